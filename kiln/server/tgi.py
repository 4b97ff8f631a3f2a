"""Text Generation Inference (TGI) compatible routes: POST /generate, /generate_stream,
/tokenize, / (TGI's compat route, the one TGI's own Python client calls) and GET /info.

Errors are TGI's `{"error", "error_type"}` with TGI's statuses (422 validation, 424
generation, 429 overloaded, 503 unavailable), never OpenAI's error JSON: routes raise
TGIError, which the app renders with `error_response`. Bodies are parsed here, not by
FastAPI, so that a bad body is a TGI 422 rather than the app's OpenAI-shaped 400.

The same building blocks serve SageMaker's /invocations for TGI and LMI bodies.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from .. import __version__
from ..runtime.engine import AsyncEngine
from ..runtime.request import FinishReason, Request, RequestOutput, TokenLogprob
from .openai import APIError, _until_disconnect, merged, submit_all
from .schemas import (
    MAX_STOP_STRINGS,
    TGI_DEFAULT_MAX_NEW_TOKENS,
    TGI_MAX_TOP_N_TOKENS,
    TGIParameters,
    TGIRequest,
    tgi_validation_message,
)

router = APIRouter()


class TGIError(Exception):
    """Raised by TGI-style routes; rendered as TGI's error JSON by the app."""

    def __init__(self, status: int, message: str, error_type: str = "validation",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers = status, message, error_type, headers


def error_response(exc: TGIError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"error": exc.message, "error_type": exc.error_type},
                        headers=exc.headers)


def invalid(message: str) -> TGIError:
    return TGIError(422, f"Input validation error: {message}", "validation")


def from_api_error(exc: APIError) -> TGIError:
    """Re-state an engine-side error (as openai.runtime_error_to_api words it) in TGI's terms."""
    if exc.status == 404:  # an adapter unloaded since the request was checked
        return TGIError(404, exc.message, "not_found")
    if exc.status == 400:
        return invalid(exc.message)
    if exc.status == 429:
        return TGIError(429, exc.message, "overloaded", exc.headers or {"Retry-After": "1"})
    if exc.status == 503:
        return TGIError(503, exc.message, "unavailable", exc.headers)
    if exc.status == 504:
        return TGIError(504, exc.message, "timeout")
    if exc.status == 499:
        return TGIError(499, exc.message, "client_closed_request")
    return TGIError(424, exc.message, "generation")


def engine_of(http: HttpRequest) -> AsyncEngine:
    engine = http.app.state.kiln.engine
    if engine is None:
        raise TGIError(503, "the model is still loading", "unavailable")
    if not engine.is_alive:
        raise TGIError(503, "the engine has stopped", "unavailable")
    return engine


async def read_json(http: HttpRequest) -> Any:
    raw = await http.body()
    if not raw.strip():
        raise invalid("the request body is empty; send a JSON object such as "
                      '{"inputs": "...", "parameters": {"max_new_tokens": 20}}')
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("the request body is not valid JSON") from None


def validate(data: Any, model: type[BaseModel] = TGIRequest) -> Any:
    """Validate a parsed JSON body; a bad one is TGI's 422."""
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object with `inputs`")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise TGIError(422, tgi_validation_message(exc), "validation") from None


# -- translation into runtime requests --------------------------------------------------


@dataclass
class Job:
    """One prompt of a TGI-style request, ready to submit."""

    request: Request
    prompt: str
    params: TGIParameters
    seed: int | None  # the seed used when sampling (reported in details), else None


def max_input_tokens(engine: AsyncEngine) -> int:
    limit = engine.engine.config.max_input_tokens
    longest = engine.max_model_len - 1
    return min(limit, longest) if limit else longest


def prepare(engine: AsyncEngine, body: TGIRequest) -> list[Job]:
    """Tokenize, truncate and check every prompt of `body`; raises TGIError(422)."""
    p = body.params
    try:
        adapters = [None if a == engine.model_name else a for a in body.adapter_ids()]
    except ValueError as exc:
        raise invalid(str(exc)) from None
    loaded = {a.name for a in engine.list_adapters()}
    for adapter in adapters:
        if adapter is not None and adapter not in loaded:
            raise TGIError(404, f"adapter '{adapter}' is not loaded (loaded: "
                                f"{', '.join(sorted(loaded)) or 'none'})", "not_found")
    limit = max_input_tokens(engine)
    total = engine.max_model_len
    rid = f"tgi-{uuid.uuid4().hex}"
    jobs = []
    for i, prompt in enumerate(body.prompts()):
        ids = engine.tokenizer.encode(prompt)
        if p.truncate is not None:
            if p.truncate > limit:
                raise invalid(f"`truncate` must be strictly positive and less than {limit + 1}. "
                              f"Given: {p.truncate}")
            ids = ids[-p.truncate:]
        if not ids:
            raise invalid("`inputs` cannot be empty")
        if len(ids) > limit:
            raise invalid(f"`inputs` must have less than {limit + 1} tokens. Given: {len(ids)}")
        if p.max_new_tokens is None:
            max_new = max(1, min(TGI_DEFAULT_MAX_NEW_TOKENS, total - len(ids)))
        else:
            max_new = p.max_new_tokens
            if len(ids) + max_new > total:
                raise invalid(f"`inputs` tokens + `max_new_tokens` must be <= {total}. Given: "
                              f"{len(ids)} `inputs` tokens and {max_new} `max_new_tokens`")
        seed = None
        if p.sampling:
            seed = p.seed if p.seed is not None else random.getrandbits(63)
        try:
            params = p.sampling_params(max_new, seed)
            engine.check_request(ids, params)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        jobs.append(Job(Request(f"{rid}-{i}", ids, params, prompt=prompt, lora_name=adapters[i]),
                        prompt, p, seed))
    return jobs


def submit(engine: AsyncEngine, jobs: list[Job]):
    try:
        return submit_all(engine, [job.request for job in jobs])
    except APIError as exc:
        raise from_api_error(exc) from None


def device_type(engine: AsyncEngine) -> str:
    """The backend's kind, e.g. `cpu` for CpuBackend."""
    return type(engine.engine.backend).__name__.removesuffix("Backend").lower() or "cpu"


def finish_reason(out: RequestOutput) -> str:
    if out.finish_reason is FinishReason.STOP:
        return "stop_sequence" if isinstance(out.stop_reason, str) else "eos_token"
    return "length"


class TokenView:
    """TGI's token objects {"id", "text", "logprob", "special"} for the engine's deltas."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.tokenizer = engine.tokenizer
        self.special = engine.tokenizer.special_ids

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token(self, token_id: int, text: str, logprob: float | None) -> dict[str, Any]:
        # A special token (EOS) shows its own string and is flagged so that clients leave it
        # out when they join the texts; one that carries flushed text is not flagged.
        special = token_id in self.special and not text
        return {"id": token_id, "text": self._piece(token_id) if special else text,
                "logprob": logprob, "special": special}

    def top(self, lp: TokenLogprob) -> list[dict[str, Any]]:
        return [{"id": t, "text": self._piece(t), "logprob": v, "special": t in self.special}
                for t, v in lp.top]

    def step(self, out: RequestOutput, top_n: bool) -> list[tuple[dict[str, Any], list[dict[str, Any]] | None]]:
        """(token, top tokens or None) for each token of one delta; the delta's text goes
        with its last token, so the texts of the tokens join into the generated text."""
        n = len(out.new_token_ids)
        result = []
        for i, token_id in enumerate(out.new_token_ids):
            lp = out.new_logprobs[i] if out.new_logprobs and i < len(out.new_logprobs) else None
            token = self.token(token_id, out.new_text if i == n - 1 else "", lp.logprob if lp else None)
            result.append((token, self.top(lp) if (top_n and lp is not None) else None))
        return result


def _check(out: RequestOutput) -> None:
    if out.finish_reason is FinishReason.ERROR:
        raise TGIError(424, out.error or "the generation failed", "generation")


# -- non-streaming ----------------------------------------------------------------------


async def generate_all(http: HttpRequest, engine: AsyncEngine, jobs: list[Job]) -> tuple[list[dict[str, Any]], int]:
    """Run every job to the end; returns TGI's {"generated_text", "details"?} per job and
    the number of tokens generated in all."""
    streams = submit(engine, jobs)
    metrics = http.app.state.kiln.metrics
    view = TokenView(engine)

    async def collect() -> tuple[list[dict[str, Any]], int]:
        texts = [""] * len(jobs)
        tokens: list[list[dict]] = [[] for _ in jobs]
        tops: list[list[list[dict]]] = [[] for _ in jobs]
        finals: dict[int, RequestOutput] = {}
        async for index, out in merged(streams, metrics):
            _check(out)
            texts[index] += out.new_text
            for token, top in view.step(out, bool(jobs[index].params.top_n_tokens)):
                tokens[index].append(token)
                if top is not None:
                    tops[index].append(top)
            if out.finished:
                finals[index] = out
        results = [_result(job, texts[i], tokens[i], tops[i], finals[i]) for i, job in enumerate(jobs)]
        return results, sum(out.num_generated_tokens for out in finals.values())

    try:
        return await _until_disconnect(http, collect())
    except APIError as exc:
        raise from_api_error(exc) from None


def _result(job: Job, text: str, tokens: list[dict], tops: list[list[dict]], final: RequestOutput) -> dict[str, Any]:
    p = job.params
    result: dict[str, Any] = {"generated_text": job.prompt + text if p.return_full_text else text}
    if p.details:
        details: dict[str, Any] = {
            "finish_reason": finish_reason(final),
            "generated_tokens": final.num_generated_tokens,
            "seed": job.seed,
            "prefill": [],
            "tokens": tokens,
        }
        if p.top_n_tokens:
            details["top_tokens"] = tops
        result["details"] = details
    return result


# -- streaming --------------------------------------------------------------------------


async def stream_events(http: HttpRequest, engine: AsyncEngine, job: Job) -> AsyncIterator[dict[str, Any]]:
    """Submit now (so that refusals are plain HTTP errors), then return TGI's stream events:
    one per token, the last with `generated_text` (and `details` when asked); an error
    after the stream started is one {"error", "error_type"} event."""
    streams = submit(engine, [job])
    metrics = http.app.state.kiln.metrics
    view = TokenView(engine)
    p = job.params

    async def events() -> AsyncIterator[dict[str, Any]]:
        index = 0
        text = ""
        try:
            async for _, out in merged(streams, metrics):
                _check(out)
                text += out.new_text
                steps = view.step(out, bool(p.top_n_tokens))
                for k, (token, top) in enumerate(steps):
                    index += 1
                    last = out.finished and k == len(steps) - 1
                    event: dict[str, Any] = {"index": index, "token": token}
                    if top is not None:
                        event["top_tokens"] = top
                    event["generated_text"] = (job.prompt + text if p.return_full_text else text) if last else None
                    event["details"] = ({"finish_reason": finish_reason(out),
                                         "generated_tokens": out.num_generated_tokens,
                                         "seed": job.seed,
                                         "input_length": out.num_prompt_tokens}
                                        if last and p.details else None)
                    yield event
        except TGIError as exc:
            yield {"error": exc.message, "error_type": exc.error_type}
        except APIError as exc:
            err = from_api_error(exc)
            yield {"error": err.message, "error_type": err.error_type}

    return events()


_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_response(events: AsyncIterator[dict[str, Any]], headers: dict[str, str] | None = None) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data:{json.dumps(event, separators=(',', ':'))}\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={**_STREAM_HEADERS, **(headers or {})})


def jsonlines_response(events: AsyncIterator[dict[str, Any]], headers: dict[str, str] | None = None) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield json.dumps(event, separators=(",", ":")) + "\n"

    return StreamingResponse(body(), media_type="application/jsonlines", headers={**_STREAM_HEADERS, **(headers or {})})


# -- routes -----------------------------------------------------------------------------


async def _parse(http: HttpRequest) -> tuple[AsyncEngine, TGIRequest]:
    engine = engine_of(http)
    return engine, validate(await read_json(http))


async def respond(http: HttpRequest, engine: AsyncEngine, body: TGIRequest, *, as_list: bool,
                  jsonlines: bool = False) -> Response:
    """Answer a TGI-style body: a stream when `body.stream`, else one result (or, with
    `as_list`, TGI's compat list form `[{"generated_text", ...}]`)."""
    jobs = prepare(engine, body)
    if body.stream:
        if len(jobs) != 1:
            raise invalid("streaming takes a single prompt in `inputs`, not a list")
        events = await stream_events(http, engine, jobs[0])
        return jsonlines_response(events) if jsonlines else sse_response(events)
    start = time.monotonic()
    results, generated = await generate_all(http, engine, jobs)
    headers = {
        "x-compute-type": device_type(engine),
        "x-total-time": str(int((time.monotonic() - start) * 1000)),
        "x-prompt-tokens": str(sum(len(job.request.prompt_token_ids) for job in jobs)),
        "x-generated-tokens": str(generated),
    }
    return JSONResponse(results if as_list else results[0], headers=headers)


@router.post("/generate")
async def generate(http: HttpRequest) -> Response:
    engine, body = await _parse(http)
    body.stream = False
    return await respond(http, engine, body, as_list=False)


@router.post("/generate_stream")
async def generate_stream(http: HttpRequest) -> Response:
    engine, body = await _parse(http)
    body.stream = True
    return await respond(http, engine, body, as_list=False)


@router.post("/")
async def compat_generate(http: HttpRequest) -> Response:
    """TGI's compat route: `stream` picks /generate_stream, else /generate's result in a list."""
    engine, body = await _parse(http)
    return await respond(http, engine, body, as_list=True)


@router.post("/tokenize")
async def tokenize(http: HttpRequest) -> list[dict[str, Any]]:
    engine, body = await _parse(http)
    pieces = engine.tokenizer.encode_with_offsets(body.inputs)
    if body.params.truncate is not None:
        pieces = pieces[-body.params.truncate:]
    return [{"id": token_id, "text": body.inputs[start:stop], "start": start, "stop": stop}
            for token_id, start, stop in pieces]


@router.get("/info")
async def info(http: HttpRequest) -> dict[str, Any]:
    engine = engine_of(http)
    config = engine.engine.config
    stats = engine.stats()
    max_input = max_input_tokens(engine)
    return {
        "model_id": engine.model_name,
        "model_sha": None,
        "model_dtype": f"torch.{config.dtype}",
        "model_device_type": device_type(engine),
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": engine.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_STRINGS,
        "max_top_n_tokens": TGI_MAX_TOP_N_TOKENS,
        "max_input_tokens": max_input,
        "max_input_length": max_input,  # the name before TGI 2.1
        "max_total_tokens": engine.max_model_len,
        "max_batch_prefill_tokens": config.max_num_batched_tokens,
        "max_batch_total_tokens": stats.num_blocks * config.block_size,
        "max_batch_size": config.max_num_seqs,
        "validation_workers": 1,
        "router": "kiln",
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }
