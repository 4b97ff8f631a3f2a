"""The pure parts of bench/peers.py (no server is started): roof arithmetic, medians,
the alternating schedule, the table, prompt construction, and serving.py's request body."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peers  # noqa: E402
import serving  # noqa: E402

# SmolLM2-135M's config.json (the default model), as kiln converts it.
SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "vocab_size": 49152, "tie_word_embeddings": True}


def word_tokenizer() -> peers.Tokenizer:
    """A whitespace tokenizer with a growing vocabulary: one token per word."""
    vocab: dict[str, int] = {}
    inverse: list[str] = []

    def encode(text: str) -> list[int]:
        ids = []
        for w in text.split():
            if w not in vocab:
                vocab[w] = len(inverse)
                inverse.append(w)
            ids.append(vocab[w])
        return ids

    return peers.Tokenizer(encode, lambda ids: " ".join(inverse[i] for i in ids))


def test_model_shape_counts_smollm2_parameters():
    shape = peers.ModelShape.from_config(SMOL)
    # per layer: q 576x576, k and v 576x192, o 576x576, gate/up/down 3 x 576x1536
    per_layer = 576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536
    assert per_layer == 3_538_944
    assert shape.linear_params() == 30 * per_layer + 49152 * 576  # + the tied lm_head
    # SmolLM2-135M has ~134.5M parameters, all of them in these matrices but the norms
    assert 134e6 < shape.linear_params() < 135e6
    assert shape.flops_per_token(0) == 2 * shape.linear_params()
    # attention: QK^T and PV, 2 FLOPs per multiply-add, 9 heads x 64 dims x 30 layers
    assert shape.flops_per_token(100) - shape.flops_per_token(0) == 4 * 30 * 9 * 64 * 100
    # K and V, 30 layers, 3 KV heads x 64 dims, bf16
    assert shape.kv_bytes_per_token(2) == 2 * 30 * 3 * 64 * 2
    norms = (2 * 30 + 1) * 576
    assert shape.weight_bytes(2) == (shape.linear_params() + norms) * 2


def test_head_dim_and_kv_heads_default_from_config():
    cfg = {k: v for k, v in SMOL.items() if k not in ("head_dim", "num_key_value_heads")}
    shape = peers.ModelShape.from_config(cfg)
    assert shape.head_dim == 64 and shape.kv_heads == 9


def test_decode_step_roof_memory_bound_at_batch_one_and_compute_bound_at_large_batch():
    shape = peers.ModelShape.from_config(SMOL)
    flops, bw = 300e9, 10e9
    one = peers.decode_step_roof(shape, 1, 100, flops, bw, 2, 2)
    weights = shape.weight_bytes(2)
    assert one == pytest.approx((weights + 100 * shape.kv_bytes_per_token(2)) / bw)
    big = peers.decode_step_roof(shape, 256, 100, flops, bw, 2, 2)
    assert big == pytest.approx(256 * shape.flops_per_token(100) / flops)
    # batching amortizes the weight reads: per-token time falls with batch
    assert big / 256 < one


def test_workload_roof_counts_a_shared_prefix_once():
    shape = peers.ModelShape.from_config(SMOL)
    kw = dict(max_tokens=16, concurrency=4, decode_flops_per_s=100e9, prefill_flops_per_s=200e9,
              bytes_per_s=10e9, weight_bytes_per_param=2, kv_bytes=2)
    lens = [1050] * 8
    unshared = peers.workload_roof(shape, lens, 0, **kw)
    shared = peers.workload_roof(shape, lens, 1000, **kw)
    assert shared["decode_s"] == pytest.approx(unshared["decode_s"])
    assert shared["prefill_s"] < unshared["prefill_s"] / 4
    assert shared["tokens_per_s"] > unshared["tokens_per_s"]
    # tokens/s is total output over prefill + decode time
    assert unshared["tokens_per_s"] == pytest.approx(8 * 16 / (unshared["prefill_s"] + unshared["decode_s"]))
    # 8 requests 4 at a time: two decode waves of 16 steps
    assert unshared["batch"] == 4
    assert unshared["decode_s"] == pytest.approx(2 * 16 * unshared["decode_step_s"])
    # ~366 MB a step at 10 GB/s (37 ms) against 1.4 GFLOP at 100 GFLOP/s (14 ms)
    assert unshared["decode_bound"] == "memory"
    fast_memory = peers.workload_roof(shape, lens, 0, **{**kw, "bytes_per_s": 1e12})
    assert fast_memory["decode_bound"] == "compute"
    assert fast_memory["tokens_per_s"] > unshared["tokens_per_s"]


def test_rate_for_picks_nearest_measured_batch_and_best_rate_for_gguf():
    machine = {"matmul": {"bfloat16": {"1": 1e9, "8": 8e9, "64": 60e9, "512": 200e9},
                          "float32": {"1": 2e9, "8": 5e9, "64": 30e9, "512": 100e9}}}
    assert peers.rate_for(machine, "bfloat16", 6) == 8e9
    assert peers.rate_for(machine, "float32", 48) == 30e9
    assert peers.rate_for(machine, "q4_1", 1) == 2e9  # fp32 beats bf16 there
    assert peers.rate_for(machine, "q4_1", 600) == 200e9


def test_median_machine_takes_each_rate_and_the_bandwidth_median_of_the_probes():
    def probe(bf16_64: float, fp32_64: float, bw: float) -> dict:
        return {"threads": 2, "matmul": {"bfloat16": {"1": 1e9, "64": bf16_64}, "float32": {"1": 1e9, "64": fp32_64}},
                "bandwidth_bytes_per_s": bw}

    probes = [probe(300e9, 150e9, 30e9), probe(380e9, 120e9, 34e9), probe(340e9, 160e9, 29e9)]
    m = peers.median_machine(probes)
    assert m["matmul"]["bfloat16"]["64"] == 340e9 and m["matmul"]["float32"]["64"] == 150e9
    assert m["bandwidth_bytes_per_s"] == 30e9 and m["probes"] == 3
    assert peers.rate_for(m, "bfloat16", 60) == 340e9
    assert peers.probe_range(probes, "bfloat16", "64") == "340 (300-380)"
    assert peers.probe_range(probes, None, "") == "30.0 (29.0-34.0)"
    assert peers.probe_range(probes[:1], "bfloat16", "64") == "300"


def test_schedule_alternates_servers_round_by_round():
    order = peers.schedule(["kiln", "vllm", "llamacpp"], 3)
    assert order[:4] == [(0, "kiln"), (0, "vllm"), (0, "llamacpp"), (1, "kiln")]
    assert len(order) == 9
    # no server runs twice in a row
    assert all(a[1] != b[1] for a, b in zip(order, order[1:]))
    assert [r for r, s in order if s == "vllm"] == [0, 1, 2]


def _run(server, workload, rnd, tps, ttft=0.1, errors=0, equal=True):
    return {"server": server, "workload": workload, "round": rnd, "tokens_per_s": tps, "ttft_p50": ttft,
            "ttft_p99": ttft * 2, "itl_p50": 0.01, "itl_p99": 0.02, "peak_rss_bytes": 2**30 * (rnd + 1),
            "errors": errors, "tokens_equal": equal}


def test_aggregate_takes_medians_per_server_and_workload():
    runs = [_run("kiln", "c8", 0, 100.0), _run("kiln", "c8", 1, 300.0, errors=1),
            _run("kiln", "c8", 2, 200.0, ttft=float("nan")), _run("vllm", "c8", 0, 50.0, equal=False)]
    startups = [{"server": "kiln", "round": r, "ready_s": 10.0 + r, "first_request_s": 11.0 + r,
                 "peak_rss_bytes": 100 + r, "error": ""} for r in range(3)]
    startups.append({"server": "vllm", "round": 0, "ready_s": float("nan"), "first_request_s": float("nan"),
                     "peak_rss_bytes": 0, "error": "boom"})
    agg = peers.aggregate(runs, startups)
    k = agg["kiln"]["workloads"]["c8"]
    assert k["tokens_per_s"] == 200.0
    assert k["ttft_p50"] == pytest.approx(0.1)  # NaN left out of the median
    assert k["peak_rss_bytes"] == 2 * 2**30
    assert k["rounds"] == 3 and k["errors"] == 1 and k["tokens_equal"]
    assert agg["kiln"]["first_request_s"] == 12.0
    assert agg["vllm"]["workloads"]["c8"]["tokens_equal"] is False
    assert agg["vllm"]["failures"] == ["boom"]
    assert math.isnan(agg["vllm"]["first_request_s"])


def test_markdown_table_rows_and_roof_share():
    runs = [_run("kiln", "c8", 0, 150.0), _run("vllm", "c8", 0, 75.0, errors=2)]
    startups = [{"server": s, "round": 0, "ready_s": 1.0, "first_request_s": 2.5, "peak_rss_bytes": 1,
                 "error": ""} for s in ("kiln", "vllm")]
    agg = peers.aggregate(runs, startups)
    table = peers.markdown_table(agg, {"kiln": {"c8": 300.0}}, ["c8", "single"])
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, two rows (no single-workload rows)
    assert lines[2].startswith("| c8 | kiln | 150.0 | 300 | 50.0 | 100 / 200 | 10 / 20 | 1024 | 2.5 |")
    assert "vllm (2 errors)" in lines[3] and "| — |" in lines[3]  # no roof for vllm: no share
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_text_of_tokens_is_exact_and_seeded():
    tok = word_tokenizer()
    a = peers.text_of_tokens(tok, 1000, random.Random(1))
    assert len(tok.encode(a)) == 1000
    assert a == peers.text_of_tokens(tok, 1000, random.Random(1))
    assert a != peers.text_of_tokens(tok, 1000, random.Random(2))


def test_build_prompts_shared_prefix_and_long_prompt():
    tok = word_tokenizer()
    w = peers.WORKLOADS["shared-prefix"]
    prompts = peers.build_prompts(w, tok, seed=0)
    assert len(prompts) == w.requests
    prefix = prompts[0].split("\n\n")[0]
    assert len(tok.encode(prefix)) == 1000
    assert all(p.startswith(prefix + "\n\n") for p in prompts)
    tails = [p.split("\n\n", 1)[1] for p in prompts]
    assert len(set(tails)) > 1  # each request differs after the prefix
    assert all(20 <= len(t.split()) <= 60 for t in tails)
    assert prompts == peers.build_prompts(w, tok, seed=0)  # same prompts for every server

    long = peers.build_prompts(peers.WORKLOADS["long-prompt"], tok, seed=0)
    assert len(long) == 8 and all(len(tok.encode(p)) == 2000 for p in long)
    assert len(set(long)) == 8  # distinct: no prefix cache can cover them

    plain = peers.build_prompts(peers.WORKLOADS["c8"], None, seed=3)
    assert plain == serving.make_prompts(32, peers.workload_seed(peers.WORKLOADS["c8"], 3), 20, 200)
    assert all(20 <= len(p.split()) <= 200 for p in plain)
    with pytest.raises(ValueError):
        peers.build_prompts(w, None)


def test_quick_workloads_are_tiny():
    for w in peers.WORKLOADS.values():
        q = peers.quick_workload(w)
        assert q.max_tokens == 8 and 2 <= q.requests <= 4
        assert q.prefix_tokens == w.prefix_tokens and q.prompt_tokens == w.prompt_tokens


def test_request_body_overrides_and_removals():
    body = serving.request_body("hi", 16, "m", {"ignore_eos": None, "stream_options": None, "min_tokens": 16})
    assert body == {"prompt": "hi", "max_tokens": 16, "temperature": 0, "stream": True, "model": "m",
                    "min_tokens": 16}
    default = serving.request_body("hi", 16, None)
    assert default["ignore_eos"] is True and "model" not in default
    assert default["stream_options"] == {"include_usage": True}


def test_peer_body_fills_max_tokens():
    peer = peers.Peer("x", Path("/nonexistent"), [], "q4_1", extra_body={"min_tokens": "MAX_TOKENS", "a": None})
    assert peers.peer_body(peer, 64) == {"min_tokens": 64, "a": None}
    assert not peer.installed()


def test_make_prompts_unchanged_without_prefix():
    # backward compatibility: the default prompts of serving.py do not move
    rng = random.Random(0)
    expected = [" ".join(rng.choice(serving.WORDS) for _ in range(rng.randint(5, 9))) for _ in range(3)]
    assert serving.make_prompts(3, 0, 5, 9) == expected
    pre = serving.make_prefix(4, 0)
    assert pre.endswith("\n\n") and len(pre.split()) == 4
    assert all(p.startswith(pre) for p in serving.make_prompts(3, 0, 5, 9, pre))
    assert serving.make_prefix(0, 0) == ""


def test_no_prompt_is_shared_between_workloads_or_with_their_warm_up():
    tok = word_tokenizer()
    seen: dict[str, str] = {}
    for w in peers.WORKLOADS.values():
        for seed in (0, 1):  # 1: the warm-up's seed
            for p in peers.build_prompts(w, tok, seed):
                head = " ".join(p.split()[:12])  # a prefix cache would hit on a shared start
                assert head not in seen or seen[head] == (w.name, seed), (w.name, seed, seen.get(head))
                seen[head] = (w.name, seed)


def test_prefill_roof_computes_logits_for_each_prompts_last_token_only():
    """Servers compute a prompt's LM head row for its last token only: the roof's prefill must
    count the head once per prompt, not once per prompt token (which understates the roof)."""
    shape = peers.ModelShape.from_config(SMOL)
    kw = dict(max_tokens=1, concurrency=1, decode_flops_per_s=1e12, prefill_flops_per_s=1e11,
              bytes_per_s=1e12, weight_bytes_per_param=2, kv_bytes=2)
    head = 49152 * 576
    body = shape.linear_params() - head
    assert shape.flops_per_token(0) - shape.flops_per_token(0, logits=False) == 2 * head
    r = peers.workload_roof(shape, [100, 100], 0, **kw)
    # two prompts of 100 tokens: 200 x the layers' linears, 2 x the head, causal attention
    attn = sum(4 * 30 * 9 * 64 * t for t in range(100))
    expected = 2 * (100 * 2 * body + 2 * head + attn)
    assert r["prefill_s"] * 1e11 == pytest.approx(expected, rel=0.01)
