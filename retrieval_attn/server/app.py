"""The HTTP layer: routes -> OpenAIServing -> Scheduler -> the engine's worker thread.

A route parses its body into a protocol model, calls the serving object and sends what it
returns: a JSON body, an APIError with its own status, or a text/event-stream. One error
shape everywhere, {"error": {message, type, param, code}}; a bug answers 500 with no
exception text (the traceback goes to the server's log).
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import make_asgi_app
from starlette.exceptions import HTTPException
from starlette.routing import Mount

from retrieval_attn.api import LLM
from retrieval_attn.server.contexts import ContextStore
from retrieval_attn.server.executor import LLMExecutor
from retrieval_attn.server.metrics import Metrics
from retrieval_attn.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ContextRequest,
)
from retrieval_attn.server.scheduler import Executor, Scheduler
from retrieval_attn.server.serving import APIError, OpenAIServing

LOG = logging.getLogger("retrieval_attn.server")


def build_app(llm: LLM, model_name: str, max_waiting: int = 64,
              default_max_tokens: int = 16, executor: Executor | None = None) -> FastAPI:
    """The server's ASGI app over a loaded LLM; its engine worker starts with the app's
    lifespan (uvicorn) and stops with it. executor: what runs the sequences (default
    LLMExecutor(llm); tests pass a fake)."""
    scheduler: Scheduler
    metrics = Metrics(lambda: scheduler.num_running, lambda: scheduler.num_waiting,
                      lambda: _kv_bytes(llm))
    scheduler = Scheduler(executor or LLMExecutor(llm), max_waiting, metrics)
    contexts = ContextStore(llm, scheduler)
    serving = OpenAIServing(llm, scheduler, model_name, default_max_tokens, metrics.rejected,
                            contexts)

    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()
        contexts.close()

    app = FastAPI(title="retrieval-attn", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics  # for tests and tools

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return _send(await serving.completion(req, _request_id(request),
                                              _disconnect_watch(request)))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        return _send(await serving.chat(req, _request_id(request),
                                        _disconnect_watch(request)))

    @app.post("/v1/contexts")
    async def create_context(req: ContextRequest):
        return _send(await contexts.create(req))

    @app.get("/v1/contexts")
    async def list_contexts():
        return contexts.list()

    @app.delete("/v1/contexts/{context_id}")
    async def delete_context(context_id: str):
        try:
            return contexts.delete(context_id)
        except APIError as e:
            return _error(e)

    @app.get("/v1/models")
    async def models():
        return serving.models()

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return _error(APIError(503, "the engine worker has stopped (see the server log)",
                                   "server_error"))
        return {"status": "ok"}

    metrics_app = Mount("/metrics", make_asgi_app(registry=metrics.registry))
    metrics_app.path_regex = re.compile("^/metrics(?P<path>.*)$")  # /metrics, no redirect
    app.router.routes.append(metrics_app)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        metrics.rejected()
        return _error(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        LOG.exception("unhandled error answering %s %s", request.method, request.url.path)
        return _error(APIError(500, "internal server error (details are in the server's "
                               "log)", "server_error"))

    return app


def _send(result: Any):
    if isinstance(result, APIError):
        return _error(result)
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    parts, param = [], None
    for err in errors[:5]:
        if err.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {err.get('msg')} at character "
                            f"{err.get('loc', ('', '?'))[-1]}", "invalid_request_error")
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return APIError(400, "; ".join(parts) or "invalid request body", "invalid_request_error",
                    param)


def _request_id(request: Request) -> str | None:
    rid = request.headers.get("x-request-id")
    return rid if rid and len(rid) <= 128 else None


def _disconnect_watch(request: Request):
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return watch


def _kv_bytes(llm: LLM) -> dict[str, int]:
    try:  # read from the metrics thread while the worker may be changing the policy
        return llm.engine.kv.memory_bytes()
    except Exception:  # noqa: BLE001 - a scrape must not fail over one gauge
        return {}


def model_name_of(llm: LLM) -> str:
    """The name clients send as `model`: the checkpoint's file or folder name."""
    name = str(llm.loaded.source).rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".gguf")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads (a taken port fails at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                    timeout_s: float = 30.0) -> Iterator[str]:
    """A real uvicorn server for app on a background thread (port 0: a free one), for
    tests and benchmarks in one process; yields its base URL and stops it on exit."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


def serve(model: str | None, config: str, host: str, port: int, max_waiting: int,
          model_name: str | None = None) -> int:
    """retrieval-attn serve: bind, load the model, answer until interrupted."""
    import uvicorn

    from retrieval_attn.errors import ConfigError

    try:
        sock = bind(host, port)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; pick another "
                          "--port or --host") from None
    LOG.info("listening on http://%s:%d; loading the model", host, sock.getsockname()[1])
    llm = LLM(model=model, config=config)
    name = model_name or model_name_of(llm)
    app = build_app(llm, name, max_waiting)
    LOG.info("serving %s (max_context_tokens %d) on http://%s:%d/v1", name,
             llm.config.runtime.max_context_tokens, host, sock.getsockname()[1])
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0
