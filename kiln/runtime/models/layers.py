"""Building blocks of Llama-family decoders, in plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def add_and_norm(self, residual: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, its norm): a layer's residual add and the next norm, which a
        backend may fuse (and then update `residual` in place; callers use the returned one)."""
        residual = residual + delta
        return residual, self(residual)


# Rows up to which a linear with a copy of its weight for kiln_cpu::gemv_bf16 (Linear.gemv)
# uses it by default: one row (AVX512-BF16 dots). Where the kernel runs the same copy at several
# rows (AMX tiles, or AVX512-BF16 passes of 6 rows), the backend raises each linear's own limit
# (Linear.gemv_rows, from kiln_cpu::gemv_bf16_max_rows; bench/RESULTS.md).
GEMV_MAX_ROWS = 1
# Rows up to which Linear.greedy_argmax reads the int8 screen (kiln_cpu::greedy_head_bf16 takes up
# to 64). Past 16 rows its tile products and the blocks it recomputes cost about what they save,
# and more than that where the model is unsure (flat logits leave many blocks to recompute):
# bench/greedy_head.py, bench/RESULTS.md.
GREEDY_HEAD_MAX_ROWS = 16


class Linear(nn.Module):
    """The one linear-layer interface: y = x W^T.

    Dense weights today; int8 / GPTQ weight formats and a per-row LoRA term plug in behind
    the same forward (see DESIGN.md), so model code never branches on the weight format.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.packed: torch.Tensor | None = None  # a backend's prepacked copy of the weight
        self.gemv: torch.Tensor | None = None  # the CPU backend's copy for kiln_cpu::gemv_bf16
        self.gemv_rows = GEMV_MAX_ROWS  # rows up to which forward uses it
        self.greedy = None  # an LM head's int8 screen for greedy_argmax (cpu_ops.GreedyScreen)

    def pack_mkldnn(self) -> None:
        """Prepack the weight for oneDNN; the dense copy is dropped to save memory.

        float32: about 2x faster than MKL's sgemm at decode batch sizes on AVX-512.
        bfloat16: F.linear re-packs the weight into oneDNN's (AMX) blocked layout on every
        call; packing once makes the decode-sized linears ~30% faster (bench/RESULTS.md).
        The batch-size hint hardly matters (1..512 measured within noise)."""
        w = self.weight.detach()
        if w.dtype == torch.bfloat16:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
        else:
            self.packed = w.to_mkldnn()
        self.weight = None

    def uses_gemv(self, x: torch.Tensor) -> bool:
        """Whether forward(x) runs kiln_cpu::gemv_bf16 on the `gemv` copy."""
        return self.gemv is not None and x.dim() == 2 and x.shape[0] <= self.gemv_rows and x.stride(1) == 1

    def greedy_argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """argmax(forward(x)) per row (the first maximum), exactly, without writing the logits:
        read from the int8 screen (`greedy`, the CPU backend's, for the LM head) where it has
        one and forward(x) would take the gemv path; None where the caller should compute the
        logits instead."""
        if self.greedy is None or not self.uses_gemv(x) or x.shape[0] > GREEDY_HEAD_MAX_ROWS:
            return None
        tokens = torch.ops.kiln_cpu.greedy_head_bf16(x, self.gemv, self.greedy.q, self.greedy.stats)
        return None if bool((tokens < 0).any()) else tokens  # -1: a row that is not finite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_gemv(x):
            return torch.ops.kiln_cpu.gemv_bf16(x, self.gemv)
        if self.packed is not None:
            # Dense in, dense out: no conversion of activations to oneDNN's layout.
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.weight)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, Hugging Face's "rotate half" layout, cos/sin precomputed."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D], positions: [T]."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
