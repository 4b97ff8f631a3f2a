"""Llama-family decoder (Llama 2/3, Mistral, SmolLM2, TinyLlama): RMSNorm, RoPE, SwiGLU,
grouped-query attention whose K/V live in the paged cache.

The model works on a flat batch: every scheduled token of every sequence side by side
([T] ids and positions). Attention is delegated to the backend, which knows the cache layout.
q/k/v and gate/up projections are fused into one matmul each (fewer, larger GEMMs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .layers import Linear, RMSNorm, RotaryEmbedding, silu_and_mul
from .loader import ModelConfig, iter_safetensors


class AttentionBackend(Protocol):
    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        """Store k/v of the new tokens in the cache and return attention output [T, Hq*D]."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.tp = None  # tensor parallelism: o_proj is row-parallel, its output is all-reduced

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        backend: AttentionBackend,
        meta: Any,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rope(
            positions,
            q.view(T, self.num_heads, self.head_dim),
            k.view(T, self.num_kv_heads, self.head_dim),
        )
        v = v.view(T, self.num_kv_heads, self.head_dim)
        return reduce_row_parallel(self.tp, self.o_proj(backend.attention(self.layer, q, k, v, meta)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.tp = None  # tensor parallelism: down_proj is row-parallel, its output is all-reduced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_row_parallel(self.tp, self.down_proj(silu_and_mul(self.gate_up_proj(x))))


def reduce_row_parallel(tp, y: torch.Tensor) -> torch.Tensor:
    """Sum the partial outputs of a row-parallel linear (and its LoRA term) over the ranks."""
    return y if tp is None else tp.all_reduce(y)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class LlamaForCausalLM(nn.Module):
    """With `tp` (kiln.runtime.parallel.TensorParallel) the model is one rank's shard: `cfg` is
    the local config (its heads, its columns of the MLP, its rows of the vocabulary)."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None, tp=None) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(
            cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta
        )
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        for layer in self.layers:
            layer.self_attn.tp = layer.mlp.tp = tp

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: Any,
        logits_indices: torch.Tensor,
        greedy: bool = False,
    ) -> torch.Tensor:
        """Run the flat batch; return float32 logits [len(logits_indices), vocab] of the
        tokens that are sampled (the last scheduled token of each sequence), or with `greedy`
        (every sampled row is plain greedy) their argmax token ids where the head can pick
        them without the logits (see `head`)."""
        if self.tp is None:
            h = self.embed_tokens(input_ids)
        else:  # vocab-parallel: each rank embeds the ids in its rows, the sum is the embedding
            h = self.tp.embed(self.embed_tokens.weight, input_ids)
        residual = h
        x = self.layers[0].input_layernorm(residual)
        for i, layer in enumerate(self.layers):
            residual, x = layer.post_attention_layernorm.add_and_norm(
                residual, layer.self_attn(x, positions, self.rope, backend, meta))
            if i + 1 < len(self.layers):
                residual, x = self.layers[i + 1].input_layernorm.add_and_norm(residual, layer.mlp(x))
            else:  # the final norm runs on the sampled rows only
                residual = residual + layer.mlp(x)
        out = self.head(self.norm(residual[logits_indices]), greedy)
        return out if out.dtype == torch.long else out.float()

    def head(self, h: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """The LM head on final-norm rows `h`: logits [rows, vocab] in the head's dtype, or, with
        `greedy`, int64 token ids [rows] (each row's first maximum, the argmax of those logits)
        where the head has a way to pick them without writing the logits (Linear.greedy_argmax)."""
        if greedy and self.tp is None:
            pick = getattr(self.lm_head, "greedy_argmax", None)
            tokens = pick(h) if pick is not None else None
            if tokens is not None:
                return tokens
        logits = self.lm_head(h)
        if self.tp is not None:  # vocab-parallel LM head: gather every rank's columns
            logits = self.tp.gather_vocab(logits)
        return logits

    @classmethod
    def from_folder(
        cls, folder: Path, dtype: torch.dtype = torch.float32, max_positions: int | None = None, tp=None,
    ) -> "LlamaForCausalLM":
        """With `tp`, build this rank's shard and read only its slices of the checkpoint."""
        cfg = ModelConfig.from_folder(folder)
        if tp is not None:
            cfg = tp.plan.local_config(cfg)
        with torch.device("meta"):
            model = cls(cfg, max_positions, tp)
        model.to_empty(device="cpu")
        # Buffers were on meta: rebuild RoPE tables for real.
        model.rope = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta)
        from ..quant.checkpoint import gptq_loader

        gptq = gptq_loader(folder)  # None unless config.json declares GPTQ weights
        if gptq is not None and tp is not None:
            gptq.shard = tp.plan
        tensors = iter_safetensors(folder) if tp is None else tp.plan.iter_safetensors(folder)
        if gptq is not None:
            gptq.prepare(model)
            tensors = gptq.filter(tensors)
        load_weights(model, tensors, dtype)
        if gptq is not None:
            gptq.install(model)
        return model


# Checkpoint tensors that are fused into one kiln parameter, and their order.
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def load_weights(model: LlamaForCausalLM, tensors, dtype: torch.dtype) -> None:
    """Copy checkpoint tensors (Hugging Face names) into the model, fusing q/k/v and
    gate/up; fail loudly on a missing or unexpected tensor or a shape mismatch."""
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    params = dict(model.named_parameters())
    pending: dict[str, dict[int, torch.Tensor]] = {}
    loaded: set[str] = set()
    for name, tensor in tensors:
        name = name.removeprefix("model.")
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied to the embedding
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target = name
        for src, (dst, index) in _FUSED.items():
            if f".{src}." in f".{name}":
                target = name.replace(src, dst)
                parts = pending.setdefault(target, {})
                parts[index] = tensor
                expected = 3 if "qkv" in dst else 2
                if len(parts) < expected:
                    target = None
                else:
                    tensor = torch.cat([parts[i] for i in range(expected)], dim=0)
                    del pending[target]
                break
        if target is None:
            continue
        if target not in params:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        param = params[target]
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, model {tuple(param.shape)}"
            )
        param.data.copy_(tensor.to(param.dtype))
        loaded.add(target)
    missing = set(params) - loaded
    if missing or pending:
        raise ValueError(f"checkpoint is missing tensors: {sorted(missing | set(pending))[:8]}")
    model.to(dtype)
    model.rope.cos = model.rope.cos.float()
    model.rope.sin = model.rope.sin.float()
