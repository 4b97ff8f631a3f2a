"""LoRA serving cost: engine throughput at 32 concurrent requests spread over 0, 1, 4 and 16
distinct adapters, at ranks 8 and 64 (adapters on all seven projections, or with --targets
attention on q/k/v/o as `kiln train` makes them; seeded random weights written as PEFT folders). Every run uses the same workload: 32 requests, prompt
lengths uniform in [64, 256], 64 new tokens each, greedy, EOS ignored; request i uses
adapter i mod N. Runs alternate base / adapters so that drift on a shared machine hits both.

    python bench/lora.py                        # ranks 8 and 64, 0/1/4/16 adapters, 3 repeats
    python bench/lora.py --ranks 8 --repeats 1  # quicker
    python bench/lora.py --targets attention --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kiln.config import EngineConfig
from kiln.runtime.engine import Engine
from kiln.runtime.models.loader import ModelConfig, resolve_model
from kiln.runtime.request import Request, SamplingParams

TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# --targets: every projection (the heaviest adapters), or the attention ones (`kiln train`'s default)
TARGET_SETS = {"all": tuple(TARGETS), "attention": ("q_proj", "k_proj", "v_proj", "o_proj")}


def write_adapter(folder: Path, cfg: ModelConfig, rank: int, seed: int,
                  targets: tuple[str, ...] = tuple(TARGETS)) -> Path:
    """A PEFT-format adapter with seeded random weights (what peft would save) on `targets`."""
    gen = torch.Generator().manual_seed(seed)
    q, kv, h, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    dims = {name: dims[name] for name in targets}
    tensors = {}
    for layer in range(cfg.num_layers):
        for name, (d_in, d_out) in dims.items():
            prefix = f"base_model.model.model.layers.{layer}.{TARGETS[name]}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / d_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(dims),
        "bias": "none", "task_type": "CAUSAL_LM"}))
    return folder


def run(engine: Engine, prompts: list[list[int]], adapters: list[str], new_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        lora = adapters[i % len(adapters)] if adapters else None
        engine.add_request(Request(f"bench-{time.monotonic_ns()}-{i}", prompt, params, lora_name=lora))
    start = time.perf_counter()
    tokens = 0
    while engine.has_work:
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="8,64")
    ap.add_argument("--adapters", default="0,1,4,16", help="distinct adapters per run")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--targets", default="all", choices=tuple(TARGET_SETS),
                    help="projections the adapters cover: all seven, or q/k/v/o (kiln train's default) [default all]")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model dtype [default float32]")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--lora-mode", choices=["loop", "grouped", "grouped-torch"],
                    help="force a LoRA compute path (A/B; default: the engine's; grouped-torch: the slot-batched "
                         "path without kiln's C++ kernel)")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    counts = [int(c) for c in args.adapters.split(",")]

    model = resolve_model("default")
    cfg = ModelConfig.from_folder(model)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, cfg.vocab_size) for _ in range(rng.randint(64, 256))] for _ in range(args.requests)]
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        targets = TARGET_SETS[args.targets]
        loras = ",".join(f"r{rank}-{i}={write_adapter(root / f'r{rank}-{i}', cfg, rank, 1000 * rank + i, targets)}"
                         for rank in ranks for i in range(max(counts)))
        engine = Engine(EngineConfig(kv_cache_bytes=2 << 30, max_num_seqs=args.requests, loras=loras,
                                     max_loras=max(max(counts), 1), lora_cache_bytes=8 << 30,
                                     dtype=args.dtype))
        if args.lora_mode:
            engine.lora.context.mode = "grouped" if args.lora_mode == "grouped-torch" else args.lora_mode
            engine.lora.context.cpu_kernel &= args.lora_mode == "grouped"
        # Warm-up: one uncounted pass of the whole workload (the first pass touches the KV
        # cache's pages and builds oneDNN's kernels for new shapes: ~1/3 slower than the rest).
        run(engine, prompts, [], args.new_tokens)
        samples: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            for rank in ranks:
                for n in counts:
                    key = "base" if n == 0 else f"rank {rank}, {n} adapters"
                    if n == 0 and rank != ranks[0]:
                        continue
                    names = [f"r{rank}-{i}" for i in range(n)]
                    samples.setdefault(key, []).append(run(engine, prompts, names, args.new_tokens))
                    print(f"repeat {repeat + 1}: {key}: {samples[key][-1]:.1f} tokens/s", flush=True)
        results = {key: statistics.median(v) for key, v in samples.items()}
    base = results["base"]
    print(f"\n{args.requests} concurrent requests, {args.new_tokens} new tokens each, {args.dtype}, "
          f"adapters on {args.targets} projections (median of {args.repeats})")
    print("| run | tokens/s | vs base |\n| --- | ---: | ---: |")
    for key, value in results.items():
        print(f"| {key} | {value:.1f} | {value / base:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tokens_per_s": results, "args": vars(args) | {"json": str(args.json)}}, indent=2))


if __name__ == "__main__":
    main()
