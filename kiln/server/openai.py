"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..runtime.engine import AsyncEngine, DeadlineExceededError, EngineDeadError, QueueFullError, RequestStream
from ..runtime.lora import AdapterNotFoundError
from ..runtime.request import FinishReason, Request, RequestOutput, SamplingParams, TokenLogprob
from .schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

router = APIRouter()


class APIError(Exception):
    """Raised by routes; rendered as OpenAI's error JSON by the app."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers


def runtime_error_to_api(exc: Exception) -> APIError:
    """The one mapping from engine exceptions to HTTP statuses."""
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), "service_unavailable")
    if isinstance(exc, DeadlineExceededError):
        return APIError(504, str(exc), "timeout_error")
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc), "not_found_error", "model")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, "internal error", "internal_error")


def submit_all(engine: AsyncEngine, requests: list[Request]) -> list[RequestStream]:
    """Admit every request or none: a refusal closes those already admitted."""
    streams: list[RequestStream] = []
    try:
        for request in requests:
            streams.append(engine.submit(request))
    except Exception as exc:
        for stream in streams:
            stream.close()
        raise runtime_error_to_api(exc) from None
    return streams


def _engine(http: HttpRequest) -> AsyncEngine:
    engine = http.app.state.kiln.engine
    if engine is None:
        raise APIError(503, "the model is still loading", "service_unavailable")
    if not engine.is_alive:
        raise APIError(503, "the engine has stopped", "service_unavailable")
    return engine


def _check_model(engine: AsyncEngine, model: str | None) -> str:
    """The base model's name, or a loaded LoRA adapter's (vLLM's convention: adapters are
    picked through `model`)."""
    if model is None or model == engine.model_name:
        return engine.model_name
    if any(a.name == model for a in engine.list_adapters()):
        return model
    raise APIError(404, f"the model '{model}' does not exist; this server serves "
                        f"'{engine.model_name}' and the adapters listed by /v1/models", "not_found_error", "model")


def _lora_of(engine: AsyncEngine, model: str) -> str | None:
    return None if model == engine.model_name else model


def _make_requests(engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams,
                   n: int, prefix: str, lora_name: str | None = None) -> list[Request]:
    """One engine request per (prompt, choice); seeded choices get distinct seeds."""
    requests = []
    for ids in prompts:
        for i in range(n):
            p = params if n == 1 else dataclasses.replace(
                params, seed=None if params.seed is None else params.seed + i, stop=list(params.stop)
            )
            try:
                engine.check_request(ids, p)
            except ValueError as exc:
                raise APIError(400, str(exc), param="prompt") from None
            requests.append(Request(f"{prefix}-{len(requests)}", ids, p, lora_name=lora_name))
    return requests


def _sampling_params(body, max_tokens: int, logprobs: int | None) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, logprobs)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


async def merged(streams: list[RequestStream], metrics) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (index, delta). Leaving early, or an error in
    one, closes (aborts) every stream still running. Engine errors become APIError."""
    try:
        if len(streams) == 1:
            async for out in metrics.observe(streams[0].request.arrival_time, streams[0], streams[0].request.lora_name):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for out in metrics.observe(stream.request.arrival_time, stream, stream.request.lora_name):
                    await queue.put((index, out))
            except Exception as exc:  # surfaced to the consumer
                await queue.put((index, exc))

        tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
        remaining = len(streams)
        try:
            while remaining:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    remaining -= 1
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    except APIError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise runtime_error_to_api(exc) from None
    finally:
        for stream in streams:
            stream.close()


async def _until_disconnect(http: HttpRequest, coro):
    """Run a non-streaming generation, cancelling it (and so aborting its requests) if the
    client goes away first."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await http.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "client disconnected", "client_closed_request")


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def _stream_response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _finish(out: RequestOutput) -> str | None:
    if not out.finished or out.finish_reason is None:
        return None
    return out.finish_reason.value


def _raise_if_error(out: RequestOutput) -> None:
    if out.finish_reason is FinishReason.ERROR:
        raise APIError(500, out.error or "internal error", "internal_error")


# -- /v1/models -----------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(http: HttpRequest) -> ModelList:
    engine = _engine(http)
    started = http.app.state.kiln.started
    cards = [ModelCard(id=engine.model_name, created=started, max_model_len=engine.max_model_len,
                       root=str(engine.engine.model_path))]
    cards += [ModelCard(id=a.name, created=int(a.loaded_at), max_model_len=engine.max_model_len,
                        root=str(a.path), parent=engine.model_name) for a in engine.list_adapters()]
    return ModelList(data=cards)


# -- /v1/completions ------------------------------------------------------------------


class _CompletionLogprobs:
    """Accumulates the legacy completions `logprobs` object of one choice."""

    def __init__(self, engine: AsyncEngine, text_offset: int) -> None:
        self.engine = engine
        self.offset = text_offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top: list[dict[str, float]] = []
        self.text_offset: list[int] = []

    def add(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        decode = self.engine.tokenizer.decode
        start = len(self.tokens)
        for lp in logprobs:
            token = decode([lp.token_id], skip_special_tokens=False)
            self.tokens.append(token)
            self.token_logprobs.append(lp.logprob)
            self.top.append({decode([t], skip_special_tokens=False): v for t, v in lp.top})
            self.text_offset.append(self.offset)
            self.offset += len(token)
        return self.as_dict(start)

    def as_dict(self, start: int = 0) -> dict[str, Any]:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top[start:],
            "text_offset": self.text_offset[start:],
        }


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: HttpRequest):
    engine = _engine(http)
    model = _check_model(engine, body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    tok = engine.tokenizer
    prompt_texts: list[str] = []
    prompt_ids: list[list[int]] = []
    for p in body.prompts():
        if isinstance(p, str):
            prompt_texts.append(p)
            prompt_ids.append(tok.encode(p))
        else:
            if not p:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if any(not 0 <= t < engine.vocab_size for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {engine.vocab_size})", param="prompt")
            prompt_ids.append(list(p))
            prompt_texts.append(tok.decode(list(p), skip_special_tokens=False))
    if not all(prompt_ids):
        raise APIError(400, "prompt must not be empty", param="prompt")
    longest = max(len(ids) for ids in prompt_ids)
    max_tokens = body.max_tokens if body.max_tokens is not None else max(engine.max_model_len - longest, 1)
    params = _sampling_params(body, max_tokens, body.logprobs)
    rid = f"cmpl-{uuid.uuid4().hex}"
    requests = _make_requests(engine, prompt_ids, params, body.n, rid, _lora_of(engine, model))
    streams = submit_all(engine, requests)
    metrics = http.app.state.kiln.metrics
    created = int(time.time())
    n_prompt = sum(len(ids) for ids in prompt_ids) * body.n

    def echo(index: int) -> str:
        return prompt_texts[index // body.n] if body.echo else ""

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            lps = {i: _CompletionLogprobs(engine, len(echo(i))) for i in range(len(requests))}
            generated = 0
            started: set[int] = set()
            try:
                async for index, out in merged(streams, metrics):
                    _raise_if_error(out)
                    generated += len(out.new_token_ids)
                    text = out.new_text
                    if index not in started:
                        started.add(index)
                        text = echo(index) + text
                    choice = {
                        "index": index, "text": text,
                        "logprobs": lps[index].add(out.new_logprobs) if out.new_logprobs is not None else None,
                        "finish_reason": _finish(out),
                    }
                    if out.finished:
                        choice["stop_reason"] = out.stop_reason
                    yield _sse({"id": rid, "object": "text_completion", "created": created,
                                "model": model, "choices": [choice]})
                if include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                                "choices": [], "usage": _usage(n_prompt, generated)})
            except APIError as exc:
                yield _sse({"error": {"message": exc.message, "type": exc.type, "code": exc.status}})
            yield _sse("[DONE]")

        return _stream_response(events())

    async def collect() -> dict[str, Any]:
        texts = [echo(i) for i in range(len(requests))]
        lps = [_CompletionLogprobs(engine, len(texts[i])) for i in range(len(requests))]
        finals: dict[int, RequestOutput] = {}
        generated = 0
        async for index, out in merged(streams, metrics):
            _raise_if_error(out)
            texts[index] += out.new_text
            generated += len(out.new_token_ids)
            if out.new_logprobs is not None:
                lps[index].add(out.new_logprobs)
            if out.finished:
                finals[index] = out
        choices = [
            {"index": i, "text": texts[i],
             "logprobs": lps[i].as_dict() if params.logprobs is not None else None,
             "finish_reason": _finish(finals[i]), "stop_reason": finals[i].stop_reason}
            for i in range(len(requests))
        ]
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": _usage(n_prompt, generated)}

    return JSONResponse(await _until_disconnect(http, collect()))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- /v1/chat/completions -------------------------------------------------------------


def _chat_logprobs(engine: AsyncEngine, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    decode = engine.tokenizer.decode

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in logprobs
    ]


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
    engine = _engine(http)
    model = _check_model(engine, body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    try:
        prompt_ids = engine.tokenizer.encode_chat([m.as_template_input() for m in body.messages])
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    except Exception as exc:  # a template that rejects this conversation (e.g. role order)
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = max(engine.max_model_len - len(prompt_ids), 1)
    params = _sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    requests = _make_requests(engine, [prompt_ids], params, body.n, rid, _lora_of(engine, model))
    streams = submit_all(engine, requests)
    metrics = http.app.state.kiln.metrics
    created = int(time.time())
    n_prompt = len(prompt_ids) * body.n

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                         "model": model, "choices": choices, **extra})

        async def events() -> AsyncIterator[str]:
            generated = 0
            try:
                for i in range(len(requests)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
                async for index, out in merged(streams, metrics):
                    _raise_if_error(out)
                    generated += len(out.new_token_ids)
                    choice: dict[str, Any] = {
                        "index": index,
                        "delta": {"content": out.new_text} if out.new_text or not out.finished else {},
                        "logprobs": ({"content": _chat_logprobs(engine, out.new_logprobs)}
                                     if out.new_logprobs is not None else None),
                        "finish_reason": _finish(out),
                    }
                    if out.finished:
                        choice["stop_reason"] = out.stop_reason
                    yield chunk([choice])
                if include_usage:
                    yield chunk([], usage=_usage(n_prompt, generated))
            except APIError as exc:
                yield _sse({"error": {"message": exc.message, "type": exc.type, "code": exc.status}})
            yield _sse("[DONE]")

        return _stream_response(events())

    async def collect() -> dict[str, Any]:
        texts = [""] * len(requests)
        lps: list[list[dict[str, Any]]] = [[] for _ in requests]
        finals: dict[int, RequestOutput] = {}
        generated = 0
        async for index, out in merged(streams, metrics):
            _raise_if_error(out)
            texts[index] += out.new_text
            generated += len(out.new_token_ids)
            if out.new_logprobs is not None:
                lps[index].extend(_chat_logprobs(engine, out.new_logprobs))
            if out.finished:
                finals[index] = out
        choices = [
            {"index": i, "message": {"role": "assistant", "content": texts[i]},
             "logprobs": {"content": lps[i]} if params.logprobs is not None else None,
             "finish_reason": _finish(finals[i]), "stop_reason": finals[i].stop_reason}
            for i in range(len(requests))
        ]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": _usage(n_prompt, generated)}

    return JSONResponse(await _until_disconnect(http, collect()))
