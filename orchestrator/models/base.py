"""The model seam: one async method, ``complete``, for every backend.

A client knows its protocol (Ollama, llama.cpp, litellm). Where it runs and with
which key is the tier configuration's business, handed to the constructor.
Clients translate their library's errors into ``ModelUnavailable``,
``ModelTimeout`` or ``ModelCallError`` at this boundary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelRequest:
    model: str  # the name after the provider prefix: ``llama3.2:1b`` for ``ollama/llama3.2:1b``
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    timeout_s: float
    json_schema: dict[str, Any] | None = None
    stream: bool = False  # ask for the answer as a stream, and assemble it


@dataclass(frozen=True)
class ModelReply:
    text: str
    prompt_tokens: int
    completion_tokens: int


def prompt_tokens_upper_bound(messages: list[dict[str, str]]) -> int:
    """At least the prompt's real token count: a byte-level BPE token holds at
    least one byte, plus a chat template's tokens around each message."""
    return sum(len(m["content"].encode()) + 16 for m in messages)


class ModelClient(ABC):
    @abstractmethod
    async def complete(self, request: ModelRequest) -> ModelReply:
        """Answer one chat request, or raise a ``ModelError``. Usage is what the backend reported."""

    async def aclose(self) -> None:  # noqa: B027 - most clients hold nothing to close
        """Release connections. Called once, inside the event loop that used the client."""
