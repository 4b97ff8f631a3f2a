"""SageMaker's hosting contract: GET /ping and POST /invocations.

/invocations takes what SageMaker clients send to TGI and LMI containers:
- a TGI / LMI body {"inputs", "parameters", "stream"}: answered as TGI's list
  `[{"generated_text", "details"?}]` (one entry per prompt when `inputs` is a list), errors
  in TGI's shape;
- an OpenAI chat body {"messages", ...} or completion body {"prompt", ...}: answered exactly as
  /v1/chat/completions and /v1/completions answer (OpenAI's shapes and errors). SageMaker
  endpoints serve one model, so `model` is not checked;
- a raw prompt with `Content-Type: application/x-text` (or text/plain), default parameters.

Streaming (InvokeEndpointWithResponseStream) is SSE, or JSON lines when the Accept header
asks for application/jsonlines or application/x-ndjson. The
X-Amzn-SageMaker-Custom-Attributes request header is echoed on the response.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from . import openai, tgi
from .openai import APIError
from .schemas import ChatCompletionRequest, CompletionRequest, LMIRequest
from .tgi import TGIError

router = APIRouter()

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
_JSON_TYPES = {"", "application/json", "application/octet-stream"}
_TEXT_TYPES = {"application/x-text", "text/plain"}
_JSONLINES = ("application/jsonlines", "application/x-ndjson", "application/jsonl")


@router.get("/ping")
async def ping(http: HttpRequest) -> Response:
    """200 with an empty body once the model is loaded and the server is not draining."""
    state = http.app.state.kiln
    reason = None
    if state.load_error:
        reason = f"the model failed to load: {state.load_error}"
    elif state.engine is None:
        reason = "the model is still loading"
    elif state.draining:
        reason = "the server is shutting down"
    elif not state.engine.is_alive:
        reason = "the engine has stopped"
    if reason is not None:
        return JSONResponse(status_code=503, content={"error": reason, "error_type": "unavailable"})
    return Response(status_code=200)


@router.post("/invocations")
async def invocations(http: HttpRequest) -> Response:
    attributes = http.headers.get(CUSTOM_ATTRIBUTES)
    try:
        response = await _invoke(http)
    except (TGIError, APIError) as exc:
        if attributes is not None:
            exc.headers = {**(exc.headers or {}), CUSTOM_ATTRIBUTES: attributes}
        raise
    if attributes is not None:
        response.headers[CUSTOM_ATTRIBUTES] = attributes
    return response


def _wants_jsonlines(http: HttpRequest) -> bool:
    accept = http.headers.get("accept", "").lower()
    return any(kind in accept for kind in _JSONLINES)


async def _invoke(http: HttpRequest) -> Response:
    content_type = http.headers.get("content-type", "").split(";")[0].strip().lower()
    jsonlines = _wants_jsonlines(http)
    if content_type in _TEXT_TYPES:
        engine = tgi.engine_of(http)
        raw = await http.body()
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise tgi.invalid("the request body is not valid UTF-8 text") from None
        body = tgi.validate({"inputs": prompt, "adapters": http.headers.get(ADAPTER_HEADER)}, LMIRequest)
        return await tgi.respond(http, engine, body, as_list=True, jsonlines=jsonlines)
    if content_type not in _JSON_TYPES and not content_type.endswith("+json"):
        raise TGIError(415, f"unsupported Content-Type '{content_type}': send application/json "
                            f"(TGI / LMI or OpenAI bodies) or application/x-text (a raw prompt)",
                       "validation")
    engine = tgi.engine_of(http)
    data = await tgi.read_json(http)
    if isinstance(data, dict) and "messages" in data:
        return await _openai(http, data, ChatCompletionRequest, openai.chat_completions, jsonlines)
    if isinstance(data, dict) and "prompt" in data and "inputs" not in data:
        return await _openai(http, data, CompletionRequest, openai.completions, jsonlines)
    if not isinstance(data, dict) or "inputs" not in data:
        raise tgi.invalid("expected a JSON object with `inputs` (TGI / LMI), `messages` (OpenAI "
                          "chat completions) or `prompt` (OpenAI completions)")
    body = tgi.validate(data, LMIRequest)
    if header_adapter := http.headers.get(ADAPTER_HEADER):
        body.adapters = header_adapter
    return await tgi.respond(http, engine, body, as_list=True, jsonlines=jsonlines)


async def _openai(http: HttpRequest, data: dict[str, Any], model, handler, jsonlines: bool) -> Response:
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        from .app import _validation_message  # the app's wording of OpenAI-route 400s

        message, param = _validation_message(RequestValidationError(exc.errors()))
        raise APIError(400, message, param=param) from None
    # One model per endpoint: whatever name the client sends; an adapter comes from the header.
    body.model = http.headers.get(ADAPTER_HEADER) or None
    response = await handler(body, http)
    if jsonlines and isinstance(response, StreamingResponse):
        return StreamingResponse(_sse_to_jsonlines(response.body_iterator), media_type="application/jsonlines",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return response


async def _sse_to_jsonlines(events: AsyncIterator[str | bytes]) -> AsyncIterator[str]:
    """OpenAI's SSE chunks as JSON lines; the closing [DONE] is left out."""
    async for chunk in events:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        for line in text.splitlines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload and payload != "[DONE]":
                yield json.dumps(json.loads(payload), separators=(",", ":")) + "\n"
