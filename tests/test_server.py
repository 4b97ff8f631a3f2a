"""End-to-end tests of `kiln serve`: a real server process on a loopback port, exercised with
the official `openai` client and plain HTTP (httpx)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from kiln_process import KilnProcess

# Answered at length: greedy output runs past the small max_tokens used here.
CHAT = [{"role": "user", "content": "Write a long story about a dragon who lives in a castle."}]


# -- the server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> KilnProcess:
    srv = KilnProcess(tmp_path_factory.mktemp("kiln-server"))
    yield srv
    # SIGTERM drains and exits 0 after a clean shutdown.
    assert srv.stop() == 0, f"kiln serve exited with {srv.proc.returncode}:\n{srv.log()}"
    log_text = srv.log()
    assert "Application shutdown complete" in log_text, log_text
    assert "Traceback" not in log_text, log_text


@pytest.fixture(scope="module")
def http(server: KilnProcess):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: KilnProcess) -> openai.OpenAI:
    c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def hf_tokenizer(model: str):
    """The model's tokenizer straight from its folder, independent of the server."""
    cache = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
    folders = sorted(p.parent for p in cache.glob(f"models/{model}*/tokenizer.json"))
    assert folders, f"no converted model folder for {model} under {cache} (the server converts it at start)"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folders[0]))


def _metrics(http: httpx.Client) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value}."""
    r = http.get("/metrics")
    assert r.status_code == 200
    out = {}
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def _stream_text(stream) -> tuple[str, str | None, list]:
    """Concatenated text and the finish_reason of a one-choice completions stream."""
    text, finish, chunks = "", None, []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            assert choice.index == 0
            text += choice.text or ""
            if choice.finish_reason is not None:
                assert finish is None, "two chunks carried a finish_reason"
                finish = choice.finish_reason
    return text, finish, chunks


def _chat_stream_text(stream) -> tuple[str, str | None, object]:
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == [], "the usage chunk must have no choices"
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason is not None:
                assert finish is None
                finish = choice.finish_reason
    return text, finish, usage


# -- models and health --------------------------------------------------------------------


def test_health_and_models(server: KilnProcess, http: httpx.Client, client: openai.OpenAI):
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].id == r.json()["model"] == "SmolLM2-135M-Instruct"
    assert models[0].object == "model"


# -- completions --------------------------------------------------------------------------


def test_completion_greedy_usage_and_stream(client: openai.OpenAI, model: str, hf_tokenizer):
    prompt = "The capital of France is"
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
    assert resp.object == "text_completion" and resp.model == model
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.text.strip()
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(hf_tokenizer.encode(prompt))
    assert resp.usage.completion_tokens == 16
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 16
    # The text is the decoding of exactly 16 tokens.
    assert len(hf_tokenizer.encode(choice.text, add_special_tokens=False)) in range(12, 21)

    # Greedy is deterministic.
    again = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
    assert again.choices[0].text == choice.text

    stream = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    text, finish, chunks = _stream_text(stream)
    assert text == choice.text
    assert finish == "length"
    assert len([c for c in chunks if c.choices]) > 1, "the stream came in one piece"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 16


def test_completion_token_id_prompt(client: openai.OpenAI, model: str, hf_tokenizer):
    text = "Once upon a time, there was a little"
    ids = hf_tokenizer.encode(text)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=model, prompt=text, max_tokens=8, temperature=0)
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_completion_n_and_seed(client: openai.OpenAI, model: str):
    kwargs = dict(model=model, prompt="My favourite food is", max_tokens=12, temperature=1.0, n=2, seed=1234)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert all(t for t in texts)
    assert first.usage.completion_tokens == second.usage.completion_tokens
    assert first.usage.prompt_tokens == 2 * client.completions.create(
        model=model, prompt="My favourite food is", max_tokens=1, temperature=0).usage.prompt_tokens
    # A different seed is a different sample (12 tokens at temperature 1 from a 135M model).
    other = client.completions.create(**{**kwargs, "seed": 98765})
    assert [c.text for c in sorted(other.choices, key=lambda c: c.index)] != texts


def test_completion_n_stream_indices(client: openai.OpenAI, model: str):
    stream = client.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0,
                                       n=2, stream=True)
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    # Greedy: both choices are the same text.
    assert texts[0] and texts[0] == texts[1]


def _pick_stop(text: str) -> tuple[str, str]:
    """A stop string from the middle of `text` and the text before its first occurrence."""
    for width in (4, 3, 5, 2):
        for start in range(len(text) // 3, 2 * len(text) // 3 + 1):
            stop = text[start:start + width]
            if len(stop) < width or not stop.strip():
                continue
            cut = text.find(stop)
            # Occurs first in the middle, not at the very start.
            if cut >= 2:
                return stop, text[:cut]
    raise AssertionError(f"no usable stop string in {text!r}")


def test_completion_stop_strings(client: openai.OpenAI, model: str):
    prompt = "Here is a short story about a dog:"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length"
    stop, expected = _pick_stop(text)

    cut = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected, (text, stop)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 24

    stream = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                       stop=[stop], stream=True)
    streamed, finish, _ = _stream_text(stream)
    assert streamed == expected
    assert finish == "stop"

    # And in chat.
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0)
    ctext = chat.choices[0].message.content
    cstop, cexpected = _pick_stop(ctext)
    ccut = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0, stop=cstop)
    assert ccut.choices[0].message.content == cexpected
    assert ccut.choices[0].finish_reason == "stop"


def test_completion_logprobs(client: openai.OpenAI, model: str):
    resp = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=8,
                                     temperature=0, logprobs=2)
    choice = resp.choices[0]
    lp = choice.logprobs
    n = resp.usage.completion_tokens
    assert n == 8
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0
        assert 1 <= len(top) <= 2
        assert all(v <= 0.0 for v in top.values())
        # Greedy: the sampled token is the most likely one.
        assert token in top
        assert logprob == pytest.approx(max(top.values()), abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset)

    stream = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=8,
                                       temperature=0, logprobs=2, stream=True)
    tokens, logprobs = [], []
    for chunk in stream:
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                logprobs += c.logprobs.token_logprobs
    assert tokens == lp.tokens
    assert logprobs == pytest.approx(lp.token_logprobs, abs=1e-4)


# -- chat ---------------------------------------------------------------------------------


def test_chat_greedy_and_stream(client: openai.OpenAI, model: str, hf_tokenizer):
    resp = client.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0)
    assert resp.object == "chat.completion"
    msg = resp.choices[0].message
    assert msg.role == "assistant"
    assert msg.content and msg.content.strip()
    assert resp.choices[0].finish_reason == "length"
    templated = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert resp.usage.prompt_tokens == len(hf_tokenizer.encode(templated, add_special_tokens=False))
    assert resp.usage.completion_tokens == 16
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 16

    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, finish, usage = _chat_stream_text(stream)
    assert text == msg.content
    assert finish == "length"
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (resp.usage.prompt_tokens, 16)


def test_chat_finishes_with_stop_on_eos(client: openai.OpenAI, model: str):
    messages = [{"role": "user", "content": "Reply with just the word: yes"}]
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=64, temperature=0)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens < 64
    assert "<|im_end|>" not in resp.choices[0].message.content


def test_chat_n_seed(client: openai.OpenAI, model: str):
    kwargs = dict(model=model, messages=CHAT, max_tokens=10, temperature=1.0, n=2, seed=7)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1]
    key = lambda r: [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]  # noqa: E731
    assert key(a) == key(b)
    assert all(key(a))


def test_chat_logprobs(client: openai.OpenAI, model: str):
    resp = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 8
    assert "".join(e.token for e in content) == resp.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0.0
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert 1 <= len(entry.top_logprobs) <= 3
        best = max(t.logprob for t in entry.top_logprobs)
        assert entry.logprob == pytest.approx(best, abs=1e-4)
        assert entry.token in [t.token for t in entry.top_logprobs]

    plain = client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


# -- bad input ----------------------------------------------------------------------------


BAD_REQUESTS = [
    # (id, path, body (dict, or raw bytes), status, words the message must contain)
    ("invalid-json", "/v1/completions", b'{"prompt": "hi", ', 400, ["json"]),
    ("empty-body", "/v1/completions", b"", 400, ["body"]),
    ("not-an-object", "/v1/completions", b"[1, 2]", 400, ["object"]),
    ("missing-prompt", "/v1/completions", {"max_tokens": 4}, 400, ["prompt"]),
    ("missing-messages", "/v1/chat/completions", {"max_tokens": 4}, 400, ["messages"]),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, ["messages"]),
    ("bad-role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, ["role"]),
    ("max-tokens-0", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, ["max_tokens"]),
    ("max-tokens-neg", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, ["max_tokens"]),
    ("chat-max-tokens-0", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, ["max_tokens"]),
    ("temperature-neg", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, ["temperature"]),
    ("top-p-0", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, ["top_p"]),
    ("prompt-too-long", "/v1/completions", {"prompt": "hello " * 9000, "max_tokens": 4}, 400,
     ["prompt", "context"]),
    ("max-tokens-too-many", "/v1/completions", {"prompt": "hi", "max_tokens": 100000}, 400, ["max_tokens"]),
    ("unknown-model", "/v1/completions", {"prompt": "hi", "model": "no-such-model"}, 404, ["no-such-model"]),
    ("unknown-model-chat", "/v1/chat/completions",
     {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, ["no-such-model"]),
    ("n-0", "/v1/completions", {"prompt": "hi", "n": 0}, 400, ["n"]),
    ("prompt-int", "/v1/completions", {"prompt": 5}, 400, ["prompt"]),
    ("prompt-empty-list", "/v1/completions", {"prompt": []}, 400, ["prompt"]),
    ("prompt-token-out-of-vocab", "/v1/completions", {"prompt": [10**9], "max_tokens": 2}, 400, ["prompt"]),
    ("max-tokens-string", "/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, ["max_tokens"]),
    ("empty-stop", "/v1/completions", {"prompt": "hi", "stop": [""]}, 400, ["stop"]),
    ("logprobs-too-many", "/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, ["logprobs"]),
    ("top-logprobs-without-logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, ["top_logprobs", "logprobs"]),
    ("suffix", "/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, ["suffix"]),
]


def _assert_error_shape(r: httpx.Response, status: int, words: list[str]) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "code"} <= set(err), err
    assert isinstance(err["message"], str) and len(err["message"]) > 5
    assert isinstance(err["type"], str) and err["type"]
    assert err["code"] == status
    for word in words:
        assert word.lower() in err["message"].lower(), (word, err["message"])
    return err


@pytest.mark.parametrize("name,path,body,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests(http: httpx.Client, name, path, body, status, words):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    err = _assert_error_shape(r, status, words)
    expected_type = "not_found_error" if status == 404 else "invalid_request_error"
    assert err["type"] == expected_type


def test_bad_requests_leave_server_healthy(http: httpx.Client, model: str):
    for _, path, body, status, _ in BAD_REQUESTS:
        if isinstance(body, bytes):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    m = _metrics(http)
    assert m['kiln_http_errors_total{status="400"}'] >= sum(1 for b in BAD_REQUESTS if b[3] == 400)
    assert m['kiln_http_errors_total{status="404"}'] >= 2


def test_unknown_route_is_404_json(http: httpx.Client):
    _assert_error_shape(http.get("/v1/nothing-here"), 404, [])


def test_openai_client_errors(client: openai.OpenAI, model: str):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model, prompt="hi", max_tokens=0)
    assert bad.value.status_code == 400
    assert "max_tokens" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=CHAT, temperature=5)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-nothing", messages=CHAT, max_tokens=2)
    assert missing.value.status_code == 404
    assert "gpt-nothing" in missing.value.message


# -- disconnects, concurrency, metrics ----------------------------------------------------


def test_client_disconnect_mid_stream_frees_everything(server: KilnProcess, http: httpx.Client, model: str):
    before = _metrics(http)
    assert before["kiln_num_requests_running"] == 0
    body = {"model": model, "prompt": "Count forever:", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as own:
        with own.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            received = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    payload = json.loads(line[len("data: "):])
                    assert payload["choices"][0]["finish_reason"] is None
                    received += 1
                    if received == 4:
                        break
            during = _metrics(http)
            assert during["kiln_num_requests_running"] == 1
            assert during["kiln_kv_cache_blocks_free"] < during["kiln_kv_cache_blocks_total"]
        # Leaving the block closes the response (and so the connection) mid-stream.

    deadline = time.monotonic() + 10
    while True:
        m = _metrics(http)
        if (m["kiln_num_requests_running"] == 0 and m["kiln_num_requests_waiting"] == 0
                and m["kiln_kv_cache_blocks_free"] == m["kiln_kv_cache_blocks_total"]):
            break
        assert time.monotonic() < deadline, f"request not aborted after disconnect: {m}\n{server.log()}"
        time.sleep(0.2)
    # Aborted, not run to 2000 tokens: the generation counter moved by far less.
    assert m["kiln_generation_tokens_total"] - before["kiln_generation_tokens_total"] < 1000
    assert m.get('kiln_requests_total{finish_reason="abort"}', 0) >= 1
    # And the server still serves.
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200


PROMPTS = [
    "The capital of Italy is",
    "def fibonacci(n):",
    "A recipe for pancakes: first,",
    "The three laws of robotics are",
    "In 1969, the first person to walk on the moon",
    "My name is Sarah and I",
    "Water boils at",
    "The best way to learn a language is",
]


def test_concurrent_requests_match_sequential(server: KilnProcess, model: str):
    async def run() -> tuple[list[str], list[str], list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x",
                                      max_retries=0, timeout=120) as ac:
            async def one(prompt: str) -> str:
                r = await ac.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
                assert r.choices[0].finish_reason == "length"
                return r.choices[0].text

            async def one_chat(prompt: str) -> str:
                r = await ac.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0)
                return r.choices[0].message.content

            alone = [await one(p) for p in PROMPTS]
            together = await asyncio.gather(*(one(p) for p in PROMPTS))
            # Mixed: completions and chat streams at once.
            mixed = await asyncio.gather(*(one(p) for p in PROMPTS[:4]), *(one_chat(p) for p in PROMPTS[:4]))
            chat_alone = [await one_chat(p) for p in PROMPTS[:4]]
            return alone, list(together), list(mixed), chat_alone

    alone, together, mixed, chat_alone = asyncio.run(run())
    assert all(alone)
    assert len(set(alone)) == len(alone)
    for prompt, a, t in zip(PROMPTS, alone, together):
        assert t == a, f"{prompt!r}: batched {t!r} != alone {a!r}"
    assert mixed == alone[:4] + chat_alone


def test_metrics_track_requests(http: httpx.Client, model: str):
    before = _metrics(http)
    r = http.post("/v1/completions", json={"model": model, "prompt": "The sky is", "max_tokens": 5,
                                           "temperature": 0})
    assert r.status_code == 200
    usage = r.json()["usage"]
    after = _metrics(http)
    assert after["kiln_time_to_first_token_seconds_count"] > 0
    assert after["kiln_time_to_first_token_seconds_count"] == before["kiln_time_to_first_token_seconds_count"] + 1
    assert after["kiln_e2e_request_latency_seconds_count"] == before["kiln_e2e_request_latency_seconds_count"] + 1
    assert after["kiln_prompt_tokens_total"] == before["kiln_prompt_tokens_total"] + usage["prompt_tokens"]
    assert after["kiln_generation_tokens_total"] == (before["kiln_generation_tokens_total"]
                                                      + usage["completion_tokens"])
    # (a labelled counter appears with its first request: absent before it on a fresh server)
    assert after['kiln_requests_total{finish_reason="length"}'] == (
        before.get('kiln_requests_total{finish_reason="length"}', 0) + 1)
    assert after["kiln_engine_steps_total"] > before["kiln_engine_steps_total"]
    assert after["kiln_num_requests_running"] == 0
    assert 0 < after["kiln_kv_cache_blocks_total"]
    assert re.search(r"^# TYPE kiln_time_to_first_token_seconds histogram$", http.get("/metrics").text, re.M)


def test_the_benchmark_load_generator_measures_a_real_server(server: KilnProcess, model: str):
    """bench/serving.py (the harness's client for every peer) against a running kiln: streamed
    requests at a fixed concurrency, tokens counted from the usage the stream ends with, one
    TTFT per request and an inter-token gap per later token; a request the server refuses is
    counted as an error with its status, not as tokens."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import serving

    prompts = serving.make_prompts(5, 0, 5, 30)
    r = asyncio.run(serving.run_load(server.base_url, model, prompts, 6, 2, None, 0, None))
    assert (r["requests"], r["ok"], r["errors"]) == (5, 5, 0), r
    assert r["output_tokens"] == 30 and r["tokens_per_request_min"] == r["tokens_per_request_max"] == 6
    assert 0 < r["ttft_p50"] <= r["ttft_p99"] < r["seconds"]
    assert 0 < r["itl_p50"] <= r["itl_p99"] and r["tokens_per_s"] > 0
    bad = asyncio.run(serving.run_load(server.base_url, model, prompts[:2], 6, 2, None, 0, None,
                                       extra_body={"max_tokens": -1}))
    assert (bad["ok"], bad["errors"], bad["error_kinds"], bad["output_tokens"]) == (0, 2, ["HTTP 400"], 0), bad
