"""Turns a scheduled batch into flat tensors, runs the model, returns logits.

The scheduler said *what* runs; this module decides *how*: the flat layout (decodes first,
then prefills), slot mappings, and which rows need logits. The layout is built from plain
per-sequence entries (`build_inputs`), so a tensor-parallel worker that mirrors the block
tables builds exactly the same tensors as rank 0 (see runtime/parallel.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .backends.base import AttentionMetadata, PrefillSlice
from .models.llama import LlamaForCausalLM
from .lora import LoraContext
from .scheduler import ScheduledBatch, Sequence


@dataclass
class StepResult:
    logits: torch.Tensor | None  # [len(sampled), vocab] float32 (the CPU decode loop: the model's dtype)
    sampled: list[Sequence]  # sequences whose last token was computed: they get a new token
    forward_seconds: float
    tokens: torch.Tensor | None = None  # [len(sampled)] int64 instead of logits: greedy picks


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor


# A decode: (block ids, number of computed tokens, the token to compute).
# A prefill: (block ids, computed tokens, the tokens to compute, whether it reaches the end).
Decode = tuple[list[int], int, int]
Prefill = tuple[list[int], int, list[int], bool]


def build_inputs(block_size: int, decodes: list[Decode], prefills: list[Prefill]) -> StepInputs:
    bs = block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    for block_ids, pos, token in decodes:
        ids.append(token)
        positions.append(pos)
        slots.append(block_ids[pos // bs] * bs + pos % bs)
    max_blocks = max((len(d[0]) for d in decodes), default=0)
    decode_tables = torch.tensor(
        [d[0] + [0] * (max_blocks - len(d[0])) for d in decodes], dtype=torch.long,
    ).view(len(decodes), max_blocks)
    decode_lens = torch.tensor([d[1] + 1 for d in decodes], dtype=torch.long)

    slices: list[PrefillSlice] = []
    ids_t = [torch.tensor(ids, dtype=torch.long)]
    pos_t = [torch.tensor(positions, dtype=torch.long)]
    slot_t = [torch.tensor(slots, dtype=torch.long)]
    start = len(decodes)
    # Logits only for rows that produce a token: every decode, and prefills that reach
    # the end of their sequence (an intermediate chunk samples nothing).
    rows = list(range(len(decodes)))
    for block_ids_list, c, tokens, final in prefills:
        n = len(tokens)
        block_ids = torch.tensor(block_ids_list, dtype=torch.long)
        pos = torch.arange(c, c + n)
        ids_t.append(torch.tensor(tokens, dtype=torch.long))
        pos_t.append(pos)
        slot_t.append(block_ids[pos // bs] * bs + pos % bs)
        slices.append(PrefillSlice(start, n, c + n, block_ids))
        if final:
            rows.append(start + n - 1)
        start += n

    meta = AttentionMetadata(
        slot_mapping=torch.cat(slot_t),
        num_decode=len(decodes),
        decode_context_lens=decode_lens,
        decode_block_tables=decode_tables,
        prefills=slices,
    )
    return StepInputs(torch.cat(ids_t), torch.cat(pos_t), meta, torch.tensor(rows, dtype=torch.long))


def run_model(model: LlamaForCausalLM, backend, inputs: StepInputs, lora_context: LoraContext | None,
              segments: list, use_graphs: bool = True, greedy: bool = False) -> torch.Tensor:
    """One forward over the flat batch; the LoRA segments are set for its duration. With
    `greedy` (every sampled row is plain greedy) the result may be int64 token ids instead of
    logits (LlamaForCausalLM.forward)."""
    if lora_context is not None:
        lora_context.segments = segments
    try:
        state = backend.prepare(inputs.meta)
        args = (inputs.input_ids, inputs.positions)
        # A backend with its own forward: CUDA moves tensors and replays graphs, the CPU runs
        # pure-decode steps in one C++ loop; both fall back to the model's modules.
        device_forward = getattr(backend, "forward", None)
        if device_forward is not None:
            # A captured CUDA graph (and the CPU's decode loop) holds no LoRA term: batches
            # with adapters run the modules (their LoRA term goes through the LoRA kernels).
            return device_forward(model, *args, state, inputs.logits_indices,
                                  use_graphs=use_graphs and not segments, greedy=greedy)
        return model(*args, backend, state, inputs.logits_indices, greedy)
    finally:
        if lora_context is not None:
            lora_context.segments = []


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend, block_size: int,
                 lora_context: LoraContext | None = None) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.lora_context = lora_context

    def release(self, seq: Sequence) -> None:
        """A sequence left the engine. Nothing to do here: its blocks are the scheduler's
        (the tensor-parallel runner drops the workers' copy of its block table)."""

    def execute(self, batch: ScheduledBatch, greedy: bool = False) -> StepResult:
        """Run the batch. `greedy`: every sequence in it samples plain greedy, so the model may
        return the tokens instead of logits (StepResult.tokens)."""
        decodes: list[Sequence] = []
        prefills: list[tuple[Sequence, int]] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if n == 1:
                decodes.append(seq)
            else:
                prefills.append((seq, n))
        # Longest context first: the backend pads decodes in groups of similar length.
        decodes.sort(key=lambda s: s.num_computed_tokens, reverse=True)
        d_in = [(s.block_table.block_ids, s.num_computed_tokens, s.token_ids[s.num_computed_tokens])
                for s in decodes]
        p_in = [(s.block_table.block_ids, s.num_computed_tokens,
                 s.token_ids[s.num_computed_tokens:s.num_computed_tokens + n],
                 s.num_computed_tokens + n == s.num_tokens) for s, n in prefills]
        inputs = build_inputs(self.block_size, d_in, p_in)
        sampled = list(decodes) + [s for (s, _), p in zip(prefills, p_in) if p[3]]
        segments = []
        if self.lora_context is not None:
            segments = lora_segments([s.adapter for s in decodes], [s.adapter for s, _ in prefills],
                                     inputs.meta.prefills)
        t0 = time.perf_counter()
        self.before_forward(decodes, prefills, d_in, p_in)
        out = run_model(self.model, self.backend, inputs, self.lora_context, segments, greedy=greedy)
        if out.dtype == torch.long:
            return StepResult(None, sampled, time.perf_counter() - t0, tokens=out)
        return StepResult(out, sampled, time.perf_counter() - t0)

    def before_forward(self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]],
                       d_in: list[Decode], p_in: list[Prefill]) -> None:
        """Called with the step's layout just before the forward (tensor parallelism sends it
        to the other ranks here)."""


def lora_segments(decode_adapters: list, prefill_adapters: list, slices: list[PrefillSlice]) -> list:
    """The flat-batch rows of each adapter in the batch: a slice when they are contiguous
    (one adapter, or a prefill), else an index tensor."""
    rows: dict[int, tuple[object, list[int]]] = {}
    for i, adapter in enumerate(decode_adapters):
        if adapter is not None:
            rows.setdefault(id(adapter), (adapter, []))[1].append(i)
    for adapter, sl in zip(prefill_adapters, slices):
        if adapter is not None:
            rows.setdefault(id(adapter), (adapter, []))[1].extend(range(sl.query_start, sl.query_start + sl.query_len))
    segments = []
    for adapter, idx in rows.values():
        if idx[-1] - idx[0] + 1 == len(idx):  # rows are appended in increasing order
            segments.append((adapter, slice(idx[0], idx[-1] + 1)))
        else:
            segments.append((adapter, torch.tensor(idx, dtype=torch.long)))
    return segments
