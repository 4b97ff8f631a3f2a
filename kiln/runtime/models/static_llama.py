"""Static-shape Llama forwards for graph compilers (Neuron; torch.jit elsewhere).

Two graph families over a KV buffer with one fixed slot per batch row,
`kv[layer, k|v, row, position, kv_head, head_dim]`:

- context encoding: one new sequence, its prompt padded to a bucket length, written into
  one row at positions [0, bucket); returns the logits of its last real token.
- token generation: every row computes one token at its own position; a position mask
  hides the slots past it (inactive rows run too, on padding, and nothing reads them).

The functions are pure torch over a flat tuple of weight tensors (see `flat_weights`), so a
traced graph holds no weights: the same tensors the eager model uses are passed in. The KV
buffer is updated in place and also returned, so a compiler that only knows functional
graphs (XLA on Neuron) can alias that output to the input buffer.

The math mirrors models/llama.py and the cpu backend op for op (the same SDPA layout for
grouped-query attention), so greedy outputs agree with the cpu backend token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear, _rotate, silu_and_mul
from .llama import LlamaForCausalLM

# Per-layer weights, in this order, in the flat tuple.
_PER_LAYER = 6  # input_layernorm, qkv_proj, o_proj, post_attention_layernorm, gate_up_proj, down_proj
_HEAD = 5  # embed_tokens, rope cos, rope sin, final norm, lm_head


@dataclass(frozen=True)
class StaticDims:
    """What a graph's shapes are built from (all fixed at compile time)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rms_norm_eps: float
    rows: int  # batch rows of the token-generation graph (and of the KV buffer)
    max_length: int  # KV slots per row: prompt plus generated tokens

    @classmethod
    def of(cls, model: LlamaForCausalLM, rows: int, max_length: int) -> "StaticDims":
        c = model.config
        return cls(c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.rms_norm_eps,
                   rows, max_length)

    def kv_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.rows, self.max_length, self.num_kv_heads, self.head_dim)


def _dense(module: nn.Module) -> torch.Tensor:
    base = getattr(module, "base", module)  # a LoRA wrapper holds the real linear in .base
    if type(base) is not Linear or base.weight is None:
        raise ValueError(
            f"static-shape graphs need dense linear weights, found {type(base).__name__}: "
            "load the model without quantization and without prepacked weights"
        )
    return base.weight


def flat_weights(model: LlamaForCausalLM) -> tuple[torch.Tensor, ...]:
    """The model's weights in the order the static forwards read them."""
    out = [model.embed_tokens.weight, model.rope.cos, model.rope.sin, model.norm.weight, _dense(model.lm_head)]
    for layer in model.layers:
        out += [layer.input_layernorm.weight, _dense(layer.self_attn.qkv_proj), _dense(layer.self_attn.o_proj),
                layer.post_attention_layernorm.weight, _dense(layer.mlp.gate_up_proj), _dense(layer.mlp.down_proj)]
    return tuple(out)


def _layer_weights(weights: tuple[torch.Tensor, ...], i: int) -> tuple[torch.Tensor, ...]:
    start = _HEAD + i * _PER_LAYER
    return weights[start:start + _PER_LAYER]


def _qkv(d: StaticDims, x: torch.Tensor, w_qkv: torch.Tensor, positions: torch.Tensor,
         cos_t: torch.Tensor, sin_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = x.shape[0]
    q_size, kv_size = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    q, k, v = F.linear(x, w_qkv).split([q_size, kv_size, kv_size], dim=-1)
    cos = cos_t[positions].unsqueeze(1).to(x.dtype)
    sin = sin_t[positions].unsqueeze(1).to(x.dtype)
    q = _rotate(q.reshape(T, d.num_heads, d.head_dim), cos, sin)
    k = _rotate(k.reshape(T, d.num_kv_heads, d.head_dim), cos, sin)
    return q, k, v.reshape(T, d.num_kv_heads, d.head_dim)


def _mlp_block(d: StaticDims, residual: torch.Tensor, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x = F.rms_norm(residual, (d.hidden_size,), w[3], d.rms_norm_eps)
    return residual + F.linear(silu_and_mul(F.linear(x, w[4])), w[5])


class ContextEncoding(nn.Module):
    """One prompt of exactly `bucket` tokens (padded) into one row of the KV buffer."""

    def __init__(self, dims: StaticDims, bucket: int) -> None:
        super().__init__()
        if bucket > dims.max_length:
            raise ValueError(f"bucket {bucket} exceeds the maximum length {dims.max_length}")
        self.dims, self.bucket = dims, bucket

    def forward(self, input_ids: torch.Tensor, row: torch.Tensor, last: torch.Tensor, kv: torch.Tensor,
                *weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [bucket], row [1], last [1] (index of the last real token), kv buffer,
        weights -> (float32 logits [1, vocab], kv)."""
        d, n = self.dims, self.bucket
        Hkv, G, D = d.num_kv_heads, d.num_heads // d.num_kv_heads, d.head_dim
        embed, cos_t, sin_t, norm_w, lm_head = weights[:_HEAD]
        positions = torch.arange(n, device=input_ids.device)
        slots = row * d.max_length + positions  # flat slots of this row's first `n` positions
        # Causal over the bucket; query rows are ordered (position, group member) as in the
        # cpu backend. Padding sits after the real tokens, so real tokens never see it.
        mask = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril().repeat_interleave(G, dim=0)
        residual = F.embedding(input_ids, embed)
        for i in range(d.num_layers):
            w = _layer_weights(weights, i)
            x = F.rms_norm(residual, (d.hidden_size,), w[0], d.rms_norm_eps)
            q, k, v = _qkv(d, x, w[1], positions, cos_t, sin_t)
            kv[i, 0].view(-1, Hkv, D).index_copy_(0, slots, k)
            kv[i, 1].view(-1, Hkv, D).index_copy_(0, slots, v)
            qp = q.view(n, Hkv, G, D).transpose(0, 1).reshape(1, Hkv, n * G, D)
            o = F.scaled_dot_product_attention(qp, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                                               attn_mask=mask, scale=D ** -0.5)
            attn = o.view(Hkv, n, G, D).transpose(0, 1).reshape(n, Hkv * G * D)
            residual = residual + F.linear(attn, w[2])
            residual = _mlp_block(d, residual, w)
        h = F.rms_norm(residual.index_select(0, last), (d.hidden_size,), norm_w, d.rms_norm_eps)
        return F.linear(h, lm_head).float(), kv


class TokenGeneration(nn.Module):
    """One token for every row of the KV buffer, each at its own position."""

    def __init__(self, dims: StaticDims) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                *weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [rows], positions [rows], kv buffer, weights -> (float32 logits
        [rows, vocab], kv)."""
        d, R = self.dims, self.dims.rows
        Hkv, G, D, L = d.num_kv_heads, d.num_heads // d.num_kv_heads, d.head_dim, d.max_length
        embed, cos_t, sin_t, norm_w, lm_head = weights[:_HEAD]
        slots = torch.arange(R, device=input_ids.device) * L + positions
        # Row r attends to its slots [0, positions[r]]; the rest of the row is stale or padding.
        mask = (torch.arange(L, device=input_ids.device).unsqueeze(0) <= positions.unsqueeze(1)).view(R, 1, 1, L)
        residual = F.embedding(input_ids, embed)
        for i in range(d.num_layers):
            w = _layer_weights(weights, i)
            x = F.rms_norm(residual, (d.hidden_size,), w[0], d.rms_norm_eps)
            q, k, v = _qkv(d, x, w[1], positions, cos_t, sin_t)
            k_cache, v_cache = kv[i, 0], kv[i, 1]  # [rows, L, Hkv, D]
            k_cache.view(-1, Hkv, D).index_copy_(0, slots, k)
            v_cache.view(-1, Hkv, D).index_copy_(0, slots, v)
            o = F.scaled_dot_product_attention(q.view(R, Hkv, G, D), k_cache.transpose(1, 2),
                                               v_cache.transpose(1, 2), attn_mask=mask, scale=D ** -0.5)
            residual = residual + F.linear(o.reshape(R, Hkv * G * D), w[2])
            residual = _mlp_block(d, residual, w)
        h = F.rms_norm(residual, (d.hidden_size,), norm_w, d.rms_norm_eps)
        return F.linear(h, lm_head).float(), kv
