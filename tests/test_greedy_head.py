"""Greedy decoding's LM head read from an int8 screen (kiln/kernels/cpu/greedy_head.cpp). Its
answer must be exactly the argmax of the bfloat16 logits the full head writes (gemv_bf16, whose
accuracy against float64 test_cpu_backend checks), the first index among ties, at every row
count: for random and adversarial weights, and for the real model's head on its own hidden
states. An engine with the screen must decode the same tokens as one without it."""

from __future__ import annotations

import pytest
import torch

from kiln.config import EngineConfig
from kiln.kernels import cpu_ops
from kiln.runtime.engine import Engine
from kiln.runtime.models.layers import Linear
from kiln.runtime.models.loader import cache_dir
from kiln.runtime.request import Request, SamplingParams

ROWS = [1, 2, 5, 15, 16, 17, 31, 32, 33, 48, 63, 64]


@pytest.fixture(scope="module")
def screen_kernel() -> None:
    """The kernel's tests need AMX-INT8 tiles; on a CPU without them kiln never builds the
    screen (KILN_CPU_GREEDY_HEAD has nothing to turn on) and always computes the logits."""
    assert cpu_ops.load(cache_dir()), "kiln's C++ kernels did not build"
    if not cpu_ops.greedy_head_supported():
        pytest.skip("the int8 screen runs on AMX-INT8 tiles, which this CPU lacks (kiln then computes logits)")


def _full(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return cpu_ops.argmax_rows(cpu_ops.gemv_bf16(x, packed))


def _weight(V: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, K, generator=g) * 0.05 * torch.rand(V, 1, generator=g)).bfloat16()


def _hidden(M: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, 3] *= 30  # an outlier channel, as a decoder's final hidden states have
    return x.bfloat16()


@pytest.mark.parametrize("seed", [0, 1])
def test_screen_gives_the_argmax_of_the_full_head(screen_kernel, seed):
    w = _weight(4096, 576, seed)
    packed, screen = cpu_ops.pack_gemv_bf16(w), cpu_ops.pack_greedy_head(w)
    for M in ROWS:
        x = _hidden(M, 576, seed * 100 + M)
        assert torch.equal(cpu_ops.greedy_head_bf16(x, packed, screen), _full(x, packed)), M


def test_screen_reads_strided_rows(screen_kernel):
    w = _weight(1024, 128, 3)
    packed, screen = cpu_ops.pack_gemv_bf16(w), cpu_ops.pack_greedy_head(w)
    x = _hidden(40, 256, 4)[:, :128]  # row stride 256
    assert torch.equal(cpu_ops.greedy_head_bf16(x, packed, screen), _full(x.contiguous(), packed))


def test_ties_go_to_the_first_index(screen_kernel):
    """Equal logits (copies of the winning row, in the same block and in later ones) and logits
    one bfloat16 step apart in the weights: the first maximum of the bf16 logits, as argmax."""
    V, K = 2048, 192
    w = _weight(V, K, 5).float()
    x = _hidden(64, K, 6).float()
    for m in range(64):  # every row of x has its own clear winner, copied
        v = 31 * m + 5
        w[v] = x[m] / x[m].norm() * 2
    w = w.bfloat16()
    w32 = w.clone()
    for m in range(0, 64, 2):
        v = 31 * m + 5
        w32[v + 3] = w[v]            # same block (or the next): exact tie
        w32[(v + 700) % V] = w[v]    # a later block: exact tie
        nudged = w[v].clone()
        nudged[m % K] = torch.nextafter(nudged[m % K].float(), torch.tensor(9.0)).bfloat16()
        w32[(v + 1301) % V] = nudged  # near tie: may round to the same bf16 logit
    packed, screen = cpu_ops.pack_gemv_bf16(w32), cpu_ops.pack_greedy_head(w32)
    xb = x.bfloat16()
    for M in (1, 7, 64):
        got = cpu_ops.greedy_head_bf16(xb[:M], packed, screen)
        assert torch.equal(got, _full(xb[:M], packed))
    logits = cpu_ops.gemv_bf16(xb, packed).float()
    tied = (logits == logits.amax(1, keepdim=True)).sum(1)
    assert (tied > 1).sum() >= 30  # the ties are real: several maxima in most even rows


def test_winners_the_int8_copy_ranks_wrongly(screen_kernel):
    """Logits of a few units over weights whose int8 step is coarse: each x reads only two
    channels (s, 1.37 s), where every row holds (a, d - a / 1.37) with |a| up to 0.5 and d
    small, while the other channels hold +-1 (setting the row's scale). The int8 copy's ranking is then mostly noise
    (its own argmax is wrong for most rows), and only the screen's error bounds keep the true
    winner among the candidates."""
    V, K, M = 2048, 128, 64
    g = torch.Generator().manual_seed(14)
    w = torch.randint(0, 2, (V, K), generator=g).float() * 2 - 1
    for p in range(4):
        a = torch.rand(V, generator=g) - 0.5
        w[:, 2 * p], w[:, 2 * p + 1] = a, torch.rand(V, generator=g) * 0.02 - a / 1.37
    w = w.bfloat16()
    x = torch.zeros(M, K)
    for m in range(M):
        x[m, 2 * (m % 4)] = 100 * (1 + m / 64)
        x[m, 2 * (m % 4) + 1] = 137 * (1 + m / 64)
    x = x.bfloat16()
    packed, screen = cpu_ops.pack_gemv_bf16(w), cpu_ops.pack_greedy_head(w)
    exact = _full(x, packed)
    for rows in (1, 9, 64):
        assert torch.equal(cpu_ops.greedy_head_bf16(x[:rows], packed, screen), exact[:rows]), rows
    q = screen.q.permute(0, 2, 1, 3).reshape(V, K).float() * screen.stats[0][:, None]
    approx = x.float() @ q.T
    wrong = approx.gather(1, exact[:, None]).squeeze(1) < approx.amax(1) - 0.1  # not a tie: a wrong order
    assert wrong.sum() >= M // 2


def test_a_row_that_is_not_finite_is_left_to_the_caller(screen_kernel):
    w = _weight(512, 64, 7)
    packed, screen = cpu_ops.pack_gemv_bf16(w), cpu_ops.pack_greedy_head(w)
    x = _hidden(5, 64, 8)
    x[1, 10] = float("nan")
    x[3, 0] = float("inf")
    got = cpu_ops.greedy_head_bf16(x, packed, screen)
    assert got[1] == -1 and got[3] == -1
    keep = [0, 2, 4]
    assert torch.equal(got[keep], _full(x, packed)[keep])
    head = Linear(64, 512)
    head.weight = None
    head.gemv, head.gemv_rows, head.greedy = packed, 64, screen
    assert head.greedy_argmax(x) is None  # the module computes the logits instead
    assert torch.equal(head.greedy_argmax(x[keep]), _full(x[keep], packed))
    assert head.greedy_argmax(_hidden(17, 64, 9)) is None  # past the rows where the screen pays
    assert torch.equal(head.greedy_argmax(_hidden(16, 64, 9)), _full(_hidden(16, 64, 9), packed))


def test_pack_bounds_hold_in_float64():  # plain torch: runs on any CPU
    V, K = 256, 128
    w = _weight(V, K, 10)
    screen = cpu_ops.pack_greedy_head(w)
    q = screen.q.permute(0, 2, 1, 3).reshape(V, K).double()  # back to [V, K]
    sw, alpha, beta = screen.stats.double()
    wq = q * sw[:, None]
    w64 = w.double()
    assert q.abs().max() <= 127
    assert ((w64 - wq).norm(dim=1) <= alpha).all() and ((w64 - wq).norm(dim=1) > 0).any()
    assert (wq.norm(dim=1) <= beta).all()
    assert ((w64 - wq).abs() <= sw[:, None] / 2 + 1e-12).all()  # round to nearest
    bad = w.clone()
    bad[3, 4] = float("inf")
    assert cpu_ops.pack_greedy_head(bad) is None
    assert cpu_ops.pack_greedy_head(w[:, :100]) is None  # K not a multiple of 64


def test_screen_refuses_bad_arguments(screen_kernel):
    w = _weight(256, 128, 11)
    packed, screen = cpu_ops.pack_gemv_bf16(w), cpu_ops.pack_greedy_head(w)
    x = _hidden(2, 128, 12)
    with pytest.raises(RuntimeError, match="1-64 rows"):
        cpu_ops.greedy_head_bf16(_hidden(65, 128, 1), packed, screen)
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_ops.greedy_head_bf16(x.float(), packed, screen)
    other = cpu_ops.pack_greedy_head(_weight(512, 128, 13))
    with pytest.raises(RuntimeError, match="q must be"):
        cpu_ops.greedy_head_bf16(x, packed, other)


@pytest.fixture(scope="module")
def hidden_states(screen_kernel):
    """The default model's final-norm hidden states over greedy decodes, with its LM head."""
    engine = Engine(EngineConfig(dtype="bfloat16", kv_cache_bytes=64 << 20))
    model = engine.model
    seen: list[torch.Tensor] = []
    head = model.head

    def record(h, greedy=False):
        seen.append(h.detach().clone())
        return head(h, greedy)

    model.head = record
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        prompt = torch.randint(100, 49000, (5 + 9 * i,), generator=g).tolist()
        engine.add_request(Request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)))
    while engine.has_work:
        engine.step()
    return torch.cat(seen), model.lm_head


def test_screen_on_the_real_head_gives_its_argmax(hidden_states):
    xs, head = hidden_states
    assert head.greedy is not None and len(xs) >= 250
    for M in ROWS:
        for start in range(0, len(xs) - M, 97):
            x = xs[start:start + M]
            assert torch.equal(cpu_ops.greedy_head_bf16(x, head.gemv, head.greedy), _full(x, head.gemv)), (M, start)
    # Against float64 (independent of kiln's kernels): each pick is a maximum up to bf16 rounding.
    w = head.gemv.permute(0, 2, 1, 3).reshape(head.gemv.shape[0] * 16, -1).double()
    logits = xs.double() @ w.T
    picks = torch.cat([cpu_ops.greedy_head_bf16(xs[s:s + 64], head.gemv, head.greedy) for s in range(0, len(xs), 64)])
    top = logits.amax(1)
    assert (logits.gather(1, picks[:, None]).squeeze(1) >= top - top.abs() * 2.0 ** -7 - 1e-3).all()
    assert (picks == logits.argmax(1)).float().mean() > 0.9


def _decode(monkeypatch, screen: str) -> tuple[dict[str, list[int]], int]:
    """Greedy requests (one with logprobs from step 3 on: its steps must compute logits) on an
    engine with or without the screen; their tokens and how often the screen answered."""
    monkeypatch.setenv("KILN_CPU_GREEDY_HEAD", screen)
    picks = []
    original = Linear.greedy_argmax

    def counted(self, x):
        out = original(self, x)
        picks.append(out is not None)
        return out

    monkeypatch.setattr(Linear, "greedy_argmax", counted)
    engine = Engine(EngineConfig(dtype="bfloat16", kv_cache_bytes=64 << 20))
    assert (engine.model.lm_head.greedy is not None) == (screen == "1")
    g = torch.Generator().manual_seed(1)
    out: dict[str, list[int]] = {}
    for i in range(6):
        prompt = torch.randint(100, 49000, (7 + 11 * i,), generator=g).tolist()
        engine.add_request(Request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)))
    steps = 0
    while engine.has_work:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        steps += 1
        if steps == 3:
            engine.add_request(Request("lp", [100, 200, 300], SamplingParams(temperature=0.0, max_tokens=5, logprobs=2)))
    monkeypatch.setattr(Linear, "greedy_argmax", original)
    return out, sum(picks)


def test_engine_decodes_the_same_tokens_with_the_screen(monkeypatch, screen_kernel):
    want, picked_off = _decode(monkeypatch, "0")
    got, picked_on = _decode(monkeypatch, "1")
    assert got == want and len(got) == 7
    assert picked_off == 0 and picked_on >= 10  # the screen answered the plain-greedy steps


def test_screen_setting_is_checked(monkeypatch, screen_kernel):
    monkeypatch.setenv("KILN_CPU_GREEDY_HEAD", "yes")
    with pytest.raises(ValueError, match="KILN_CPU_GREEDY_HEAD"):
        Engine(EngineConfig(dtype="bfloat16", kv_cache_bytes=64 << 20))
