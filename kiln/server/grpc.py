"""The gRPC doors, served by grpc.aio inside the HTTP server's event loop:

- kiln.v1.Inference (proto/kiln/v1/inference.proto): Generate, GenerateStream, Tokenize,
  ModelInfo, and LoRA adapter management (ListAdapters, LoadAdapter, UnloadAdapter).
- inference.GRPCInferenceService (proto/inference/grpc_predict_v2.proto): the KServe v2 /
  Triton protocol, so tritonclient[grpc] works: a BYTES `text_input` in, `text_output` out.
- grpc.health.v1.Health: SERVING once the model is loaded, NOT_SERVING while it loads and
  from the moment the server starts draining.
- server reflection, so grpcurl and friends can list and call the services.

Runtime errors map to statuses once, in `_status`: ValueError -> INVALID_ARGUMENT,
QueueFullError -> RESOURCE_EXHAUSTED, EngineDeadError -> UNAVAILABLE, DeadlineExceededError ->
DEADLINE_EXCEEDED, AdapterNotFoundError -> NOT_FOUND (an adapter that cannot be loaded is
INVALID_ARGUMENT: AdapterError is a ValueError). A cancelled call aborts its
requests in the engine (the RequestStream is closed), freeing their KV blocks. With an API
key configured every RPC but the health service needs `authorization: Bearer KEY` metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import math
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .. import __version__
from ..config import ServerConfig
from ..runtime.lora import AdapterNotFoundError
from ..proto.inference import grpc_predict_v2_pb2 as v2
from ..proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from ..proto.kiln.v1 import inference_pb2 as pb
from ..proto.kiln.v1 import inference_pb2_grpc as pb_grpc
from ..runtime.engine import AsyncEngine, DeadlineExceededError, EngineDeadError, QueueFullError, RequestStream
from ..runtime.request import FinishReason, Request, RequestOutput, SamplingParams, TokenLogprob
from .schemas import MAX_STOP_LENGTH, MAX_STOP_STRINGS

if TYPE_CHECKING:
    from .app import ServerState

log = logging.getLogger("kiln.server.grpc")

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # kiln.v1.Inference
KSERVE_SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
DEFAULT_MAX_NEW_TOKENS = 16
MODEL_VERSION = "1"


# -- errors ------------------------------------------------------------------------------


class RpcError(Exception):
    """Raised inside servicers; becomes the call's status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The one mapping from runtime exceptions to gRPC statuses."""
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, AdapterNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    log.error("unhandled error in a gRPC call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"


def _unary(fn):
    @functools.wraps(fn)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(*_status(exc))
    return wrapper


def _streaming(fn):
    @functools.wraps(fn)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(*_status(exc))
    return wrapper


def _check_output(out: RequestOutput) -> None:
    if out.finish_reason is FinishReason.ERROR:
        raise RpcError(grpc.StatusCode.INTERNAL, out.error or "internal error")


def _submit(engine: AsyncEngine, requests: list[Request]) -> list[RequestStream]:
    """Admit every request or none: a refusal closes those already admitted."""
    streams: list[RequestStream] = []
    try:
        for request in requests:
            streams.append(engine.submit(request))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


class _Base:
    def __init__(self, state: "ServerState") -> None:
        self.state = state

    def engine(self) -> AsyncEngine:
        state = self.state
        if state.load_error:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"the model failed to load: {state.load_error}")
        engine = state.engine
        if engine is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if not engine.is_alive:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the engine has stopped")
        return engine

    @property
    def ready(self) -> bool:
        engine = self.state.engine
        return engine is not None and engine.is_alive and not self.state.draining

    async def run(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """A request's deltas, observed by the metrics; the stream is closed (the request
        aborted, if unfinished) however the caller leaves, cancellation included."""
        try:
            async with contextlib.aclosing(self.state.metrics.observe(stream.request.arrival_time, stream, stream.request.lora_name)) as outs:
                async for out in outs:
                    _check_output(out)
                    yield out
        finally:
            stream.close()


# -- kiln.v1.Inference -------------------------------------------------------------------

_FINISH = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
           FinishReason.ABORT: pb.FINISH_REASON_ABORT}


def _sampling_params(msg: pb.GenerateRequest) -> SamplingParams:
    if msg.HasField("max_new_tokens") and msg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {msg.max_new_tokens}")
    if msg.top_logprobs and not msg.logprobs:
        raise ValueError("top_logprobs requires logprobs to be true")
    stops = list(msg.stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
    if any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise ValueError(f"stop strings must be at most {MAX_STOP_LENGTH} characters")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        if not math.isfinite(getattr(msg, name)):
            raise ValueError(f"{name} must be a finite number")
    return SamplingParams(
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        frequency_penalty=msg.frequency_penalty,
        presence_penalty=msg.presence_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_new_tokens if msg.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS,
        ignore_eos=msg.ignore_eos,
        stop=stops,
        stop_token_ids=list(msg.stop_token_ids),
        include_stop_str_in_output=msg.include_stop_str_in_output,
        logprobs=msg.top_logprobs if msg.logprobs else None,
        skip_special_tokens=msg.skip_special_tokens if msg.HasField("skip_special_tokens") else True,
    )


def _generate_request(engine: AsyncEngine, msg: pb.GenerateRequest) -> Request:
    if msg.prompt and msg.prompt_token_ids:
        raise ValueError("give prompt or prompt_token_ids, not both")
    if not msg.prompt and not msg.prompt_token_ids:
        raise ValueError("the prompt is empty: set prompt (text) or prompt_token_ids")
    params = _sampling_params(msg)
    ids = list(msg.prompt_token_ids) if msg.prompt_token_ids else engine.tokenizer.encode(msg.prompt)
    lora = msg.adapter_id if msg.adapter_id and msg.adapter_id != engine.model_name else None
    engine.check_request(ids, params, lora)
    return Request(msg.request_id or f"grpc-{uuid.uuid4().hex}", ids, params, prompt=msg.prompt or None,
                   lora_name=lora)


def _logprobs(engine: AsyncEngine, logprobs: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    if not logprobs:
        return []
    decode = engine.tokenizer.decode

    def text(token_id: int) -> str:
        return decode([token_id], skip_special_tokens=False)

    return [
        pb.TokenLogprob(token_id=lp.token_id, token=text(lp.token_id), logprob=lp.logprob,
                        top_logprobs=[pb.TopLogprob(token_id=t, token=text(t), logprob=v) for t, v in lp.top])
        for lp in logprobs
    ]


def _finish_fields(out: RequestOutput) -> dict[str, Any]:
    """finish_reason, stop_reason and usage of a request's last delta."""
    fields: dict[str, Any] = {
        "finish_reason": _FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        "usage": pb.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_generated_tokens,
                          total_tokens=out.num_prompt_tokens + out.num_generated_tokens,
                          cached_prompt_tokens=out.num_cached_prompt_tokens),
    }
    if isinstance(out.stop_reason, str):
        fields["stop_string"] = out.stop_reason
    elif isinstance(out.stop_reason, int):
        fields["stop_token_id"] = out.stop_reason
    return fields


def _log_finished(door: str, request: Request, out: RequestOutput | None) -> None:
    if out is None:
        log.info("%s request_id=%s aborted", door, request.request_id)
    else:
        log.info("%s request_id=%s prompt_tokens=%d completion_tokens=%d finish_reason=%s", door,
                 request.request_id, out.num_prompt_tokens, out.num_generated_tokens,
                 out.finish_reason.value if out.finish_reason else None)


class InferenceServicer(_Base, pb_grpc.InferenceServicer):
    @_unary
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        engine = self.engine()
        req = _generate_request(engine, request)
        (stream,) = _submit(engine, [req])
        text: list[str] = []
        ids: list[int] = []
        logprobs: list[pb.TokenLogprob] = []
        last: RequestOutput | None = None
        try:
            async for out in self.run(stream):
                text.append(out.new_text)
                ids.extend(out.new_token_ids)
                logprobs.extend(_logprobs(engine, out.new_logprobs))
                last = out
        finally:
            _log_finished("grpc Generate", req, last if last is not None and last.finished else None)
        assert last is not None and last.finished
        return pb.GenerateResponse(request_id=req.request_id, text="".join(text), token_ids=ids,
                                   logprobs=logprobs, model=engine.model_name, **_finish_fields(last))

    @_streaming
    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        engine = self.engine()
        req = _generate_request(engine, request)
        (stream,) = _submit(engine, [req])
        last: RequestOutput | None = None
        try:
            async for out in self.run(stream):
                last = out
                yield pb.GenerateStreamResponse(
                    request_id=req.request_id, text=out.new_text, token_ids=out.new_token_ids,
                    logprobs=_logprobs(engine, out.new_logprobs),
                    **(_finish_fields(out) if out.finished else {}),
                )
        finally:
            _log_finished("grpc GenerateStream", req, last if last is not None and last.finished else None)

    @_unary
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        tokenizer = self.engine().tokenizer
        ids = tokenizer.encode(request.text)
        return pb.TokenizeResponse(token_ids=ids, tokens=[tokenizer.decode([i], skip_special_tokens=False) for i in ids])

    @_unary
    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        engine = self.engine()
        core = engine.engine
        longest = engine.max_model_len - 1
        if core.config.max_input_tokens is not None:
            longest = min(longest, core.config.max_input_tokens)
        return pb.ModelInfoResponse(
            model=engine.model_name, max_model_len=engine.max_model_len, max_input_tokens=longest,
            vocab_size=core.model_config.vocab_size, dtype=core.config.dtype,
            eos_token_ids=list(core.model_config.eos_token_ids), block_size=core.config.block_size,
            kv_cache_blocks=engine.stats().num_blocks,
        )

    @_unary
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(
            adapters=[pb.Adapter(name=a.name, path=str(a.path)) for a in self.engine().list_adapters()])

    @_unary
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.LoadAdapterResponse:
        if not request.name or not request.path:
            raise ValueError("LoadAdapter needs a name and a path")
        adapter = await asyncio.to_thread(self.engine().load_adapter, request.name, request.path)
        return pb.LoadAdapterResponse(adapter=pb.Adapter(name=adapter.name, path=str(adapter.path)))

    @_unary
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context) -> pb.UnloadAdapterResponse:
        self.engine().unload_adapter(request.name)
        return pb.UnloadAdapterResponse()


# -- inference.GRPCInferenceService (KServe v2 / Triton) ----------------------------------

_RAW_DTYPES = {"BOOL": "?", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
               "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
               "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
_CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                   "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}

# Sampling settings accepted as request parameters, in the `sampling_parameters` JSON input,
# or as scalar input tensors, and the SamplingParams field each sets.
_SAMPLING_KEYS = {
    "max_tokens": "max_tokens", "max_new_tokens": "max_tokens", "temperature": "temperature",
    "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty", "seed": "seed",
    "stop": "stop", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos",
    "include_stop_str_in_output": "include_stop_str_in_output", "skip_special_tokens": "skip_special_tokens",
}
_FLAG_KEYS = {"stream": False, "exclude_input_in_output": True}  # with their defaults
# Request parameters tritonclient sets on its own (sequence batching, priority, timeout).
_IGNORED_PARAMETERS = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"}

_INPUTS = [("text_input", "BYTES", [1]), ("sampling_parameters", "BYTES", [1]), ("stream", "BOOL", [1]),
           ("exclude_input_in_output", "BOOL", [1])]
_OUTPUTS = [("text_output", "BYTES", [-1])]


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Triton's BYTES serialization: per element a uint32 little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ValueError("malformed BYTES tensor: truncated length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ValueError("malformed BYTES tensor: an element is longer than the data")
        items.append(bytes(raw[offset:offset + length]))
        offset += length
    return items


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _parameter_value(param: v2.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


@dataclass
class _Tensor:
    datatype: str
    shape: list[int]
    values: list[Any]


def _read_inputs(request: v2.ModelInferRequest) -> dict[str, _Tensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ValueError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    tensors: dict[str, _Tensor] = {}
    for i, tensor in enumerate(request.inputs):
        dtype = tensor.datatype
        if dtype not in _CONTENTS_FIELD and dtype not in _RAW_DTYPES:
            raise ValueError(f"input '{tensor.name}': unsupported datatype {dtype}")
        if raw:
            if dtype == "BYTES":
                values = decode_bytes_tensor(raw[i])
            else:
                try:
                    values = np.frombuffer(raw[i], dtype=_RAW_DTYPES[dtype]).tolist()
                except ValueError:
                    raise ValueError(f"input '{tensor.name}': {len(raw[i])} bytes is not a whole "
                                     f"number of {dtype} elements") from None
        else:
            if dtype not in _CONTENTS_FIELD:
                raise ValueError(f"input '{tensor.name}': {dtype} data must come in raw_input_contents")
            values = list(getattr(tensor.contents, _CONTENTS_FIELD[dtype]))
        shape = list(tensor.shape)
        if any(d < 0 for d in shape) or math.prod(shape) != len(values):
            raise ValueError(f"input '{tensor.name}': shape {shape} does not match its {len(values)} elements")
        if tensor.name in tensors:
            raise ValueError(f"input '{tensor.name}' is given twice")
        tensors[tensor.name] = _Tensor(dtype, shape, values)
    return tensors


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not valid UTF-8") from None


@dataclass
class _InferPlan:
    prompts: list[str]
    shape: list[int]
    params: SamplingParams
    stream: bool
    exclude_input: bool
    empty_final: bool


def _coerce(key: str, value: Any) -> Any:
    """A setting from JSON, a parameter or a tensor, as the SamplingParams field wants it."""
    field = _SAMPLING_KEYS[key]
    if field in ("stop",):
        if isinstance(value, str):
            if value.startswith("["):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise ValueError(f"{key}: not a JSON list of strings") from None
            else:
                return [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError(f"{key} must be a string or a list of strings")
        if len(value) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in value):
            raise ValueError(f"{key}: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters")
        return value
    if field == "stop_token_ids":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(f"{key}: not a JSON list of token ids") from None
        value = value if isinstance(value, list) else [value]
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise ValueError(f"{key} must be a list of token ids")
        return value
    if field in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be a boolean")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number")
    if field in ("max_tokens", "top_k", "seed"):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key} must be an integer")
        return int(value)
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number")
    return float(value)


def _infer_plan(request: v2.ModelInferRequest) -> _InferPlan:
    tensors = _read_inputs(request)
    settings: dict[str, Any] = {}
    flags = dict(_FLAG_KEYS)
    empty_final = False

    def put(key: str, value: Any, where: str) -> None:
        if key in _FLAG_KEYS:
            if not isinstance(value, bool):
                raise ValueError(f"{where} '{key}' must be a boolean")
            flags[key] = value
        elif key in _SAMPLING_KEYS:
            settings[_SAMPLING_KEYS[key]] = _coerce(key, value)
        else:
            raise ValueError(f"unknown {where} '{key}'; accepted: {', '.join([*_SAMPLING_KEYS, *_FLAG_KEYS])}")

    for key, param in request.parameters.items():
        if key == "triton_enable_empty_final_response":
            empty_final = bool(_parameter_value(param))
        elif key not in _IGNORED_PARAMETERS and not key.startswith("triton_"):
            put(key, _parameter_value(param), "parameter")
    if "text_input" not in tensors:
        raise ValueError("the request has no 'text_input' input (BYTES, shape [1])")
    if "sampling_parameters" in tensors:
        t = tensors.pop("sampling_parameters")
        if t.datatype != "BYTES" or len(t.values) != 1:
            raise ValueError("input 'sampling_parameters' must be one BYTES element (a JSON object)")
        try:
            obj = json.loads(_utf8(t.values[0], "sampling_parameters"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"input 'sampling_parameters' is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError("input 'sampling_parameters' must be a JSON object")
        for key, value in obj.items():
            put(key, value, "sampling parameter")
    text = tensors.pop("text_input")
    if text.datatype != "BYTES":
        raise ValueError(f"input 'text_input' must be BYTES, not {text.datatype}")
    if not text.values:
        raise ValueError("input 'text_input' is empty")
    for name, t in tensors.items():  # the rest: scalar settings, e.g. max_tokens INT32 [1]
        if len(t.values) != 1:
            raise ValueError(f"input '{name}' must hold one element")
        value = t.values[0]
        if t.datatype == "BYTES":
            value = _utf8(value, f"input '{name}'")
        put(name, value, "input")
    prompts = [_utf8(v, "text_input") for v in text.values]
    try:
        params = SamplingParams(**{"max_tokens": DEFAULT_MAX_NEW_TOKENS, **settings})
    except TypeError as exc:  # a setting of the wrong type past the checks above
        raise ValueError(str(exc)) from None
    if flags["stream"] and len(prompts) != 1:
        raise ValueError("streaming answers one prompt per request: send text_input with one element")
    return _InferPlan(prompts, text.shape, params, flags["stream"], flags["exclude_input_in_output"], empty_final)


def _text_output(texts: list[str], shape: list[int]) -> tuple[v2.ModelInferResponse.InferOutputTensor, bytes]:
    tensor = v2.ModelInferResponse.InferOutputTensor(name="text_output", datatype="BYTES", shape=shape)
    return tensor, encode_bytes_tensor([t.encode("utf-8") for t in texts])


def _set_param(params, key: str, value: Any) -> None:
    if isinstance(value, bool):
        params[key].bool_param = value
    elif isinstance(value, int):
        params[key].int64_param = value
    else:
        params[key].string_param = str(value)


class KServeServicer(_Base, v2_grpc.GRPCInferenceServiceServicer):
    """One model, the engine's, at version "1"."""

    async def ServerLive(self, request, context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request: v2.ModelReadyRequest, context) -> v2.ModelReadyResponse:
        engine = self.state.engine
        known = engine is not None and request.name == engine.model_name and request.version in ("", MODEL_VERSION)
        return v2.ModelReadyResponse(ready=known and self.ready)

    async def ServerMetadata(self, request, context) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name="kiln", version=__version__, extensions=["parameters"])

    def _model(self, name: str, version: str) -> AsyncEngine:
        engine = self.engine()
        if name != engine.model_name:
            raise RpcError(grpc.StatusCode.NOT_FOUND,
                           f"unknown model '{name}': this server serves '{engine.model_name}'")
        if version not in ("", MODEL_VERSION):
            raise RpcError(grpc.StatusCode.NOT_FOUND,
                           f"unknown version '{version}' of model '{name}': the only version is {MODEL_VERSION}")
        return engine

    @_unary
    async def ModelMetadata(self, request: v2.ModelMetadataRequest, context) -> v2.ModelMetadataResponse:
        engine = self._model(request.name, request.version)
        meta = v2.ModelMetadataResponse.TensorMetadata
        return v2.ModelMetadataResponse(
            name=engine.model_name, versions=[MODEL_VERSION], platform="kiln",
            inputs=[meta(name=n, datatype=d, shape=s) for n, d, s in _INPUTS],
            outputs=[meta(name=n, datatype=d, shape=s) for n, d, s in _OUTPUTS],
        )

    def _prepare(self, request: v2.ModelInferRequest) -> tuple[AsyncEngine, _InferPlan, list[Request]]:
        engine = self._model(request.model_name, request.model_version)
        for wanted in request.outputs:
            if wanted.name != "text_output":
                raise ValueError(f"unknown output '{wanted.name}'; this model has 'text_output'")
        plan = _infer_plan(request)
        prefix = f"kserve-{uuid.uuid4().hex}"
        requests = []
        for i, prompt in enumerate(plan.prompts):
            ids = engine.tokenizer.encode(prompt)
            engine.check_request(ids, plan.params)
            requests.append(Request(f"{prefix}-{i}", ids, plan.params, prompt=prompt))
        return engine, plan, requests

    def _response(self, engine: AsyncEngine, request: v2.ModelInferRequest, texts: list[str], shape: list[int],
                  last: list[RequestOutput] | None = None, final: bool | None = None) -> v2.ModelInferResponse:
        tensor, raw = _text_output(texts, shape)
        response = v2.ModelInferResponse(model_name=engine.model_name, model_version=MODEL_VERSION,
                                         id=request.id, outputs=[tensor], raw_output_contents=[raw])
        if final is not None:
            response.parameters["triton_final_response"].bool_param = final
        if last and len(last) == 1:  # one prompt: report how it ended
            out = last[0]
            _set_param(response.parameters, "finish_reason", out.finish_reason.value if out.finish_reason else "")
            _set_param(response.parameters, "prompt_tokens", out.num_prompt_tokens)
            _set_param(response.parameters, "completion_tokens", out.num_generated_tokens)
        return response

    async def _complete(self, engine: AsyncEngine, plan: _InferPlan, requests: list[Request]) -> tuple[list[str], list[RequestOutput]]:
        streams = _submit(engine, requests)

        async def collect(stream: RequestStream) -> tuple[str, RequestOutput]:
            parts, last = [], None
            async for out in self.run(stream):
                parts.append(out.new_text)
                last = out
            assert last is not None
            _log_finished("grpc ModelInfer", stream.request, last)
            return "".join(parts), last

        tasks = [asyncio.ensure_future(collect(s)) for s in streams]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:
                stream.close()
        texts = [text if plan.exclude_input else prompt + text
                 for (text, _), prompt in zip(results, plan.prompts)]
        return texts, [last for _, last in results]

    @_unary
    async def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse:
        engine, plan, requests = self._prepare(request)
        if plan.stream:
            raise ValueError("'stream' needs the streaming RPC (ModelStreamInfer)")
        texts, lasts = await self._complete(engine, plan, requests)
        return self._response(engine, request, texts, plan.shape, lasts)

    async def _stream_one(self, request: v2.ModelInferRequest) -> AsyncIterator[v2.ModelStreamInferResponse]:
        engine, plan, requests = self._prepare(request)
        if not plan.stream:
            texts, lasts = await self._complete(engine, plan, requests)
            yield v2.ModelStreamInferResponse(
                infer_response=self._response(engine, request, texts, plan.shape, lasts, final=True))
            return
        (stream,) = _submit(engine, requests)
        first = not plan.exclude_input
        async for out in self.run(stream):
            text = (plan.prompts[0] + out.new_text) if first else out.new_text
            first = False
            yield v2.ModelStreamInferResponse(infer_response=self._response(
                engine, request, [text], plan.shape, [out] if out.finished else None, final=out.finished))
            if out.finished:
                _log_finished("grpc ModelStreamInfer", stream.request, out)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[v2.ModelStreamInferResponse]:
        """Requests are served concurrently as they arrive; each error is reported in its
        response's error_message and the stream goes on. The call ends once the client has
        closed its side and every request has been answered; cancelling it aborts them all."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        tasks: set[asyncio.Task] = set()

        async def serve(request: v2.ModelInferRequest) -> None:
            try:
                async for response in self._stream_one(request):
                    await queue.put(response)
            except Exception as exc:
                _, message = _status(exc)
                await queue.put(v2.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=v2.ModelInferResponse(model_name=request.model_name, id=request.id)))
            finally:
                await queue.put(done)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    tasks.add(asyncio.ensure_future(serve(request)))
            finally:
                queue.put_nowait(None)  # the client closed its side (or went away)

        reader = asyncio.ensure_future(read())
        active_reader, answered = True, 0
        try:
            while active_reader or answered < len(tasks):
                item = await queue.get()
                if item is None:
                    active_reader = False
                elif item is done:
                    answered += 1
                else:
                    yield item
            await reader
        finally:
            for task in (reader, *tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)


# -- API key ------------------------------------------------------------------------------


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer KEY` metadata (UNAUTHENTICATED); the
    health service stays open, as HTTP's /health does."""

    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        if details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return await continuation(details)
        given = b""
        for key, value in details.invocation_metadata or ():
            if key.lower() == "authorization":
                given = value.encode() if isinstance(value, str) else value
                break
        token = given[7:] if given[:7].lower() == b"bearer " else b""
        handler = await continuation(details)
        if hmac.compare_digest(token, self._key) or handler is None:
            return handler
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid API key (metadata 'authorization: Bearer KEY')")

    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler, "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler, "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for attr, make in kinds.items():
        if getattr(handler, attr) is not None:
            return make(deny, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


# -- the server ---------------------------------------------------------------------------


class GrpcServer:
    """grpc.aio server for every door above; start() in the running event loop."""

    def __init__(self, state: "ServerState", config: ServerConfig) -> None:
        self.state = state
        self.config = config
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        config = self.config
        interceptors = [ApiKeyInterceptor(config.api_key)] if config.api_key else []
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.so_reuseport", 0),  # a busy port is an error, not a silently shared one
            ("grpc.max_receive_message_length", config.max_body_bytes),
            ("grpc.max_send_message_length", config.max_body_bytes),
        ])
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(self.state), server)
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(self.state), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [INFERENCE_SERVICE, KSERVE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
        host = config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        try:
            self.port = server.add_insecure_port(f"{host}:{config.grpc_port}")
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen for gRPC on {host}:{config.grpc_port}: {exc}") from None
        if not self.port:
            raise RuntimeError(f"cannot listen for gRPC on {host}:{config.grpc_port}")
        for service in ("", INFERENCE_SERVICE, KSERVE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        loop = asyncio.get_running_loop()
        self._spawn(self._watch_readiness())
        self.state.on_drain.append(lambda: loop.call_soon_threadsafe(self._drain))
        log.info("gRPC listening on %s:%d (kiln.v1.Inference, inference.GRPCInferenceService, health, reflection)",
                 config.host, self.port)
        return self.port

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _drain(self) -> None:
        self._spawn(self.health.enter_graceful_shutdown())

    async def _watch_readiness(self) -> None:
        """Health follows the server: SERVING once the engine is up, NOT_SERVING when it is
        gone or the server drains (after which the health servicer stays NOT_SERVING)."""
        serving: bool | None = None
        while True:
            engine = self.state.engine
            now = engine is not None and engine.is_alive and not self.state.draining
            if now != serving:
                serving = now
                status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
                for service in ("", INFERENCE_SERVICE, KSERVE_SERVICE):
                    await self.health.set(service, status)
            await asyncio.sleep(0.1)

    async def stop(self, grace: float | None = 5.0) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
