"""Typed settings. Precedence: CLI flags > KILN_* environment variables > defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch


@dataclass
class EngineConfig:
    model: str = "default"  # "default", a Hugging Face folder, or a .gguf file
    served_model_name: str | None = None
    dtype: str = "float32"  # float32 | bfloat16
    block_size: int = 16
    kv_cache_bytes: int | None = None  # explicit KV budget; else a fraction of free memory
    kv_cache_memory_fraction: float = 0.1
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None  # default: the model's context length
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch threads; default: all cores

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {self.dtype!r}: use float32, bfloat16 or float16") from None

    def validate(self) -> None:
        self.torch_dtype  # noqa: B018 - raises on an unknown dtype
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes must be > 0")
        if not 0 < self.kv_cache_memory_fraction <= 0.95:
            raise ValueError("kv_cache_memory_fraction must be in (0, 0.95]")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "info"
    engine: EngineConfig = field(default_factory=EngineConfig)


def _parse(value: str, kind: type | str):
    text = str(kind)
    if "bool" in text:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if "int" in text:
        return int(value)
    if "float" in text:
        return float(value)
    return value


def apply_env(obj, prefix: str = "KILN_") -> None:
    """Fill dataclass fields from KILN_<FIELD> environment variables."""
    for f in fields(obj):
        if f.name == "engine":
            continue
        raw = os.environ.get(prefix + f.name.upper())
        if raw is not None and raw != "":
            try:
                setattr(obj, f.name, _parse(raw, f.type))
            except ValueError as exc:
                raise ValueError(f"{prefix}{f.name.upper()}={raw!r}: {exc}") from None
