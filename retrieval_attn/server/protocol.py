"""OpenAI-shaped request bodies and the error body (pydantic; no torch here).

Fields follow OpenAI's order. Types are strict where a silent coercion would change the
request (a max_tokens of "8" or 2.5 is refused, not read as 8 or 2); the value checks
(max_tokens >= 1, finite temperature, ...) are SamplingParams', so the server and the
Python API refuse the same requests with the same messages.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class ErrorInfo(BaseModel):
    message: str
    type: str  # "invalid_request_error", "not_found_error", "rate_limit_error", ...
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    # unknown fields are ignored, as OpenAI's own server and vLLM's do (clients send extras)
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None  # None: the one model this server holds
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    top_k: StrictInt | None = None  # not OpenAI's; vLLM's (send it through extra_body)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    ignore_eos: StrictBool | None = None  # vLLM's: decode past end of text (benchmarks)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    # a shared context (POST /v1/contexts) this request continues; extra_body={"context": id}
    context: StrictStr | None = None

    def sampling_kwargs(self, default_max_tokens: int) -> dict[str, Any]:
        """Keyword arguments of SamplingParams: the fields the client set; the server's
        default max_tokens where it left that out."""
        out: dict[str, Any] = {"max_tokens": self.max_tokens if self.max_tokens is not None
                               else default_max_tokens}
        for name in ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    echo: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    # a string, or OpenAI's list of parts of which only {"type": "text"} ones are read
    content: StrictStr | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"a message part of type {part.get('type')!r}: this server "
                                 "reads text parts only ({'type': 'text', 'text': ...})")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's newer name for max_tokens; either may be given
    max_completion_tokens: StrictInt | None = None

    def sampling_kwargs(self, default_max_tokens: int) -> dict[str, Any]:
        out = super().sampling_kwargs(default_max_tokens)
        if self.max_tokens is None and self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        return out


class ContextRequest(BaseModel):
    """POST /v1/contexts: a document to prefill once (text, or token ids), or the folder
    of a context saved with LLM.save_context / `retrieval-attn save-context`."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    prompt: StrictStr | list[StrictInt] | None = None
    path: StrictStr | None = None
