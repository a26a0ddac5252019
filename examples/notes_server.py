"""A small MCP server over stdio, built with the official ``mcp`` package: a folder
of text notes that a model may list and read. Run as ``python -m examples.notes_server``;
``NOTES_DIR`` names the folder (default: ``examples/notes``)."""

from __future__ import annotations

import os
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("notes")


def _folder() -> Path:
    return Path(os.environ.get("NOTES_DIR", Path(__file__).parent / "notes"))


@server.tool()
def list_notes() -> list[str]:
    """The names of the notes, in order."""
    return sorted(path.stem for path in _folder().glob("*.txt"))


@server.tool()
def read_note(name: str) -> str:
    """The text of the note called ``name`` (as list_notes gives it)."""
    path = _folder() / f"{name}.txt"
    if "/" in name or not path.is_file():
        raise ToolError(f"no note called {name!r}; list_notes gives their names")
    return path.read_text()


if __name__ == "__main__":
    server.run()
