"""End-to-end tests of the gRPC doors of `kiln serve`: kiln.v1.Inference through its generated
stubs, the KServe v2 / Triton service through the official `tritonclient[grpc]`, the health
and reflection services, the API key, and the stubs being in sync with proto/.

This process imports tritonclient.grpc, which registers its own `inference` protobuf
package, so kiln's copy (kiln.proto.inference) is never imported here; its compatibility is
checked by compiling proto/ to a descriptor set instead."""

from __future__ import annotations

import queue
import re
import signal
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from kiln.proto import generate
from kiln.proto.kiln.v1 import inference_pb2 as pb
from kiln.proto.kiln.v1 import inference_pb2_grpc as pb_grpc

from kiln_process import KilnProcess

PROMPT = "The capital of France is"
API_KEY = "test-key-123"
RPC_TIMEOUT = 60
SERVICES = {"kiln.v1.Inference", "inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"}


# -- the stubs ------------------------------------------------------------------------------


def test_committed_stubs_match_the_protos(tmp_path: Path):
    written = generate.generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in written}
    committed = {p.relative_to(generate.STUBS_ROOT): p.read_text() for p in generate.generated_files()}
    assert fresh, "nothing was generated"
    assert sorted(fresh) == sorted(committed), "stub files differ from proto/: run `make proto`"
    stale = [str(path) for path, text in fresh.items() if committed[path] != text]
    assert not stale, f"stubs out of date with proto/ (run `make proto`): {stale}"


def _descriptor_set(tmp_path: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"-I{generate.PROTO_ROOT}", f"--descriptor_set_out={out}",
                        *(str(p) for p in generate.proto_files())]) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return {f.name: f for f in files}


def _fields(message: descriptor_pb2.DescriptorProto) -> dict:
    """Everything about a message's wire format, nested messages included."""
    return {
        "fields": sorted((f.number, f.name, f.type, f.label, f.type_name.rsplit(".", 1)[-1]) for f in message.field),
        "nested": {n.name: _fields(n) for n in message.nested_type},
    }


def test_kserve_proto_matches_tritons(tmp_path: Path):
    ours = _descriptor_set(tmp_path)["inference/grpc_predict_v2.proto"]
    theirs = descriptor_pb2.FileDescriptorProto()
    triton.service_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    their_messages = {m.name: m for m in theirs.message_type}
    assert len(ours.message_type) >= 15
    for message in ours.message_type:
        assert message.name in their_messages, message.name
        assert _fields(message) == _fields(their_messages[message.name]), message.name
    (service,) = ours.service
    (their_service,) = theirs.service
    assert service.name == their_service.name == "GRPCInferenceService"
    their_methods = {m.name: m for m in their_service.method}
    assert {m.name for m in service.method} == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                "ModelMetadata", "ModelInfer", "ModelStreamInfer"}
    for method in service.method:
        other = their_methods[method.name]
        assert (method.input_type, method.output_type, method.client_streaming, method.server_streaming) == (
            other.input_type, other.output_type, other.client_streaming, other.server_streaming)


# -- the server -------------------------------------------------------------------------------


def _wait_serving(srv: KilnProcess) -> None:
    """Wait for gRPC health SERVING (the HTTP side is not consulted)."""
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if srv.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {srv.proc.returncode}:\n{srv.log()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gRPC health not SERVING after 120 s:\n{srv.log()}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> KilnProcess:
    srv = KilnProcess(tmp_path_factory.mktemp("kiln-grpc"), grpc=True, wait=False)
    try:
        _wait_serving(srv)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def channel(server: KilnProcess):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def http(server: KilnProcess):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def model(stub) -> str:
    return stub.ModelInfo(pb.ModelInfoRequest(), timeout=RPC_TIMEOUT).model


@pytest.fixture(scope="module")
def greedy(stub) -> pb.GenerateResponse:
    return stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=12, temperature=0), timeout=RPC_TIMEOUT)


def _metrics(http: httpx.Client) -> dict[str, float]:
    text = http.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(kiln_[a-z_]+) ([0-9.e+-]+)$", text, re.M)}


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=RPC_TIMEOUT, **kwargs)
    return info.value.code()


# -- kiln.v1.Inference ----------------------------------------------------------------------


def test_generate_matches_http_completion(greedy: pb.GenerateResponse, http: httpx.Client, model: str):
    body = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 12,
                                              "temperature": 0}).json()
    assert greedy.text and greedy.text == body["choices"][0]["text"]
    assert len(greedy.token_ids) == 12
    assert greedy.finish_reason == pb.FINISH_REASON_LENGTH
    assert greedy.WhichOneof("stop_reason") is None
    assert greedy.usage.completion_tokens == 12
    assert greedy.usage.prompt_tokens == body["usage"]["prompt_tokens"]
    assert greedy.usage.total_tokens == greedy.usage.prompt_tokens + 12
    assert greedy.model == model and greedy.request_id


def test_generate_from_token_ids_with_logprobs(stub, greedy: pb.GenerateResponse):
    ids = list(stub.Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=RPC_TIMEOUT).token_ids)
    out = stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_new_tokens=12, temperature=0, logprobs=True,
                                           top_logprobs=3, request_id="my-id-1"), timeout=RPC_TIMEOUT)
    assert out.request_id == "my-id-1"
    assert out.text == greedy.text and list(out.token_ids) == list(greedy.token_ids)
    assert [lp.token_id for lp in out.logprobs] == list(out.token_ids)
    for lp in out.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].token_id == lp.token_id  # greedy picks the most likely token
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob >= lp.top_logprobs[2].logprob
    assert "".join(lp.token for lp in out.logprobs) == out.text


def test_stop_string_is_reported(stub, greedy: pb.GenerateResponse):
    word = greedy.text.split()[1]  # a word from the middle of the greedy text
    out = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=12, temperature=0, stop=[word]),
                        timeout=RPC_TIMEOUT)
    assert out.finish_reason == pb.FINISH_REASON_STOP
    assert out.WhichOneof("stop_reason") == "stop_string" and out.stop_string == word
    assert greedy.text.startswith(out.text) and word not in out.text
    assert out.usage.completion_tokens < 12


def test_generate_stream_concatenates_to_unary(stub, greedy: pb.GenerateResponse):
    chunks = list(stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=12, temperature=0),
                                      timeout=RPC_TIMEOUT))
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == greedy.text
    assert [t for c in chunks for t in c.token_ids] == list(greedy.token_ids)
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not c.HasField("usage") for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens == greedy.usage.prompt_tokens
    assert len({c.request_id for c in chunks}) == 1


def test_cancelled_stream_frees_the_engine(stub, http: httpx.Client):
    call = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=2000, ignore_eos=True,
                                                  temperature=0), timeout=RPC_TIMEOUT)
    for _ in range(3):
        assert next(call).token_ids
    busy = _metrics(http)
    assert busy["kiln_num_requests_running"] == 1
    assert busy["kiln_kv_cache_blocks_free"] < busy["kiln_kv_cache_blocks_total"]
    call.cancel()
    assert call.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 20
    while True:
        m = _metrics(http)
        if m["kiln_num_requests_running"] == 0 and m["kiln_kv_cache_blocks_free"] == m["kiln_kv_cache_blocks_total"]:
            break
        assert time.monotonic() < deadline, f"the cancelled request still holds the engine: {m}"
        time.sleep(0.2)
    # Not 2000 tokens' worth of work: the engine stopped generating.
    assert m["kiln_generation_tokens_total"] - busy["kiln_generation_tokens_total"] < 500


def test_tokenize(stub):
    out = stub.Tokenize(pb.TokenizeRequest(text="hello world"), timeout=RPC_TIMEOUT)
    assert len(out.token_ids) == len(out.tokens) == 2
    assert "".join(out.tokens) == "hello world"


def test_model_info(stub, http: httpx.Client, model: str):
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=RPC_TIMEOUT)
    card = http.get("/v1/models").json()["data"][0]
    assert info.model == card["id"] == model
    assert info.max_model_len == card["max_model_len"] and info.max_input_tokens == info.max_model_len - 1
    assert info.vocab_size > 1000 and list(info.eos_token_ids) and info.dtype == "float32"
    assert info.kv_cache_blocks == _metrics(http)["kiln_kv_cache_blocks_total"]


@pytest.mark.parametrize("request_, fragment", [
    (pb.GenerateRequest(prompt=PROMPT, max_new_tokens=0), "max_new_tokens"),
    (pb.GenerateRequest(max_new_tokens=4), "empty"),
    (pb.GenerateRequest(prompt=PROMPT + " x" * 9000, max_new_tokens=4), "context"),
    (pb.GenerateRequest(prompt=PROMPT, prompt_token_ids=[1, 2]), "not both"),
    (pb.GenerateRequest(prompt=PROMPT, top_p=0), "top_p"),
    (pb.GenerateRequest(prompt=PROMPT, top_logprobs=2), "logprobs"),
    (pb.GenerateRequest(prompt_token_ids=[10 ** 9]), "token ids"),
], ids=["max_new_tokens_0", "empty_prompt", "prompt_too_long", "both_prompts", "top_p_0", "top_logprobs_alone",
        "token_id_out_of_range"])
def test_bad_requests_are_invalid_argument(stub, request_, fragment: str):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request_, timeout=RPC_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()
    # The stream door answers the same, before any message.
    assert _code(lambda *a, **k: list(stub.GenerateStream(*a, **k)), request_) == grpc.StatusCode.INVALID_ARGUMENT


def test_adapter_errors(stub):
    # This server has no --lora-root: runtime loads are refused. (Adapters that work are in
    # tests/test_lora_server.py.)
    assert _code(stub.LoadAdapter, pb.LoadAdapterRequest(name="a", path="/tmp/a")) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.LoadAdapter, pb.LoadAdapterRequest(name="a")) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.UnloadAdapter, pb.UnloadAdapterRequest(name="a")) == grpc.StatusCode.NOT_FOUND
    assert list(stub.ListAdapters(pb.ListAdaptersRequest(), timeout=RPC_TIMEOUT).adapters) == []
    assert _code(stub.Generate, pb.GenerateRequest(prompt=PROMPT, adapter_id="nope")) == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kiln.v1.Inference", "inference.GRPCInferenceService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    assert _code(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service")) == grpc.StatusCode.NOT_FOUND

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=RPC_TIMEOUT)
    assert {s.name for s in answer.list_services_response.service} == SERVICES
    (answer,) = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="kiln.v1.Inference")]), timeout=RPC_TIMEOUT)
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in answer.file_descriptor_response.file_descriptor_proto]
    assert "kiln/v1/inference.proto" in {f.name for f in files}


# -- inference.GRPCInferenceService, through tritonclient --------------------------------------


@pytest.fixture(scope="module")
def triton_client(server: KilnProcess):
    client = triton.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


def _text_input(prompt: str, shape: list[int]) -> triton.InferInput:
    tensor = triton.InferInput("text_input", shape, "BYTES")
    tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=object).reshape(shape))
    return tensor


def _bytes_input(name: str, value: bytes) -> triton.InferInput:
    tensor = triton.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value], dtype=object))
    return tensor


def test_triton_health_and_metadata(triton_client, model: str):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(model)
    assert not triton_client.is_model_ready("no-such-model")
    meta = triton_client.get_model_metadata(model, as_json=True)
    assert meta["name"] == model
    assert {"name": "text_input", "datatype": "BYTES", "shape": ["1"]} in meta["inputs"]
    assert [o["name"] for o in meta["outputs"]] == ["text_output"]
    assert triton_client.get_server_metadata(as_json=True)["name"] == "kiln"
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        triton_client.get_model_metadata("no-such-model")


@pytest.mark.parametrize("shape", [[1], [1, 1]])
def test_triton_infer_matches_greedy(triton_client, model: str, greedy: pb.GenerateResponse, shape):
    result = triton_client.infer(model, [_text_input(PROMPT, shape)],
                                 parameters={"max_tokens": 12, "temperature": 0.0}, request_id="t1")
    out = result.as_numpy("text_output")
    assert out.shape == tuple(shape)
    assert out.reshape(-1)[0].decode() == greedy.text
    response = result.get_response()
    assert response.id == "t1"
    assert response.parameters["finish_reason"].string_param == "length"
    assert response.parameters["completion_tokens"].int64_param == 12


def test_triton_sampling_parameters_input_and_errors(triton_client, model: str, greedy: pb.GenerateResponse):
    params = _bytes_input("sampling_parameters", b'{"max_tokens": 12, "temperature": 0}')
    result = triton_client.infer(model, [_text_input(PROMPT, [1]), params])
    assert result.as_numpy("text_output")[0].decode() == greedy.text
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        triton_client.infer(model, [_text_input(PROMPT, [1])], parameters={"max_tokens": 0})
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        triton_client.infer(model, [_bytes_input("sampling_parameters", b"{not json")])
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        triton_client.infer("no-such-model", [_text_input(PROMPT, [1])])


def test_triton_stream_infer(triton_client, model: str, greedy: pb.GenerateResponse):
    results: queue.Queue = queue.Queue()
    triton_client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        stream_flag = triton.InferInput("stream", [1], "BOOL")
        stream_flag.set_data_from_numpy(np.array([True]))
        params = _bytes_input("sampling_parameters", b'{"max_tokens": 12, "temperature": 0}')
        triton_client.async_stream_infer(model, [_text_input(PROMPT, [1]), params, stream_flag], request_id="s1")
        triton_client.async_stream_infer("no-such-model", [_text_input(PROMPT, [1])], request_id="s2")
        texts, finals, errors = [], [], []
        deadline = time.monotonic() + RPC_TIMEOUT
        while not (finals and errors):
            assert time.monotonic() < deadline, f"stream incomplete: {texts} {finals} {errors}"
            result, error = results.get(timeout=RPC_TIMEOUT)
            if error is not None:
                errors.append(str(error))
                continue
            response = result.get_response()
            assert response.id == "s1"
            texts.append(result.as_numpy("text_output")[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                finals.append(response)
    finally:
        triton_client.stop_stream()
    assert len(texts) > 1 and "".join(texts) == greedy.text
    assert finals[0].parameters["finish_reason"].string_param == "length"
    assert "no-such-model" in errors[0]


# -- the API key, and draining ----------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> KilnProcess:
    srv = KilnProcess(tmp_path_factory.mktemp("kiln-grpc-key"), "--shutdown-grace", "3",
                      env={"KILN_API_KEY": API_KEY}, grpc=True, wait=False)
    try:
        _wait_serving(srv)  # health answers without the key
        yield srv
    finally:
        srv.stop()


def test_api_key(keyed_server: KilnProcess):
    with grpc.insecure_channel(f"127.0.0.1:{keyed_server.grpc_port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(prompt=PROMPT, max_new_tokens=2, temperature=0)
        assert _code(stub.Generate, request) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(stub.Generate, request, metadata=[("authorization", "Bearer wrong")]) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda *a, **k: list(stub.GenerateStream(*a, **k)), request) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(stub.ModelInfo, pb.ModelInfoRequest(), metadata=[("authorization", API_KEY)]) == \
            grpc.StatusCode.UNAUTHENTICATED  # the key alone, without "Bearer "
        out = stub.Generate(request, metadata=[("authorization", f"Bearer {API_KEY}")], timeout=RPC_TIMEOUT)
        assert out.usage.completion_tokens == 2
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT).status == \
            health_pb2.HealthCheckResponse.SERVING

    client = triton.InferenceServerClient(f"127.0.0.1:{keyed_server.grpc_port}")
    try:
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.is_server_live()
        assert client.is_server_live(headers={"authorization": f"Bearer {API_KEY}"})
    finally:
        client.close()


def test_health_not_serving_while_draining(keyed_server: KilnProcess):
    """SIGTERM with a request in flight: health turns NOT_SERVING at once, while the process
    is still up finishing it; then the server exits 0. (Runs last: it stops the server.)"""
    auth = [("authorization", f"Bearer {API_KEY}")]
    with grpc.insecure_channel(f"127.0.0.1:{keyed_server.grpc_port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=2000, ignore_eos=True),
                                   metadata=auth, timeout=RPC_TIMEOUT)
        assert next(call).token_ids
        health = health_pb2_grpc.HealthStub(channel)
        keyed_server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT).status == \
                health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
            time.sleep(0.05)
        assert keyed_server.proc.poll() is None  # still draining the in-flight request
        assert _code(stub.Generate, pb.GenerateRequest(prompt=PROMPT, max_new_tokens=2), metadata=auth) == \
            grpc.StatusCode.UNAVAILABLE
        call.cancel()
    assert keyed_server.stop() == 0, keyed_server.log()
