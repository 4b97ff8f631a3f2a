"""GPTQ checkpoints in the AutoGPTQ / GPTQModel format: read, validate, fuse, write.

A folder is a GPTQ checkpoint when config.json has `quantization_config.quant_method ==
"gptq"` (or a quantize_config.json sits beside it, as older AutoGPTQ wrote). Every linear
module that has a `<module>.qweight` tensor is quantized and must also have `qzeros`,
`scales` and `g_idx` of the shapes its bits and group size imply; anything else is an error
that names the tensor or field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from .gptq import ConcatLinear, GptqConfig, GptqLinear
from .packing import pack_factor, pack_rows, pack_zeros, unpack_rows, unpack_zeros
from .qweight import QuantizedWeight, check_bits, num_groups

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")
# kiln module -> checkpoint modules fused into it, in output order.
FUSED_PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
UNFUSED = ("self_attn.o_proj", "mlp.down_proj")


class QuantizedCheckpointError(ValueError):
    pass


def read_quantization_config(folder: Path) -> GptqConfig | None:
    """The GPTQ settings of a folder, None for a dense one; errors name the bad field."""
    raw = json.loads((folder / "config.json").read_text())
    qc = raw.get("quantization_config")
    source = "config.json quantization_config"
    if qc is None and (folder / "quantize_config.json").is_file():
        qc = json.loads((folder / "quantize_config.json").read_text())
        qc.setdefault("quant_method", "gptq")
        source = "quantize_config.json"
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise QuantizedCheckpointError(f"{source} must be an object")
    method = qc.get("quant_method")
    if method != "gptq":
        raise QuantizedCheckpointError(
            f"{source}: quant_method {method!r} is not supported (kiln loads 'gptq' checkpoints)")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise QuantizedCheckpointError(
            f"{source}: checkpoint_format {fmt!r} is not supported (kiln loads 'gptq', the v1 layout)")
    for key in ("bits", "group_size"):
        if not isinstance(qc.get(key), int) or isinstance(qc.get(key), bool):
            raise QuantizedCheckpointError(f"{source}: '{key}' must be an integer, got {qc.get(key)!r}")
    try:
        check_bits(qc["bits"])
    except ValueError as exc:
        raise QuantizedCheckpointError(f"{source}: {exc}") from None
    cfg = GptqConfig(bits=qc["bits"], group_size=qc["group_size"], desc_act=bool(qc.get("desc_act", False)),
                     sym=bool(qc.get("sym", True)), damp_percent=float(qc.get("damp_percent", 0.01)))
    if cfg.group_size != -1 and cfg.group_size < 1:
        raise QuantizedCheckpointError(f"{source}: 'group_size' must be -1 or >= 1, got {cfg.group_size}")
    return cfg


@dataclass
class GptqLoader:
    """Swaps a model's quantized linears for GPTQ layers while its weights load."""

    config: GptqConfig
    modules: set[str]  # checkpoint module names (without "model.") that are quantized
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # Tensor parallelism (a runtime.parallel.ShardPlan): the tensors are this rank's slices, and
    # o/down keep every group's scales and zeros (their g_idx slice names groups of the whole row).
    shard: object = None

    @classmethod
    def for_folder(cls, folder: Path, config: GptqConfig) -> "GptqLoader":
        names = []
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                names.extend(h.keys())
        modules = {n.removeprefix("model.").rsplit(".", 1)[0] for n in names if n.endswith(".qweight")}
        if not modules:
            raise QuantizedCheckpointError(f"{folder} declares GPTQ quantization but has no '*.qweight' tensors")
        return cls(config, modules)

    def prepare(self, model: torch.nn.Module) -> None:
        """Take the dense linears that the checkpoint quantizes out of the model (before its
        dense weights load), so that only their GPTQ tensors are expected."""
        for i, layer in enumerate(model.layers):
            for fused, parts in FUSED_PARTS.items():
                if any(f"layers.{i}.{p}" in self.modules for p in parts):
                    _set_module(layer, fused, _Pending())
            for name in UNFUSED:
                if f"layers.{i}.{name}" in self.modules:
                    _set_module(layer, name, _Pending())

    def filter(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Keep the quantized modules' tensors; pass every other tensor on."""
        for name, tensor in tensors:
            short = name.removeprefix("model.")
            module, _, suffix = short.rpartition(".")
            if module in self.modules and suffix in QUANT_SUFFIXES:
                self.tensors.setdefault(module, {})[suffix] = tensor
            else:
                yield name, tensor

    def install(self, model: torch.nn.Module) -> None:
        """Build the GPTQ layers and put them in place of the model's dense linears."""
        cfg = model.config
        seen: set[str] = set()
        for i, layer in enumerate(model.layers):
            prefix = f"layers.{i}."
            for fused, parts in FUSED_PARTS.items():
                names = [prefix + p for p in parts]
                quantized = [n in self.modules for n in names]
                if not any(quantized):
                    continue
                if not all(quantized):
                    missing = [n for n, q in zip(names, quantized) if not q]
                    raise QuantizedCheckpointError(f"model.{missing[0]}.qweight is missing (its siblings are quantized)")
                in_features = cfg.hidden_size
                outs = _out_sizes(cfg, fused)
                qws = [self._read(n, in_features, o) for n, o in zip(names, outs)]
                seen.update(names)
                _set_module(layer, fused, _fuse(qws))
            for name in UNFUSED:
                full = prefix + name
                if full not in self.modules:
                    continue
                in_features = cfg.num_heads * cfg.head_dim if "o_proj" in name else cfg.intermediate_size
                groups = None if self.shard is None else num_groups(in_features * self.shard.world,
                                                                    self.config.group_size)
                qw = self._read(full, in_features, cfg.hidden_size, groups)
                seen.add(full)
                _set_module(layer, name, GptqLinear(qw))
        unknown = self.modules - seen
        if unknown:
            raise QuantizedCheckpointError(f"quantized module {sorted(unknown)[0]!r} is not a linear layer kiln knows")
        self.tensors.clear()

    def _read(self, module: str, in_features: int, out_features: int, groups: int | None = None) -> QuantizedWeight:
        """Validate and unpack one module's tensors (`groups`: of the whole row, when these
        are a tensor-parallel slice of its input columns)."""
        bits, gs = self.config.bits, self.config.group_size
        t = self.tensors.get(module, {})
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            if suffix not in t:
                raise QuantizedCheckpointError(f"model.{module}.{suffix} is missing from the checkpoint")
        pf = pack_factor(bits)
        groups = groups or num_groups(in_features, gs)
        expected = {
            "qweight": (in_features // pf, out_features),
            "qzeros": (groups, out_features // pf),
            "scales": (groups, out_features),
            "g_idx": (in_features,),
        }
        if in_features % pf or out_features % pf:
            raise QuantizedCheckpointError(
                f"model.{module}: {in_features}x{out_features} cannot hold {bits}-bit values packed {pf} per int32")
        for suffix, shape in expected.items():
            if tuple(t[suffix].shape) != shape:
                raise QuantizedCheckpointError(
                    f"model.{module}.{suffix} has shape {tuple(t[suffix].shape)}, expected {shape} for "
                    f"bits={bits}, group_size={gs} and a {in_features}->{out_features} layer")
        for suffix in ("qweight", "qzeros", "g_idx"):
            if t[suffix].dtype not in (torch.int32, torch.int64) and not (suffix != "g_idx" and t[suffix].dtype == torch.uint32):
                raise QuantizedCheckpointError(f"model.{module}.{suffix} has dtype {t[suffix].dtype}, expected int32")
        if not t["scales"].is_floating_point():
            raise QuantizedCheckpointError(f"model.{module}.scales has dtype {t['scales'].dtype}, expected float16")
        g_idx = t["g_idx"].to(torch.int32)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise QuantizedCheckpointError(
                f"model.{module}.g_idx has values outside [0, {groups}) for group_size={gs}")
        if "bias" in t and t["bias"].abs().max() > 0:
            raise QuantizedCheckpointError(f"model.{module}.bias: linear biases are not supported")
        scales = t["scales"].float()
        if not torch.isfinite(scales).all():
            raise QuantizedCheckpointError(f"model.{module}.scales has non-finite values")
        qweight = t["qweight"].to(torch.int32)
        qint = unpack_rows(qweight, bits).t().to(torch.uint8).contiguous()
        zeros = unpack_zeros(t["qzeros"].to(torch.int32), bits)
        return QuantizedWeight(qint, scales, zeros, g_idx, bits, gs, self.config.sym)


def gptq_loader(folder: Path) -> GptqLoader | None:
    """A loader for a GPTQ folder, None for a dense one."""
    config = read_quantization_config(folder)
    return None if config is None else GptqLoader.for_folder(folder, config)


class _Pending(torch.nn.Module):
    """Stands where a GPTQ layer goes until its tensors are read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("GPTQ layer was not installed")


def _out_sizes(cfg, fused: str) -> list[int]:
    if fused == "self_attn.qkv_proj":
        kv = cfg.num_kv_heads * cfg.head_dim
        return [cfg.num_heads * cfg.head_dim, kv, kv]
    return [cfg.intermediate_size, cfg.intermediate_size]


def _fuse(parts: list[QuantizedWeight]) -> torch.nn.Module:
    """One GPTQ layer when the parts share g_idx (always true for act-order weights quantized
    from one Hessian, as q/k/v are); side-by-side layers otherwise."""
    if all(torch.equal(p.g_idx, parts[0].g_idx) for p in parts[1:]):
        return GptqLinear(QuantizedWeight.cat_out(parts))
    return ConcatLinear([GptqLinear(p) for p in parts])


def _set_module(root: torch.nn.Module, dotted: str, module: torch.nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def packed_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One module's tensors as AutoGPTQ writes them."""
    return {
        f"{prefix}.qweight": pack_rows(qw.qint.t().to(torch.int32), qw.bits),
        f"{prefix}.qzeros": pack_zeros(qw.zeros, qw.bits),
        f"{prefix}.scales": qw.scales.half().contiguous(),
        f"{prefix}.g_idx": qw.g_idx.to(torch.int32).clone(),
    }


def quantization_config_dict(cfg: GptqConfig) -> dict:
    return {
        "quant_method": "gptq",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.desc_act,
        "sym": cfg.sym,
        "damp_percent": cfg.damp_percent,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq",
        "meta": {"quantizer": ["kiln:0.1.0"]},
    }
