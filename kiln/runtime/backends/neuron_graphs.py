"""Compiling the Neuron backend's graphs, and the on-disk graph cache.

Every graph of a plan (one context-encoding graph per bucket, one token-generation graph) is
compiled once and saved under `<cache dir>/<key>/`, where the key hashes everything the
graphs depend on: the model folder's identity (config and weight files), dtype, shapes,
compiler, compiler flags, tensor-parallel degree, and the kiln and torch versions. A later
start with the same key loads the saved graphs instead of tracing again.

- On Inferentia (torch-neuronx imports and a Neuron device exists) graphs are compiled with
  `torch_neuronx.trace`; the weights are inlined into the compiled graph. The KV buffer is
  an argument and comes back as an output: `torch_neuronx.trace` aliases input to output
  only for a module's own state tensors, which one graph cannot share with another, so
  every graph of a plan reading one device-resident buffer needs neuronx-distributed's
  model builder (not used yet: on Inferentia the buffer crosses the host per call).
- Elsewhere they are traced with `torch.jit.trace`; the weights stay graph inputs (the
  model's own tensors are passed at every call), so a saved graph is a few hundred kB.

Saved graphs are kiln's own artifacts, written and read only by this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ... import __version__
from ..models.static_llama import ContextEncoding, StaticDims, TokenGeneration

log = logging.getLogger(__name__)

# Graphs traced by this process (not loaded from the cache): tests check a warm start adds none.
TRACE_COUNT = 0


def neuron_available() -> bool:
    """torch-neuronx imports and this machine has a Neuron device."""
    return importlib.util.find_spec("torch_neuronx") is not None and any(Path("/dev").glob("neuron*"))


def model_identity(folder: Path) -> str:
    """What identifies a model folder's weights cheaply: its config and its weight files'
    names, sizes and modification times (weights are not hashed: they can be many GB)."""
    digest = hashlib.sha256()
    folder = folder.resolve()
    digest.update(str(folder).encode())
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def cache_key(dims: StaticDims, buckets: tuple[int, ...], model_path: Path, dtype: torch.dtype,
              compiler_args: tuple[str, ...], tp_degree: int, compiler: str) -> tuple[str, dict]:
    meta = {
        "model": model_identity(model_path),
        "dtype": str(dtype),
        "dims": dims.__dict__,
        "context_buckets": list(buckets),
        "compiler": compiler,
        "compiler_args": list(compiler_args) if compiler == "neuron" else [],
        "tp_degree": tp_degree,
        "kiln": __version__,
        "torch": torch.__version__,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    return key, meta


class _Inlined(nn.Module):
    """A static forward with the weights held as parameters, for compilers that inline them."""

    def __init__(self, graph: nn.Module, weights: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.graph = graph
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in weights)

    def forward(self, *inputs: torch.Tensor):
        return self.graph(*inputs, *self.weights)


@dataclass
class Graph:
    """A compiled graph and the extra arguments it takes at every call (the weights, for
    jit-traced graphs; nothing for Neuron graphs, which hold their own)."""

    module: torch.jit.ScriptModule
    extra: tuple[torch.Tensor, ...] = ()

    def __call__(self, *inputs: torch.Tensor):
        return self.module(*inputs, *self.extra)


@dataclass
class GraphSet:
    context: dict[int, Graph]  # bucket -> context-encoding graph
    token_gen: Graph
    folder: Path
    num_traced: int = 0
    num_loaded: int = 0
    names: list[str] = field(default_factory=list)

    @classmethod
    def load_or_compile(cls, dims: StaticDims, buckets: tuple[int, ...], weights: tuple[torch.Tensor, ...],
                        model_path: Path, dtype: torch.dtype, compiler_args: tuple[str, ...], tp_degree: int,
                        cache_root: Path, compiler: str, *, progress: bool = False) -> "GraphSet":
        key, meta = cache_key(dims, buckets, model_path, dtype, compiler_args, tp_degree, compiler)
        folder = cache_root / key
        extra = weights if compiler == "jit" else ()
        jobs: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]] = [
            (f"context_{b}", ContextEncoding(dims, b), _context_example(dims, b, dtype)) for b in buckets
        ]
        jobs.append(("token_gen", TokenGeneration(dims), _token_example(dims, dtype)))
        meta_ok = (folder / "meta.json").is_file() and json.loads((folder / "meta.json").read_text()) == meta
        loaded: dict[str, torch.jit.ScriptModule] = {}
        traced = 0
        if progress:
            from tqdm import tqdm

            bar = tqdm(jobs, desc="compiling neuron graphs", unit="graph")
        else:
            bar = jobs
        for name, module, example in bar:
            path = folder / f"{name}.pt"
            if meta_ok and path.is_file():
                try:
                    loaded[name] = _load(path, compiler)
                    continue
                except Exception as exc:  # a truncated file from an interrupted write: recompile
                    log.warning("neuron graph cache: cannot load %s (%s); compiling it again", path, exc)
            graph = _compile(module, example, weights, compiler, compiler_args)
            traced += 1
            _save(graph, folder, name, meta)
            loaded[name] = graph
        context = {b: Graph(loaded[f"context_{b}"], extra) for b in buckets}
        return cls(context, Graph(loaded["token_gen"], extra), folder, traced, len(jobs) - traced,
                   [name for name, _, _ in jobs])


@contextmanager
def _quiet_jit():
    """torch marks torch.jit deprecated; it is still what torch_neuronx graphs are saved as."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        yield


def _context_example(dims: StaticDims, bucket: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(bucket, dtype=torch.long), torch.zeros(1, dtype=torch.long),
            torch.tensor([bucket - 1]), torch.zeros(dims.kv_shape(), dtype=dtype))


def _token_example(dims: StaticDims, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(dims.rows, dtype=torch.long), torch.zeros(dims.rows, dtype=torch.long),
            torch.zeros(dims.kv_shape(), dtype=dtype))


def _compile(module: nn.Module, example: tuple[torch.Tensor, ...], weights: tuple[torch.Tensor, ...],
             compiler: str, compiler_args: tuple[str, ...]) -> torch.jit.ScriptModule:
    global TRACE_COUNT
    TRACE_COUNT += 1
    with torch.no_grad(), _quiet_jit():
        if compiler == "neuron":  # pragma: no cover - needs Inferentia
            import torch_neuronx

            # The KV buffer is the last input and comes back as output 1. torch_neuronx aliases
            # only a module's own state tensors, and every graph here would get its own copy,
            # so the shared buffer travels as an argument (see the module docstring).
            return torch_neuronx.trace(_Inlined(module, weights), example, compiler_args=list(compiler_args))
        # check_trace would run the graph again and compare outputs; the graph writes the KV
        # buffer in place, so the second run differs by construction.
        return torch.jit.trace(module, (*example, *weights), check_trace=False)


def _save(graph: torch.jit.ScriptModule, folder: Path, name: str, meta: dict) -> None:
    """Write atomically (a temporary file of this process, then rename), meta.json first, so
    that servers starting side by side on one cache never read a half-written graph."""
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    if not meta_path.is_file() or json.loads(meta_path.read_text()) != meta:
        tmp = folder / f"meta.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        tmp.replace(meta_path)
    tmp = folder / f"{name}.pt.{os.getpid()}.tmp"
    with _quiet_jit():
        torch.jit.save(graph, str(tmp))
    tmp.replace(folder / f"{name}.pt")


def _load(path: Path, compiler: str) -> torch.jit.ScriptModule:
    if compiler == "neuron":  # pragma: no cover - needs Inferentia
        import torch_neuronx  # noqa: F401 - registers the Neuron ops torch.jit.load needs
    with _quiet_jit():
        return torch.jit.load(str(path))


def clear_cache(cache_root: Path) -> None:
    shutil.rmtree(cache_root, ignore_errors=True)
