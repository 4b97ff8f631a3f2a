"""Tests for kiln.runtime.sampler (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kiln.runtime.request import SamplingParams
from kiln.runtime.sampler import (
    SamplerRow,
    apply_filters,
    apply_penalties,
    sample,
)

V = 1000


def row(prompt=(), output=(), **kw) -> SamplerRow:
    return SamplerRow(SamplingParams(**kw), list(prompt), list(output))


# --------------------------------------------------------------------------- filters


def hf_filter_row(logits_row: torch.Tensor, t: float, k: int, p: float, m: float) -> torch.Tensor:
    """Hugging Face's warpers in generate()'s order; disabled filters are not added."""
    scores = logits_row[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    if t != 1.0:
        scores = TemperatureLogitsWarper(t)(ids, scores)
    if k > 0:
        scores = TopKLogitsWarper(k)(ids, scores)
    if p < 1.0:
        scores = TopPLogitsWarper(p)(ids, scores)
    if m > 0.0:
        scores = MinPLogitsWarper(m)(ids, scores)
    return scores[0]


# (temperature, top_k, top_p, min_p); includes rows with every filter disabled.
SETTINGS = [
    (1.0, 0, 1.0, 0.0),
    (0.7, 0, 1.0, 0.0),
    (1.0, 50, 1.0, 0.0),
    (1.3, 0, 0.9, 0.0),
    (1.0, 0, 1.0, 0.1),
    (0.5, 20, 0.8, 0.0),
    (0.8, 100, 0.95, 0.05),
    (2.0, 0, 0.5, 0.02),
    (1.0, 1, 1.0, 0.0),
    (0.9, 5000, 0.99, 0.0),  # top_k > V
    (1.1, 0, 0.3, 0.3),
    (1.0, 10, 1.0, 0.2),
]


def _check_against_hf(logits: torch.Tensor, settings) -> None:
    t = torch.tensor([s[0] for s in settings], dtype=torch.float32)
    k = torch.tensor([s[1] for s in settings], dtype=torch.long)
    p = torch.tensor([s[2] for s in settings], dtype=torch.float64)
    m = torch.tensor([s[3] for s in settings], dtype=torch.float32)
    got = apply_filters(logits, t, k, p, m)
    assert got.shape == logits.shape
    for i, s in enumerate(settings):
        ref = hf_filter_row(logits[i], *s)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(ref)), f"mask differs, row {i} {s}"
        fin = torch.isfinite(ref)
        assert fin.any()
        torch.testing.assert_close(got[i][fin], ref[fin], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_filters_match_transformers_mixed_batch(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(SETTINGS), V, generator=g) * 3
    # Tokens whose probability underflows to 0: a disabled top-p (row 0, top_p == 1, in a
    # batch where other rows use top-p) must not remove them, as HF adds no warper then.
    logits[0, :3] = -200.0
    _check_against_hf(logits, SETTINGS)


@pytest.mark.parametrize("seed", [10, 11])
@pytest.mark.parametrize("setting", SETTINGS)
def test_filters_match_transformers_uniform_batch(seed, setting):
    # Every row with the same setting exercises each code path on its own (e.g. top-k only
    # uses topk instead of a sort, no min-p anywhere, ...).
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, V, generator=g) * 2
    _check_against_hf(logits, [setting] * 4)


def test_filters_actually_filter():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5))
    out = apply_filters(
        logits,
        torch.tensor([1.0, 1.0, 1.0]),
        torch.tensor([0, 7, 0]),
        torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
        torch.tensor([0.0, 0.0, 0.0]),
    )
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    assert torch.equal(out[0], logits[0])
    assert int(torch.isfinite(out[1]).sum()) == 7
    assert set(torch.nonzero(torch.isfinite(out[1])).flatten().tolist()) == set(
        torch.topk(logits[1], 7).indices.tolist()
    )


def test_top_p_tiny_keeps_top_token():
    # 1 - 1e-8 rounds to 1.0 in float32, so the cumsum test alone would remove every token.
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(6))
    out = apply_filters(
        logits,
        torch.ones(2),
        torch.zeros(2, dtype=torch.long),
        torch.tensor([1e-8, 1e-8], dtype=torch.float64),
        torch.zeros(2),
    )
    for i in range(2):
        kept = torch.nonzero(torch.isfinite(out[i])).flatten().tolist()
        assert kept == [int(logits[i].argmax())]
        ref = hf_filter_row(logits[i], 1.0, 0, 1e-8, 0.0)
        assert kept == torch.nonzero(torch.isfinite(ref)).flatten().tolist()


def test_top_p_exact_boundary_matches_transformers():
    # Pick top_p so that 1 - top_p equals a cumsum value exactly: HF removes that token
    # (cumsum <= 1 - p), which pins both the comparison and how the threshold is rounded.
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 200, generator=g) * 2
    temps = [1.0, 0.8, 1.0, 1.3, 0.6, 1.0]
    settings = []
    for i, t in enumerate(temps):
        scaled = logits[i] / t if t != 1.0 else logits[i]
        cum = torch.sort(scaled[None]).values.softmax(-1).cumsum(-1)[0]
        c = cum[150 + 5 * i].item()  # a float32 value, so 1 - c is exact in float64
        settings.append((t, 0, 1.0 - c, 0.0))
    _check_against_hf(logits, settings)
    ref = hf_filter_row(logits[0], *settings[0])
    assert int(torch.isinf(ref).sum()) == 151  # the boundary token itself was removed


def test_min_p_exact_boundary_matches_transformers():
    # Pick min_p so that min_p * max_prob equals a token's probability exactly: HF keeps it
    # (it removes probs < threshold only).
    g = torch.Generator().manual_seed(14)
    logits = torch.randn(4, 100, generator=g)
    settings = []
    for i in range(4):
        probs = logits[i].softmax(-1)
        top = probs.max()
        m = None
        for j in torch.argsort(probs, descending=True)[5:].tolist():
            cand = torch.tensor(probs[j].item() / top.item(), dtype=torch.float32)
            if cand * top == probs[j]:
                m = cand.item()
                break
        assert m is not None
        settings.append((1.0, 0, 1.0, m))
    _check_against_hf(logits, settings)


# --------------------------------------------------------------------------- penalties


def reference_penalties(logits: torch.Tensor, rows) -> torch.Tensor:
    out = logits.double().clone()
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            for tok in set(r.prompt_token_ids) | set(r.output_token_ids):
                v = out[i, tok].item()
                out[i, tok] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        counts: dict[int, int] = {}
        for tok in r.output_token_ids:
            counts[tok] = counts.get(tok, 0) + 1
        for tok, c in counts.items():
            out[i, tok] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    return out


def test_penalties_match_reference():
    g = torch.Generator().manual_seed(7)
    vocab = 50
    logits = torch.randn(5, vocab, generator=g) * 3

    def toks(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    rows = [
        row(toks(10), toks(15), repetition_penalty=1.3),
        row(toks(10), toks(15)),  # no penalty: untouched
        row(toks(10), toks(30), frequency_penalty=0.7, presence_penalty=-0.4),
        row(
            toks(5), toks(20), repetition_penalty=0.8, frequency_penalty=-1.1, presence_penalty=1.5
        ),
        row(toks(8), [], repetition_penalty=1.2, frequency_penalty=0.5),  # nothing generated yet
    ]
    before = logits.clone()
    got = apply_penalties(logits, rows)
    assert torch.equal(logits, before), "input modified"
    ref = reference_penalties(logits, rows)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], logits[1])
    # The penalties changed something on every penalized row.
    for i in (0, 2, 3, 4):
        assert not torch.equal(got[i], logits[i])


def test_penalties_repeated_tokens_and_prompt_scope():
    vocab = 10
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0, 3.0, -1.0, 0.0, 0.0, 0.0]] * 2)
    rows = [
        # Frequency/presence look at output tokens only: the prompt token 5 is not counted.
        row([5, 5], [2, 2, 2, 1], frequency_penalty=0.5, presence_penalty=1.0),
        # Repetition looks at prompt and output, once per distinct token.
        row([0, 1], [3, 3], repetition_penalty=2.0),
    ]
    got = apply_penalties(logits, rows)
    exp0 = logits[0].clone()
    exp0[2] -= 0.5 * 3 + 1.0
    exp0[1] -= 0.5 * 1 + 1.0
    exp1 = logits[1].clone()
    exp1[0] = 1.0
    exp1[1] = -4.0
    exp1[3] = 0.25
    torch.testing.assert_close(got[0], exp0)
    torch.testing.assert_close(got[1], exp1)


def test_penalties_bf16_input():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(8)).bfloat16()
    rows = [row([1, 2], [3], repetition_penalty=1.5), row([4], [5, 5], frequency_penalty=1.0)]
    got = apply_penalties(logits, rows)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_penalties(logits.float(), rows))


# --------------------------------------------------------------------------- greedy / logprobs


def test_greedy_fast_path_is_argmax():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(9)).bfloat16()
    out = sample(logits, [row(temperature=0.0) for _ in range(6)])
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_uses_penalized_logits():
    logits = torch.zeros(2, 10)
    logits[:, 4] = 2.0
    logits[:, 7] = 1.9
    rows = [
        row([1], [4, 4], temperature=0.0, repetition_penalty=1.5),  # 2/1.5 < 1.9
        row([1], [4, 4], temperature=0.0),
    ]
    assert sample(logits, rows).token_ids == [7, 4]


def test_greedy_rows_in_mixed_batch_are_argmax():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(10))
    rows = [
        row(temperature=0.0),
        row(temperature=1.0, top_p=0.9),
        row(temperature=0.0),
        row(temperature=0.7, seed=3),
        row(temperature=0.0, logprobs=2),
        row(temperature=1.0, top_k=5),
    ]
    out = sample(logits, rows)
    am = logits.argmax(-1).tolist()
    for i in (0, 2, 4):
        assert out.token_ids[i] == am[i]
    # The top-k row stays within its 5 best tokens.
    assert out.token_ids[5] in torch.topk(logits[5], 5).indices.tolist()


def test_logprobs_values_and_top_lists():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(5, V, generator=g) * 2
    rows = [
        row(temperature=0.0, logprobs=3),
        row(temperature=0.0),  # no logprobs
        row(temperature=0.8, logprobs=0),
        row(
            [1, 2], [int(logits[3].argmax())], temperature=0.0, logprobs=20, repetition_penalty=2.0
        ),
        row(temperature=1.0, top_k=10, logprobs=5, seed=1),
    ]
    out = sample(logits, rows)
    ref = torch.log_softmax(logits.double(), -1)  # raw logits, before penalties/filters
    assert out.logprobs[1] is None
    for i, n in ((0, 3), (2, 0), (3, 20), (4, 5)):
        lp = out.logprobs[i]
        assert lp is not None
        assert lp.token_id == out.token_ids[i]
        assert math.isclose(lp.logprob, ref[i, lp.token_id].item(), abs_tol=1e-5)
        assert len(lp.top) == n
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True)
        assert [t for t, _ in lp.top] == torch.topk(ref[i], n).indices.tolist()
        for t, v in lp.top:
            assert math.isclose(v, ref[i, t].item(), abs_tol=1e-5)
    # Row 3: repetition penalty moved greedy off the raw argmax, yet the logprob is raw.
    assert out.token_ids[3] != int(logits[3].argmax())
    assert out.logprobs[3].top[0][0] == int(logits[3].argmax())


# --------------------------------------------------------------------------- seeds


def test_seeded_row_independent_of_batch():
    vocab = 300
    g = torch.Generator().manual_seed(12)
    steps = 6
    target = dict(temperature=0.9, top_p=0.95, seed=1234)
    step_logits = [torch.randn(vocab, generator=g) for _ in range(steps)]

    def run(build_batch):
        out_tokens: list[int] = []
        for s in range(steps):
            me = row([1, 2, 3], out_tokens, **target)
            rows, logits, pos = build_batch(me, step_logits[s], s)
            out_tokens.append(sample(logits, rows).token_ids[pos])
        return out_tokens

    def alone(me, lg, s):
        return [me], lg[None], 0

    def mixed(pos):
        def build(me, lg, s):
            others = [
                row(temperature=0.0),
                row(temperature=1.0),  # unseeded
                row(temperature=0.5, top_k=20, seed=99, output=[0] * s),
                row(temperature=1.2, min_p=0.1, frequency_penalty=0.5, output=[5, 6]),
                row(temperature=0.0, logprobs=2),
            ]
            rows = others[:pos] + [me] + others[pos:]
            other_logits = torch.randn(len(others), vocab, generator=g)
            logits = torch.cat([other_logits[:pos], lg[None], other_logits[pos:]])
            return rows, logits, pos
        return build

    ref = run(alone)
    for pos in (0, 2, 5):
        assert run(mixed(pos)) == ref
    # The seed matters, so the equality above is not vacuous.
    other = []
    for s in range(steps):
        other.append(
            sample(step_logits[s][None], [row([1], other, temperature=0.9, top_p=0.95, seed=4321)])
            .token_ids[0]
        )
    # Over 300 fairly flat tokens, two seeds agreeing on all 6 steps would be a fluke.
    assert other != ref


def test_seed_noise_depends_on_step():
    vocab = 1000
    logits = torch.zeros(1, vocab)  # uniform: the token is decided by the noise alone
    toks = [
        sample(logits, [row([], [0] * step, temperature=1.0, seed=7)]).token_ids[0]
        for step in range(5)
    ]
    assert len(set(toks)) > 1
    again = [
        sample(logits, [row([], [0] * step, temperature=1.0, seed=7)]).token_ids[0]
        for step in range(5)
    ]
    assert toks == again


# --------------------------------------------------------------------------- distribution


LOGITS8 = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def expected_probs(t: float, p: float) -> torch.Tensor:
    ref = hf_filter_row(LOGITS8, t, 0, p, 0.0)
    return torch.softmax(ref.double(), -1)


@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_distribution(seeded):
    t, p = 0.7, 0.9
    n = 20000 if not seeded else 8000
    exp = expected_probs(t, p)
    assert (exp == 0).any() and (exp > 0).sum() >= 3  # the filter removes some tokens
    torch.manual_seed(0)
    rows = [
        row(temperature=t, top_p=p, seed=(i if seeded else None)) for i in range(n)
    ]
    out = sample(LOGITS8.expand(n, -1), rows).token_ids
    counts = torch.bincount(torch.tensor(out), minlength=8).double()
    freq = counts / n
    assert counts[exp == 0].sum() == 0, "a filtered-out token was sampled"
    tol = 0.01 if not seeded else 0.016
    assert (freq - exp).abs().max() < tol, (freq, exp)
    # Chi-square over the kept tokens (df <= 7; 24.3 is the 0.999 quantile at df = 7).
    kept = exp > 0
    chi2 = (((counts[kept] - n * exp[kept]) ** 2) / (n * exp[kept])).sum().item()
    assert chi2 < 24.3, chi2
