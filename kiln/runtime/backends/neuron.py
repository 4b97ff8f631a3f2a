"""Neuron execution: a static-shape runtime of compiled graphs.

Neuron compiles fixed-shape graphs, so everything variable is padded into a few shapes
fixed at compile time (the `NeuronPlan`):

- context-encoding buckets: a new prompt is padded up to the smallest bucket that holds it
  and encoded whole into one free batch row (one graph per bucket);
- token generation: one graph for all `batch_size` rows, one token each;
- `max_length`: KV slots per row (prompt plus generated tokens).

The KV cache is one fixed buffer, `[layers, k|v, rows, max_length, kv_heads, head_dim]`,
updated in place by the graphs. Which sequence owns which row is the model runner's
business (runtime/neuron_runner.py); this module holds the buffer and runs the graphs.

Graphs are compiled with `torch_neuronx.trace` where torch-neuronx imports, and with
`torch.jit.trace` elsewhere (how it runs and is tested without Inferentia); see
neuron_graphs.py for compilation and the on-disk graph cache.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import EngineConfig
from ..models.llama import LlamaForCausalLM
from ..models.loader import ModelConfig, cache_dir
from ..models.static_llama import StaticDims, flat_weights
from .neuron_graphs import GraphSet, neuron_available

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 4096  # cap of the derived max length: the KV buffer is rows x this
SMALLEST_BUCKET = 128
DEFAULT_COMPILER_ARGS = ("--model-type=transformer",)


@dataclass(frozen=True)
class NeuronPlan:
    """The static shapes and compile settings of one Neuron deployment."""

    context_buckets: tuple[int, ...]  # ascending prompt lengths
    batch_size: int  # rows of the token-generation graph and of the KV buffer
    max_length: int  # prompt plus generated tokens
    compiler_args: tuple[str, ...]
    tp_degree: int
    visible_cores: str | None
    cache_dir: Path

    @property
    def max_prompt(self) -> int:
        """Longest prompt: the largest bucket, with at least one slot left to generate."""
        return min(self.context_buckets[-1], self.max_length - 1)

    def bucket_for(self, num_tokens: int) -> int:
        for bucket in self.context_buckets:
            if bucket >= num_tokens:
                return bucket
        raise ValueError(self.too_long(num_tokens))

    def too_long(self, num_tokens: int) -> str:
        return (f"the prompt has {num_tokens} tokens; the neuron backend's largest context-encoding "
                f"bucket is {self.context_buckets[-1]} tokens (--neuron-context-buckets)")

    @classmethod
    def from_config(cls, config: EngineConfig, mc: ModelConfig) -> "NeuronPlan":
        """Derive unset values and refuse, with a clear message, shapes the model cannot take."""
        context = mc.max_position_embeddings
        max_length = config.neuron_max_length or config.max_model_len or min(context, DEFAULT_MAX_LENGTH)
        if max_length > context:
            raise ValueError(f"the neuron max length is {max_length} tokens, but the model's context is "
                             f"only {context}: lower --neuron-max-length / --max-model-len (MAX_TOTAL_TOKENS)")
        if config.max_model_len is not None and config.neuron_max_length is not None \
                and config.max_model_len != config.neuron_max_length:
            raise ValueError(f"--max-model-len {config.max_model_len} and --neuron-max-length "
                             f"{config.neuron_max_length} disagree: with the neuron backend they are one limit")
        buckets = config.context_buckets() or _default_buckets(config.max_input_tokens or max_length - 1, max_length)
        if buckets[-1] > max_length:
            raise ValueError(f"context bucket {buckets[-1]} exceeds the neuron max length of {max_length} "
                             f"tokens (the model's context is {context}): lower --neuron-context-buckets "
                             f"or raise --neuron-max-length")
        if config.max_input_tokens is not None and config.max_input_tokens > buckets[-1]:
            raise ValueError(f"--max-input-tokens (MAX_INPUT_TOKENS) is {config.max_input_tokens}, but the "
                             f"largest context bucket is {buckets[-1]}: add a larger bucket")
        tp = config.tensor_parallel_size  # NeuronCores per model on the neuron device
        if mc.num_heads % tp or mc.num_kv_heads % tp:
            raise ValueError(f"tensor-parallel degree {tp} does not divide the model's {mc.num_heads} query "
                             f"heads and {mc.num_kv_heads} KV heads")
        args = tuple(shlex.split(config.neuron_compiler_args)) if config.neuron_compiler_args is not None \
            else DEFAULT_COMPILER_ARGS
        folder = Path(config.neuron_cache_dir) if config.neuron_cache_dir else cache_dir() / "neuron"
        return cls(buckets, config.neuron_batch_size or config.max_num_seqs, max_length, args, tp,
                   config.neuron_visible_cores, folder)


def _default_buckets(longest_prompt: int, max_length: int) -> tuple[int, ...]:
    """Powers of two from 128 (or smaller for tiny limits) up to the first that holds the
    longest prompt, the last one clipped to the max length."""
    buckets = []
    size = SMALLEST_BUCKET
    while size < longest_prompt:
        buckets.append(size)
        size *= 2
    buckets.append(min(size, max_length))
    return tuple(sorted(set(b for b in buckets if b <= max_length)))


class NeuronBackend:
    """The KV buffer and the compiled graphs of one plan."""

    name = "neuron"

    def __init__(self, model: LlamaForCausalLM, plan: NeuronPlan, model_path: Path, dtype: torch.dtype,
                 *, progress: bool = False) -> None:
        if plan.visible_cores:
            # Read by the Neuron runtime when it starts, which is at the first graph load.
            os.environ["NEURON_RT_VISIBLE_CORES"] = plan.visible_cores
        self.plan = plan
        self.dims = StaticDims.of(model, plan.batch_size, plan.max_length)
        self.compiler = "neuron" if neuron_available() else "jit"
        if self.compiler == "neuron" and plan.tp_degree > 1:
            raise ValueError(f"tensor-parallel degree {plan.tp_degree}: sharded Neuron graphs need "
                             "neuronx-distributed, which this backend does not use yet; run one server "
                             "per NeuronCore (NEURON_RT_VISIBLE_CORES) with degree 1")
        self.weights = flat_weights(model)
        self.kv = torch.zeros(self.dims.kv_shape(), dtype=dtype)
        t0 = time.perf_counter()
        self.graphs = GraphSet.load_or_compile(
            self.dims, plan.context_buckets, self.weights, model_path, dtype, plan.compiler_args,
            plan.tp_degree, plan.cache_dir, self.compiler, progress=progress,
        )
        log.info("neuron backend (%s graphs): context buckets %s, %d rows, max length %d, tp degree %d; "
                 "%d graphs compiled, %d loaded from %s in %.1fs", self.compiler, list(plan.context_buckets),
                 plan.batch_size, plan.max_length, plan.tp_degree, self.graphs.num_traced,
                 self.graphs.num_loaded, self.graphs.folder, time.perf_counter() - t0)

    def encode(self, bucket: int, input_ids: torch.Tensor, row: int, last: int) -> torch.Tensor:
        """Context-encode one padded prompt into `row`; logits [1, vocab] of token `last`."""
        logits, self.kv = self.graphs.context[bucket](
            input_ids, torch.tensor([row]), torch.tensor([last]), self.kv)
        return logits

    def generate(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for every row; logits [rows, vocab]."""
        logits, self.kv = self.graphs.token_gen(input_ids, positions, self.kv)
        return logits


def compile_graphs(config: EngineConfig) -> GraphSet:
    """Compile (or find in the cache) every graph of the plan `config` describes: what
    `kiln compile` runs ahead of `kiln serve --device neuron`."""
    from ..models.loader import resolve_model

    config.validate()
    path = resolve_model(config.model)
    plan = NeuronPlan.from_config(config, ModelConfig.from_folder(path))
    model = LlamaForCausalLM.from_folder(path, config.torch_dtype, max_positions=plan.max_length)
    model.eval()
    return NeuronBackend(model, plan, path, config.torch_dtype, progress=True).graphs
