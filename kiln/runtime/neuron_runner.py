"""The model runner of the neuron backend: sequences to fixed batch rows, batches to graphs.

The scheduler runs with chunked prefill and prefix caching off and at most `batch_size`
sequences, so every step is: one token for each running sequence (the token-generation
graph over all rows) plus whole prompts of newly admitted sequences (one context-encoding
graph each, into a free row). A row is freed as soon as its sequence finishes, is aborted
or is preempted, and the next new sequence takes it.
"""

from __future__ import annotations

import heapq
import time

import torch

from .backends.neuron import NeuronBackend
from .model_runner import StepResult
from .scheduler import ScheduledBatch, Sequence


class NeuronModelRunner:
    def __init__(self, backend: NeuronBackend) -> None:
        self.backend = backend
        self.plan = backend.plan
        self.rows: dict[str, int] = {}  # request id -> batch row
        self._free = list(range(self.plan.batch_size))  # a heap: lowest free row first

    @property
    def num_free_rows(self) -> int:
        return len(self._free)

    def release(self, seq: Sequence) -> None:
        """Free the sequence's row (finished, aborted or preempted); idempotent."""
        row = self.rows.pop(seq.request_id, None)
        if row is not None:
            heapq.heappush(self._free, row)

    def execute(self, batch: ScheduledBatch, greedy: bool = False) -> StepResult:  # logits always
        for seq in batch.preempted:  # recomputed from its tokens into a fresh row later
            self.release(seq)
        decodes: list[Sequence] = []
        new: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens == 0 and n == seq.num_tokens:
                new.append(seq)
            elif n == 1 and seq.request_id in self.rows:
                decodes.append(seq)
            else:
                raise RuntimeError(f"the neuron runner cannot compute {n} tokens of {seq.request_id} from "
                                   f"position {seq.num_computed_tokens}: chunked prefill must be off")
        t0 = time.perf_counter()
        logits: list[torch.Tensor] = []
        if decodes:
            logits.append(self._generate(decodes))
        # After token generation: a row encoded this step must not be touched by it.
        for seq in new:
            logits.append(self._encode(seq))
        return StepResult(torch.cat(logits), decodes + new, time.perf_counter() - t0)

    def _generate(self, decodes: list[Sequence]) -> torch.Tensor:
        rows_n, last = self.plan.batch_size, self.plan.max_length - 1
        ids = torch.zeros(rows_n, dtype=torch.long)
        # Idle rows compute a padding token at the last slot of their row, which no live
        # sequence reads (a sequence ends when it reaches the max length).
        positions = torch.full((rows_n,), last, dtype=torch.long)
        rows = [self.rows[seq.request_id] for seq in decodes]
        for seq, row in zip(decodes, rows):
            pos = seq.num_computed_tokens
            ids[row] = seq.token_ids[pos]
            positions[row] = pos
        out = self.backend.generate(ids, positions)
        return out.index_select(0, torch.tensor(rows, dtype=torch.long))

    def _encode(self, seq: Sequence) -> torch.Tensor:
        n = seq.num_tokens
        bucket = self.plan.bucket_for(n)
        if not self._free:
            raise RuntimeError("no free batch row: the scheduler admitted more sequences than rows")
        row = heapq.heappop(self._free)
        self.rows[seq.request_id] = row
        ids = torch.zeros(bucket, dtype=torch.long)
        ids[:n] = torch.tensor(seq.token_ids, dtype=torch.long)
        return self.backend.encode(bucket, ids, row, n - 1)
