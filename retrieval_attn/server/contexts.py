"""Shared contexts: a document prefilled once (or a saved context loaded), named by id in
many requests, each of which decodes its own prompt on top.

A prefilled document is saved (LLM.save_context) in a folder the server owns and deleted
with the context; a loaded one stays where it is. The engine serves one sequence at a
time, so each request loads the context's KV state again before its own tokens: one
prefill, but a load per request.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval_attn.api import LLM
from retrieval_attn.context import SavedContext
from retrieval_attn.errors import RetrievalAttnError
from retrieval_attn.server.protocol import ContextRequest
from retrieval_attn.server.scheduler import Scheduler
from retrieval_attn.server.serving import APIError, bad_request


@dataclass
class SharedContext:
    id: str
    saved: SavedContext
    created: int
    owned: bool  # the server prefilled it into its own folder (deleted with it)

    def card(self) -> dict[str, Any]:
        return {"id": self.id, "object": "context", "created": self.created,
                "prompt_tokens": len(self.saved.prompt_token_ids)}


class ContextStore:
    def __init__(self, llm: LLM, scheduler: Scheduler) -> None:
        self.llm, self.scheduler = llm, scheduler
        self.contexts: dict[str, SharedContext] = {}
        self._root: Path | None = None

    def get(self, context_id: str) -> SharedContext:
        try:
            return self.contexts[context_id]
        except KeyError:
            raise APIError(404, f"the context {context_id!r} does not exist (GET "
                           "/v1/contexts lists them)", "not_found_error", "context") from None

    async def create(self, req: ContextRequest) -> dict[str, Any] | APIError:
        if (req.prompt is None) == (req.path is None):
            return bad_request("give a document to prefill as prompt (text or token ids), or "
                               "the folder of a saved context as path, not both", "prompt")
        cid, owned = f"ctx-{uuid.uuid4().hex}", req.path is None
        try:
            if req.path is not None:
                saved = await asyncio.to_thread(self.llm.load_context, req.path)
            else:
                prompt = req.prompt if isinstance(req.prompt, str) \
                    else {"prompt_token_ids": req.prompt}
                ids = await asyncio.to_thread(self.llm.encode, prompt)
                self.llm.engine.check_prompt(ids)
                folder = self._folder() / cid
                run = self.scheduler.call(lambda: self.llm.save_context(
                    {"prompt_token_ids": ids}, folder))
                await asyncio.wrap_future(run)
                saved = await asyncio.to_thread(self.llm.load_context, folder)
        except RetrievalAttnError as e:
            return bad_request(str(e), "path" if req.path is not None else "prompt")
        ctx = SharedContext(cid, saved, int(time.time()), owned)
        self.contexts[cid] = ctx
        return ctx.card()

    def list(self) -> dict[str, Any]:
        return {"object": "list", "data": [c.card() for c in self.contexts.values()]}

    def delete(self, context_id: str) -> dict[str, Any]:
        ctx = self.get(context_id)
        del self.contexts[context_id]
        if ctx.owned:
            shutil.rmtree(ctx.saved.path, ignore_errors=True)
        return {"id": context_id, "object": "context.deleted", "deleted": True}

    def close(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def _folder(self) -> Path:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="retrieval-attn-contexts-"))
        return self._root
