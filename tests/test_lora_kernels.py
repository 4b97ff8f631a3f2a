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
    (F32, 300, 64, 72, 3, [64, 8, 8], [0] * 130 + [2, -1, 1] * 40 + [1] * 50, True),  # 32-row blocks
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


# -- the wrapped linears: per-adapter loop vs slot-batched torch vs Triton ------------------
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

from kiln.runtime.lora import Adapter, LoraContext, LoraLinear, read_adapter  # noqa: E402
from kiln.runtime.models.layers import Linear  # noqa: E402
from kiln.runtime.models.loader import ModelConfig  # noqa: E402

TINY = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64,
                   tie_word_embeddings=True, eos_token_ids=[0], architecture="LlamaForCausalLM")
_DIMS = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
         "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)}


def _peft_folder(folder: Path, rank: int, seed: int, targets: list[str]) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(TINY.num_layers):
        for name in targets:
            d_in, d_out = _DIMS[name]
            where = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{where}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) / rank ** 0.5
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank}))
    return folder


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory) -> list[Adapter]:
    """Rank 8 and 64 on every projection, and a rank-16 one on q, v and up only (so the fused
    qkv / gate_up have parts without ranks). Weights in float64."""
    root = tmp_path_factory.mktemp("tiny")
    specs = [(8, list(_DIMS)), (64, list(_DIMS)), (16, ["q_proj", "v_proj", "up_proj"]), (8, list(_DIMS))]
    out = []
    for i, (rank, targets) in enumerate(specs):
        path = _peft_folder(root / f"a{i}", rank, 10 + i, targets)
        _, weights, r = read_adapter(path, TINY, 64, torch.float64)
        out.append(Adapter(f"a{i}", path, 1000 + i, r, float(rank), tuple(targets), 0, weights))
    return out


def _reference(x: torch.Tensor, base: torch.Tensor, key, row_adapter: list) -> torch.Tensor:
    """float64, row by row: x W^T + x A_t B_t of the row's adapter."""
    y = x.double() @ base.double().t()
    for i, adapter in enumerate(row_adapter):
        if adapter is not None and key in adapter.weights:
            a_t, b_t = adapter.weights[key]
            y[i] += x[i].double() @ a_t.double() @ b_t.double()
    return y


@pytest.mark.parametrize("mode,dtype", [("loop", torch.float64), ("grouped", torch.float64),
                                        ("grouped", F32), ("triton", F32), ("grouped-cpu", F32),
                                        ("grouped-cpu", BF16)])
def test_lora_linear_paths_match_float64(tiny_adapters, mode, dtype) -> None:
    """Decode rows of four adapters (ranks 8, 64, 16 on a subset) interleaved with base rows,
    then a prefill of 12 rows for one adapter (more than a group holds: it runs alone), one of
    10 rows for the rank-16 adapter (alone, on 16 of the buffers' 64 rows) and base rows; every row must equal the float64 per-row reference. "grouped-cpu" is
    "grouped" with its decode rows through kiln's C++ kernel (kiln/kernels/cpu/lora.cpp)."""
    cpu_kernel = mode == "grouped-cpu"
    if cpu_kernel:
        from kiln.kernels import cpu_ops
        from kiln.runtime.models.loader import cache_dir

        assert cpu_ops.load(cache_dir()), "kiln's C++ kernels did not build (see the warning in the log)"
        mode = "grouped"
    a0, a1, a2, a3 = tiny_adapters
    decode = [a0, None, a1, a2, a0, a3, None, a1, a2, a3, a0]
    prefill = [(a1, 12), (None, 3), (a2, 10)]
    row_adapter = decode + [a for a, n in prefill for _ in range(n)]
    T = len(row_adapter)
    segments: dict[int, tuple] = {}
    for i, a in enumerate(row_adapter):
        if a is not None:
            segments.setdefault(id(a), (a, []))[1].append(i)
    segs = [(a, slice(r[0], r[-1] + 1) if r[-1] - r[0] + 1 == len(r) else torch.tensor(r)) for a, r in segments.values()]

    if mode != "loop" or dtype != torch.float64:
        tiny = [Adapter(a.name, a.path, a.uid, a.rank, a.alpha, a.targets, 0,
                        {k: (x.to(dtype), y.to(dtype)) for k, (x, y) in a.weights.items()}) for a in tiny_adapters]
        remap = {id(a): b for a, b in zip(tiny_adapters, tiny)}
        segs = [(remap[id(a)], rows) for a, rows in segs]
    context = LoraContext(TINY, dtype, "cpu", max_slots=4, mode=mode, cpu_kernel=cpu_kernel)
    g = torch.Generator().manual_seed(5)
    for step in range(2):  # the second step reuses the filled slots
        context.segments = segs
        for layer in range(TINY.num_layers):
            for name, (d_in, d_out) in (("qkv_proj", (64, 128)), ("o_proj", (64, 64)),
                                        ("gate_up_proj", (64, 192)), ("down_proj", (96, 64))):
                base = Linear(d_in, d_out)
                base.weight.data = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype)
                x = torch.randn(T, d_in, generator=g).to(dtype)
                y = LoraLinear(base, layer, name, context)(x)
                ref = _reference(x, base.weight, (layer, name), row_adapter)
                tol = 1e-12 if dtype == torch.float64 else TOL[dtype]
                assert rel_err(y, ref) < tol, (mode, layer, name)
        plan = context.plan(x)
        if mode == "loop":
            assert plan.num_slots == 0 and len(plan.single) == 4
        else:
            assert not plan.single and context.slots.num_copies == 4  # every adapter slotted, once
            if mode == "grouped":  # a1 (2 + 12 rows) and a2 (2 + 10) run on their own rows, not in a group
                assert [context.slots._owner[s][0] for s, _, _ in plan.large] == [a1.uid, a2.uid]
                assert [r for _, _, r in plan.large] == [64, 16] and context.slots.rank == 64
                # the other two: padded torch groups, or the kernel's unpadded row lists
                assert (plan.groups is not None and plan.num_slots == 0) if cpu_kernel else plan.num_slots
        context.segments = []

    if mode == "grouped":
        # an evicted and re-read adapter (new tensors) is copied again; the others are not
        victim = segs[0][0]
        victim.weights = {k: (a.clone(), b.clone()) for k, (a, b) in victim.weights.items()}
        context.segments = segs
        context.plan(torch.zeros(T, 64, dtype=dtype))
        assert context.slots.num_copies == 5


def test_one_adapter_runs_on_its_own_weights(tiny_adapters) -> None:
    """grouped mode with a single adapter in the batch: no slot copy, the per-adapter path."""
    context = LoraContext(TINY, torch.float64, "cpu", max_slots=4)
    assert context.mode == "grouped"
    context.segments = [(tiny_adapters[0], torch.tensor([0, 2]))]
    plan = context.plan(torch.zeros(3, 64))
    assert len(plan.single) == 1 and plan.num_slots == 0 and not plan.large
    assert context.slots.num_copies == 0


def test_growing_the_slots_keeps_their_contents(tiny_adapters) -> None:
    context = LoraContext(TINY, torch.float64, "cpu", max_slots=4)
    a0, _, _, a3 = tiny_adapters  # both rank 8: the buffers grow without changing rank
    slots = context.slots
    first = slots.assign([a0])
    before = slots.a[(0, "qkv_proj")][first[0]].clone()
    again = slots.assign([a3, a0])  # a second slot is needed: reallocated, a0 kept in place
    assert slots.num_slots == 2 and again[1] == first[0] and slots.num_copies == 2
    assert torch.equal(slots.a[(0, "qkv_proj")][first[0]], before)


def test_linears_no_slotted_adapter_touches_add_nothing(tiny_adapters) -> None:
    """Two slotted adapters on q, v and up only: o_proj and down_proj have no slot with weights
    (LoraSlots.used is empty there), skip the LoRA term (their NaN-poisoned buffers are not
    read) and return the base output to the bit; qkv still adds."""
    a2 = tiny_adapters[2]
    twin = Adapter("a2-twin", a2.path, 2002, a2.rank, a2.alpha, a2.targets, 0, dict(a2.weights))
    context = LoraContext(TINY, torch.float64, "cpu", max_slots=4)
    context.segments = [(a2, torch.tensor([0, 2])), (twin, torch.tensor([1]))]
    context.plan(torch.zeros(3, 64))  # slots both adapters
    for name in ("o_proj", "down_proj"):  # their buffers are never read: poison them to prove it
        context.slots.a[(0, name)].fill_(float("nan"))
    g = torch.Generator().manual_seed(9)
    for name, (d_in, d_out) in (("o_proj", (64, 64)), ("down_proj", (96, 64)), ("qkv_proj", (64, 128))):
        base = Linear(d_in, d_out)
        base.weight.data = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        x = torch.randn(3, d_in, generator=g, dtype=torch.float64)
        y = LoraLinear(base, 0, name, context)(x)
        plain = base(x)
        if name == "qkv_proj":
            assert context.slots.used[(0, name)] and not torch.equal(y, plain)
            assert rel_err(y, _reference(x, base.weight, (0, name), [a2, twin, a2])) < 1e-12
        else:
            assert not context.slots.used[(0, name)] and torch.equal(y, plain)


@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_a_smaller_batch_rank_keeps_the_buffers_only_for_the_kernel(tiny_adapters, cpu_kernel) -> None:
    """A rank-64 batch, then a batch of rank-8 adapters only. The C++ kernel reads just each
    slot's own ranks, so it keeps the rank-64 buffers (no reallocation, no refill of the slot
    already holding a0); the torch path reads every row, so its buffers shrink to rank 8. Both
    give the float64 reference."""
    if cpu_kernel:
        from kiln.kernels import cpu_ops
        from kiln.runtime.models.loader import cache_dir

        assert cpu_ops.load(cache_dir()), "kiln's C++ kernels did not build (see the warning in the log)"
    a0, a1, _, a3 = [Adapter(a.name, a.path, a.uid, a.rank, a.alpha, a.targets, 0,
                             {k: (x.float(), y.float()) for k, (x, y) in a.weights.items()}) for a in tiny_adapters]
    context = LoraContext(TINY, F32, "cpu", max_slots=4, cpu_kernel=cpu_kernel)
    g = torch.Generator().manual_seed(11)
    base = Linear(64, 128)
    base.weight.data = torch.randn(128, 64, generator=g) / 8
    for batch in ([a0, a1], [a0, a3]):  # ranks 8 + 64, then 8 + 8
        context.segments = [(a, torch.tensor([i])) for i, a in enumerate(batch)]
        x = torch.randn(2, 64, generator=g)
        y = LoraLinear(base, 0, "qkv_proj", context)(x)
        assert rel_err(y, _reference(x, base.weight, (0, "qkv_proj"), batch)) < 1e-5
    slots = context.slots
    if cpu_kernel:
        assert slots.rank == 64 and slots.num_copies == 3  # a3 filled; a0 kept in its slot
        assert int(slots.ranks[(0, "qkv_proj")].max()) == 8  # what the kernel reads of the rank-64 rows
    else:
        assert slots.rank == 8 and slots.num_copies == 4  # new buffers: both refilled
