"""LoRA adapters: the registry (load, validate, evict, reload) and the per-row LoRA term.

An adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors). Its weights are
never merged into the base: every wrapped linear computes y = base(x) + B (A x) * scale for the
rows of the batch that asked for that adapter, so one batch mixes adapters and the base model.
kiln fuses q/k/v and gate/up into one linear each; an adapter's A matrices of the fused parts
are stacked and its B matrices placed block-diagonally (the per-adapter reference path,
LoraContext mode "loop"). The serving paths copy each running adapter once into slot-stacked
buffers, split per part, and compute the term for all adapters of a batch at once: batched
matmuls on the CPU, segmented Triton kernels on CUDA (lora_slots.py, kernels/lora.py).

Residency: adapter weights live in memory up to a byte budget; past it, the least recently
used idle adapters are dropped from memory and re-read from their folder when next asked for.
How many distinct adapters one running batch may hold (`max_loras`) is the scheduler's limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import itertools
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from .lora_slots import LoraPlan, LoraSlots, grouped_lora
from .models.loader import ModelConfig

if TYPE_CHECKING:  # parallel.py imports this module
    from .parallel import ShardPlan

log = logging.getLogger(__name__)

# PEFT module name -> (kiln's fused linear, index of the part inside it)
_TARGETS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter could not be loaded: the message says which file, field or tensor."""


class AdapterNotFoundError(LookupError):
    """No adapter of that name is loaded."""


@dataclass
class LoraSettings:
    max_loras: int = 8  # distinct adapters in one running batch
    max_lora_rank: int = 64
    max_cpu_bytes: int = 1 << 30  # adapter weights kept in memory
    roots: tuple[Path, ...] = ()  # folders runtime loads may read from


@dataclass
class Adapter:
    """A registered adapter. `weights` is None while evicted (re-read on demand)."""

    name: str
    path: Path
    uid: int  # unique per load: keys the prefix cache, so KV of another load is never reused
    rank: int
    alpha: float
    targets: tuple[str, ...]
    nbytes: int = 0
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None  # (A_t, B_t)
    in_use: int = 0  # requests holding it
    unloading: bool = False
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = field(default_factory=time.time)

    @property
    def cache_salt(self) -> int:
        return hash(("lora", self.uid))


_uids = itertools.count(1)


def _return_freed_memory() -> None:
    """Give freed heap pages back to the OS. Adapter weights are tens of MB, allocated and freed
    on whichever thread loads them; glibc keeps such memory in its per-thread arenas, so a
    server that swaps adapters all day would otherwise grow."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _parts(cfg: ModelConfig) -> dict[str, list[tuple[int, int]]]:
    """(output offset, size) of each part of the fused linears; input sizes below."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    inter = cfg.intermediate_size
    return {"qkv_proj": [(0, q), (q, kv), (q + kv, kv)], "o_proj": [(0, cfg.hidden_size)],
            "gate_up_proj": [(0, inter), (inter, inter)], "down_proj": [(0, cfg.hidden_size)]}


def _in_features(cfg: ModelConfig, linear: str) -> int:
    return {"qkv_proj": cfg.hidden_size, "o_proj": cfg.num_heads * cfg.head_dim,
            "gate_up_proj": cfg.hidden_size, "down_proj": cfg.intermediate_size}[linear]


def read_adapter(path: Path, cfg: ModelConfig, max_rank: int, dtype: torch.dtype
                 ) -> tuple[dict, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], int]:
    """Parse and validate a PEFT folder against the base model; return (config, fused weights
    {(layer, linear): (A_t [in, r], B_t [r, out] with the scale folded in)}, largest rank).
    Ranks come from the tensors themselves, so PEFT's rank_pattern needs no parsing."""
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path} does not exist")
    if not config_file.is_file():
        raise AdapterError(f"{config_file} is missing: not a PEFT adapter folder")
    if not weights_file.is_file():
        raise AdapterError(f"{weights_file} is missing (only safetensors adapters are accepted)")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_file}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    if config.get("use_dora"):
        raise AdapterError(f"{config_file}: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{config_file}: bias {config.get('bias')!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise AdapterError(f"{config_file}: modules_to_save {config['modules_to_save']} is not supported")
    try:
        alpha = float(config.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise AdapterError(f"{config_file}: lora_alpha must be a number") from None
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))

    raw: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():
                m = _KEY.search(key)
                if m is None:
                    raise AdapterError(f"{weights_file}: tensor {key!r} is not a LoRA weight of a "
                                       f"q/k/v/o/gate/up/down projection")
                layer, module, which = int(m.group(1)), m.group(2), m.group(3)
                if module not in _TARGETS:
                    raise AdapterError(f"{weights_file}: tensor {key!r} targets {module!r}; supported "
                                       f"target modules are {', '.join(_TARGETS)}")
                raw.setdefault((layer, module), {})[which] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise AdapterError(f"{weights_file} is not a readable safetensors file: {exc}") from None
    if not raw:
        raise AdapterError(f"{weights_file} holds no LoRA weights")

    parts = _parts(cfg)
    by_linear: dict[tuple[int, str], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    max_seen = 0
    for (layer, module), ab in sorted(raw.items()):
        name = f"layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights_file}: {name} has lora_{'A' if 'A' not in ab else 'B'} missing")
        if not 0 <= layer < cfg.num_layers:
            raise AdapterError(f"{weights_file}: {name}: the base model has {cfg.num_layers} layers")
        linear, index = _TARGETS[module]
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        want_in, want_out = _in_features(cfg, linear), parts[linear][index][1]
        if a.ndim != 2 or b.ndim != 2 or tuple(a.shape) != (r, want_in) or tuple(b.shape) != (want_out, r):
            raise AdapterError(
                f"{weights_file}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the "
                f"base model needs ({r}, {want_in}) and ({want_out}, {r}): the adapter was made for "
                f"another base model")
        if r > max_rank:
            raise AdapterError(f"{weights_file}: {name} has rank {r}, above this server's "
                               f"--max-lora-rank {max_rank}")
        max_seen = max(max_seen, r)
        a_alpha = _pattern_value(alpha_pattern, layer, module, alpha)
        scale = a_alpha / math.sqrt(r) if rslora else a_alpha / r
        by_linear.setdefault((layer, linear), []).append((index, a.float(), b.float() * scale))

    fused: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, linear), items in by_linear.items():
        total_out = sum(size for _, size in parts[linear])
        total_r = sum(a.shape[0] for _, a, _ in items)
        a_t = torch.empty(_in_features(cfg, linear), total_r)
        b_t = torch.zeros(total_r, total_out)
        r0 = 0
        for index, a, b in items:
            offset, size = parts[linear][index]
            a_t[:, r0:r0 + a.shape[0]] = a.t()
            b_t[r0:r0 + a.shape[0], offset:offset + size] = b.t()
            r0 += a.shape[0]
        fused[(layer, linear)] = (a_t.to(dtype).contiguous(), b_t.to(dtype).contiguous())
    return config, fused, max_seen


def _pattern_value(pattern: dict, layer: int, module: str, default: float) -> float:
    """PEFT's alpha_pattern: keys are module-name suffixes or regexes."""
    name = f"model.layers.{layer}.{'self_attn' if module in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{module}"
    for key, value in pattern.items():
        if name.endswith(key) or re.fullmatch(key, name) or re.search(rf"(^|\.){key}$", name):
            return float(value)
    return default


class LoraContext:
    """What the wrapped linears read during one forward: which rows use which adapter, and
    (built from that at the first wrapped linear of the step) how the LoRA term is computed.

    mode "loop": each adapter's rows through its own fused weights (the reference path);
    "grouped": adapters with few rows (decodes) batched through slot-stacked weights, adapters
    with many rows (prefills) one by one; "triton": every row through the segmented Triton
    kernels (CUDA). See lora_slots.py. `cpu_kernel`: "grouped" runs its decode rows through
    kiln's C++ kernel (kiln/kernels/cpu/lora.cpp) instead of torch's gather + bmm + scatter.
    """

    def __init__(self, cfg: ModelConfig | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", max_slots: int = 8, mode: str | None = None,
                 cpu_kernel: bool = False) -> None:
        device = torch.device(device)
        self._segments: list[tuple[Adapter, torch.Tensor | slice]] = []
        self._plan: LoraPlan | None = None
        # CUDA without triton installed keeps to torch ops (the grouped path runs on any device).
        kernels = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        self.mode = mode or ("loop" if cfg is None else "triton" if kernels else "grouped")
        self.slots: LoraSlots | None = None
        if cfg is not None:
            parts = {(i, name): p for i in range(cfg.num_layers) for name, p in _parts(cfg).items()}
            self.slots = LoraSlots(parts, {k: _in_features(cfg, k[1]) for k in parts}, max_slots, dtype, device)
        # "grouped": an adapter with more rows than this runs on its own rows, not padded into
        # the [slots, m] groups of the decode rows.
        self.max_group_rows = 8
        self.cpu_kernel = cpu_kernel and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        if self.slots is not None:
            self.slots.keep_larger_rank = self.cpu_kernel

    @property
    def segments(self) -> list[tuple[Adapter, torch.Tensor | slice]]:
        return self._segments

    @segments.setter
    def segments(self, value: list[tuple[Adapter, torch.Tensor | slice]]) -> None:
        self._segments = value
        self._plan = None  # a new step: rebuilt at its first wrapped linear

    def plan(self, x: torch.Tensor) -> LoraPlan:
        if self._plan is None:
            self._plan = self._build(x.shape[0], x.device)
        return self._plan

    def _build(self, num_rows: int, device: torch.device) -> LoraPlan:
        live = [(a, rows) for a, rows in self._segments if a.weights is not None]
        if self.mode == "loop" or self.slots is None or (self.mode == "grouped" and len(live) == 1):
            return LoraPlan(single=live)  # one adapter: as fast on its own weights, and no slot copy
        batched = live[:self.slots.max_slots]  # the scheduler keeps a batch within max_loras
        single = live[len(batched):]
        if not batched:
            return LoraPlan(single=single)
        slots = self.slots.assign([a for a, _ in batched])
        if self.mode == "triton":
            from ..kernels.lora import lora_indices  # triton only where it runs

            idx = torch.full((num_rows,), -1, dtype=torch.int32)
            for (_, rows), s in zip(batched, slots):
                idx[rows] = s
            n = max(slots) + 1
            return LoraPlan(single=single, num_slots=n, indices=lora_indices(idx.to(device, non_blocking=True), n))
        # "grouped": adapters with few rows (decodes) are padded into [slots, m] groups; one
        # with many (a prefill) runs on its own rows, where padding others to it would waste
        # more than batching saves.
        small = [(rows, s) for (_, rows), s in zip(batched, slots) if _num_rows(rows, num_rows) <= self.max_group_rows]
        large = [(s, rows if isinstance(rows, slice) else rows.to(device), a.rank)
                 for (a, rows), s in zip(batched, slots) if _num_rows(rows, num_rows) > self.max_group_rows]
        if not small:
            return LoraPlan(single=single, large=large)
        if self.cpu_kernel:  # each slot's rows as they are: no padding, no gathered copy of x
            sizes = [_num_rows(rows, num_rows) for rows, _ in small]
            rows = torch.cat([torch.arange(num_rows)[r] if isinstance(r, slice) else r.long() for r, _ in small])
            ptr = torch.tensor([0] + list(itertools.accumulate(sizes)), dtype=torch.long)
            return LoraPlan(single=single, large=large, groups=(torch.tensor([s for _, s in small]), ptr, rows))
        n = max(s for _, s in small) + 1
        m = max(_num_rows(rows, num_rows) for rows, _ in small)
        gather = torch.zeros(n, m, dtype=torch.long)
        mask = torch.zeros(n, m, 1, dtype=self.slots.dtype)
        for rows, s in small:
            r = torch.arange(num_rows)[rows] if isinstance(rows, slice) else rows
            gather[s, :r.numel()] = r
            mask[s, :r.numel()] = 1
        full = bool(mask.all())
        return LoraPlan(single=single, num_slots=n, group_rows=m, gather=gather.view(-1).to(device),
                        mask=None if full else mask.to(device), large=large)


def _num_rows(rows: torch.Tensor | slice, total: int) -> int:
    return len(range(*rows.indices(total))) if isinstance(rows, slice) else rows.numel()


class LoraLinear(nn.Module):
    """Any linear (dense, int8, GPTQ) plus the per-row LoRA term of the adapters in the batch."""

    def __init__(self, base: nn.Module, layer: int, linear: str, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.key = (layer, linear)
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.context.segments:
            return y
        plan = self.context.plan(x)
        for adapter, rows in plan.single:
            pair = adapter.weights.get(self.key) if adapter.weights is not None else None
            if pair is None:
                continue
            a_t, b_t = pair
            if isinstance(rows, slice):
                y[rows] += (x[rows] @ a_t) @ b_t
            else:
                rows = rows.to(x.device, non_blocking=True)
                y.index_add_(0, rows, (x.index_select(0, rows) @ a_t) @ b_t)
        slots = self.context.slots
        # No slotted adapter has weights for this linear (adapters on q/k/v/o only, at the MLP): nothing to add.
        if (plan.num_slots or plan.large or plan.groups is not None) and slots.used[self.key]:
            a, bs, parts, R = slots.a[self.key], slots.b[self.key], slots.parts[self.key], slots.rank
            if plan.indices is not None:
                from ..kernels.lora import lora_expand, lora_shrink

                t = lora_shrink(x, a.transpose(1, 2), plan.indices)  # [T, P*R] float32
                for p, (off, size) in enumerate(parts):
                    lora_expand(t[:, p * R:(p + 1) * R], bs[p], plan.indices, y, off)
            else:
                grouped_lora(x, y, plan, a, bs, parts, R, slots.ranks[self.key])
        return y


class LoraManager:
    """The adapter registry. Thread-safe: the server loads and unloads, the engine thread
    acquires and releases adapters for requests."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, settings: LoraSettings, dtype: torch.dtype,
                 shard: ShardPlan | None = None, cpu_kernel: bool = False) -> None:
        self.cfg = cfg  # the full model's: adapter files are checked against it
        self.settings = settings
        self.dtype = dtype
        self.device = next(model.parameters()).device  # adapter weights live beside the model's
        # Tensor parallelism (`shard`: this rank's ShardPlan): adapters' full weights are sliced
        # to this rank's at load, and the slot buffers take this rank's linear shapes.
        self.shard_weights = shard.shard_adapter if shard is not None else None
        local = shard.local_config(cfg) if shard is not None else cfg
        self.context = LoraContext(local, dtype, self.device, settings.max_loras, cpu_kernel=cpu_kernel)
        self._adapters: dict[str, Adapter] = {}
        self._lock = threading.Lock()
        self.num_loads = 0
        self.num_evictions = 0
        self._wrap(model)

    def _wrap(self, model: nn.Module) -> None:
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj = LoraLinear(attn.qkv_proj, i, "qkv_proj", self.context)
            attn.o_proj = LoraLinear(attn.o_proj, i, "o_proj", self.context)
            mlp.gate_up_proj = LoraLinear(mlp.gate_up_proj, i, "gate_up_proj", self.context)
            mlp.down_proj = LoraLinear(mlp.down_proj, i, "down_proj", self.context)

    # -- registry (server side) -----------------------------------------------------

    def check_path(self, path: str | Path) -> Path:
        """Resolve a runtime load's path and confine it to the configured adapter roots."""
        resolved = Path(path).expanduser().resolve()
        roots = [Path(r).expanduser().resolve() for r in self.settings.roots]
        if not roots:
            raise AdapterError("loading adapters at runtime is disabled: start the server with "
                               "--lora-root DIR to allow adapters under DIR")
        if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
            raise AdapterError(f"adapter path {str(path)!r} is outside the allowed adapter roots "
                               f"({', '.join(str(r) for r in roots)})")
        return resolved

    def load(self, name: str, path: str | Path, *, confine: bool = True) -> Adapter:
        """Validate and register an adapter (reads the files; call off the event loop)."""
        if not name or not re.fullmatch(r"[A-Za-z0-9._:/@-]{1,128}", name):
            raise AdapterError(f"adapter name {name!r} must be 1-128 letters, digits or . _ : / @ -")
        resolved = self.check_path(path) if confine else Path(path).expanduser().resolve()
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        config, weights, rank = self._read(resolved)
        nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in weights.values())
        targets = tuple(sorted({k[1] for k in weights}))
        adapter = Adapter(name, resolved, next(_uids), rank,
                          float(config.get("lora_alpha", 8)), targets, nbytes, weights)
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
            self._adapters[name] = adapter
            self.num_loads += 1
            self._evict_over_budget(keep=adapter)
        log.info("adapter loaded: name=%s path=%s rank=%d targets=%s bytes=%d",
                 name, resolved, adapter.rank, ",".join(targets), nbytes)
        return adapter

    def _read(self, path: Path) -> tuple[dict, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], int]:
        config, weights, rank = read_adapter(path, self.cfg, self.settings.max_lora_rank, self.dtype)
        if self.shard_weights is not None:
            weights = self.shard_weights(weights)
        if self.device.type != "cpu":
            weights = {key: (a.to(self.device), b.to(self.device)) for key, (a, b) in weights.items()}
        return config, weights, rank

    def unload(self, name: str) -> None:
        """Forget an adapter. Requests using it finish first; new ones are refused at once."""
        with self._lock:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise AdapterNotFoundError(f"no adapter named {name!r} is loaded")
            # Requests holding it keep their reference until they finish; the name is free
            # at once, so a new version can be loaded under it (with a new prefix-cache salt).
            adapter.unloading = True
            idle = adapter.in_use == 0
        log.info("adapter unloaded: name=%s (requests still using it: %d)", name, adapter.in_use)
        if idle:
            del adapter
            _return_freed_memory()

    def list(self) -> list[Adapter]:
        with self._lock:
            return list(self._adapters.values())

    def get(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._adapters.get(name)
        if adapter is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded")
        return adapter

    # -- requests (engine thread) ---------------------------------------------------

    def acquire(self, name: str) -> Adapter:
        """Hold an adapter for a request, re-reading its weights if they were evicted."""
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise AdapterNotFoundError(f"no adapter named {name!r} is loaded")
            adapter.in_use += 1
            adapter.last_used = time.monotonic()
            evicted = adapter.weights is None
        if evicted:
            try:
                _, weights, _ = self._read(adapter.path)
            except AdapterError:
                self.release(adapter)
                raise
            with self._lock:
                adapter.weights = weights
                self.num_loads += 1
                self._evict_over_budget(keep=adapter)
        return adapter

    def release(self, adapter: Adapter) -> None:
        with self._lock:
            adapter.in_use -= 1
            adapter.last_used = time.monotonic()
            last_user_of_unloaded = adapter.unloading and adapter.in_use == 0
        if last_user_of_unloaded:
            adapter.weights = None  # the caller's reference may outlive this call
            _return_freed_memory()

    def _evict_over_budget(self, keep: Adapter) -> None:
        """Drop the weights of least recently used idle adapters until under the budget."""
        resident = [a for a in self._adapters.values() if a.weights is not None]
        total = sum(a.nbytes for a in resident)
        for victim in sorted(resident, key=lambda a: a.last_used):
            if total <= self.settings.max_cpu_bytes:
                break
            if victim is keep or victim.in_use:
                continue
            victim.weights = None
            total -= victim.nbytes
            self.num_evictions += 1
            log.info("adapter evicted from memory: name=%s (re-read on next use)", victim.name)
            _return_freed_memory()

    def stats(self) -> dict[str, int]:
        with self._lock:
            resident = [a for a in self._adapters.values() if a.weights is not None]
            return {"num_adapters": len(self._adapters), "num_adapters_resident": len(resident),
                    "adapter_resident_bytes": sum(a.nbytes for a in resident),
                    "adapter_loads": self.num_loads, "adapter_evictions": self.num_evictions}
