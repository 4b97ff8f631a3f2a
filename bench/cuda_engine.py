"""The engine end to end through the cuda backend on a GPU: greedy equivalence with the cpu
backend on the same weights, and offline throughput.

The weights are seeded random ones in SmolLM2-135M's shape (config and tokenizer from
--meta), so this runs on a GPU machine that cannot fetch the real model. Both backends load
the same folder; the cpu backend's greedy tokens (float32) are the reference.

    python bench/cuda_engine.py --meta DIR_WITH_CONFIG_AND_TOKENIZER --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kiln.config import EngineConfig
from kiln.runtime.backends import cuda as cuda_backend
from kiln.runtime.engine import Engine
from kiln.runtime.request import Request, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "The quick brown fox jumps over the lazy dog. " * 6 + "Then the dog",
    "You are a careful assistant. Answer in plain words. Question: why is the sky blue?\nAnswer:",
    "You are a careful assistant. Answer in plain words. Question: how do I boil an egg?\nAnswer:",
    "In 1969, astronauts landed on the Moon. " * 30 + "The mission was called",
]


def random_model(meta: Path, out: Path, seed: int = 0) -> Path:
    """SmolLM2-135M's config and tokenizer with random weights (norms at 1): N(0, 0.02)
    embeddings and N(0, 2/fan_in) projections, large enough that each layer moves the
    residual stream (at 0.02 everywhere the tied embedding dominates and greedy decoding just
    repeats the last token, which would make the comparison weak)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in meta.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((meta / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * (2 / shape[1]) ** 0.5

    tensors = {"model.embed_tokens.weight": torch.randn(v, h, generator=g) * 0.02, "model.norm.weight": torch.ones(h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
        }
    if not cfg.get("tie_word_embeddings", False):
        tensors["lm_head.weight"] = w(v, h)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def engine(model: Path, backend: str, dtype: str = "float32", **kw) -> Engine:
    return Engine(EngineConfig(model=str(model), attention_backend=backend, dtype=dtype,
                               kv_cache_bytes=kw.pop("kv", 2 << 30), max_model_len=4096, **kw))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(name: str, ref: list[list[int]], got: list[list[int]], results: dict) -> None:
    div = [first_divergence(r, g) for r, g in zip(ref, got)]
    same = sum(d is None for d in div)
    results[name] = {"identical": same, "prompts": len(ref), "first_divergence": div}
    print(f"{name}: {same}/{len(ref)} greedy sequences identical to the cpu backend; "
          f"first divergence per prompt: {div}", flush=True)


def throughput(model: Path, dtype: str, graphs: bool, new_tokens: int, n: int, results: dict) -> None:
    saved = cuda_backend.GRAPH_BATCH_SIZES
    if not graphs:
        cuda_backend.GRAPH_BATCH_SIZES = ()
    try:
        eng = engine(model, "triton", dtype, kv=16 << 30, max_num_seqs=64)
    finally:
        cuda_backend.GRAPH_BATCH_SIZES = saved
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49152) for _ in range(rng.randint(32, 512))] for _ in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    eng.generate([prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = eng.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in out)
    # Pure-decode step time at 64 running sequences.
    for i, p in enumerate(prompts[:64]):
        eng.add_request(Request(f"d{i}", p, SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)))
    steps = []
    while eng.has_work and len(steps) < 40:
        eng.step()
        t = eng.last_step
        if t is not None and t.num_decode == t.num_seqs == min(64, n):
            steps.append((t.total_seconds, t.forward_seconds))
    for i in range(min(64, n)):
        eng.abort(f"d{i}")
    key = f"throughput_{dtype}_{'graphs' if graphs else 'eager'}"
    results[key] = {"requests": n, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                    "decode_step_ms": 1e3 * statistics.median(s for s, _ in steps),
                    "decode_forward_ms": 1e3 * statistics.median(f for _, f in steps)}
    r = results[key]
    print(f"{key}: {r['tokens_per_s']:.0f} tokens/s ({tokens} tokens, {n} requests, prompts 32-512, "
          f"{new_tokens} new, in {seconds:.2f} s); decode step at 64 seqs {r['decode_step_ms']:.2f} ms "
          f"(forward {r['decode_forward_ms']:.2f} ms)", flush=True)
    del eng
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meta", type=Path, required=True, help="folder with config.json and tokenizer files")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/cuda_engine.py: no CUDA device on this machine.")
        return 0
    model = random_model(args.meta, Path("/tmp/kiln-random-smollm2"))
    results: dict = {"command": " ".join(["python"] + sys.argv), "device": torch.cuda.get_device_name()}
    cpu = engine(model, "cpu")
    prompts = [cpu.tokenizer.encode(p) for p in PROMPTS]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    ref = cpu.generate(prompts, greedy)
    del cpu
    gpu = engine(model, "triton")
    compare("cuda_fp32_graphs", ref, gpu.generate(prompts, greedy), results)
    # Again: the shared-prefix prompts now hit the prefix cache (prefill over cached blocks).
    compare("cuda_fp32_prefix_cache_hit", ref, gpu.generate(prompts, greedy), results)
    del gpu
    chunked = engine(model, "triton", max_num_batched_tokens=64)
    compare("cuda_fp32_chunked_prefill_64", ref, chunked.generate(prompts, greedy), results)
    del chunked
    cpu16 = engine(model, "cpu", "bfloat16")
    ref16 = cpu16.generate(prompts, greedy)
    del cpu16
    bf16 = engine(model, "triton", "bfloat16")
    got16 = bf16.generate(prompts, greedy)
    compare("cuda_bf16_vs_cpu_bf16", ref16, got16, results)
    compare("cuda_bf16_vs_cpu_fp32", ref, got16, results)
    del bf16
    torch.cuda.empty_cache()
    for dtype, graphs in (("bfloat16", True), ("bfloat16", False), ("float32", True)):
        throughput(model, dtype, graphs, 128, 64, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
