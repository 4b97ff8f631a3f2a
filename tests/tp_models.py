"""Small random Llama folders for tensor-parallel tests (the default model's 9 query heads
cannot be split over 2 ranks): config.json + seeded random safetensors + the default model's
tokenizer files, so prompts encode the same way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from kiln.runtime.models.loader import resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def make_llama(out: Path, *, heads: int = 4, kv_heads: int = 2, hidden: int = 128, intermediate: int = 256,
               layers: int = 3, tie: bool = False, seed: int = 0) -> Path:
    default = resolve_model("default")
    base = json.loads((default / "config.json").read_text())
    vocab = base["vocab_size"]
    head_dim = hidden // heads
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 1024, "tie_word_embeddings": tie,
        "bos_token_id": base["bos_token_id"], "eos_token_id": base["eos_token_id"], "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).contiguous()

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(vocab, hidden, std=1.0),
                                  "model.norm.weight": 1 + rnd(hidden, std=0.1)}
    if not tie:
        t["lm_head.weight"] = rnd(vocab, hidden, std=hidden ** -0.5 * 3)
    s_in, s_mid = hidden ** -0.5, intermediate ** -0.5
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rnd(hidden, std=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + rnd(hidden, std=0.1)
        t[p + "self_attn.q_proj.weight"] = rnd(heads * head_dim, hidden, std=s_in * 2)
        t[p + "self_attn.k_proj.weight"] = rnd(kv_heads * head_dim, hidden, std=s_in * 2)
        t[p + "self_attn.v_proj.weight"] = rnd(kv_heads * head_dim, hidden, std=s_in)
        t[p + "self_attn.o_proj.weight"] = rnd(hidden, heads * head_dim, std=(heads * head_dim) ** -0.5)
        t[p + "mlp.gate_proj.weight"] = rnd(intermediate, hidden, std=s_in)
        t[p + "mlp.up_proj.weight"] = rnd(intermediate, hidden, std=s_in)
        t[p + "mlp.down_proj.weight"] = rnd(hidden, intermediate, std=s_mid)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (default / name).is_file():
            shutil.copy(default / name, out / name)
    return out
