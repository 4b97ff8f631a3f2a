"""The batched LoRA compute path: adapters' weights stacked per slot, and the per-step plan
that says which rows use which slot.

Why: the per-adapter path costs a gather, two small matmuls and a scatter per adapter per
wrapped linear (16 adapters x 120 linears = ~7,700 ops per decode step, mostly overhead), and
its fused B matrices are block-diagonal, so a third of the bytes it reads are zeros. Here
each adapter in a running batch gets a slot; its weights are copied once into per-linear
buffers, rank-major and split per part of the fused linear:

    A   [S, P*R, in]   part p's ranks at rows p*R .. p*R + r_p (zero padding after)
    B_p [S, R, N_p]    one per part (q/k/v of qkv_proj, gate/up of gate_up_proj)

R is the largest rank in the batch (with the CPU kernel, which reads only each slot's own r_p
rows, the largest so far: a smaller batch rank does not reallocate). A slot stays filled while its adapter's weights are alive
(a weak reference to them: eviction and unload invalidate it) and is reused least recently
used first, so a steady batch copies nothing. On the CPU, rows of the slotted adapters are
padded into [slots, m, in] groups and each linear runs one gather, one bmm for A, one bmm per
part for B and one scatter-add per part, or, where kiln's C++ kernels built, one call of
kiln/kernels/cpu/lora.cpp that reads each slot's weights once for all of its rows. On CUDA the
same buffers feed the segmented Triton kernels (kiln/kernels/lora.py) through a per-row slot
index.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

Key = tuple[int, str]  # (layer, fused linear name)


class LoraSlots:
    """Per-linear slot buffers (see the module docstring). Grows up to `max_slots` slots."""

    def __init__(self, parts: dict[Key, list[tuple[int, int]]], in_features: dict[Key, int],
                 max_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        self.parts = parts  # (output offset, size) of each part of each linear
        self.in_features = in_features
        self.max_slots = max_slots
        self.dtype, self.device = dtype, device
        self.rank = 0
        self.num_slots = 0
        self.a: dict[Key, torch.Tensor] = {}
        self.b: dict[Key, list[torch.Tensor]] = {}
        # [slots, parts] int32: the ranks the slot's adapter has for that part (0: none). The rows
        # past them are zeros, which the CPU kernel does not read: an adapter on q/v reads no
        # MLP buffers, and a rank-8 adapter in rank-64 buffers reads 8 rows.
        self.ranks: dict[Key, torch.Tensor] = {}
        # per linear, the slots with any ranks there: the hot path's check, without a tensor op
        self.used: dict[Key, set[int]] = {key: set() for key in parts}
        self._owner: list[tuple[int, weakref.ref] | None] = []  # (uid, weak ref to its weights)
        self._tick: list[int] = []
        self._clock = 0
        self._layouts: dict[int, tuple[weakref.ref, dict]] = {}  # uid -> (its weights, _layout's answer)
        self.num_copies = 0  # adapters copied into a slot (tests and stats)
        # Keep buffers of a larger rank when a batch's largest rank drops (set where the CPU
        # kernel reads only each slot's own ranks): no reallocation and refill of every slot each
        # time the last high-rank request of a mixed batch finishes. The torch paths read all R
        # rows, so for them the buffers follow the batch's rank.
        self.keep_larger_rank = False

    def _allocate(self, num_slots: int, rank: int) -> None:
        """(Re)allocate every buffer. Same rank (growing): the filled slots keep their
        contents, so they are not copied from the adapters again (~70 ms per rank-64 adapter
        of the default model); a new rank: all slots are free afterwards."""
        keep = self.num_slots if rank == self.rank else 0
        old_a, old_b, old_ranks = self.a, self.b, self.ranks
        self.a, self.b, self.ranks = {}, {}, {}
        for key, parts in self.parts.items():
            a = torch.zeros(num_slots, len(parts) * rank, self.in_features[key], dtype=self.dtype, device=self.device)
            bs = [torch.zeros(num_slots, rank, size, dtype=self.dtype, device=self.device) for _, size in parts]
            ranks = torch.zeros(num_slots, len(parts), dtype=torch.int32)
            if keep:
                a[:keep] = old_a.pop(key)
                for b, old in zip(bs, old_b.pop(key)):
                    b[:keep] = old
                ranks[:keep] = old_ranks[key][:keep]
            else:
                old_a.pop(key, None), old_b.pop(key, None)  # free as we go: the peak stays ~one set
            self.a[key], self.b[key], self.ranks[key] = a, bs, ranks
            self.used[key] = {slot for slot in self.used[key] if slot < keep}
        self.num_slots, self.rank = num_slots, rank
        self._owner = self._owner[:keep] + [None] * (num_slots - keep)
        self._tick = self._tick[:keep] + [0] * (num_slots - keep)

    def _live(self, slot: int, adapter) -> bool:
        owner = self._owner[slot]
        if owner is None or owner[0] != adapter.uid:
            return False
        return adapter.weights is not None and owner[1]() is _anchor(adapter.weights)

    def assign(self, adapters: list) -> list[int]:
        """A slot for each adapter (distinct, at most max_slots of them), copying the weights
        of those not already slotted."""
        assert len(adapters) <= self.max_slots, (len(adapters), self.max_slots)
        rank = max(a.rank for a in adapters)
        if self.keep_larger_rank:
            rank = max(rank, self.rank)
        need = len(adapters)
        if rank != self.rank:  # every buffer changes shape: the slots are refilled
            self._allocate(max(need, self.num_slots), rank)
        elif need > self.num_slots:  # grow by doubling: a batch gaining adapters one by one reallocates rarely
            self._allocate(min(self.max_slots, max(need, 2 * self.num_slots)), rank)
        self._clock += 1
        where = {self._owner[s][0]: s for s in range(self.num_slots) if self._owner[s] is not None}
        slots: list[int | None] = []
        for adapter in adapters:
            s = where.get(adapter.uid)
            slots.append(s if s is not None and self._live(s, adapter) else None)
        taken = {s for s in slots if s is not None}
        for s in taken:
            self._tick[s] = self._clock
        for i, adapter in enumerate(adapters):
            if slots[i] is None:
                s = min((s for s in range(self.num_slots) if s not in taken), key=lambda s: self._tick[s])
                self._fill(s, adapter)
                slots[i] = s
                taken.add(s)
                self._tick[s] = self._clock
        return slots  # type: ignore[return-value]

    def _fill(self, slot: int, adapter) -> None:
        R = self.rank
        layout = self._layout(adapter)
        for key, parts in self.parts.items():
            a_buf, b_bufs = self.a[key], self.b[key]
            self.ranks[key][slot] = 0
            self.used[key].discard(slot)
            pair = adapter.weights.get(key)  # None: the adapter does not touch this linear
            for p, (off, size) in enumerate(parts):
                rows = layout[key][p] if pair is not None else slice(0, 0)
                r = rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
                if r > R:
                    raise ValueError(f"adapter {adapter.name}: {key} part {p} has {r} ranks, above its rank {R}")
                if r:
                    a_t, b_t = pair  # [in, r_total], [r_total, out] (the parts' B block-diagonal)
                    a_buf[slot, p * R:p * R + r].copy_(a_t[:, rows].t())
                    b_bufs[p][slot, :r].copy_(b_t[rows, off:off + size])
                    self.ranks[key][slot, p] = r
                    self.used[key].add(slot)
                # ranks past the adapter's (all of them where it has none) are zeros: they add nothing
                a_buf[slot, p * R + r:(p + 1) * R].zero_()
                b_bufs[p][slot, r:].zero_()
        self._owner[slot] = (adapter.uid, weakref.ref(_anchor(adapter.weights)))
        self.num_copies += 1

    def _layout(self, adapter) -> dict[Key, list[slice | torch.Tensor]]:
        """The rank rows that feed each part of each linear, found once per load of an
        adapter's weights (a scan of its B) and reused by every later fill of that load: a
        batch whose adapters come and go refills slots often, and the scan was most of a fill."""
        anchor = _anchor(adapter.weights)
        cached = self._layouts.get(adapter.uid)
        if cached is not None and cached[0]() is anchor:
            return cached[1]
        layout = {key: [_rank_rows(b_t[:, off:off + size]) for off, size in self.parts[key]]
                  for key, (_, b_t) in adapter.weights.items() if key in self.parts}
        self._layouts = {uid: c for uid, c in self._layouts.items() if c[0]() is not None}  # drop unloaded ones
        self._layouts[adapter.uid] = (weakref.ref(anchor), layout)
        return layout


def _rank_rows(b_part: torch.Tensor) -> slice | torch.Tensor:
    """The rows of B with a non-zero in a part's columns: the ranks that feed that part. Zero
    rows add nothing wherever they go, so this is exact for any fused layout. A slice when
    they are contiguous (as read_adapter lays them out), so a fill copies without a gather."""
    rows = (b_part != 0).any(dim=1).nonzero().flatten()
    if rows.numel() and int(rows[-1] - rows[0]) + 1 == rows.numel():
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def _anchor(weights: dict) -> torch.Tensor:
    """One tensor of an adapter's weights: alive exactly as long as that load of them."""
    return next(iter(weights.values()))[0]


@dataclass
class LoraPlan:
    """Built once per step (at the first wrapped linear) and read by every wrapped linear."""

    single: list  # [(adapter, rows)]: adapters run one by one (many rows: a prefill)
    num_slots: int = 0  # slots spanned by the batched adapters (0: none)
    # CPU: rows of slot s are gather[s*m:(s+1)*m] (padding: row 0, zeroed by mask)
    group_rows: int = 0
    gather: torch.Tensor | None = None  # [num_slots * m] int64
    mask: torch.Tensor | None = None  # [num_slots, m, 1] or None when nothing is padded
    large: list = field(default_factory=list)  # [(slot, rows, rank)]: slotted adapters with many rows (CPU)
    # CPU with kiln's C++ kernel: (slot of each group, group_ptr, rows), the rows of group g
    # being rows[group_ptr[g]:group_ptr[g+1]] (kiln.kernels.cpu_ops.lora_grouped)
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # CUDA: the Triton kernels' row layout (kiln.kernels.lora.LoraIndices)
    indices: object | None = None


def grouped_lora(x: torch.Tensor, y: torch.Tensor, plan: LoraPlan, a: torch.Tensor, bs: list[torch.Tensor],
                 parts: list[tuple[int, int]], rank: int, ranks: torch.Tensor) -> None:
    """y += the LoRA term of the slotted rows, in torch ops. Grouped slots: one gather, one bmm
    for A, one bmm per part for B, one scatter-add. Slots with many rows: plain matmuls on
    their rows (a slice for a prefill), B per part, so no block-diagonal zeros are read.
    With plan.groups, the decode rows go through kiln's C++ kernel instead."""
    if plan.groups is not None:
        from ..kernels import cpu_ops

        x = x if x.stride(-1) == 1 else x.contiguous()
        cpu_ops.lora_grouped(x, y, a, bs, [off for off, _ in parts], ranks, *plan.groups)
    if plan.num_slots:
        n, m = plan.num_slots, plan.group_rows
        xg = x.index_select(0, plan.gather).view(n, m, -1)
        t = torch.bmm(xg, a[:n].transpose(1, 2))  # [n, m, P*R]
        if plan.mask is not None:
            t.mul_(plan.mask)  # padding rows (copies of row 0) add nothing
        out = _cat([torch.bmm(t[:, :, p * rank:(p + 1) * rank], bs[p][:n]) for p in range(len(parts))])
        y.index_add_(0, plan.gather, out.view(n * m, -1))  # one scatter for all parts (measured faster)
    for s, rows, r in plan.large:
        xs = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        if r == rank:
            t = xs @ a[s].t()  # [rows, P*R]
            out = _cat([t[:, p * rank:(p + 1) * rank] @ bs[p][s] for p in range(len(parts))])
        else:  # buffers of a larger rank (keep_larger_rank): only the adapter's own r rows of each part
            t = xs @ a[s].view(len(parts), rank, -1)[:, :r].transpose(1, 2)  # [P, rows, r]
            out = _cat([t[p] @ bs[p][s, :r] for p in range(len(parts))])
        if isinstance(rows, slice):
            y[rows] += out
        else:
            y.index_add_(0, rows, out)


def _cat(outs: list[torch.Tensor]) -> torch.Tensor:
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # parts are contiguous, in order
