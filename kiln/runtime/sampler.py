"""Batched token sampling with per-row parameters.

One batch mixes any combination of greedy, sampled, seeded and penalized rows. The order
of operations for one row is:

1. penalties (repetition, then frequency/presence) on the raw logits,
2. greedy rows: argmax of the penalized logits,
3. sampled rows: temperature -> top-k -> top-p -> min-p (Hugging Face's warpers, same
   order and semantics), softmax, then one draw by the "exponential race":
   argmax(probs / E) with E ~ Exponential(1) i.i.d., which picks token i with
   probability probs[i] and vectorises over rows.

Seeded rows draw their noise from their own ``torch.Generator`` seeded from
``(seed, len(output_token_ids))``, so their tokens do not depend on what else is in the
batch nor on their position in it. The noise streams of CPU and CUDA generators differ,
so a seed reproduces on the same kind of device only.

Logprobs are those of the *raw* model logits (before penalties, temperature and
filters), as vLLM returns by default: ``log_softmax(raw)[chosen]`` and the top N of that
same distribution, best first.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kiln.kernels import cpu_ops
from kiln.runtime.request import SamplingParams, TokenLogprob

__all__ = ["SamplerRow", "SamplerOutput", "apply_penalties", "apply_filters", "plain_greedy", "sample"]

_NEG_INF = float("-inf")
_SEED_MULT = 1_000_003
_SEED_MASK = (1 << 63) - 1


@dataclass
class SamplerRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far for this request


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # None for rows whose params.logprobs is None


def plain_greedy(params: SamplingParams) -> bool:
    """Whether a row's token is the argmax of its raw logits with nothing else read from them
    (no temperature, penalties or logprobs): the model may then pick it without writing them."""
    return params.temperature == 0.0 and not params.uses_penalties and params.logprobs is None


def row_seed(seed: int, step: int) -> int:
    """The generator seed of a seeded row at decoding step ``step`` (tokens generated so far)."""
    return (seed * _SEED_MULT + step) & _SEED_MASK


# --------------------------------------------------------------------------- penalties


def apply_penalties(logits: Tensor, rows: Sequence[SamplerRow]) -> Tensor:
    """Apply repetition, frequency and presence penalties; returns a new float32 tensor.

    * repetition (Hugging Face semantics) over prompt + output tokens: a logit > 0 is
      divided by the penalty, otherwise multiplied by it;
    * frequency and presence (OpenAI semantics) over output tokens only:
      ``logit -= frequency * count + presence * (count > 0)``.

    Rows whose params use no penalty are left untouched. ``logits`` is not modified.
    """
    out = logits.float()
    idx = [i for i, r in enumerate(rows) if r.params.uses_penalties]
    if not idx:
        return out
    device = out.device
    vocab = out.shape[-1]
    prow = [rows[i] for i in idx]
    all_rows = len(idx) == len(rows)
    idx_t = None if all_rows else torch.tensor(idx, device=device)
    x = out if all_rows else out[idx_t]
    n = len(prow)

    rep = [r.params.repetition_penalty for r in prow]
    if any(p != 1.0 for p in rep):
        lens = [len(r.prompt_token_ids) + len(r.output_token_ids) for r in prow]
        toks = torch.tensor(
            list(itertools.chain.from_iterable(
                itertools.chain(r.prompt_token_ids, r.output_token_ids) for r in prow
            )),
            dtype=torch.long,
            device=device,
        )
        ridx = torch.repeat_interleave(
            torch.arange(n, device=device), torch.tensor(lens, dtype=torch.long, device=device)
        )
        seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
        seen[ridx, toks] = True
        pen = torch.tensor(rep, dtype=torch.float32, device=device)[:, None]
        penalized = torch.where(x > 0, x / pen, x * pen)
        x = torch.where(seen, penalized, x)

    freq = [r.params.frequency_penalty for r in prow]
    pres = [r.params.presence_penalty for r in prow]
    if any(f != 0.0 for f in freq) or any(p != 0.0 for p in pres):
        lens = [len(r.output_token_ids) for r in prow]
        toks = torch.tensor(
            list(itertools.chain.from_iterable(r.output_token_ids for r in prow)),
            dtype=torch.long,
            device=device,
        )
        ridx = torch.repeat_interleave(
            torch.arange(n, device=device), torch.tensor(lens, dtype=torch.long, device=device)
        )
        counts = torch.zeros(n, vocab, dtype=torch.float32, device=device)
        counts.index_put_(
            (ridx, toks),
            torch.ones(toks.numel(), dtype=torch.float32, device=device),
            accumulate=True,
        )
        f_t = torch.tensor(freq, dtype=torch.float32, device=device)[:, None]
        p_t = torch.tensor(pres, dtype=torch.float32, device=device)[:, None]
        x = x - (f_t * counts + p_t * (counts > 0).float())

    if all_rows:
        return x  # every op above was out of place: ``logits`` is untouched
    if out is logits:
        out = out.clone()
    out[idx_t] = x
    return out


# --------------------------------------------------------------------------- filters


def apply_filters(
    logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor
) -> Tensor:
    """Temperature, top-k, top-p and min-p per row, as Hugging Face's warpers do them.

    ``logits`` is [B, V] float32; ``temperature``, ``top_p``, ``min_p`` are float tensors
    [B] and ``top_k`` a long tensor [B] (0 disables it; top_p == 1 and min_p == 0 disable
    theirs). Returns a new tensor with filtered tokens set to -inf. Rows must have
    temperature > 0 (greedy rows are not filtered).

    ``top_p`` may be float64: the threshold ``1 - top_p`` is then computed in float64
    before rounding to float32, exactly like Hugging Face's ``TopPLogitsWarper``.
    """
    vocab = logits.shape[-1]
    use_t = bool((temperature != 1.0).any())
    kmax = min(int(top_k.max()), vocab) if top_k.numel() else 0
    use_p = bool((top_p < 1.0).any())
    use_m = bool((min_p > 0.0).any())
    return _filters(
        logits,
        temperature if use_t else None,
        top_k if kmax > 0 else None,
        kmax,
        top_p if use_p else None,
        min_p if use_m else None,
    )


def _filters(
    x: Tensor,
    temperature: Tensor | None,
    top_k: Tensor | None,
    kmax: int,
    top_p: Tensor | None,
    min_p: Tensor | None,
) -> Tensor:
    """apply_filters with the unused filters given as None (no device syncs)."""
    vocab = x.shape[-1]
    device = x.device
    if temperature is not None:  # TemperatureLogitsWarper
        x = x / temperature.to(device=device, dtype=x.dtype)[:, None]

    if top_p is not None:
        # One ascending sort serves top-k and top-p.
        sorted_vals, sorted_idx = torch.sort(x, dim=-1)
        if top_k is not None:  # TopKLogitsWarper: drop tokens below the k-th largest value
            kk = top_k.to(device).clamp(max=vocab)
            pos = torch.where(kk > 0, vocab - kk, torch.zeros_like(kk))  # k = 0: the minimum
            thresh = sorted_vals.gather(1, pos[:, None])
            x = x.masked_fill(x < thresh, _NEG_INF)
            # Sorting the filtered scores would give exactly these values.
            sorted_vals = sorted_vals.masked_fill(sorted_vals < thresh, _NEG_INF)
        # TopPLogitsWarper: remove where the ascending cumsum <= 1 - p, keep the top token.
        cum = sorted_vals.softmax(dim=-1).cumsum(dim=-1)
        top_p = top_p.to(device)
        thr = (1.0 - top_p.double()).to(cum.dtype)
        remove = (cum <= thr[:, None]) & (top_p < 1.0)[:, None]
        remove[:, -1] = False
        x = x.masked_fill(remove.scatter(1, sorted_idx, remove), _NEG_INF)
    elif top_k is not None:  # top-k alone: a partial topk is cheaper than a full sort
        kk = top_k.to(device).clamp(max=vocab)
        vals = torch.topk(x, kmax, dim=-1).values
        thresh = vals.gather(1, (kk - 1).clamp(min=0)[:, None])
        thresh = thresh.masked_fill((kk <= 0)[:, None], _NEG_INF)
        x = x.masked_fill(x < thresh, _NEG_INF)

    if min_p is not None:  # MinPLogitsWarper
        probs = x.softmax(dim=-1)
        scaled = min_p.to(device=device, dtype=probs.dtype)[:, None] * probs.amax(-1, keepdim=True)
        # min_p <= 1, so the most likely token is never below the threshold: one is kept.
        x = x.masked_fill(probs < scaled, _NEG_INF)
    return x


# --------------------------------------------------------------------------- sampling


def sample(logits: Tensor, rows: Sequence[SamplerRow]) -> SamplerOutput:
    """Pick one token per row of ``logits`` ([len(rows), V], any float dtype)."""
    n = len(rows)
    params = [r.params for r in rows]
    if all(plain_greedy(p) for p in params):  # hot path (also n == 0)
        return SamplerOutput(_argmax(logits).tolist(), [None] * n)
    any_pen = False
    any_lp = False
    for p in params:
        if p.uses_penalties:
            any_pen = True
        if p.logprobs is not None:
            any_lp = True

    device = logits.device
    raw = logits.float()
    x = apply_penalties(raw, rows) if any_pen else raw

    s_idx = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if len(s_idx) == n:
        tokens = _sample_rows(x, rows)
    else:
        tokens = _argmax(x)  # greedy rows: argmax of the penalized logits
        if s_idx:
            s_t = torch.tensor(s_idx, device=device)
            tokens[s_t] = _sample_rows(x[s_t], [rows[i] for i in s_idx])
    token_ids = tokens.tolist()

    logprobs: list[TokenLogprob | None] = [None] * n
    if any_lp:
        lp_idx = [i for i, p in enumerate(params) if p.logprobs is not None]
        if len(lp_idx) == n:
            lp_raw, lp_tok = raw, tokens
        else:
            it = torch.tensor(lp_idx, device=device)
            lp_raw, lp_tok = raw[it], tokens[it]
        lp = torch.log_softmax(lp_raw, dim=-1)
        chosen = lp.gather(1, lp_tok[:, None]).squeeze(1).tolist()
        max_n = max(params[i].logprobs for i in lp_idx)
        if max_n > 0:
            tv, ti = torch.topk(lp, max_n, dim=-1)
            tv, ti = tv.tolist(), ti.tolist()
        for j, i in enumerate(lp_idx):
            k = params[i].logprobs
            top = list(zip(ti[j][:k], tv[j][:k])) if k else []
            logprobs[i] = TokenLogprob(token_id=token_ids[i], logprob=chosen[j], top=top)
    return SamplerOutput(token_ids, logprobs)


def _sample_rows(xs: Tensor, rows: Sequence[SamplerRow]) -> Tensor:
    """Filter and draw one token per row; every row has temperature > 0."""
    sp = [r.params for r in rows]
    device = xs.device
    vocab = xs.shape[-1]

    temps = [p.temperature for p in sp]
    ks = [p.top_k for p in sp]
    ps = [p.top_p for p in sp]
    ms = [p.min_p for p in sp]
    kmax = min(max(ks), vocab)
    xs = _filters(
        xs,
        torch.tensor(temps, dtype=torch.float32, device=device)
        if any(t != 1.0 for t in temps) else None,
        torch.tensor(ks, dtype=torch.long, device=device) if kmax > 0 else None,
        kmax,
        torch.tensor(ps, dtype=torch.float64, device=device) if any(p < 1.0 for p in ps) else None,
        torch.tensor(ms, dtype=torch.float32, device=device) if any(m > 0.0 for m in ms) else None,
    )
    probs = xs.softmax(dim=-1)

    # Exponential race: argmax(probs / E), E ~ Exp(1), draws token i with probability probs[i].
    q = torch.empty_like(probs)
    seeded = [(j, p.seed) for j, p in enumerate(sp) if p.seed is not None]
    if len(seeded) < len(sp):
        q.exponential_()
    for j, seed in seeded:
        gen = torch.Generator(device=device)
        gen.manual_seed(row_seed(seed, len(rows[j].output_token_ids)))
        q[j].exponential_(generator=gen)
    # Guard against E == 0 (0/0 = NaN would win the argmax).
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return _argmax(probs.div_(q))


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row argmax (first index of the maximum, as argmax). On the CPU kiln's kernel where it is
    built (64 x 49152 float32: ~0.3 vs 1.2 ms for torch's max(dim), bench/RESULTS.md), else
    torch's max(dim), ~2.5x faster than argmax over a vocabulary-wide row."""
    if x.device.type != "cpu":
        return x.argmax(dim=-1)
    if x.dim() == 2 and x.dtype in _ARGMAX_DTYPES and x.stride(-1) == 1 and x.shape[-1] and cpu_ops.has_argmax_rows():
        return cpu_ops.argmax_rows(x)
    return x.max(dim=-1).indices


_ARGMAX_DTYPES = (torch.float32, torch.bfloat16)
