"""Model clients behind one seam; ``Clients`` builds and reuses them per endpoint."""

from __future__ import annotations

from orchestrator.models.base import ModelClient, ModelReply, ModelRequest
from orchestrator.models.registry import Clients

__all__ = ["Clients", "ModelClient", "ModelReply", "ModelRequest"]
