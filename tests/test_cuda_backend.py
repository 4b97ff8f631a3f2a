"""The cuda backend: how it is chosen (CUDA mocked away), and the model forward through its
Triton kernels against the cpu backend on the default model.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors; with
KILN_TEST_CUDA=1 on a CUDA machine the same forward runs compiled on the GPU."""

from __future__ import annotations

import logging
import os

import torch

CUDA = os.environ.get("KILN_TEST_CUDA") == "1" and torch.cuda.is_available()
if not CUDA:
    # Must be set before kiln.kernels is imported: @triton.jit reads it when it decorates.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kiln.cli import _engine_config, build_parser  # noqa: E402
from kiln.config import EngineConfig  # noqa: E402
from kiln.runtime.backends import select  # noqa: E402
from kiln.runtime.backends.base import AttentionMetadata, PrefillSlice  # noqa: E402
from kiln.runtime.backends.cpu import CpuBackend  # noqa: E402
from kiln.kernels.prefill_attention import prefill_attention_ref  # noqa: E402
from kiln.runtime.backends.cuda import CudaBackend  # noqa: E402
from kiln.runtime.models.llama import LlamaForCausalLM  # noqa: E402
from kiln.runtime.models.loader import resolve_model  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


# -- selection ----------------------------------------------------------------------------
@pytest.fixture
def machine(monkeypatch):
    """Set what the machine has: CUDA, triton, flash-attn."""

    def set_(cuda: bool, flash: bool = False, triton: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(select, "_flash_attn_available", lambda: flash)
        monkeypatch.setattr(select, "_triton_available", lambda: triton)

    return set_


@pytest.mark.parametrize("cuda,flash,triton,requested,expected", [
    (False, False, True, "auto", "cpu"),
    (False, True, True, "auto", "cpu"),
    (True, False, True, "auto", "triton"),
    (True, True, True, "auto", "flash-attn"),
    (True, True, False, "auto", "cpu"),  # CUDA torch without triton: stay runnable
    (True, True, True, "cpu", "cpu"),
    (True, True, True, "triton", "triton"),
    (True, True, True, "flash-attn", "flash-attn"),
])
def test_choice(machine, caplog, cuda, flash, triton, requested, expected) -> None:
    machine(cuda, flash, triton)
    with caplog.at_level(logging.INFO, logger=select.__name__):
        assert select.choose_attention_backend(requested) == expected
    assert f"attention backend: {expected}" in caplog.text  # the choice is logged, with why


@pytest.mark.parametrize("cuda,flash,triton,requested,message", [
    (False, False, True, "triton", "needs a CUDA device"),
    (False, True, True, "flash-attn", "needs a CUDA device"),
    (True, False, True, "flash-attn", "flash-attn package"),
    (True, True, False, "triton", "needs triton"),
    (True, True, True, "tensorrt", "unknown attention backend"),
])
def test_forced_choice_that_cannot_run(machine, cuda, flash, triton, requested, message) -> None:
    machine(cuda, flash, triton)
    with pytest.raises(ValueError, match=message):
        select.choose_attention_backend(requested)


def test_flag_and_env(monkeypatch) -> None:
    args = build_parser().parse_args(["generate", "hi", "--attention-backend", "triton"])
    assert _engine_config(args).attention_backend == "triton"
    monkeypatch.setenv("KILN_ATTENTION_BACKEND", "cpu")
    assert _engine_config(build_parser().parse_args(["generate", "hi"])).attention_backend == "cpu"
    monkeypatch.setenv("KILN_ATTENTION_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="attention_backend"):
        _engine_config(build_parser().parse_args(["generate", "hi"]))
    assert EngineConfig().attention_backend == "auto"


def test_create_backend_cpu() -> None:
    backend = select.create_backend("cpu", 2, 4, 2, 16, 8, 16, torch.float32, max_num_seqs=4, max_model_len=64)
    assert isinstance(backend, CpuBackend)


@pytest.mark.skipif(CUDA, reason="checks the error raised where flash-attn is missing")
def test_flash_attn_prefill_needs_the_package() -> None:
    if select._flash_attn_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match="flash-attn"):
        CudaBackend(1, 2, 1, 16, 4, 16, torch.float32, device="cpu", prefill="flash-attn")


# -- the model through the kernels ---------------------------------------------------------
BS = 16


def _steps(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]]:
    """Two steps over three sequences, laid out as the model runner does (decodes first):
    step 1 prefills A (12 tokens), B (7) and the first chunk of C (20); step 2 decodes A and
    B and prefills C's second chunk (9 tokens over its 20 cached ones, ending mid-block).
    Physical blocks are shuffled: A [5, 2], B [9], C [3, 7]."""
    g = torch.Generator().manual_seed(7)
    tokens = {name: torch.randint(0, vocab, (n,), generator=g) for name, n in (("A", 13), ("B", 8), ("C", 29))}
    blocks = {"A": [5, 2], "B": [9], "C": [3, 7]}

    def slots(name: str, pos: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(blocks[name])
        return table[pos // BS] * BS + pos % BS

    steps = []
    # Step 1: three prefills.
    spans = [("A", 0, 12), ("B", 0, 7), ("C", 0, 20)]
    ids, pos, slot, prefills, start = [], [], [], [], 0
    for name, c, n in spans:
        p = torch.arange(c, c + n)
        ids.append(tokens[name][c:c + n]), pos.append(p), slot.append(slots(name, p))
        prefills.append(PrefillSlice(start, n, c + n, torch.tensor(blocks[name])))
        start += n
    meta = AttentionMetadata(torch.cat(slot), 0, torch.zeros(0, dtype=torch.long),
                             torch.zeros(0, 0, dtype=torch.long), prefills)
    steps.append((torch.cat(ids), torch.cat(pos), meta))
    # Step 2: decode A (position 12) and B (position 7), then C's second chunk.
    ids = [tokens["A"][12:13], tokens["B"][7:8], tokens["C"][20:29]]
    pos = [torch.tensor([12]), torch.tensor([7]), torch.arange(20, 29)]
    slot = [slots("A", pos[0]), slots("B", pos[1]), slots("C", pos[2])]
    meta = AttentionMetadata(
        torch.cat(slot), 2, torch.tensor([13, 8]), torch.tensor([[5, 2], [9, 0]]),
        [PrefillSlice(2, 9, 29, torch.tensor(blocks["C"]))],
    )
    steps.append((torch.cat(ids), torch.cat(pos), meta))
    return steps


def test_model_forward_matches_cpu_backend() -> None:
    """Default model, float32: every row's logits through the cuda backend's kernels
    (KV write, prefill over cached blocks, decode, RMSNorm, RoPE, SwiGLU) against the cpu
    backend's, over a prefill step and a mixed decode + chunked-prefill step."""
    model = LlamaForCausalLM.from_folder(resolve_model("default"), torch.float32, max_positions=256)
    cfg = model.config
    shape = (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16, BS, torch.float32)
    steps = _steps(cfg.vocab_size)

    cpu = CpuBackend(*shape)
    expected = []
    for ids, pos, meta in steps:
        rows = torch.arange(ids.numel())
        expected.append(model(ids, pos, cpu, cpu.prepare(meta), rows))

    cuda = CudaBackend(*shape, device=DEV, max_num_seqs=4, max_model_len=256, cuda_graphs=False)
    cuda.prepare_model(model)  # moves the model, swaps in the Triton RMSNorm / RoPE / SwiGLU
    for (ids, pos, meta), ref in zip(steps, expected):
        got = cuda.forward(model, ids, pos, cuda.prepare(meta), torch.arange(ids.numel()))
        assert got.device.type == "cpu" and got.dtype == torch.float32
        err = float((got.double() - ref.double()).norm() / ref.double().norm())
        assert err < 1e-4, err
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


# -- prefill routing when flash-attn is present ---------------------------------------------
class _VarlenStandIn:
    """flash_attn_varlen_func's contract in plain torch (flash-attn cannot be installed on
    this machine): packed q/k/v, cumulative lengths, causal, GQA by head groups."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        self.calls += 1
        assert causal and torch.equal(cu_q, cu_k) and max_q == max_k
        out = torch.empty_like(q)
        group = q.shape[1] // k.shape[1]
        for s in range(len(cu_q) - 1):
            a, b = int(cu_q[s]), int(cu_q[s + 1])
            o = torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].repeat_interleave(group, 1).transpose(0, 1),
                v[a:b].repeat_interleave(group, 1).transpose(0, 1), is_causal=True, scale=softmax_scale)
            out[a:b] = o.transpose(0, 1)
        return out


@pytest.mark.skipif(CUDA, reason="routing is checked on CPU tensors")
def test_prefill_routes_to_flash_attn_only_without_cached_context() -> None:
    H, Hkv, D = 4, 2, 64
    backend = CudaBackend(1, H, Hkv, D, 8, BS, torch.float32, device="cpu", cuda_graphs=False)
    backend.flash_varlen = stand_in = _VarlenStandIn()
    g = torch.Generator().manual_seed(3)

    def run(meta: AttentionMetadata, n: int) -> float:
        """Attention output's relative error against the float64 reference over the cache."""
        q, k, v = (torch.randn(n, h, D, generator=g) for h in (H, Hkv, Hkv))
        out = backend.attention(0, q, k, v, backend.prepare(meta)).view(n, H, D)
        lens = [p.query_len for p in meta.prefills]
        cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))])
        tables = torch.stack([p.block_ids for p in meta.prefills])
        ctx = torch.tensor([p.context_len for p in meta.prefills])
        ref = prefill_attention_ref(q.double(), backend.k_cache[0], backend.v_cache[0], tables, cu, ctx, D ** -0.5, BS)
        return float((out.double() - ref).norm() / ref.norm())

    fresh = AttentionMetadata(torch.cat([torch.arange(16, 28), torch.arange(32, 40)]), 0,
                              torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long),
                              [PrefillSlice(0, 12, 12, torch.tensor([1])), PrefillSlice(12, 8, 8, torch.tensor([2]))])
    assert run(fresh, 20) < 1e-5
    assert stand_in.calls == 1
    # A second chunk of the first sequence attends to its 12 cached tokens: Triton's kernel.
    chunk = AttentionMetadata(torch.arange(28, 32), 0, torch.zeros(0, dtype=torch.long),
                              torch.zeros(0, 0, dtype=torch.long), [PrefillSlice(0, 4, 16, torch.tensor([1]))])
    assert run(chunk, 4) < 1e-5
    assert stand_in.calls == 1
