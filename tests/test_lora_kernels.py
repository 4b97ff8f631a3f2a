"""The segmented LoRA kernels (kiln/kernels/lora.py) against their plain-torch reference and
a float64 one: mixed adapters, base rows (-1) left untouched, a partial last block of rows,
rank 8 and 64 (padded to one stacked rank), column slices of a fused output, and strided
(rank-major) weights.

Here (no GPU) they run under TRITON_INTERPRET=1 on CPU tensors; with KILN_TEST_CUDA=1 on a
CUDA machine the same cases run compiled."""

from __future__ import annotations

import os

import torch

CUDA = os.environ.get("KILN_TEST_CUDA") == "1" and torch.cuda.is_available()
if not CUDA:
    # Must be set before kiln.kernels is imported: @triton.jit reads it when it decorates.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kiln.kernels.lora import (  # noqa: E402
    lora_expand, lora_expand_ref, lora_indices, lora_shrink, lora_shrink_ref,
)

DEV = "cuda" if CUDA else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = {F32: 1e-5, BF16: 1e-2, F16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def _stack(g: torch.Generator, slots: int, ranks: list[int], k: int, n: int, dtype: torch.dtype,
           rank_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A [S, K, R] and B [S, R, N] with each slot's rank padded with zeros to R = max(ranks).
    rank_major: A is stored [S, R, K] and handed over as a transposed view (as the runtime does)."""
    R = max(ranks)
    a = torch.zeros(slots, R, k) if rank_major else torch.zeros(slots, k, R)
    b = torch.zeros(slots, R, n)
    for s in range(slots):
        r = ranks[s % len(ranks)]
        if rank_major:
            a[s, :r] = torch.randn(r, k, generator=g) / k ** 0.5
        else:
            a[s, :, :r] = torch.randn(k, r, generator=g) / k ** 0.5
        b[s, :r] = torch.randn(r, n, generator=g) / r ** 0.5
    a = a.to(dtype).to(DEV)
    return (a.transpose(1, 2) if rank_major else a), b.to(dtype).to(DEV)


# (dtype, rows, K, N, slots, ranks, rows' slots (pattern, repeated over the rows), rank-major A)
CASES = [
    (F32, 7, 64, 48, 2, [8], [0, -1, 1, 1, -1, 0, 0], False),  # fewer rows than one block
    (F32, 37, 576, 192, 4, [8, 64], [3, 0, -1, 2, 1, 1, 0, 3, -1], True),  # mixed ranks, partial last block
    (F32, 40, 96, 130, 3, [64], [1] * 17 + [-1] * 3 + [0, 2] * 10, False),  # a prefill-like run of one slot
    (BF16, 33, 576, 96, 4, [8, 64], [2, -1, 0, 3, 1], True),
    (F16, 19, 128, 80, 2, [64, 8], [1, 0, -1], False),
    (F32, 5, 64, 32, 3, [8], [-1], False),  # base rows only: nothing changes
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-T{c[1]}-K{c[2]}-N{c[3]}-S{c[4]}-r{max(c[5])}")
def test_shrink_and_expand(case) -> None:
    dtype, T, K, N, S, ranks, pattern, rank_major = case
    g = torch.Generator().manual_seed(T * K + N)
    idx = torch.tensor([pattern[i % len(pattern)] for i in range(T)], dtype=torch.int32)
    x = torch.randn(T, K, generator=g).to(dtype).to(DEV)
    a, b = _stack(g, S, ranks, K, N, dtype, rank_major)
    ind = lora_indices(idx.to(DEV), S)

    # shrink: base rows keep what `out` held (NaN here: any write to them fails)
    t = lora_shrink(x, a, ind, out=torch.full((T, a.shape[2]), float("nan"), device=DEV))
    has = idx >= 0
    t64 = lora_shrink_ref(x.double().cpu(), a.double().cpu(), idx)
    assert torch.isnan(t.cpu()[~has]).all()
    if has.any():
        assert rel_err(t.cpu()[has], t64[has]) < TOL[dtype]
        ref32 = lora_shrink_ref(x.cpu(), a.cpu(), idx)  # the plain-torch reference in float32
        assert rel_err(ref32[has], t64[has]) < TOL[dtype]

    # expand into the middle columns of a wider (fused) output; the other columns and the
    # base rows stay bit-identical
    t = torch.where(has[:, None].to(DEV), t, torch.zeros_like(t))
    off, width = 5, N + 11
    y0 = torch.randn(T, width, generator=g).to(dtype).to(DEV)
    y = y0.clone()
    lora_expand(t, b, ind, y, col_offset=off, scale=0.5)
    y64 = lora_expand_ref(t64, b.double().cpu(), idx, y0.double().cpu(), off, 0.5)
    assert torch.equal(y.cpu()[~has], y0.cpu()[~has])
    assert torch.equal(y.cpu()[:, :off], y0.cpu()[:, :off]) and torch.equal(y.cpu()[:, off + N:], y0.cpu()[:, off + N:])
    if has.any():
        delta, delta64 = (y.double() - y0.double()).cpu()[has], (y64 - y0.double().cpu())[has]
        assert rel_err(delta, delta64) < 2 * TOL[dtype]  # the LoRA term itself, not swamped by y
        ref = lora_expand_ref(t.cpu(), b.cpu(), idx, y0.cpu(), off, 0.5)
        assert rel_err(y, ref) < TOL[dtype]


def test_indices_sort_rows_by_slot() -> None:
    idx = torch.tensor([2, -1, 0, 2, 1, -1, 0], dtype=torch.int32, device=DEV)
    ind = lora_indices(idx, 4)
    assert ind.seg.tolist() == [0, 2, 3, 5, 5]  # slot 3 is empty; base rows after the last slot
    assert ind.perm.tolist()[:5] == [2, 6, 4, 0, 3]
    assert sorted(ind.perm.tolist()) == list(range(7))


def test_empty_batch() -> None:
    ind = lora_indices(torch.zeros(0, dtype=torch.int32, device=DEV), 2)
    a, b = torch.zeros(2, 8, 16, device=DEV), torch.zeros(2, 16, 8, device=DEV)
    t = lora_shrink(torch.zeros(0, 8, device=DEV), a, ind)
    assert t.shape == (0, 16)
    assert lora_expand(t, b, ind, torch.zeros(0, 8, device=DEV)).shape == (0, 8)
