"""Resumable checkpoints, safetensors and JSON only (no pickle).

checkpoint-000012/
  adapter_config.json, adapter_model.safetensors   the LoRA weights (a loadable PEFT folder)
  optimizer.safetensors                            AdamW moments and step per parameter, RNG state
  state.json                                       step, options fingerprint; written last
A checkpoint is written into a temporary folder and renamed into place, so a run killed while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class CheckpointState:
    step: int
    fingerprint: dict[str, Any]


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"checkpoint-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with state.json), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: Path, step: int, peft_model: Any, optimizer: torch.optim.Optimizer,
                    params: dict[str, torch.nn.Parameter], fingerprint: dict[str, Any], keep: int) -> Path:
    final = checkpoint_path(root, step)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value.detach().to("cpu").contiguous()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> CheckpointState:
    raw = json.loads((path / "state.json").read_text())
    return CheckpointState(step=int(raw["step"]), fingerprint=raw.get("fingerprint", {}))


def load_checkpoint(path: Path, peft_model: Any, optimizer: torch.optim.Optimizer,
                    params: dict[str, torch.nn.Parameter]) -> CheckpointState:
    from peft import set_peft_model_state_dict

    state = read_state(path)
    weights = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint {path} does not fit this model: unexpected weights {unexpected[:3]}")
    tensors = load_file(str(path / "optimizer.safetensors"))
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors.pop("rng.torch"))
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("::")
        per_param.setdefault(name, {})[field] = value
    for name, p in params.items():
        if name not in per_param:
            raise ValueError(f"checkpoint {path} has no optimizer state for {name}")
        # AdamW keeps `step` on the CPU and the moments beside the parameter.
        optimizer.state[p] = {k: (v if k == "step" else v.to(p.device)) for k, v in per_param[name].items()}
    return state
