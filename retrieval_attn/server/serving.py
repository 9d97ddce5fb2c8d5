"""OpenAIServing: completion and chat requests -> scheduler -> OpenAI-shaped answers.

Methods return a response body (dict), an APIError (the route sends it with its status),
or an async iterator of server-sent-event lines. The checks that need the model (unknown
model, prompt over the context, bad sampling values) happen here, before the request is
queued, so a bad request never reaches the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from retrieval_attn.api import LLM
from retrieval_attn.errors import RetrievalAttnError
from retrieval_attn.sampling import SamplingParams
from retrieval_attn.server.protocol import ChatCompletionRequest, CompletionRequest
from retrieval_attn.server.scheduler import QueueFull, RequestStream, Scheduler, Sequence


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


class OpenAIServing:
    def __init__(self, llm: LLM, scheduler: Scheduler, model_name: str,
                 default_max_tokens: int = 16, on_reject: Callable[[], None] | None = None,
                 contexts: Any = None) -> None:
        self.llm, self.scheduler, self.model_name = llm, scheduler, model_name
        self.contexts = contexts  # a ContextStore (server/contexts.py), or None
        self.default_max_tokens = default_max_tokens
        self.max_context_tokens = llm.config.runtime.max_context_tokens
        self.on_reject = on_reject or (lambda: None)
        self.created = int(time.time())

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "retrieval-attn", "max_model_len": self.max_context_tokens}]}

    # ----- the two generation endpoints -----

    async def completion(self, req: CompletionRequest, request_id: str | None,
                         disconnected: Callable[[], Awaitable[None]]):
        try:
            prompt = req.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                if len(prompt) != 1:
                    raise bad_request(f"prompt is a list of {len(prompt)} strings: this server "
                                      "takes one prompt per request", "prompt")
                prompt = prompt[0]
            if req.echo:
                raise bad_request("echo is not supported", "echo")
            ids = await self._encode(prompt if isinstance(prompt, str)
                                     else {"prompt_token_ids": prompt}, "prompt", req.context)
            seq = self._submit(req, ids, request_id or f"cmpl-{uuid.uuid4().hex}")
        except APIError as e:
            self.on_reject()
            return e
        kind = "text_completion"
        if req.stream:
            return self._sse(seq, req, kind, chat=False)
        return await self._full(seq, kind, chat=False, disconnected=disconnected)

    async def chat(self, req: ChatCompletionRequest, request_id: str | None,
                   disconnected: Callable[[], Awaitable[None]]):
        try:
            try:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            except ValueError as e:
                raise bad_request(str(e), "messages") from None
            ids = await self._encode(messages, "messages", req.context)
            seq = self._submit(req, ids, request_id or f"chatcmpl-{uuid.uuid4().hex}")
        except APIError as e:
            self.on_reject()
            return e
        if req.stream:
            return self._sse(seq, req, "chat.completion.chunk", chat=True)
        return await self._full(seq, "chat.completion", chat=True, disconnected=disconnected)

    # ----- shared -----

    async def _encode(self, prompt: Any, param: str, context: str | None) -> list[int]:
        """The prompt's token ids, checked (with the shared context's before them, if any)."""
        before = self._context(context).prompt_token_ids if context is not None else []
        try:  # a long document would hold up the event loop: tokenize beside it
            ids = await asyncio.to_thread(self.llm.encode, prompt)
            self.llm.engine.check_prompt(list(before) + ids)
        except RetrievalAttnError as e:
            raise bad_request(str(e), param) from None
        return ids

    def _context(self, context_id: str):
        if self.contexts is None:
            raise APIError(404, f"the context {context_id!r} does not exist",
                           "not_found_error", "context")
        return self.contexts.get(context_id).saved

    def _submit(self, req, ids: list[int], request_id: str) -> Sequence:
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist: this server "
                           f"serves {self.model_name!r} (GET /v1/models)", "not_found_error",
                           "model")
        if req.n != 1:
            raise bad_request(f"n is {req.n}: this server returns one choice per request",
                              "n")
        try:
            params = SamplingParams(**req.sampling_kwargs(self.default_max_tokens))
        except RetrievalAttnError as e:
            raise bad_request(str(e), _param_of(str(e))) from None
        seq = Sequence(request_id, ids, params, RequestStream(asyncio.get_running_loop()),
                       self._context(req.context) if req.context is not None else None)
        try:
            self.scheduler.submit(seq)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error") from None
        return seq

    async def _full(self, seq: Sequence, kind: str, chat: bool,
                    disconnected: Callable[[], Awaitable[None]]):
        """Wait for the whole answer; a client that leaves first cancels the request."""
        text, reason = "", None
        watch = asyncio.ensure_future(disconnected())
        try:
            while True:
                got = asyncio.ensure_future(seq.stream.get())
                done, _ = await asyncio.wait({got, watch}, return_when=asyncio.FIRST_COMPLETED)
                if got not in done:
                    got.cancel()
                    self.scheduler.abort(seq)
                    return APIError(499, "the client closed the request", "cancelled")
                d = got.result()
                text += d.text
                if d.error is not None:
                    return APIError(500, d.error, "server_error")
                if d.finished:
                    reason = d.finish_reason
                    break
        except asyncio.CancelledError:
            self.scheduler.abort(seq)
            raise
        finally:
            watch.cancel()
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": seq.request_id, "object": kind, "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": _usage(seq)}

    async def _sse(self, seq: Sequence, req, kind: str, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: (chat) a role-only delta first, then text deltas, a chunk
        with finish_reason, a usage chunk if asked, and [DONE] last. A client that leaves
        closes this generator, which cancels the request."""
        created = int(time.time())

        def chunk(delta_text: str | None, reason: str | None = None, role: bool = False,
                  usage: dict | None = None) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if delta_text is not None:
                    delta["content"] = delta_text
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": delta_text or ""}
            choice |= {"logprobs": None, "finish_reason": reason}
            body = {"id": seq.request_id, "object": kind, "created": created,
                    "model": self.model_name, "choices": [] if usage else [choice]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        finished = False
        try:
            if chat:
                yield chunk("", role=True)
            while not finished:
                d = await seq.stream.get()
                if d.error is not None:
                    err = APIError(500, d.error, "server_error").body()
                    yield f"data: {json.dumps(err)}\n\n"
                    finished = True
                    break
                finished = d.finished
                if d.text:
                    yield chunk(d.text)
                if finished:
                    yield chunk(None, d.finish_reason)
            if req.stream_options is not None and req.stream_options.include_usage:
                yield chunk(None, usage=_usage(seq))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                self.scheduler.abort(seq)


def _usage(seq: Sequence) -> dict[str, int]:
    n = len(seq.prompt_ids)
    if seq.context is not None:  # the shared context's tokens are part of the prompt
        n += len(seq.context.prompt_token_ids)
    return {"prompt_tokens": n, "completion_tokens": seq.new_tokens,
            "total_tokens": n + seq.new_tokens}


def _param_of(message: str) -> str | None:
    """SamplingParams' messages start with the field's name."""
    name = message.split(" ", 1)[0]
    return name if name in SamplingParams.__dataclass_fields__ else None
