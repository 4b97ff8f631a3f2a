"""App factory and lifecycle: the engine loads in the background while the port is already
open (so /health can say 503 "loading"), errors render as OpenAI's error JSON."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import EngineConfig
from ..runtime.engine import AsyncEngine, Engine
from . import openai
from .metrics import ServerMetrics
from .openai import APIError

log = logging.getLogger("kiln.server")


@dataclass
class ServerState:
    engine: AsyncEngine | None = None
    load_error: str | None = None
    started: int = field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics = None  # type: ignore[assignment]


def _error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": status}},
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


def create_app(state: ServerState | None = None) -> FastAPI:
    state = state or ServerState()
    state.metrics = ServerMetrics(lambda: state.engine.stats() if state.engine else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="kiln", version="0.1.0", lifespan=lifespan,
                  description="LLM inference server with an OpenAI-compatible API.")
    app.state.kiln = state
    app.include_router(openai.router)

    @app.exception_handler(APIError)
    async def _api_error(_: HttpRequest, exc: APIError) -> JSONResponse:
        state.metrics.http_errors.labels(str(exc.status)).inc()
        return _error(exc.status, exc.message, exc.type, exc.param)

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
        if not state.engine.is_alive:
            return _error(503, "the engine has stopped", "service_unavailable")
        return JSONResponse({"status": "ok", "model": state.engine.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def load_engine_in_background(state: ServerState, config: EngineConfig,
                              on_failure: Callable[[], None]) -> threading.Thread:
    def load() -> None:
        try:
            state.engine = AsyncEngine(Engine(config))
            log.info("serving %s", state.engine.model_name)
        except Exception as exc:
            log.exception("the model failed to load")
            state.load_error = str(exc)
            on_failure()

    thread = threading.Thread(target=load, name="kiln-load", daemon=True)
    thread.start()
    return thread
