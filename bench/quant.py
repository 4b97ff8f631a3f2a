"""Quantization benchmark: quality, memory and decode speed of the default model in float32,
bfloat16, int8 (`--quantize int8`), GPTQ 4-bit g128 and round-to-nearest 4-bit g128 (both
made by `kiln quantize`), and llama.cpp's Q4_1 file of the same model when llama-cpp-python
is available (a separate venv; see --llamacpp-python).

- perplexity: kiln's model forward on a held-out text that is not the calibration text:
  the Python language reference shipped in the standard library (pydoc_data.topics, PSF
  licence), first --ppl-tokens tokens, in windows of --ppl-window tokens.
- weights in memory: bytes of every parameter and buffer of the loaded model, RoPE tables
  excluded (a tied LM head that is quantized counts its own copy).
- single-stream decode: one request, --new-tokens greedy tokens; tokens / time of the
  decode steps (prefill excluded), median over --repeats runs that alternate the variants.
- 32 concurrent: 32 requests decoding together; tokens/s of pure-decode steps, same medians.

    python bench/quant.py --json bench/results/quant.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kiln.config import EngineConfig
from kiln.runtime.engine import Engine
from kiln.runtime.request import Request, SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def held_out_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def make_folders(out: Path, samples: int, seq_len: int) -> dict[str, Path]:
    from kiln.runtime.quant.calibrate import QuantizeJob, run_quantize
    from kiln.runtime.quant.gptq import GptqConfig

    folders = {}
    for method in ("gptq", "rtn"):
        folder = out / f"smollm2-{method}-4bit-g128"
        if not (folder / "config.json").is_file():
            t = time.perf_counter()
            run_quantize(QuantizeJob(out=folder, method=method, config=GptqConfig(bits=4, group_size=128),
                                     num_samples=samples, seq_len=seq_len))
            print(f"kiln quantize --method {method}: {time.perf_counter() - t:.0f} s", flush=True)
        folders[method] = folder
    return folders


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("rope.") or t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for m in model.modules():  # oneDNN-prepacked weights and one-row copies live outside parameters
        for attr in ("packed", "gemv"):
            copy = getattr(m, attr, None)
            if isinstance(copy, torch.Tensor):
                total += copy.numel() * copy.element_size()
    return total


@torch.inference_mode()
def perplexity(engine: Engine, ids: list[int], window: int) -> float:
    from kiln.runtime.quant.calibrate import _DenseCausal

    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        inp, target = torch.tensor(chunk[:-1]), torch.tensor(chunk[1:])
        n = len(inp)
        logits = engine.model(inp, torch.arange(n), _DenseCausal(1, n), None, torch.arange(n))
        nll += float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
        count += n
    return math.exp(nll / count)


def decode_rate(engine: Engine, prompts: list[list[int]], new_tokens: int, tag: str) -> float:
    """Tokens/s of the steps in which every running sequence decodes one token."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"{tag}-{i}", p, params))
    times = []
    while engine.has_work:
        engine.step()
        t = engine.last_step
        if t is not None and t.num_decode == t.num_seqs == len(prompts):
            times.append(t.total_seconds)
    return len(prompts) * len(times) / sum(times)


def llamacpp_run(python: Path, job: dict) -> dict:
    """One run of bench/llamacpp_probe.py in the llama-cpp-python venv (see its docstring)."""
    out = subprocess.run([str(python), str(ROOT / "bench" / "llamacpp_probe.py")], input=json.dumps(job),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp probe failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_kernels(repeats: int = 200) -> dict:
    """Per-call time of the CPU paths for one gate_up-sized layer (3072 x 576): float32 dense
    (oneDNN-packed, as the engine runs it), bfloat16 dense, int8 GEMV vs int8
    dequantize+GEMM, and GPTQ int4 GEMV (torch's int4pack) vs GPTQ dequantize+GEMM."""
    import torch.nn.functional as F

    from kiln.runtime.quant import gptq as gq, int8 as i8

    w = torch.randn(3072, 576) * 0.05
    dense = w.to_mkldnn()
    wb = w.bfloat16()
    int8 = i8.Int8Linear.from_float(w)
    g4 = gq.GptqLinear(gq.rtn_quantize(w, 4, 128))
    out = {}
    for rows in (1, 4, 8, 16, 32, 128):
        x = torch.randn(rows, 576)
        paths = {
            "float32 dense": lambda: torch.ops.mkldnn._linear_pointwise(x, dense, None, "none", [], ""),
            "bfloat16 dense": lambda: F.linear(x.bfloat16(), wb).float(),
            "int8 GEMV": lambda: torch._weight_int8pack_mm(x.bfloat16(), int8.qweight, int8.scales).float(),
            "int8 dequantize+GEMM": lambda: F.linear(x.bfloat16(), int8.dequantize(torch.bfloat16)).float(),
            "int4 GEMV": lambda: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), g4.int4pack, g4.int4_group, g4.scale_zero).float(),
            "int4 dequantize+GEMM": lambda: F.linear(x.bfloat16(), g4._dequantize_sorted()).float(),
        }
        for name, f in paths.items():
            for _ in range(5):
                f()
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(repeats // 5):
                    f()
                times.append((time.perf_counter() - t) / (repeats // 5))
            out.setdefault(name, {})[rows] = statistics.median(times) * 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="float32,bfloat16,int8,gptq4,rtn4")
    ap.add_argument("--folders", type=Path, default=ROOT / "bench" / "results" / "quant")
    ap.add_argument("--calibration-samples", type=int, default=128)
    ap.add_argument("--calibration-seq-len", type=int, default=256)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--ppl-window", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--llamacpp-python", type=Path, default=ROOT / ".peers" / "llama-cpp" / "bin" / "python",
                    help="python of a venv with llama-cpp-python (pip install 'llama-cpp-python==0.3.36') "
                         "[default: .peers/llama-cpp/bin/python]; skipped when missing")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--gptq-folder", type=Path, default=None, help="use this GPTQ folder (e.g. made with --desc-act --asym)")
    ap.add_argument("--rtn-folder", type=Path, default=None, help="use this round-to-nearest folder")
    ap.add_argument("--no-speed", action="store_true", help="perplexity and memory only")
    ap.add_argument("--kernels", action="store_true", help="only the per-layer CPU kernel timings (microseconds)")
    args = ap.parse_args()
    if args.kernels:
        res = bench_kernels()
        print("| path | " + " | ".join(f"{r} rows" for r in next(iter(res.values()))) + " |")
        for name, row in res.items():
            print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in row.values()) + " |")
        return 0

    variants = args.variants.split(",")
    folders = {"gptq": args.gptq_folder, "rtn": args.rtn_folder}
    if {"gptq4", "rtn4", "gptq4+int8head"} & set(variants) and not (args.gptq_folder and args.rtn_folder):
        made = make_folders(args.folders, args.calibration_samples, args.calibration_seq_len)
        folders = {k: folders[k] or made[k] for k in made}
    configs = {
        "float32": EngineConfig(), "bfloat16": EngineConfig(dtype="bfloat16"),
        "int8": EngineConfig(quantize="int8"),
        "gptq4": EngineConfig(model=str(folders.get("gptq"))), "rtn4": EngineConfig(model=str(folders.get("rtn"))),
        # GPTQ layers plus an int8 copy of the tied LM head (float32 otherwise: 113 MB a token)
        "gptq4+int8head": EngineConfig(model=str(folders.get("gptq")), quantize="int8"),
    }
    engines = {}
    for v in variants:
        cfg = configs[v]
        cfg.kv_cache_bytes = 512 << 20
        cfg.max_num_seqs = max(cfg.max_num_seqs, args.concurrency)
        engines[v] = Engine(cfg)
    tok = engines[variants[0]].tokenizer
    ppl_ids = tok.encode(held_out_text())[: args.ppl_tokens]
    prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    single = [tok.encode(prompt)]
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(100, 49000, (64,), generator=g).tolist() for _ in range(args.concurrency)]

    results: dict = {"command": " ".join(["python"] + sys.argv), "threads": torch.get_num_threads(),
                     "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                     "held_out": f"pydoc_data.topics, first {len(ppl_ids)} tokens", "variants": {}}
    for v, e in engines.items():
        r = results["variants"][v] = {"weights_mib": weight_bytes(e.model) / 2**20}
        r["perplexity"] = perplexity(e, ppl_ids, args.ppl_window)
        print(f"{v}: weights {r['weights_mib']:.1f} MiB, perplexity {r['perplexity']:.3f}", flush=True)
    llamacpp = args.llamacpp_python.is_file()
    job: dict = {}
    if llamacpp:  # the same token ids, windows, prompts and lengths as kiln's
        from kiln.runtime.models.loader import default_gguf_path

        job = {"gguf": str(default_gguf_path()), "threads": torch.get_num_threads(), "window": args.ppl_window,
               "ppl_ids": ppl_ids, "single": single[0], "batch": batch, "new_tokens": args.new_tokens}
        first = llamacpp_run(args.llamacpp_python, {**job, "perplexity": True})
        results["llama.cpp Q4_1"] = {"weights_mib": first["model_bytes"] / 2**20, "perplexity": first["perplexity"],
                                     "llama_cpp_python": first["version"]}
        print(f"llama.cpp Q4_1: weights {first['model_bytes'] / 2**20:.1f} MiB, "
              f"perplexity {first['perplexity']:.3f}", flush=True)
    else:
        results["llama.cpp Q4_1"] = f"skipped: no llama-cpp-python at {args.llamacpp_python}"
    singles = {v: [] for v in engines}
    batched = {v: [] for v in engines}
    if llamacpp:
        singles["llama.cpp Q4_1"], batched["llama.cpp Q4_1"] = [], []
    for rep in range(0 if args.no_speed else args.repeats):  # alternate variants: the host is shared and noisy
        for v, e in engines.items():
            e.generate([single[0][:8]], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
            singles[v].append(decode_rate(e, single, args.new_tokens, f"s{rep}"))
            batched[v].append(decode_rate(e, batch, args.new_tokens, f"b{rep}"))
            print(f"  run {rep} {v}: single {singles[v][-1]:.1f} tok/s, x{args.concurrency} {batched[v][-1]:.1f} tok/s", flush=True)
        if llamacpp:
            v = "llama.cpp Q4_1"
            r = llamacpp_run(args.llamacpp_python, {**job, "speed": True})
            singles[v].append(r["single_stream_tok_s"])
            batched[v].append(r["concurrent_tok_s"])
            print(f"  run {rep} {v}: single {singles[v][-1]:.1f} tok/s, x{args.concurrency} {batched[v][-1]:.1f} tok/s", flush=True)
    for v in singles if not args.no_speed else []:
        r = results["variants"][v] if v in engines else results[v]
        r["single_stream_tok_s"] = statistics.median(singles[v])
        r[f"concurrent_{args.concurrency}_tok_s"] = statistics.median(batched[v])
        r["runs_single"], r["runs_concurrent"] = singles[v], batched[v]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
