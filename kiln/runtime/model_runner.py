"""Turns a scheduled batch into flat tensors, runs the model, returns logits.

The scheduler said *what* runs; this module decides *how*: the flat layout (decodes first,
then prefills), slot mappings, and which rows need logits.
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
    logits: torch.Tensor  # [len(sampled), vocab] float32
    sampled: list[Sequence]  # sequences whose last token was computed: they get a new token
    forward_seconds: float


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend, block_size: int,
                 lora_context: LoraContext | None = None) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.lora_context = lora_context

    def release(self, seq: Sequence) -> None:
        """A sequence left the engine. Nothing to do: its blocks are the scheduler's."""

    def execute(self, batch: ScheduledBatch) -> StepResult:
        bs = self.block_size
        decodes: list[Sequence] = []
        prefills: list[tuple[Sequence, int]] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if n == 1:
                decodes.append(seq)
            else:
                prefills.append((seq, n))
        # Longest context first: the backend pads decodes in groups of similar length.
        decodes.sort(key=lambda s: s.num_computed_tokens, reverse=True)

        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq in decodes:
            pos = seq.num_computed_tokens
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(seq.block_table.block_ids[pos // bs] * bs + pos % bs)
        max_blocks = max((len(s.block_table.block_ids) for s in decodes), default=0)
        decode_tables = torch.tensor(
            [s.block_table.block_ids + [0] * (max_blocks - len(s.block_table.block_ids)) for s in decodes],
            dtype=torch.long,
        ).view(len(decodes), max_blocks)
        decode_lens = torch.tensor([s.num_computed_tokens + 1 for s in decodes], dtype=torch.long)

        slices: list[PrefillSlice] = []
        ids_t = [torch.tensor(ids, dtype=torch.long)]
        pos_t = [torch.tensor(positions, dtype=torch.long)]
        slot_t = [torch.tensor(slots, dtype=torch.long)]
        start = len(decodes)
        for seq, n in prefills:
            c = seq.num_computed_tokens
            block_ids = torch.tensor(seq.block_table.block_ids, dtype=torch.long)
            pos = torch.arange(c, c + n)
            ids_t.append(torch.tensor(seq.token_ids[c:c + n], dtype=torch.long))
            pos_t.append(pos)
            slot_t.append(block_ids[pos // bs] * bs + pos % bs)
            slices.append(PrefillSlice(start, n, c + n, block_ids))
            start += n

        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_t),
            num_decode=len(decodes),
            decode_context_lens=decode_lens,
            decode_block_tables=decode_tables,
            prefills=slices,
        )
        # Logits only for rows that produce a token: every decode, and prefills that reach
        # the end of their sequence (an intermediate chunk samples nothing).
        sampled = list(decodes)
        rows = list(range(len(decodes)))
        for (seq, n), sl in zip(prefills, slices):
            if seq.num_computed_tokens + n == seq.num_tokens:
                sampled.append(seq)
                rows.append(sl.query_start + n - 1)

        if self.lora_context is not None:
            self.lora_context.segments = _lora_segments(decodes, prefills, slices)
        t0 = time.perf_counter()
        try:
            state = self.backend.prepare(meta)
            args = (torch.cat(ids_t), torch.cat(pos_t))
            logits_indices = torch.tensor(rows, dtype=torch.long)
            device_forward = getattr(self.backend, "forward", None)  # a device backend moves tensors, replays graphs
            if device_forward is not None:
                # A captured CUDA graph holds no LoRA term: batches with adapters run eagerly
                # (their LoRA term goes through the segmented Triton kernels).
                lora = self.lora_context is not None and bool(self.lora_context.segments)
                logits = device_forward(self.model, *args, state, logits_indices, use_graphs=not lora)
            else:
                logits = self.model(*args, self.backend, state, logits_indices)
        finally:
            if self.lora_context is not None:
                self.lora_context.segments = []
        return StepResult(logits, sampled, time.perf_counter() - t0)


def _lora_segments(decodes: list[Sequence], prefills: list[tuple[Sequence, int]],
                   slices: list[PrefillSlice]) -> list:
    """The flat-batch rows of each adapter in the batch: a slice when they are contiguous
    (one adapter, or a prefill), else an index tensor."""
    rows: dict[int, tuple[object, list[int]]] = {}
    for i, seq in enumerate(decodes):
        if seq.adapter is not None:
            rows.setdefault(id(seq.adapter), (seq.adapter, []))[1].append(i)
    for (seq, n), sl in zip(prefills, slices):
        if seq.adapter is not None:
            rows.setdefault(id(seq.adapter), (seq.adapter, []))[1].extend(range(sl.query_start, sl.query_start + n))
    segments = []
    for adapter, idx in rows.values():
        if idx[-1] - idx[0] + 1 == len(idx):  # rows are appended in increasing order
            segments.append((adapter, slice(idx[0], idx[-1] + 1)))
        else:
            segments.append((adapter, torch.tensor(idx, dtype=torch.long)))
    return segments
