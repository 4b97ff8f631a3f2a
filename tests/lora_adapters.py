"""Real PEFT adapters for the default model, made with peft itself (random, seeded weights),
and greedy references computed by transformers + peft."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kiln.runtime.models.loader import resolve_model

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model("default")), dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_adapter(out: Path, *, seed: int, rank: int = 8, alpha: float = 16.0,
                 targets: list[str] = ALL_TARGETS, rslora: bool = False, b_scale: float = 0.3) -> Path:
    """A PEFT LoRA adapter with random A and B (B is zero in a fresh adapter, which would
    make it a no-op), scaled so it moves the model's output without wrecking it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", init_lora_weights=False)
    peft_model = get_peft_model(base_model(), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(b_scale)
    peft_model.save_pretrained(str(out))
    assert (out / "adapter_model.safetensors").is_file()
    return out


def peft_greedy(adapter: Path | None, prompts: list[list[int]], new_tokens: int) -> list[tuple[list[int], torch.Tensor]]:
    """(tokens, per-step logits) of transformers' greedy generate, with the adapter applied
    by peft (None: the base model)."""
    model = base_model()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            res = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            out.append((res.sequences[0, len(ids):].tolist(), torch.stack([s[0] for s in res.logits])))
    return out


def rewrite_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
