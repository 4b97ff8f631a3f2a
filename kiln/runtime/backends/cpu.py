"""CPU execution: the paged KV cache as plain tensors, attention from torch ops.

Decodes: kiln's C++ kernel (kiln/kernels/cpu/paged_decode.cpp) reads each sequence's context
in place through its block table, one call per layer for every decoding row. Where it cannot
be built (no compiler; float16), decodes are batched into one scaled_dot_product_attention
call per length group instead: each context gathered from its blocks into a padded [B, L]
view with a padding mask. The query heads of a GQA group are laid out as several queries
against their one KV head, so K/V are never repeated. Prefills (and prefill chunks): in
bfloat16 on a CPU with AVX512-BF16 (AMX tiles where it has them), kiln's C++ kernel
(kiln/kernels/cpu/paged_prefill.cpp) runs all of a step's prefills in one call per layer,
reading each context through its block table; else
SDPA one sequence at a time, with a causal mask offset by the cached context.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...kernels import cpu_ops
from . import cpu_decode
from ..models.layers import Linear, RMSNorm, RotaryEmbedding
from ..models.llama import MLP, reduce_row_parallel
from .base import AttentionMetadata

log = logging.getLogger(__name__)


@dataclass
class _PrefillPlan:
    start: int
    length: int
    gather: torch.Tensor | None  # cache slots of the whole context; None: no cached prefix
    mask: torch.Tensor | None  # [len*group, context] bool, None: plain causal


@dataclass
class _DecodeGroup:
    start: int  # rows [start, end) of the flat batch
    end: int
    block_ids: torch.Tensor  # [rows * blocks]: each row's block table, padded, flattened
    mask: torch.Tensor  # [rows, 1, 1, blocks * block_size] bool, True = attend


@dataclass
class _PrefillBatch:
    """Every prefill of a step for the C++ prefill kernel (int64 each)."""

    tables: torch.Tensor  # [P, blocks], padded
    starts: torch.Tensor  # [P] first row in the flat batch
    query_lens: torch.Tensor  # [P]
    context_lens: torch.Tensor  # [P]


@dataclass
class CpuStepState:
    slot_mapping: torch.Tensor
    num_decode: int
    decode_groups: list[_DecodeGroup]  # the gather + SDPA path
    decode_tables: torch.Tensor | None  # the C++ kernel's path: [num_decode, blocks] int64
    decode_lens: torch.Tensor | None
    prefills: list[_PrefillPlan]  # the SDPA path
    prefill_batch: _PrefillBatch | None = None  # the C++ kernel's path


_PACKABLE = (torch.float32, torch.bfloat16)
# Fresh prefills at least this long use SDPA's causal GQA path; shorter ones the explicit
# group mask (equal speed at ~100 tokens, the mask path a little ahead below).
_GQA_CAUSAL_FROM = 256

# Decodes are padded to the longest context of their group; the model runner sorts them by
# length, so a few groups of consecutive rows cut most of the padding.
_DECODE_GROUPS = 4
_MIN_GROUP = 8


class CpuBackend:
    name = "cpu"

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.block_size = block_size
        self.scale = head_dim ** -0.5
        # [layer, k|v, slot, kv head, head dim]; pages are touched lazily by the OS.
        self.kv = torch.zeros(num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim, dtype=dtype)
        from ..models.loader import cache_dir

        self.kernels = cpu_ops.load(cache_dir())  # False: no compiler here; pure-torch paths
        self.paged_decode = self.kernels and dtype in (torch.float32, torch.bfloat16)
        # Prefill attention in one C++ call per layer: bfloat16 on a CPU with AVX512-BF16.
        self.paged_prefill = (self.kernels and dtype == torch.bfloat16
                              and cpu_ops.paged_prefill_supported(head_dim, self.group))
        self._loop = None  # (model, its DecodeLoop or None), built at the first pure-decode step

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Prepack float32 and bfloat16 linear weights for oneDNN where it is available, give
        bfloat16 linears a second copy for the one-row kernel (gemv.cpp) where memory allows
        (`_want_gemv_copies`), and swap in the fused C++ RMSNorm, RoPE and SwiGLU where kiln's
        CPU kernels built."""
        gemv_linears = [m for m in model.modules() if isinstance(m, Linear) and m.weight is not None
                        and m.weight.dtype == torch.bfloat16 and m.out_features % 16 == 0 and m.in_features % 2 == 0]
        if self.kernels and gemv_linears and cpu_ops.gemv_bf16_supported() and _want_gemv_copies(gemv_linears):
            rows = cpu_ops.gemv_bf16_max_rows()
            for module in gemv_linears:
                module.gemv = cpu_ops.pack_gemv_bf16(module.weight.detach())
                module.gemv_rows = rows
            head = getattr(model, "lm_head", None)
            if isinstance(head, Linear) and head.gemv is not None and _want_greedy_head():
                head.greedy = cpu_ops.pack_greedy_head(head.weight.detach())  # None: not screenable
        for module in model.modules():
            if (torch.backends.mkldnn.is_available() and isinstance(module, Linear)
                    and module.weight is not None and module.weight.dtype in _PACKABLE):
                module.pack_mkldnn()
            elif self.kernels and type(module) is RMSNorm:
                module.__class__ = FusedRMSNorm
            elif self.kernels and type(module) is MLP:
                module.__class__ = FusedMLP
        rope = getattr(model, "rope", None)
        if self.kernels and type(rope) is RotaryEmbedding:
            rope.__class__ = FusedRotaryEmbedding
            rope.cos, rope.sin = rope.cos.float().contiguous(), rope.sin.float().contiguous()

    def forward(self, model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                state: CpuStepState, logits_indices: torch.Tensor, use_graphs: bool = True,
                greedy: bool = False) -> torch.Tensor:
        """One step. A pure-decode step without LoRA rows (`use_graphs`) runs every decoder
        layer in one C++ call where the model allows it (backends/cpu_decode.py); other steps
        run the model's modules. `greedy`: as LlamaForCausalLM.forward."""
        n = state.num_decode
        if (use_graphs and state.decode_tables is not None and n == input_ids.numel()
                and len(logits_indices) == n):
            loop = self._decode_loop(model)
            if loop is not None and (loop.max_rows is None or n <= loop.max_rows):
                return loop.run(model, input_ids, positions, self, state, greedy)
        return model(input_ids, positions, self, state, logits_indices, greedy)

    def _decode_loop(self, model: torch.nn.Module):
        cached = self._loop
        if cached is None or cached[0] is not model:
            loop = cpu_decode.build(model, self.kv.dtype) if cpu_decode.enabled() else None
            cached = self._loop = (model, loop)
        return cached[1]

    def prepare(self, meta: AttentionMetadata) -> CpuStepState:
        """Work shared by all layers of a step: gather indices and masks."""
        bs = self.block_size
        groups = []
        nd = meta.num_decode
        tables_d = lens = None
        if nd and self.paged_decode:
            tables_d = meta.decode_block_tables.to(torch.long).contiguous()
            lens = meta.decode_context_lens.to(torch.long).contiguous()
        elif nd:
            lens = meta.decode_context_lens
            n_groups = max(1, min(_DECODE_GROUPS, nd // _MIN_GROUP))
            bounds = [round(i * nd / n_groups) for i in range(n_groups + 1)]
            for start, end in zip(bounds, bounds[1:]):
                group_lens = lens[start:end]
                blocks = -(-int(group_lens.max()) // bs)
                mask = torch.arange(blocks * bs) < group_lens.unsqueeze(1)
                groups.append(_DecodeGroup(
                    start, end, meta.decode_block_tables[start:end, :blocks].flatten(),
                    mask.view(end - start, 1, 1, blocks * bs),
                ))
        if meta.prefills and self.paged_prefill:
            ps = meta.prefills
            width = max(len(p.block_ids) for p in ps)
            tables = torch.zeros(len(ps), width, dtype=torch.long)
            for i, p in enumerate(ps):
                tables[i, :len(p.block_ids)] = p.block_ids
            batch = _PrefillBatch(tables, torch.tensor([p.query_start for p in ps]),
                                  torch.tensor([p.query_len for p in ps]),
                                  torch.tensor([p.context_len for p in ps]))
            return CpuStepState(meta.slot_mapping, nd, groups, tables_d, lens, [], batch)
        plans = []
        for p in meta.prefills:
            if p.context_len == p.query_len:
                plans.append(_PrefillPlan(p.query_start, p.query_len, None, None))
                continue
            slots = (p.block_ids.unsqueeze(-1) * bs + torch.arange(bs)).flatten()[: p.context_len]
            cached = p.context_len - p.query_len
            q_pos = torch.arange(p.query_len).unsqueeze(1) + cached
            mask = torch.arange(p.context_len).unsqueeze(0) <= q_pos  # [len, ctx]
            plans.append(
                _PrefillPlan(p.query_start, p.query_len, slots,
                             mask.repeat_interleave(self.group, dim=0))
            )
        return CpuStepState(meta.slot_mapping, nd, groups, tables_d, lens, plans)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  state: CpuStepState) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H*D]."""
        k_cache, v_cache = self.kv[layer, 0], self.kv[layer, 1]
        k_cache.index_copy_(0, state.slot_mapping, k)
        v_cache.index_copy_(0, state.slot_mapping, v)
        T = q.shape[0]
        Hkv, G, D = self.num_kv_heads, self.group, self.head_dim
        out = torch.empty(T, Hkv, G, D, dtype=q.dtype)
        bs = self.block_size
        k_blocks = k_cache.view(-1, bs * Hkv * D)
        v_blocks = v_cache.view(-1, bs * Hkv * D)
        if state.decode_tables is not None:
            nd = state.num_decode
            out[:nd] = cpu_ops.paged_decode(
                q[:nd].reshape(nd, Hkv, G, D), k_cache, v_cache, state.decode_tables, state.decode_lens,
                bs, self.scale,
            )
        for g in state.decode_groups:
            rows, width = g.end - g.start, g.mask.shape[-1]
            # Whole blocks are gathered with index_select (row memcpys; advanced indexing is
            # several times slower here), then viewed as one padded context per row.
            kd = k_blocks.index_select(0, g.block_ids).view(rows, width, Hkv, D).transpose(1, 2)
            vd = v_blocks.index_select(0, g.block_ids).view(rows, width, Hkv, D).transpose(1, 2)
            out[g.start:g.end] = F.scaled_dot_product_attention(
                q[g.start:g.end].view(rows, Hkv, G, D), kd, vd, attn_mask=g.mask, scale=self.scale
            )
        pb = state.prefill_batch
        if pb is not None:
            if q.stride(2) != 1 or q.stride(1) != D:  # the kernel takes any token stride, not head strides
                q = q.contiguous()
            cpu_ops.paged_prefill(out, q, k_cache, v_cache, pb.tables, pb.starts, pb.query_lens,
                                  pb.context_lens, bs, self.scale)
        for p in state.prefills:
            s, n = p.start, p.length
            if p.gather is None and n >= _GQA_CAUSAL_FROM:
                # Long fresh prompts: SDPA's own GQA with its causal flag skips the masked
                # half of the work (2000 tokens: 8.5 vs 20.9 ms a layer, bench/RESULTS.md).
                o = F.scaled_dot_product_attention(
                    q[s:s + n].transpose(0, 1).unsqueeze(0), k[s:s + n].transpose(0, 1).unsqueeze(0),
                    v[s:s + n].transpose(0, 1).unsqueeze(0), is_causal=True, scale=self.scale, enable_gqa=True,
                )
                out[s:s + n] = o[0].transpose(0, 1).view(n, Hkv, G, D)
                continue
            # [n, Hkv, G, D] -> [1, Hkv, n*G, D]: query rows ordered (position, group member).
            # 4-D inputs keep SDPA on its fused CPU kernel (3-D falls back to the math path).
            qp = q[s:s + n].view(n, Hkv, G, D).transpose(0, 1).reshape(1, Hkv, n * G, D)
            if p.gather is None:
                kp, vp = k[s:s + n].transpose(0, 1), v[s:s + n].transpose(0, 1)
                mask = _causal_group_mask(n, G)
            else:
                kp = k_cache.view(-1, Hkv * D).index_select(0, p.gather).view(-1, Hkv, D).transpose(0, 1)
                vp = v_cache.view(-1, Hkv * D).index_select(0, p.gather).view(-1, Hkv, D).transpose(0, 1)
                mask = p.mask
            o = F.scaled_dot_product_attention(
                qp, kp.unsqueeze(0), vp.unsqueeze(0), attn_mask=mask, scale=self.scale
            )
            out[s:s + n] = o.view(Hkv, n, G, D).transpose(0, 1)
        return out.view(T, Hkv * G * D)


# The one-row kernel's copies double the bfloat16 weights: by default they are made only while
# they take at most this share of available memory (the default model's: 256 MiB).
_GEMV_MEMORY_SHARE = 0.1


def _want_greedy_head() -> bool:
    """KILN_CPU_GREEDY_HEAD=0 turns the LM head's int8 screen for plain-greedy rows off (it
    costs half the head's bf16 copy in memory); on by default where the CPU has AMX-INT8."""
    setting = os.environ.get("KILN_CPU_GREEDY_HEAD", "1")
    if setting not in ("0", "1"):
        raise ValueError(f"KILN_CPU_GREEDY_HEAD={setting!r}: use 0 or 1")
    return setting == "1" and cpu_ops.greedy_head_supported()


def _want_gemv_copies(linears: list) -> bool:
    """KILN_CPU_GEMV=1 / 0 forces the copies on / off; `auto` (default) makes them when they
    fit in _GEMV_MEMORY_SHARE of available memory, so a large model is not doubled."""
    setting = os.environ.get("KILN_CPU_GEMV", "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"KILN_CPU_GEMV={setting!r}: use auto, 0 or 1")
    if setting != "auto":
        return setting == "1"
    import psutil  # as the KV budget: available memory

    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if size > _GEMV_MEMORY_SHARE * psutil.virtual_memory().available:
        log.info("one-row bfloat16 kernel off: its weight copy (%d MiB) would exceed %d%% of available "
                 "memory (KILN_CPU_GEMV=1 forces it)", size >> 20, int(_GEMV_MEMORY_SHARE * 100))
        return False
    return True


_mask_cache: dict[tuple[int, int], torch.Tensor] = {}


def _causal_group_mask(n: int, group: int) -> torch.Tensor:
    key = (n, group)
    mask = _mask_cache.get(key)
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool).tril().repeat_interleave(group, dim=0)
        if len(_mask_cache) > 64:
            _mask_cache.clear()
        _mask_cache[key] = mask
    return mask


# The model's elementwise layers, each one C++ op (kiln/kernels/cpu/fused.cpp) instead of
# several torch ops: the class is swapped in place by CpuBackend.prepare_model, weights kept.
class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.stride(-1) != 1 or x.dtype != self.weight.dtype:
            return super().forward(x)
        return cpu_ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, residual: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One pass, residual updated in place: it is the model's own stream (the embedding's
        # output first), never a tensor the caller keeps.
        if (residual.dim() != 2 or residual.stride(-1) != 1 or delta.shape != residual.shape
                or delta.stride(-1) != 1 or residual.dtype != self.weight.dtype or delta.dtype != residual.dtype):
            return super().add_and_norm(residual, delta)
        return residual, cpu_ops.add_rms_norm(residual, delta, self.weight, self.eps)


class FusedRotaryEmbedding(RotaryEmbedding):
    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cpu_ops.rope(q, k, positions, self.cos, self.sin)


class FusedMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        if type(gate_up) is Linear and gate_up.uses_gemv(x) and gate_up.gemv.shape[0] % 2 == 0:
            h = cpu_ops.gemv_silu_bf16(x, gate_up.gemv)  # the same bits, one pass fewer
        else:
            h = cpu_ops.silu_and_mul(gate_up(x))
        return reduce_row_parallel(self.tp, self.down_proj(h))
