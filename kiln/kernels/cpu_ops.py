"""kiln's C++ kernels for the CPU, built once per machine: decode and prefill attention over the
paged cache (cpu/paged_decode.cpp, cpu/paged_prefill.cpp), the fused RMSNorm, RoPE and SwiGLU (cpu/fused.cpp), the
batched LoRA term of decode rows (cpu/lora.cpp), the bfloat16 linear of 1-64 rows
(cpu/gemv.cpp), the loop over a pure-decode step's layers that issues them from C++
(cpu/decode_step.cpp), the sampler's row-wise argmax (cpu/argmax.cpp) and greedy decoding's
LM head read from an int8 screen (cpu/greedy_head.cpp).

torch.utils.cpp_extension compiles it with the host's own instruction set (-march=native)
into a folder keyed by the source, torch's version and the CPU's flags, so a cache copied to
another kind of CPU is never loaded there. Building needs a C++ compiler and ninja; without
them (or on any build error) `load()` returns None and the caller keeps its pure-torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_DIR = Path(__file__).with_name("cpu")
SOURCES = (_DIR / "paged_decode.cpp", _DIR / "fused.cpp", _DIR / "lora.cpp", _DIR / "decode_step.cpp",
           _DIR / "gemv.cpp", _DIR / "argmax.cpp", _DIR / "paged_prefill.cpp", _DIR / "greedy_head.cpp")
_HEADERS = (_DIR / "vec.h", _DIR / "amx.h", _DIR / "parallel.h", _DIR / "gemv.h")
_lock = threading.Lock()
_loaded: dict[Path, bool] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_dir(cache_root: Path) -> Path:
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in SOURCES + _HEADERS) + torch.__version__.encode() + _cpu_flags().encode()
    ).hexdigest()[:16]
    return cache_root / "cpu-kernels" / key


def load(cache_root: Path) -> bool:
    """Build (first time) and load the kernels; True when torch.ops.kiln_cpu.* work."""
    if os.environ.get("KILN_CPU_KERNELS", "1") == "0":
        return False
    folder = build_dir(cache_root)
    with _lock:
        if folder in _loaded:
            return _loaded[folder]
        ok = False
        if hasattr(torch.ops, "kiln_cpu") and hasattr(torch.ops.kiln_cpu, "paged_decode"):
            ok = True  # already registered in this process (another cache root)
        else:
            try:
                from torch.utils import cpp_extension

                folder.mkdir(parents=True, exist_ok=True)
                if not (folder / "kiln_cpu_kernels.so").exists():
                    log.info("building kiln's CPU kernels once into %s (about 15 s)", folder)
                cpp_extension.load(
                    name="kiln_cpu_kernels", sources=[str(p) for p in SOURCES], build_directory=str(folder),
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-DNDEBUG"],
                    is_python_module=False, verbose=False,
                )
                ok = True
            except Exception as exc:  # no compiler, no ninja, a build error: keep the torch path
                log.warning("kiln's CPU kernels are unavailable (%s); using the pure-torch paths",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        _loaded[folder] = ok
        return ok


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q [B, Hkv, G, D]; caches [slots, Hkv, D]; tables [B, blocks] and lens [B] int64."""
    return torch.ops.kiln_cpu.paged_decode(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)


def paged_prefill_supported(head_dim: int, group: int) -> bool:
    """Whether paged_prefill runs here for this head size and GQA group (a CPU with AVX512-BF16;
    AMX tiles where it has them)."""
    return bool(torch.ops.kiln_cpu.paged_prefill_supported(head_dim, group))


def paged_prefill(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, query_starts: torch.Tensor, query_lens: torch.Tensor,
                  context_lens: torch.Tensor, block_size: int, scale: float) -> None:
    """Causal attention of every prefill's new queries over its whole cached context, into the
    prefills' rows of out [T, Hkv, G, D] (other rows untouched). q [T, Hkv * G, D]; caches
    [slots, Hkv, D]; block_tables [P, blocks], query_starts / query_lens / context_lens [P], int64."""
    torch.ops.kiln_cpu.paged_prefill(out, q, k_cache, v_cache, block_tables, query_starts, query_lens,
                                     context_lens, block_size, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, H] (unit inner stride) -> x * rsqrt(mean(x^2) + eps) * weight, in float32 inside."""
    return torch.ops.kiln_cpu.rms_norm(x, weight, eps)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += delta in place (rounded to its dtype), then rms_norm(residual): one pass."""
    return torch.ops.kiln_cpu.add_rms_norm(residual, delta, weight, eps)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q [T, Hq, D] and k [T, Hk, D]; cos/sin float32 [positions, D/2]."""
    return torch.ops.kiln_cpu.rope(q, k, positions, cos, sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> silu(gate) * up [T, I]."""
    return torch.ops.kiln_cpu.silu_and_mul(gate_up)


def lora_grouped(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], offsets: list[int],
                 ranks: torch.Tensor, group_slot: torch.Tensor, group_ptr: torch.Tensor, rows: torch.Tensor) -> None:
    """y[rows of group g] += (x A_s^T) B_s per part, in place; s = group_slot[g], the rows of group
    g are rows[group_ptr[g]:group_ptr[g+1]] (distinct). a [S, P*R, K], bs[p] [S, R, N_p];
    ranks [S, P] int32: the ranks slot s has for part p; the zero rows past them are not read."""
    torch.ops.kiln_cpu.lora_grouped(x, y, a, bs, offsets, ranks, group_slot, group_ptr, rows)


def has_argmax_rows() -> bool:
    """Whether argmax_rows is registered (the kernels were built and loaded in this process)."""
    return hasattr(torch.ops, "kiln_cpu") and hasattr(torch.ops.kiln_cpu, "argmax_rows")


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, V] float32 or bfloat16 (unit inner stride) -> [N] int64: the first index of each row's
    maximum, a NaN counting as the maximum (as torch.max(dim=-1).indices)."""
    return torch.ops.kiln_cpu.argmax_rows(x)


def gemv_bf16_supported() -> bool:
    """Whether gemv_bf16 runs here (the build's CPU has AVX512-BF16)."""
    return bool(torch.ops.kiln_cpu.gemv_bf16_supported())


def gemv_bf16_max_rows() -> int:
    """Rows up to which gemv_bf16 beats oneDNN here: 64 wherever it runs (AMX tiles, or AVX512-BF16
    passes of 6 rows), else 1."""
    return int(torch.ops.kiln_cpu.gemv_bf16_max_rows())


def pack_gemv_bf16(weight: torch.Tensor) -> torch.Tensor:
    """bfloat16 [N, K] (N a multiple of 16, K even) -> gemv_bf16's layout [N/16, K/2, 16, 2]."""
    return torch.ops.kiln_cpu.pack_gemv_bf16(weight)


def gemv_bf16(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16 @ W^T -> [M, N]: one row by AVX512-BF16 dots; 2-64 rows by AMX tiles
    where the CPU has them (K a multiple of 32), else by AVX512-BF16 dots in passes of 6 rows
    that round each output as one row does; past 64 rows each row streams the weight again."""
    return torch.ops.kiln_cpu.gemv_bf16(x, packed)


def gemv_silu_bf16(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(gemv_bf16(x, packed)) in one pass, bit for bit: `packed` holds a fused
    gate/up weight [2I, K] (2I a multiple of 32); the [M, 2I] product is never written."""
    return torch.ops.kiln_cpu.gemv_silu_bf16(x, packed)


def greedy_head_supported() -> bool:
    """Whether greedy_head_bf16 runs here (the build's CPU has AMX-INT8 and the kernel may use it)."""
    return hasattr(torch.ops, "kiln_cpu") and hasattr(torch.ops.kiln_cpu, "greedy_head_supported") \
        and bool(torch.ops.kiln_cpu.greedy_head_supported())


@dataclass(frozen=True)
class GreedyScreen:
    """An LM head weight's int8 copy for greedy_head_bf16: `q` [V/16, K/4, 16, 4] (AMX-INT8's
    B layout, one scale per row) and `stats` [3, V] float32: each row's scale sw, then bounds
    ||w - sw q|| + 2^-12 ||w|| and ||sw q|| rounded up (see cpu/greedy_head.cpp)."""

    q: torch.Tensor
    stats: torch.Tensor


def pack_greedy_head(weight: torch.Tensor, chunk: int = 4096) -> GreedyScreen | None:
    """The int8 screen of a bfloat16 LM head weight [V, K] (V a multiple of 16, K of 64); None
    for a weight with a non-finite value (the screen's bounds would not hold)."""
    V, K = weight.shape
    if V % 16 or K % 64 or weight.dtype != torch.bfloat16 or not bool(torch.isfinite(weight).all()):
        return None
    q = torch.empty(V, K, dtype=torch.int8)
    stats = torch.empty(3, V, dtype=torch.float32)
    inf = torch.tensor(float("inf"))
    for s in range(0, V, chunk):
        w = weight[s:s + chunk].double()
        sw = (w.abs().amax(1) / 127).float()
        sw = torch.where(sw > 0, sw, torch.ones_like(sw))  # the float32 scale the kernel multiplies by
        qq = torch.round(w / sw.double()[:, None]).clamp_(-127, 127)
        wq = qq * sw.double()[:, None]
        alpha = (w - wq).norm(dim=1) * (1 + 1e-12) + 2.0 ** -12 * w.norm(dim=1)
        beta = wq.norm(dim=1) * (1 + 1e-12)
        stats[0, s:s + chunk] = sw
        stats[1, s:s + chunk] = torch.nextafter(alpha.float(), inf)
        stats[2, s:s + chunk] = torch.nextafter(beta.float(), inf)
        q[s:s + chunk] = qq.to(torch.int8)
    return GreedyScreen(q.view(V // 16, 16, K // 4, 4).permute(0, 2, 1, 3).contiguous(), stats)


def greedy_head_bf16(x: torch.Tensor, packed: torch.Tensor, screen: GreedyScreen) -> torch.Tensor:
    """argmax over each row of gemv_bf16(x, packed) (first index of the maximum), exactly, for
    x [M, K] bfloat16 with M <= 64, from the int8 screen and a few recomputed blocks: [M] int64,
    -1 for a row of x that is not finite."""
    return torch.ops.kiln_cpu.greedy_head_bf16(x, packed, screen.q, screen.stats)
