"""Training options: one dataclass, fed by CLI flags or by SageMaker's string hyperparameters."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

DEFAULT_SM_ROOT = Path("/opt/ml")


@dataclass
class TrainOptions:
    data: str | None = None  # a .jsonl file or a folder of them; SageMaker: the channel
    out: str | None = None  # where the PEFT adapter is written; SageMaker: /opt/ml/model
    model: str = "default"  # "default", a Hugging Face folder or a .gguf file
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    lr: float = 2e-4
    lr_scheduler: str = "linear"  # constant | linear | cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 1024
    seed: int = 42
    checkpoint_dir: str | None = None  # default OUT/checkpoints; SageMaker: /opt/ml/checkpoints
    checkpoint_every: int = 100  # optimizer steps; 0 = only on SIGTERM
    keep_checkpoints: int = 2
    resume: bool = True
    log_every: int = 10
    dtype: str = "auto"  # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    num_threads: int = 0  # torch CPU threads; 0 = torch's default (all cores)
    qlora: bool = False
    channel: str = "train"  # SageMaker channel to read when no --data is given
    sagemaker: bool = False
    sm_root: str = str(DEFAULT_SM_ROOT)

    @property
    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def validate(self) -> None:
        positive = ("rank", "batch_size", "grad_accum", "max_seq_len", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        for name in ("max_steps", "checkpoint_every", "warmup_steps", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("set epochs > 0 or max-steps > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr-scheduler must be constant, linear or cosine (got {self.lr_scheduler!r})")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16 (got {self.dtype!r})")
        if not self.target_module_list:
            raise ValueError("target-modules is empty")
        if not self.data:
            raise ValueError("no training data: pass --data FILE_OR_DIR (or run with --sagemaker)")
        if not self.out:
            raise ValueError("no output folder: pass --out DIR (or run with --sagemaker)")


_HELP = {
    "data": "a JSON-lines file, or a folder of *.jsonl / *.json files; each line is "
            '{"prompt": ..., "completion": ...} or {"messages": [...]}',
    "out": "folder for the PEFT adapter (adapter_config.json + adapter_model.safetensors)",
    "model": "'default' (SmolLM2-135M-Instruct), a Hugging Face folder or a .gguf file",
    "rank": "LoRA rank r",
    "alpha": "LoRA alpha (scale = alpha / rank)",
    "dropout": "LoRA dropout",
    "target_modules": "comma-separated module names that get LoRA weights",
    "epochs": "passes over the data (ignored when --max-steps > 0)",
    "max_steps": "optimizer steps; 0 = derive from --epochs",
    "lr": "peak learning rate (AdamW)",
    "lr_scheduler": "constant, linear or cosine decay after warm-up",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay",
    "batch_size": "records per micro-batch (per process)",
    "grad_accum": "micro-batches per optimizer step",
    "max_seq_len": "tokens per record; longer records are cut at the end",
    "seed": "seed for LoRA initialisation, data order and dropout",
    "checkpoint_dir": "folder for resumable checkpoints; a restarted run resumes from the newest "
                      "[default: OUT/checkpoints; SageMaker: SM_ROOT/checkpoints]",
    "checkpoint_every": "save a checkpoint every N optimizer steps (0 = only at the end and on SIGTERM)",
    "keep_checkpoints": "how many checkpoints to keep",
    "resume": "start from step 0 even when --checkpoint-dir holds a checkpoint [default: resume]",
    "log_every": "print a progress line every N optimizer steps",
    "dtype": "base weights: auto (bfloat16 on CUDA, else float32), float32, bfloat16 or float16",
    "gradient_checkpointing": "trade compute for activation memory",
    "num_threads": "torch CPU threads (0 = all cores)",
    "qlora": "load the base model in 4-bit NF4 with bitsandbytes (QLoRA); needs "
             "`pip install bitsandbytes` (CUDA, or a bitsandbytes build with CPU support)",
    "channel": "the SageMaker data channel to train on",
    "sagemaker": "follow the SageMaker training contract (read SM_ROOT/input, write SM_ROOT/model); "
                 "on by default when SM_ROOT/input/config/hyperparameters.json exists",
    "sm_root": "root of the SageMaker tree (tests point it at a temporary folder)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainOptions field; defaults are None so that an explicit flag can be told
    apart from a default (flags win over hyperparameters.json)."""
    hints = get_type_hints(TrainOptions)
    for f in dataclasses.fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = "none" if default is None else default
        help_text = _HELP[f.name] if "[default" in _HELP[f.name] else f"{_HELP[f.name]} [default {shown}]"
        if hints[f.name] is bool:
            if default:  # on by default: offer the --no- form
                parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name,
                                    action="store_const", const=False, default=None, help=help_text)
            else:
                parser.add_argument(flag, dest=f.name, action="store_const", const=True,
                                    default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_scalar_type(hints[f.name]), default=None,
                                metavar=f.name.upper(), help=help_text)


def _scalar_type(hint: Any) -> type:
    for t in (int, float):
        if hint is t:
            return t
    return str


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def coerce(name: str, value: Any) -> Any:
    """Turn a hyperparameter value (SageMaker passes every one as a JSON string) into the type
    of the TrainOptions field `name`."""
    hint = get_type_hints(TrainOptions)[name]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]  # the SageMaker Python SDK json-encodes strings: '"q_proj,v_proj"'
    try:
        if hint is bool:
            return value if isinstance(value, bool) else parse_bool(str(value))
        if hint is int:
            number = float(value)  # "100", "1e3" and "100.0" are all fine
            if number != int(number):
                raise ValueError
            return int(number)
        if hint is float:
            return float(value)
        if isinstance(value, list):  # target_modules may come as a JSON list
            return ",".join(str(v) for v in value)
        return None if value is None else str(value)
    except (TypeError, ValueError):
        raise ValueError(f"hyperparameter {name!r}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None


def field_name(key: str) -> str | None:
    """`max-steps`, `max_steps` and `MAX_STEPS` all name the field max_steps."""
    name = key.strip().lower().replace("-", "_")
    aliases = {"learning_rate": "lr", "lora_r": "rank", "r": "rank", "lora_alpha": "alpha",
               "lora_dropout": "dropout", "num_train_epochs": "epochs",
               "per_device_train_batch_size": "batch_size",
               "gradient_accumulation_steps": "grad_accum", "max_length": "max_seq_len"}
    name = aliases.get(name, name)
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    return name if name in names else None


def from_hyperparameters(raw: dict[str, Any]) -> dict[str, Any]:
    """Map SageMaker hyperparameters onto TrainOptions fields; unknown keys are an error (a typo
    would otherwise silently train with the default)."""
    out: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        name = field_name(key)
        if name is None:
            if key.startswith("sagemaker_"):  # set by the SageMaker SDK itself
                continue
            unknown.append(key)
            continue
        out[name] = coerce(name, value)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}")
    return out


def merge(flags: dict[str, Any], hyperparameters: dict[str, Any] | None = None) -> TrainOptions:
    """Defaults < hyperparameters.json < CLI flags."""
    values: dict[str, Any] = dict(hyperparameters or {})
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainOptions(**values)


def options_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name, None) for f in dataclasses.fields(TrainOptions)}


def fingerprint(opts: TrainOptions) -> dict[str, Any]:
    """The options a checkpoint must agree with to be resumed (the rest may change)."""
    keep = ("model", "rank", "alpha", "target_modules", "batch_size", "grad_accum", "max_seq_len", "seed", "qlora")
    return {k: getattr(opts, k) for k in keep}


__all__ = ["TrainOptions", "add_arguments", "coerce", "from_hyperparameters", "merge",
           "options_from_args", "fingerprint", "parse_bool", "field_name", "DEFAULT_SM_ROOT"]
