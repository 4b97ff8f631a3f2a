"""End-to-end tests of the TGI- and SageMaker-compatible HTTP surfaces: a real `kiln serve`
process on a loopback port, exercised with TGI's own Python client (`text_generation`) and
plain HTTP (httpx)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from text_generation import Client
from text_generation.errors import OverloadedError, ValidationError, parse_error

# text_generation 0.7 calls pydantic's deprecated `.dict()`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")

STARTUP_TIMEOUT_S = 120
STORY = "Once upon a time, in a land far away,"  # greedy output runs past 16 tokens
# A ChatML prompt the model answers briefly, ending with its EOS token.
CHATML = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
ATTRS = "X-Amzn-SageMaker-Custom-Attributes"


# -- servers ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, base_url: str, log_path: Path) -> None:
        self.proc, self.base_url, self.log_path = proc, base_url, log_path
        self.ping_statuses: list[int] = []  # /ping answers seen while waiting for it to be 200

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _start(tmp_path_factory, *extra: str) -> Server:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("kiln-tgi") / "server.log"
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--grpc-port", "0", "--kv-cache-bytes", "256M", *extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    srv = Server(proc, base_url, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"kiln serve exited with {proc.returncode} while starting:\n{srv.log()}")
            try:
                status = httpx.get(f"{base_url}/ping", timeout=5).status_code
                srv.ping_statuses.append(status)
                if status == 200 and httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                    return srv
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"kiln serve not ready after {STARTUP_TIMEOUT_S} s:\n{srv.log()}")
            time.sleep(0.1)
    except BaseException:
        srv.stop()
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _start(tmp_path_factory)
    try:
        yield srv
    finally:
        srv.stop()
        assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def http(server: Server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tgi(server: Server) -> Client:
    return Client(server.base_url, timeout=120)


def _openai_completion(http: httpx.Client, prompt, max_tokens: int) -> str:
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _sse_events(text: str) -> list[dict]:
    events = []
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload != "[DONE]":
                events.append(json.loads(payload))
    return events


def _assert_tgi_error(r: httpx.Response, status: int, error_type: str, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"}, body
    assert body["error_type"] == error_type, body
    for word in words:
        assert word.lower() in body["error"].lower(), body


# -- TGI with TGI's own client ------------------------------------------------------------


def test_generate_greedy_matches_openai_and_details(tgi: Client, http: httpx.Client):
    r = tgi.generate(STORY, max_new_tokens=12)  # do_sample defaults to False: greedy
    assert r.generated_text == _openai_completion(http, STORY, 12)
    d = r.details
    assert d.finish_reason.value == "length"
    assert d.generated_tokens == 12 and len(d.tokens) == 12
    assert "".join(t.text for t in d.tokens if not t.special) == r.generated_text
    assert all(t.logprob is not None and t.logprob <= 0 for t in d.tokens)
    assert d.seed is None and d.prefill == [] and d.top_tokens is None
    # do_sample=False stays greedy whatever the temperature.
    hot = tgi.generate(STORY, max_new_tokens=12, temperature=1.9, top_k=50)
    assert hot.generated_text == r.generated_text


def test_generate_stream_matches_generate(tgi: Client):
    full = tgi.generate(STORY, max_new_tokens=10)
    events = list(tgi.generate_stream(STORY, max_new_tokens=10))
    assert len(events) == 10
    assert "".join(e.token.text for e in events if not e.token.special) == full.generated_text
    assert [e.token.id for e in events] == [t.id for t in full.details.tokens]
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == full.generated_text
    assert last.details.finish_reason.value == "length" and last.details.generated_tokens == 10


def test_eos_is_a_special_token(tgi: Client):
    r = tgi.generate(CHATML, max_new_tokens=60)
    assert r.details.finish_reason.value == "eos_token"
    assert r.details.tokens[-1].special and r.details.tokens[-1].text not in r.generated_text
    assert r.generated_text.strip() and r.details.generated_tokens == len(r.details.tokens) < 60
    events = list(tgi.generate_stream(CHATML, max_new_tokens=60))
    assert events[-1].token.special and events[-1].details.finish_reason.value == "eos_token"
    assert "".join(e.token.text for e in events if not e.token.special) == r.generated_text


def test_stop_sequences(tgi: Client):
    reference = tgi.generate(STORY, max_new_tokens=16).generated_text
    stop = "kingdom" if "kingdom" in reference else reference.split()[2]
    expected = reference[: reference.index(stop) + len(stop)]  # TGI keeps the stop sequence
    r = tgi.generate(STORY, max_new_tokens=16, stop_sequences=[stop])
    assert r.generated_text == expected
    assert r.details.finish_reason.value == "stop_sequence"
    assert r.details.generated_tokens < 16
    events = list(tgi.generate_stream(STORY, max_new_tokens=16, stop_sequences=[stop]))
    assert events[-1].generated_text == expected
    assert events[-1].details.finish_reason.value == "stop_sequence"


def test_seed_reproducibility(tgi: Client):
    kw = dict(do_sample=True, max_new_tokens=8, temperature=1.5)
    a = tgi.generate("My favourite animal is", seed=7, **kw)
    b = tgi.generate("My favourite animal is", seed=7, **kw)
    assert a.generated_text == b.generated_text and a.details.seed == 7
    others = {tgi.generate("My favourite animal is", seed=s, **kw).generated_text for s in (8, 9, 10)}
    assert others - {a.generated_text}, "different seeds all gave the same sample"
    # Without a seed the server picks one and reports it; it reproduces the sample.
    c = tgi.generate("My favourite animal is", **kw)
    assert c.details.seed is not None
    assert tgi.generate("My favourite animal is", seed=c.details.seed, **kw).generated_text == c.generated_text


def test_top_n_tokens(tgi: Client):
    r = tgi.generate(STORY, max_new_tokens=4, top_n_tokens=3)
    top = r.details.top_tokens
    assert len(top) == 4
    for token, alternatives in zip(r.details.tokens, top):
        assert len(alternatives) == 3
        logprobs = [t.logprob for t in alternatives]
        assert logprobs == sorted(logprobs, reverse=True)
        assert alternatives[0].id == token.id  # greedy picks the most likely token
        assert alternatives[0].logprob == pytest.approx(token.logprob, abs=1e-5)
    events = list(tgi.generate_stream(STORY, max_new_tokens=4, top_n_tokens=2))
    assert all(len(e.top_tokens) == 2 and e.top_tokens[0].id == e.token.id for e in events)


def test_client_errors(tgi: Client):
    with pytest.raises(ValidationError, match="max_new_tokens"):
        tgi.generate(STORY, max_new_tokens=0)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        list(tgi.generate_stream(STORY, max_new_tokens=0))
    with pytest.raises(ValidationError, match="8192"):
        tgi.generate(STORY, max_new_tokens=10**6)
    with pytest.raises(ValidationError, match="decoder_input_details"):
        tgi.generate(STORY, max_new_tokens=2, decoder_input_details=True)
    assert tgi.generate(STORY, max_new_tokens=2).details.generated_tokens == 2


# -- TGI over plain HTTP ------------------------------------------------------------------


def test_info_and_tokenize(http: httpx.Client):
    info = http.get("/info").json()
    model = http.get("/v1/models").json()["data"][0]["id"]
    assert info["model_id"] == model
    assert info["max_total_tokens"] == 8192 and info["max_input_tokens"] == 8191
    assert info["max_concurrent_requests"] == 256 and isinstance(info["version"], str)
    text = "Hello world, café!"
    pieces = http.post("/tokenize", json={"inputs": text}).json()
    assert all(p["text"] == text[p["start"]:p["stop"]] for p in pieces)
    assert "".join(p["text"] for p in pieces) == text
    usage = http.post("/v1/completions", json={"prompt": text, "max_tokens": 1}).json()["usage"]
    assert len(pieces) == usage["prompt_tokens"]
    assert len(http.post("/tokenize", json={"inputs": text, "parameters": {"truncate": 2}}).json()) == 2


def test_truncate_keeps_the_last_tokens(http: httpx.Client):
    ids = [p["id"] for p in http.post("/tokenize", json={"inputs": STORY}).json()]
    r = http.post("/generate", json={"inputs": STORY, "parameters": {"max_new_tokens": 6, "truncate": 4}})
    assert r.status_code == 200, r.text
    assert r.headers["x-prompt-tokens"] == "4" and r.headers["x-generated-tokens"] == "6"
    assert r.json()["generated_text"] == _openai_completion(http, ids[-4:], 6)
    assert r.json()["generated_text"] != _openai_completion(http, ids, 6)


def test_return_full_text_and_compat_route(http: httpx.Client):
    r = http.post("/generate", json={"inputs": STORY, "parameters": {"max_new_tokens": 5, "return_full_text": True}})
    assert r.status_code == 200 and set(r.json()) == {"generated_text"}  # no details unless asked
    assert r.json()["generated_text"] == STORY + _openai_completion(http, STORY, 5)
    compat = http.post("/", json={"inputs": STORY, "parameters": {"max_new_tokens": 5}})
    assert compat.json() == [{"generated_text": _openai_completion(http, STORY, 5)}]


@pytest.mark.parametrize("body,words", [
    (b"not json", ["not valid JSON"]),
    (b"", ["empty"]),
    (b"[1, 2]", ["JSON object"]),
    (b'{"parameters": {}}', ["inputs", "required"]),
    (b'{"inputs": ""}', ["inputs", "cannot be empty"]),
    (b'{"inputs": "x", "parameters": {"temperature": -1}}', ["temperature"]),
    (b'{"inputs": "x", "parameters": {"max_new_tokens": "many"}}', ["max_new_tokens", "integer"]),
    (b'{"inputs": "x", "parameters": {"stop": [""]}}', ["stop"]),
    (b'{"inputs": "x", "parameters": {"top_n_tokens": 50}}', ["top_n_tokens"]),
    (b'{"inputs": "x", "parameters": {"best_of": 2}}', ["best_of"]),
    (b'{"inputs": "x", "parameters": {"truncate": 100000}}', ["truncate"]),
])
def test_tgi_validation_errors(http: httpx.Client, body: bytes, words: list[str]):
    for path in ("/generate", "/generate_stream"):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        _assert_tgi_error(r, 422, "validation", *words)


def test_unknown_adapter_is_404(http: httpx.Client):
    for path in ("/generate", "/generate_stream"):
        r = http.post(path, json={"inputs": "x", "parameters": {"adapter_id": "my-lora"}})
        _assert_tgi_error(r, 404, "not_found", "adapter", "my-lora", "not loaded")


def test_server_still_serves_after_bad_requests(http: httpx.Client, tgi: Client):
    http.post("/generate", content=b"{", headers={"content-type": "application/json"})
    assert tgi.generate(STORY, max_new_tokens=3).details.generated_tokens == 3
    assert http.get("/health").status_code == 200


# -- SageMaker --------------------------------------------------------------------------


def test_ping(server: Server, http: httpx.Client):
    r = http.get("/ping")
    assert r.status_code == 200 and r.content == b""


def test_invocations_tgi_body(http: httpx.Client, tgi: Client):
    expected = tgi.generate(STORY, max_new_tokens=8).generated_text
    r = http.post("/invocations", json={"inputs": STORY, "parameters": {"max_new_tokens": 8}},
                  headers={ATTRS: "trace=abc,tenant=7", "X-Unknown-Header": "ignored"})
    assert r.status_code == 200, r.text
    assert r.json() == [{"generated_text": expected}]
    assert r.headers[ATTRS] == "trace=abc,tenant=7"
    # LMI's spelling (stop_sequences) and details; and a batch of prompts.
    r = http.post("/invocations", json={"inputs": STORY, "parameters": {
        "max_new_tokens": 8, "do_sample": False, "details": True, "stop_sequences": [expected.split()[1]]}})
    (result,) = r.json()
    assert result["details"]["finish_reason"] == "stop_sequence"
    assert expected.startswith(result["generated_text"]) and len(result["generated_text"]) < len(expected)
    r = http.post("/invocations", json={"inputs": [STORY, CHATML], "parameters": {"max_new_tokens": 8}})
    assert [x["generated_text"] for x in r.json()] == [expected, tgi.generate(CHATML, max_new_tokens=8).generated_text]
    assert ATTRS not in r.headers


def test_invocations_openai_chat_body(http: httpx.Client):
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]
    expected = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0}).json()
    r = http.post("/invocations", json={"messages": messages, "max_tokens": 8, "temperature": 0,
                                        "model": "any-name-the-client-likes"}, headers={ATTRS: "x=1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and r.headers[ATTRS] == "x=1"
    assert body["choices"][0]["message"] == expected["choices"][0]["message"]
    assert body["usage"] == expected["usage"]


def test_invocations_openai_completion_body(http: httpx.Client):
    r = http.post("/invocations", json={"prompt": STORY, "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == _openai_completion(http, STORY, 7)
    assert body["usage"]["completion_tokens"] == 7


def test_invocations_raw_text(http: httpx.Client, tgi: Client):
    expected = tgi.generate(CHATML, max_new_tokens=100).generated_text  # the default budget
    for content_type in ("application/x-text", "text/plain; charset=utf-8"):
        r = http.post("/invocations", content=CHATML.encode(), headers={"content-type": content_type, ATTRS: "raw"})
        assert r.status_code == 200, r.text
        assert r.json() == [{"generated_text": expected}] and r.headers[ATTRS] == "raw"


def test_invocations_streaming_sse_and_jsonlines(http: httpx.Client, tgi: Client):
    expected = tgi.generate(STORY, max_new_tokens=6).generated_text
    body = {"inputs": STORY, "parameters": {"max_new_tokens": 6, "details": True}, "stream": True}
    r = http.post("/invocations", json=body, headers={ATTRS: "s=1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers[ATTRS] == "s=1"
    events = _sse_events(r.text)
    assert len(events) == 6 and [e["index"] for e in events] == list(range(1, 7))
    assert "".join(e["token"]["text"] for e in events) == expected == events[-1]["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "length"
    for accept in ("application/jsonlines", "application/x-ndjson"):
        r = http.post("/invocations", json=body, headers={"accept": accept})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/jsonlines")
        lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        assert "data:" not in r.text and len(lines) == 6
        assert all(set(line["token"]) == {"id", "text", "logprob", "special"} for line in lines)
        assert "".join(line["token"]["text"] for line in lines) == expected == lines[-1]["generated_text"]
        assert all(line["generated_text"] is None for line in lines[:-1])
    # An OpenAI chat body streams OpenAI chunks, as JSON lines when asked.
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "stream": True}
    sse = _sse_events(http.post("/invocations", json=chat).text)
    lines = [json.loads(x) for x in http.post("/invocations", json=chat, headers={"accept": "application/jsonlines"}).text.splitlines()]
    assert all(x["object"] == "chat.completion.chunk" for x in lines)
    content = lambda chunks: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content(lines) == content(sse) and content(lines)


@pytest.mark.parametrize("content,content_type,status,words", [
    (b"{not json", "application/json", 422, ["not valid JSON"]),
    (b'{"something": 1}', "application/json", 422, ["inputs", "messages", "prompt"]),
    (b'{"inputs": ""}', "application/json", 422, ["inputs", "empty"]),
    (b'{"inputs": "x", "parameters": {"max_new_tokens": 0}}', "application/json", 422, ["max_new_tokens"]),
    (b'{"inputs": ["a", "b"], "stream": true}', "application/json", 422, ["single prompt"]),
    (b"", "application/x-text", 422, ["inputs", "empty"]),
    (b"\xff\xfe", "application/x-text", 422, ["UTF-8"]),
    (b"x", "image/png", 415, ["Content-Type", "application/json", "application/x-text"]),
])
def test_invocations_bad_tgi_bodies(http: httpx.Client, content, content_type, status, words):
    r = http.post("/invocations", content=content, headers={"content-type": content_type, ATTRS: "bad=1"})
    _assert_tgi_error(r, status, "validation", *words)
    assert r.headers[ATTRS] == "bad=1"


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": 9}, "temperature"),
])
def test_invocations_bad_openai_bodies(http: httpx.Client, body, param):
    r = http.post("/invocations", json=body, headers={ATTRS: "bad=2"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]  # OpenAI's shape for OpenAI bodies
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]
    assert r.headers[ATTRS] == "bad=2"
    ok = http.post("/invocations", json={"inputs": STORY, "parameters": {"max_new_tokens": 2}})
    assert ok.status_code == 200 and ok.json()[0]["generated_text"]


# -- overload and drain, on a server admitting one request at a time ---------------------


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    srv = _start(tmp_path_factory, "--max-concurrent-requests", "1")
    try:
        yield srv
    finally:
        srv.stop()


def test_ping_is_503_while_loading(small_server: Server):
    # The port opens before the model is loaded; /ping says 503 until then.
    assert small_server.ping_statuses[0] == 503, small_server.ping_statuses
    assert small_server.ping_statuses[-1] == 200 and set(small_server.ping_statuses) == {503, 200}


def test_overload_gives_tgi_429s_and_admitted_requests_finish(small_server: Server):
    url = f"{small_server.base_url}/generate"
    body = {"inputs": STORY, "parameters": {"max_new_tokens": 16}}
    expected = httpx.post(url, json=body, timeout=120).json()["generated_text"]

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(url, json=body) for _ in range(8)))

    responses = asyncio.run(flood())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == len(responses), [r.text for r in responses]
    assert ok and refused, [r.status_code for r in responses]
    assert all(r.json()["generated_text"] == expected for r in ok)
    for r in refused:
        _assert_tgi_error(r, 429, "overloaded", "retry")
        assert r.headers["Retry-After"] == "1"
        assert isinstance(parse_error(429, r.json()), OverloadedError)  # as TGI's client names it
    assert httpx.post(url, json=body, timeout=120).json()["generated_text"] == expected


def test_ping_is_503_while_draining(small_server: Server):
    url = small_server.base_url
    result: dict = {}

    def long_request() -> None:
        result["response"] = httpx.post(f"{url}/generate", json={"inputs": STORY, "parameters": {"max_new_tokens": 48}},
                                        timeout=120)

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.5)  # admitted and running
    small_server.proc.send_signal(signal.SIGTERM)
    statuses = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and 503 not in statuses:
        try:
            statuses.append(httpx.get(f"{url}/ping", timeout=5).status_code)
        except httpx.TransportError:
            break  # the server is gone already
        time.sleep(0.05)
    assert statuses and statuses[-1] == 503, (statuses, small_server.log())
    worker.join(timeout=120)
    assert result["response"].status_code == 200, result["response"].text
    assert len(result["response"].json()["generated_text"]) > 20  # it ran to the end
    assert small_server.proc.wait(timeout=40) in (0, -signal.SIGTERM), small_server.log()
