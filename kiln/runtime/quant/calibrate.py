"""`kiln quantize`: GPTQ (or round-to-nearest) over a dense model folder, layer by layer,
written as an AutoGPTQ-format folder that `kiln serve --model DIR` loads.

Memory stays bounded by one layer's work: the calibration hidden states of all samples
([samples * seq_len, hidden], float32) plus one Hessian at a time. Quantization is
"true-sequential": each linear sees inputs computed with the already-quantized linears
before it (qkv, then o, then gate/up, then down), and the next layer sees this layer's
quantized output.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ..models.llama import LlamaForCausalLM
from ..models.loader import iter_safetensors
from .checkpoint import FUSED_PARTS, _out_sizes, packed_tensors, quantization_config_dict
from .gptq import GptqConfig, GptqLinear, HessianAccumulator, gptq_quantize, rtn_quantize
from .qweight import QuantizedWeight

# The sublayers of a decoder layer, in the order they are quantized.
SUBLAYERS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
METHODS = ("gptq", "rtn")


def default_calibration_text() -> str:
    """The calibration text that ships with kiln: a hand-written text (prose, Q&A, code;
    written for the project) and ~38k tokens the default model wrote over 64 topics
    (bench/make_calibration.py). The second matters: on the hand-written text alone (2.5k
    tokens) GPTQ over-fits, and held-out perplexity is clearly worse (bench/RESULTS.md)."""
    data = resources.files("kiln.runtime.quant").joinpath("data")
    return "\n\n".join(data.joinpath(name).read_text(encoding="utf-8")
                       for name in ("calibration.txt", "calibration-generated.txt"))


def calibration_samples(token_ids: list[int], num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets: [n, seq_len]."""
    if len(token_ids) < seq_len:
        raise ValueError(f"the calibration text has {len(token_ids)} tokens; need at least seq_len={seq_len}")
    ids = torch.tensor(token_ids, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(token_ids) - seq_len + 1, (num_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


class _DenseCausal:
    """Attention for calibration: `batch` whole sequences of `seq_len` tokens, causal, no cache."""

    def __init__(self, batch: int, seq_len: int) -> None:
        self.batch, self.seq_len = batch, seq_len

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> torch.Tensor:
        b, n = self.batch, self.seq_len
        q, k, v = (t.view(b, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2).reshape(b * n, -1)


class _Stop(Exception):
    """Raised by a hook once it has the input it needed: the rest of the layer is skipped."""


def _layer_forward(model: LlamaForCausalLM, layer, h: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    positions = torch.arange(seq_len).repeat(batch)
    backend = _DenseCausal(batch, seq_len)
    x = layer.input_layernorm(h)
    h = h + layer.self_attn(x, positions, model.rope, backend, None)
    x = layer.post_attention_layernorm(h)
    return h + layer.mlp(x)


@torch.no_grad()
def quantize_model_weights(
    model: LlamaForCausalLM,
    samples: torch.Tensor,
    config: GptqConfig,
    method: str = "gptq",
    num_layers: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    on_layer: Callable[[int], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize the decoder's linears in place (their dense weights become the dequantized
    values) and return the quantized weights by kiln module name ("layers.0.mlp.down_proj").
    `num_layers` limits the work to the first layers (for tests)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use {' or '.join(METHODS)}")
    config.validate()
    n, seq_len = samples.shape
    layers = list(model.layers)[: num_layers or len(model.layers)]
    results: dict[str, QuantizedWeight] = {}
    with torch.inference_mode():
        hidden = [model.embed_tokens(samples[i:i + batch_size]).reshape(-1, model.config.hidden_size)
                  for i in range(0, n, batch_size)]
    bar = tqdm(total=len(layers) * len(SUBLAYERS), desc=f"{method} {config.bits}-bit", unit="linear",
               disable=not progress)
    for index, layer in enumerate(layers):
        for name in SUBLAYERS:
            module = layer.get_submodule(name)
            bar.set_postfix_str(f"layer {index} {name.split('.')[-1]}")
            if method == "gptq":
                acc = HessianAccumulator(module.in_features)

                def hook(_mod, args, acc=acc):
                    acc.add(args[0])
                    raise _Stop

                handle = module.register_forward_pre_hook(hook)
                try:
                    with torch.inference_mode():
                        for h in hidden:
                            try:
                                _layer_forward(model, layer, h, h.shape[0] // seq_len, seq_len)
                            except _Stop:
                                pass
                finally:
                    handle.remove()
                qw = gptq_quantize(module.weight, acc.mean(), config)
            else:
                qw = rtn_quantize(module.weight, config.bits, config.group_size, config.sym)
            module.weight.data.copy_(qw.dequantize(module.weight.dtype))
            results[f"layers.{index}.{name}"] = qw
            bar.update(1)
        if method == "gptq" and index + 1 < len(layers):
            with torch.inference_mode():
                hidden = [_layer_forward(model, layer, h, h.shape[0] // seq_len, seq_len) for h in hidden]
        if on_layer:
            on_layer(index)
    bar.close()
    return results


def install_gptq_layers(model: LlamaForCausalLM, weights: dict[str, QuantizedWeight]) -> None:
    """Swap the model's dense linears for GPTQ layers holding `weights`."""
    for name, qw in weights.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, GptqLinear(qw))


def save_quantized(src: Path, out: Path, model: LlamaForCausalLM, weights: dict[str, QuantizedWeight],
                   config: GptqConfig) -> Path:
    """Write an AutoGPTQ-format folder: the source's dense tensors except the quantized
    linears, which become qweight/qzeros/scales/g_idx per checkpoint module (fused kiln
    modules are split back into q/k/v and gate/up), plus config files and tokenizer."""
    cfg = model.config
    checkpoint_modules: dict[str, QuantizedWeight] = {}
    for name, qw in weights.items():
        prefix, _, sub = name.partition(".")  # "layers" / "0.self_attn.qkv_proj"
        layer, _, module = sub.partition(".")
        if module in FUSED_PARTS:
            for part, piece in zip(FUSED_PARTS[module], qw.split_out(_out_sizes(cfg, module))):
                checkpoint_modules[f"model.layers.{layer}.{part}"] = piece
        else:
            checkpoint_modules[f"model.{name}"] = qw
    tensors: dict[str, torch.Tensor] = {}
    for tname, tensor in iter_safetensors(src, desc="copying dense weights"):
        if tname.removesuffix(".weight") in checkpoint_modules:
            continue
        tensors[tname] = tensor.contiguous()
    for mname, qw in checkpoint_modules.items():
        tensors.update(packed_tensors(mname, qw))

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json") \
                and f.name not in ("config.json", "quantize_config.json") and not f.name.startswith(".kiln"):
            shutil.copy2(f, tmp / f.name)
    raw = json.loads((src / "config.json").read_text())
    qc = quantization_config_dict(config)
    raw["quantization_config"] = qc
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (tmp / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items() if k != "quant_method"}, indent=2) + "\n")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


@dataclass
class QuantizeJob:
    model: str = "default"
    out: Path = Path("quantized")
    method: str = "gptq"
    config: GptqConfig = None  # type: ignore[assignment]
    calibration: Path | None = None
    num_samples: int = 128
    seq_len: int = 256
    seed: int = 0


def run_quantize(job: QuantizeJob, progress: bool = True) -> Path:
    """The whole `kiln quantize`: load, calibrate, quantize layer by layer, write."""
    from ..models.loader import resolve_model
    from ..tokenizer import Tokenizer

    config = job.config or GptqConfig()
    config.validate()
    src = resolve_model(job.model)
    model = LlamaForCausalLM.from_folder(src, torch.float32)
    if any(not hasattr(layer.self_attn.qkv_proj, "weight") for layer in model.layers):
        raise ValueError(f"{src} is already quantized")
    text = job.calibration.read_text(encoding="utf-8") if job.calibration else default_calibration_text()
    samples = calibration_samples(Tokenizer(src).encode(text), job.num_samples, job.seq_len, job.seed)
    weights = quantize_model_weights(model, samples, config, job.method, progress=progress)
    return save_quantized(src, Path(job.out), model, weights, config)
