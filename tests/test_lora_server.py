"""LoRA adapters through every door of a real `kiln serve` subprocess: the openai SDK (model =
adapter), TGI's client (adapter_id), SageMaker (/adapters, the adapter header, LMI's
`adapters`), gRPC (the adapter RPCs and adapter_id); hot load and unload while other requests
stream; bad loads refused with their reason; per-adapter metrics. Outputs are checked against
transformers + peft."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from text_generation import Client
from text_generation.errors import NotFoundError

from kiln.proto.kiln.v1 import inference_pb2 as pb
from kiln.proto.kiln.v1 import inference_pb2_grpc as pb_grpc
from kiln_process import KilnProcess
from lora_adapters import make_adapter, peft_greedy

PROMPT = "The capital of France is"
NEW = 12


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora-root")
    make_adapter(root / "hot", seed=11, rank=8)
    make_adapter(root / "boot", seed=12, rank=4, targets=["q_proj", "v_proj", "down_proj"], b_scale=0.6)
    return root


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    srv = KilnProcess(tmp_path_factory.mktemp("lora-server"), "--lora-root", str(root),
                      "--lora", f"boot={root / 'boot'}", grpc=True)
    try:
        yield srv
    finally:
        srv.stop()
        assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kiln.runtime.models.loader import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model("default")))


@pytest.fixture(scope="module")
def expected(root, tokenizer) -> dict[str | None, str]:
    """transformers + peft greedy text of PROMPT under each adapter (None: the base)."""
    ids = tokenizer.encode(PROMPT)
    out = {}
    for name in ("hot", "boot", None):
        tokens = peft_greedy(root / name if name else None, [ids], NEW)[0][0]
        out[name] = tokenizer.decode(tokens)
    assert len(set(out.values())) == 3
    return out


def _complete(http: httpx.Client, model: str | None = None, **extra) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "ignore_eos": True, **extra}
    if model:
        body["model"] = model
    return http.post("/v1/completions", json=body)


def _load(http: httpx.Client, name: str, path: Path | str) -> httpx.Response:
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def test_startup_adapter_through_the_openai_sdk(server, expected):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    models = {m.id: m for m in client.models.list().data}
    assert "boot" in models and models["boot"].model_extra["parent"] == "SmolLM2-135M-Instruct"
    done = client.completions.create(model="boot", prompt=PROMPT, max_tokens=NEW, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.model == "boot"
    assert done.choices[0].text == expected["boot"]
    base = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=NEW,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert base.choices[0].text == expected[None]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)


def test_hot_load_and_unload_while_requests_stream(server, http, root, expected):
    errors: list[str] = []
    texts: list[str] = []

    def stream_base() -> None:
        try:
            with httpx.Client(base_url=server.base_url, timeout=120) as c:
                r = _complete(c, max_tokens=48)
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    texts.append(r.json()["choices"][0]["text"])
        except Exception as exc:  # noqa: BLE001 - any failure is the test's failure
            errors.append(repr(exc))

    threads = [threading.Thread(target=stream_base) for _ in range(3)]
    for t in threads:
        t.start()
    r = _load(http, "hot", root / "hot")
    assert r.status_code == 200 and "added successfully" in r.text, r.text
    r = _complete(http, "hot")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected["hot"]
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(texts) == 3 and len(set(texts)) == 1, errors

    # unload while a request on the adapter runs: it finishes with all its tokens
    holder: dict[str, httpx.Response] = {}
    runner = threading.Thread(target=lambda: holder.setdefault("r", _complete(httpx.Client(
        base_url=server.base_url, timeout=120), "hot", max_tokens=64)))
    runner.start()
    _wait_running(http)
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "hot"})
    assert r.status_code == 200, r.text
    runner.join(timeout=300)
    finished = holder["r"]
    assert finished.status_code == 200, finished.text
    assert finished.json()["usage"]["completion_tokens"] == 64
    r = _complete(http, "hot")
    assert r.status_code == 404 and "hot" in r.json()["error"]["message"]
    assert "hot" not in {m["id"] for m in http.get("/v1/models").json()["data"]}


def _wait_running(http: httpx.Client) -> None:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if re.search(r"^kiln_num_requests_running 1\.0$", http.get("/metrics").text, re.M):
            return
        time.sleep(0.02)
    pytest.fail("the adapter request never started running")


def test_bad_loads_are_refused_and_the_server_keeps_serving(http, root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(root / "hot", outside)
    cases = [
        ({"lora_name": "x", "lora_path": str(outside)}, 400, "outside the allowed adapter roots"),
        ({"lora_name": "x", "lora_path": str(root / ".." / tmp_path.name / "outside")}, 400, "outside"),
        ({"lora_name": "x", "lora_path": str(root / "nope")}, 400, "does not exist"),
        ({"lora_name": "boot", "lora_path": str(root / "hot")}, 400, "already loaded"),
        ({"lora_name": "x"}, 400, "lora_path"),
    ]
    for body, status, words in cases:
        r = http.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == status, r.text
        assert words in r.json()["error"]["message"], r.text
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"})
    assert r.status_code == 404, r.text
    assert _complete(http, "boot").status_code == 200


def test_tgi_adapter_id(server, http, root, expected):
    assert _load(http, "tgi-hot", root / "hot").status_code == 200
    tgi = Client(server.base_url, timeout=120)
    # TGI's client has no ignore_eos; 12 greedy tokens of this prompt do not reach EOS.
    got = tgi.generate(PROMPT, max_new_tokens=NEW, adapter_id="tgi-hot")
    assert got.generated_text == expected["hot"]
    streamed = "".join(r.token.text for r in tgi.generate_stream(PROMPT, max_new_tokens=NEW, adapter_id="boot")
                       if not r.token.special)
    assert streamed == expected["boot"]
    with pytest.raises(NotFoundError):
        tgi.generate(PROMPT, max_new_tokens=2, adapter_id="nope")
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "tgi-hot"}).status_code == 200


def test_sagemaker_adapter_routes_header_and_lmi_field(http, root, expected):
    r = http.post("/adapters", json={"name": "sm", "src": str(root / "hot")})
    assert r.status_code == 200 and r.json()["name"] == "sm", r.text
    assert {a["name"] for a in http.get("/adapters").json()} >= {"sm", "boot"}
    header = {"X-Amzn-SageMaker-Adapter-Identifier": "sm"}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": NEW}}
    r = http.post("/invocations", json=body, headers=header)
    assert r.status_code == 200 and r.json()[0]["generated_text"] == expected["hot"], r.text
    r = http.post("/invocations", json={**body, "adapters": "boot"})
    assert r.json()[0]["generated_text"] == expected["boot"], r.text
    r = http.post("/invocations", json={"inputs": [PROMPT, PROMPT], "adapters": ["sm", ""],
                                        "parameters": {"max_new_tokens": NEW}})
    assert [x["generated_text"] for x in r.json()] == [expected["hot"], expected[None]], r.text
    r = http.post("/invocations", json={"prompt": PROMPT, "max_tokens": NEW, "temperature": 0}, headers=header)
    assert r.json()["choices"][0]["text"] == expected["hot"], r.text
    assert http.delete("/adapters/sm").status_code == 200
    r = http.post("/invocations", json=body, headers=header)
    assert r.status_code == 404 and r.json()["error_type"] == "not_found", r.text
    assert http.delete("/adapters/sm").status_code == 404


def test_grpc_adapter_rpcs(server, root, expected):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        loaded = stub.LoadAdapter(pb.LoadAdapterRequest(name="g", path=str(root / "hot")), timeout=60)
        assert loaded.adapter.name == "g"
        assert {a.name for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=60).adapters} >= {"g", "boot"}
        out = stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter_id="g", max_new_tokens=NEW,
                                               temperature=0, ignore_eos=True), timeout=60)
        assert out.text == expected["hot"]
        stub.UnloadAdapter(pb.UnloadAdapterRequest(name="g"), timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter_id="g"), timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadAdapter(pb.LoadAdapterRequest(name="g", path="/etc"), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside" in info.value.details()


def test_per_adapter_metrics(http):
    assert _complete(http, "boot").status_code == 200
    text = http.get("/metrics").text
    requests = re.search(r'^kiln_lora_requests_total\{adapter="boot"\} (\S+)$', text, re.M)
    tokens = re.search(r'^kiln_lora_generation_tokens_total\{adapter="boot"\} (\S+)$', text, re.M)
    assert requests and float(requests.group(1)) >= 1
    assert tokens and float(tokens.group(1)) >= NEW
    assert re.search(r'^kiln_lora_time_to_first_token_seconds_count\{adapter="boot"\} [1-9]', text, re.M)
    assert re.search(r"^kiln_lora_adapters_loaded [1-9]", text, re.M)
    assert re.search(r"^kiln_lora_loads_total [1-9]", text, re.M)
