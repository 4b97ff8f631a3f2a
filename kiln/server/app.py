"""App factory and lifecycle: the engine loads in the background while the port is already
open (so /health can say 503 "loading"), errors render as OpenAI's error JSON."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ServerConfig
from ..runtime.engine import AsyncEngine, Engine
from . import admin, openai, sagemaker, tgi
from .metrics import ServerMetrics
from .openai import APIError
from .schemas import ChatCompletionRequest, CompletionRequest, LMIRequest, TGIRequest
from .tgi import TGIError

log = logging.getLogger("kiln.server")


@dataclass
class ServerState:
    engine: AsyncEngine | None = None
    load_error: str | None = None
    draining: bool = False
    on_drain: list = field(default_factory=list)  # callbacks run when draining starts (gRPC)
    started: int = field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics = None  # type: ignore[assignment]


def _error(status: int, message: str, type_: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": status}},
        headers=headers,
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc, tags = _split_loc(first.get("loc", ()))
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        if param is None:
            return "the request body is missing; send a JSON object", None
        msg = "field required"
    if tags:
        # A union field (e.g. `prompt`): pydantic reports one error per accepted type and
        # tags each location with the type; name the field itself and list what it accepts.
        accepted = []
        for err in errors:
            err_loc, err_tags = _split_loc(err.get("loc", ()))
            if err_loc == loc and err_tags and err_tags[0] not in accepted:
                accepted.append(err_tags[0])
        msg = f"{msg} (accepted: {', '.join(accepted)})"
    return (f"{param}: {msg}" if param else msg), param


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _split_loc(raw) -> tuple[list[str], list[str]]:
    """Split a pydantic error location into the field path and the union-member tags
    pydantic inserts into it (`str`, `list[int]`, `function-after[...]`)."""
    loc: list[str] = []
    tags: list[str] = []
    for part in raw:
        if part == "body" and not loc:
            continue
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part):
            tags.append(part)
            continue
        if not tags:
            loc.append(str(part))
    return loc, tags


def create_app(state: ServerState | None = None, config: ServerConfig | None = None) -> FastAPI:
    """With a config whose grpc_port is not 0, the gRPC server runs in the same event loop:
    started at startup, stopped (with a short grace) at shutdown."""
    state = state or ServerState()
    state.metrics = ServerMetrics(lambda: state.engine.stats() if state.engine else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        grpc_server = None
        if config is not None and config.grpc_port:
            from .grpc import GrpcServer

            grpc_server = GrpcServer(state, config)
            await grpc_server.start()
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=5.0)
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="kiln", version="0.1.0", lifespan=lifespan,
                  description="LLM inference server with an OpenAI-compatible API.")
    app.state.kiln = state
    app.include_router(openai.router)
    app.include_router(tgi.router)
    app.include_router(sagemaker.router)
    app.include_router(admin.router)

    @app.exception_handler(APIError)
    async def _api_error(_: HttpRequest, exc: APIError) -> JSONResponse:
        state.metrics.http_errors.labels(str(exc.status)).inc()
        return _error(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(TGIError)
    async def _tgi_error(_: HttpRequest, exc: TGIError) -> JSONResponse:
        # TGI and SageMaker (TGI-body) routes answer in TGI's shape: {"error", "error_type"}.
        state.metrics.http_errors.labels(str(exc.status)).inc()
        return tgi.error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        state.metrics.http_errors.labels("400").inc()
        message, param = _validation_message(exc)
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        state.metrics.http_errors.labels(str(exc.status_code)).inc()
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _internal(_: HttpRequest, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        state.metrics.http_errors.labels("500").inc()
        return _error(500, "internal server error", "internal_error")

    @app.get("/health")
    async def health() -> Response:
        if state.load_error:
            return _error(503, f"the model failed to load: {state.load_error}", "service_unavailable")
        if state.engine is None:
            return _error(503, "the model is still loading", "service_unavailable")
        if state.draining:
            return _error(503, "the server is shutting down", "service_unavailable")
        if state.engine.fatal_error:
            return _error(503, f"the engine failed: {state.engine.fatal_error}", "service_unavailable")
        if not state.engine.is_alive:
            return _error(503, "the engine has stopped", "service_unavailable")
        return JSONResponse({"status": "ok", "model": state.engine.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = _document_manual_routes(schema)
        return app.openapi_schema

    app.openapi = openapi
    return app


def _document_manual_routes(schema: dict[str, Any]) -> dict[str, Any]:
    """The TGI and SageMaker routes parse their bodies themselves (to answer in TGI's error
    shape and to accept several content types), so FastAPI cannot see their bodies: describe
    them here, so that clients and schema-driven fuzzers see the real contract."""
    _, top = models_json_schema(
        [(model, "validation") for model in (TGIRequest, LMIRequest, CompletionRequest, ChatCompletionRequest)],
        ref_template="#/components/schemas/{model}",
    )
    schema.setdefault("components", {}).setdefault("schemas", {}).update(top["$defs"])

    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    paths = schema["paths"]
    for path in ("/generate", "/generate_stream", "/", "/tokenize"):
        paths[path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": ref("TGIRequest")}}}
    paths["/invocations"]["post"]["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"anyOf": [ref("LMIRequest"), ref("ChatCompletionRequest"),
                                                  ref("CompletionRequest")]}},
        "application/x-text": {"schema": {"type": "string", "minLength": 1}},
    }}
    paths["/ping"]["get"]["responses"] = {
        "200": {"description": "The model is loaded and the server is not draining (empty body)."},
        "503": {"description": "Loading, draining or failed ({\"error\", \"error_type\"}).",
                "content": {"application/json": {"schema": {"type": "object"}}}},
    }
    return schema


def load_engine_in_background(state: ServerState, config: ServerConfig,
                              on_failure: Callable[[], None]) -> threading.Thread:
    def load() -> None:
        try:
            state.engine = AsyncEngine(Engine(config.engine), config.max_concurrent_requests,
                                       config.request_timeout)
            log.info("serving %s", state.engine.model_name)
        except Exception as exc:
            log.exception("the model failed to load")
            state.load_error = str(exc)
            on_failure()

    thread = threading.Thread(target=load, name="kiln-load", daemon=True)
    thread.start()
    return thread


# -- HTTP edge: API key and body size, as plain ASGI middleware (streaming-safe) ----------

_OPEN_PATHS = frozenset({"/ping", "/health"})


class EdgeMiddleware:
    """Refuses oversized bodies (413) and, when an API key is set, requests without it (401).
    The key is compared in constant time; /ping and /health stay open."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope.get("path") not in _OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key):
                return await _error(401, "missing or invalid API key (Authorization: Bearer KEY)",
                                    "authentication_error")(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _error(413, f"the request body is larger than {self.max_body_bytes} bytes",
                                "invalid_request_error")(scope, receive, send)
        received = 0
        limit = self.max_body_bytes

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _error(413, f"the request body is larger than {limit} bytes",
                         "invalid_request_error")(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


# -- the process: HTTP (and gRPC) servers, background load, drain on SIGTERM ------------


class _Server(uvicorn.Server):
    """uvicorn, with SIGTERM meaning "drain": stop admitting, let in-flight requests finish
    within the grace period (health turns 503 meanwhile), then exit 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace: float) -> None:
        super().__init__(config)
        self.kiln_state = state
        self.grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.kiln_state.draining and self._loop is not None:
            self.kiln_state.draining = True
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))
            return
        super().handle_exit(sig, frame)

    async def _drain(self) -> None:
        state = self.kiln_state
        log.info("SIGTERM: draining (grace %.0f s)", self.grace)
        if state.engine is not None:
            state.engine.stop_accepting()
        for hook in state.on_drain:
            hook()
        deadline = time.monotonic() + self.grace
        while state.engine is not None and state.engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = state.engine.num_in_flight if state.engine is not None else 0
        log.info("drained (%d requests still in flight); exiting", left)
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the caught signal after shutting down, which turns a clean drain
        # into exit status 143; kiln exits 0 instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run_server(config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT. Returns the process exit status."""
    state = ServerState()
    app = create_app(state, config)
    asgi = EdgeMiddleware(app, config.api_key, config.max_body_bytes)
    server = _Server(
        uvicorn.Config(asgi, host=config.host, port=config.port, log_level=config.log_level,
                       timeout_graceful_shutdown=5),
        state, config.shutdown_grace,
    )
    load_engine_in_background(state, config, lambda: setattr(server, "should_exit", True))
    fatal: list[str] = []
    threading.Thread(target=_exit_on_engine_failure, args=(state, server, fatal), name="kiln-engine-watch",
                     daemon=True).start()
    server.run()
    if state.engine is not None:
        state.engine.shutdown()
    if state.load_error:
        print(f"kiln: the model failed to load: {state.load_error}", file=sys.stderr)
        return 1
    if fatal:
        print(f"kiln: the engine failed: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


# Seconds a failed engine's server gets to close its connections before the process exits.
FATAL_EXIT_GRACE_S = 20.0


def _exit_on_engine_failure(state: ServerState, server: uvicorn.Server, fatal: list[str]) -> None:
    """An engine that can no longer run (a tensor-parallel worker died) stops the server:
    /health is 503 at once, the process exits non-zero, within FATAL_EXIT_GRACE_S even if
    something hangs on the way out."""
    while not server.should_exit:
        engine = state.engine
        error = engine.fatal_error if engine is not None else None
        if error:
            fatal.append(error)
            log.error("the engine failed (%s); exiting", error)
            server.should_exit = True

            def force() -> None:
                print(f"kiln: the engine failed: {error} (forced exit)", file=sys.stderr, flush=True)
                os._exit(1)

            timer = threading.Timer(FATAL_EXIT_GRACE_S, force)
            timer.daemon = True
            timer.start()
            return
        time.sleep(0.2)
