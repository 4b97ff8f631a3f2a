"""The decoder layers of a pure-decode step as one C++ call (kiln/kernels/cpu/decode_step.cpp).

At small batches a CPU decode step is dominated by the per-operation cost of issuing ~400
small torch ops from Python (module calls, argument parsing, views): ~3 of the ~10-17 ms of a
one-sequence step of the default model. `DecodeLoop` flattens the model once into lists of
weights and calls the same kernels from C++, so the output is bit-identical to the module path.

It applies only where that path would run these exact kernels: steps whose rows all decode,
no LoRA rows, no tensor parallelism, linears that are dense, oneDNN-prepacked, int8 or GPTQ
int4pack (anything else, e.g. bitsandbytes or a split GPTQ layer, keeps the module path), and
batches small enough for the quantized GEMV kernels the module path would pick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..models.layers import Linear

# Linear kinds, as decode_step.cpp numbers them.
DENSE, MKLDNN, INT8, INT4 = 0, 1, 2, 3
_NONE = torch.empty(0)


@dataclass
class DecodeLoop:
    norms: list[torch.Tensor]
    linears: list[torch.Tensor]
    kinds: list[int]
    max_rows: int | None  # the quantized GEMVs' row limit; None: any batch
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float

    def run(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, backend, state,
            greedy: bool = False) -> torch.Tensor:
        """Logits of every row of a pure-decode step, in the LM head's dtype: the sampler reads any
        float dtype, and greedy rows (the common case) need no float32 copy of [rows, vocab].
        With `greedy`, token ids where the head can pick them (LlamaForCausalLM.head)."""
        h = model.embed_tokens(input_ids)
        residual = torch.ops.kiln_cpu.decode_layers(
            h, positions, state.slot_mapping, state.decode_tables, state.decode_lens, backend.kv,
            model.rope.cos, model.rope.sin, self.norms, self.linears, self.kinds,
            self.num_heads, self.num_kv_heads, self.head_dim, backend.block_size, self.eps, backend.scale,
        )
        return model.head(model.norm(residual), greedy)


def enabled() -> bool:
    """KILN_CPU_DECODE_LOOP=0 keeps every step on the module path (for comparisons)."""
    return os.environ.get("KILN_CPU_DECODE_LOOP", "1") != "0"


def build(model: nn.Module, dtype: torch.dtype) -> DecodeLoop | None:
    """Flatten `model` for decode_layers, or None where some layer is not one it can run."""
    from ..lora import LoraLinear
    from ..models.llama import Attention, DecoderLayer, LlamaForCausalLM
    from .cpu import FusedMLP, FusedRMSNorm, FusedRotaryEmbedding

    # The loop is LlamaForCausalLM's forward written out: any other model (or subclass) keeps
    # its own modules.
    if (type(model) is not LlamaForCausalLM or model.tp is not None
            or type(model.rope) is not FusedRotaryEmbedding or type(model.norm) is not FusedRMSNorm):
        return None
    norms: list[torch.Tensor] = []
    linears: list[torch.Tensor] = []
    kinds: list[int] = []
    max_rows: int | None = None
    eps = None
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if type(layer) is not DecoderLayer or type(attn) is not Attention or type(mlp) is not FusedMLP:
            return None
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm) is not FusedRMSNorm or norm.weight.dtype != dtype or eps not in (None, norm.eps):
                return None
            eps = norm.eps
            norms.append(norm.weight.detach())
        for module in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if isinstance(module, LoraLinear):
                module = module.base  # steps with LoRA rows never take this path
            entry = _linear_entry(module, dtype)
            if entry is None:
                return None
            kind, group, tensors, rows = entry
            kinds += [kind, group]
            linears += tensors
            if rows is not None:
                max_rows = rows if max_rows is None else min(max_rows, rows)
    if eps is None:
        return None
    return DecodeLoop(norms, linears, kinds, max_rows, attn.num_heads, attn.num_kv_heads, attn.head_dim, eps)


def _linear_entry(module: nn.Module, dtype: torch.dtype):
    """(kind, group, [weight, aux, perm], row limit) of a linear the loop can run, else None."""
    from ..quant import gptq, int8

    if type(module) is Linear:
        if module.packed is not None:
            if module.gemv is not None:  # gemv_bf16 up to the module's row limit, as Linear.forward
                return MKLDNN, module.gemv_rows, [module.packed, module.gemv, _NONE], None
            return MKLDNN, 0, [module.packed, _NONE, _NONE], None
        if module.weight.dtype == dtype:
            return DENSE, 0, [module.weight.detach(), _NONE, _NONE], None
        return None
    if type(module) is int8.Int8Linear:
        return INT8, 0, [module.qweight, module.scales, _NONE], int8.GEMV_MAX_ROWS
    if type(module) is gptq.GptqLinear and module.int4_group is not None:
        perm = module.perm if module.perm is not None else _NONE
        return INT4, module.int4_group, [module.int4pack, module.scale_zero, perm], gptq.GEMV_MAX_ROWS
    return None
