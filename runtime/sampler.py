"""Sampling on the device for a mixed batch: each row carries its own settings.

Order, as transformers' logits processors apply them: repetition penalty (prompt + output tokens),
presence/frequency penalties (output tokens), then for sampled rows temperature -> top-k -> top-p -> min-p,
then a draw, ``argmax(p / E)`` with E ~ Exp(1) from runtime/sampling_noise.py (seeded per request). Greedy rows
(temperature 0) take the argmax of the penalised logits. Rows with a grammar (structured output) arrive already
masked to -inf outside it (runtime/structured_output.py), so every step here keeps to it.

No full-vocabulary sort in the common case. A batch is split by what its rows need (``SamplingPlan``, decided on
the host when the batch is built):
- greedy rows: one argmax;
- top-k rows (the common case: Qwen's generation_config sets top_k 20): ``topk`` of a window a little wider than
  the largest k, then temperature, top-p and min-p on the window only, and noise for the window's tokens only;
- rows with top-k off: top-p needs the sorted row (the one case that sorts), min-p alone needs only the row's
  maximum, and neutral rows (temperature only) skip filtering.
The window computes what the full-row sort did (the same softmax over the same values, the same ascending
cumulative sum), so a seed draws the same token as before wherever the support is the same. Tokens that tie the
k-th value exactly all stay in the support, as in transformers, and with bf16 logits such ties are frequent (on
the demo model, a window of k+1 would miss tied tokens in 17% of rows at k=20), hence the window's slack; rows
whose ties may still reach past it are flagged (the window's last value equals the k-th) and redrawn on the full
row after the step's token read-back, so a tie costs a second sync only when it happens.

Per-batch constants (row groups, settings in the shapes the ops want, noise keys for the next 64 output indices)
are computed once and cached on the batch's SamplingTensors: a decode step runs ~40 small ops for a top-k batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from qwen2_triton.runtime.row_select import argmax, largest
from qwen2_triton.runtime.sampling_noise import (KEY_BLOCK, bits_to_exponential, exponential_noise, key_block,
                                                noise_at, race)

__all__ = ["SamplingPlan", "SamplingTensors", "apply_penalties", "bits_to_exponential", "draw", "exponential_noise",
           "filter_logits", "make_plan", "noise_at", "sample", "top_logprobs", "window_width"]

ALL = "all"  # a row group that is the whole batch (no gather needed)


@dataclass
class SamplingPlan:
    """Host-side facts about a batch, decided when it was built (a step never reads settings back from the
    device). Row groups: (n,) int64 index tensors on the logits' device, None when empty, ``ALL`` for every row."""
    greedy_rows: object = None  # temperature 0
    window_rows: object = None  # sampled, top-k on: the topk-window path
    full_rows: object = None  # sampled, top-k off (or k too large for a window)
    window: int = 0  # topk width for window rows: the largest k plus slack for ties
    window_k: int = 0  # the k every window row has (the common case: one generation_config), 0 when they differ
    window_top_p: bool = False  # some window row has top_p < 1
    window_min_p: bool = False
    full_top_p: bool = False  # some full row has top_p < 1: those rows are sorted
    full_min_p: bool = False
    repetition: bool = False  # some row has repetition_penalty != 1
    frequency: bool = False  # some row has presence or frequency penalty != 0
    masked: bool = False  # some row has a grammar mask: mostly -inf (runtime/row_select.py ``largest``)

    @property
    def all_greedy(self) -> bool:
        return self.greedy_rows is ALL


@dataclass
class SamplingTensors:
    """Per-row settings, (B,) each, on the logits' device."""
    temperature: torch.Tensor  # float32, 0 = greedy
    top_k: torch.Tensor  # int64, vocab size (or more) when off
    top_p: torch.Tensor  # float32
    min_p: torch.Tensor  # float32
    repetition_penalty: torch.Tensor  # float32
    presence_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    seeds: torch.Tensor  # int64 in [0, 2^32)
    steps: torch.Tensor  # int64: output index of the token being drawn, at step_offset 0
    # Penalty state, either dense (B, V) tables ...
    seen_mask: torch.Tensor | None = None  # (B, V) bool: token in prompt or output (repetition penalty)
    output_counts: torch.Tensor | None = None  # (B, V) float32: occurrences in the output so far
    # ... or per row the token ids of prompt + output, padded with a token of the row (runtime/token_history.py)
    history_ids: torch.Tensor | None = None  # (B, L) int64
    history_counts: torch.Tensor | None = None  # (B, L) float32: output occurrences of each history_ids token
    plan: SamplingPlan | None = None  # None: derived from these tensors (one host sync; for tests and tools)
    step_offset: int = 0  # draws since ``steps`` was read: a row's output index is steps + step_offset
    cache: dict = field(default_factory=dict, repr=False)  # per-batch constants, built on first use

    def rows(self, idx: torch.Tensor) -> "SamplingTensors":
        """These settings for a subset of rows (no plan, no cache: they are per batch)."""
        kw = {f.name: getattr(self, f.name)[idx] for f in fields(self)
              if isinstance(getattr(self, f.name), torch.Tensor)}
        return SamplingTensors(**kw, step_offset=self.step_offset)

    def keys(self) -> torch.Tensor:
        """(B,) noise keys of the rows' current output indices, from a cached block of KEY_BLOCK."""
        block, off = divmod(self.step_offset, KEY_BLOCK)
        cached = self.cache.get("keys")
        if cached is None or cached[0] != block:
            cached = self.cache["keys"] = (block, key_block(self.seeds, self.steps, block))
        return cached[1][:, off]

    def const(self, name: str, make):
        """A per-batch constant: ``make()`` once, then the cached value."""
        value = self.cache.get(name)
        if value is None:
            value = self.cache[name] = make()
        return value


def apply_penalties(logits: torch.Tensor, t: SamplingTensors, inplace: bool = False) -> torch.Tensor:
    """Penalised logits. A new tensor unless ``inplace`` (then written into ``logits``); ``logits`` itself when no
    row has a penalty."""
    if t.history_ids is not None:
        return _apply_penalties_sparse(logits, t, inplace)
    if t.seen_mask is not None:
        p = t.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(t.seen_mask, penalised, logits)
    if t.output_counts is not None:
        logits = logits - t.frequency_penalty[:, None] * t.output_counts \
            - t.presence_penalty[:, None] * (t.output_counts > 0).float()
    return logits


def _apply_penalties_sparse(logits: torch.Tensor, t: SamplingTensors, inplace: bool) -> torch.Tensor:
    """The dense form's arithmetic on the history's columns only: O(B x L) instead of several passes over (B, V).
    A token listed twice (or the padding, a repeat of one of the row's tokens) computes the same value from the
    same inputs, so the scatter's duplicate writes agree."""
    ids = t.history_ids
    x = logits.gather(1, ids)  # (B, L)
    if t.plan is None or t.plan.repetition:  # every listed token is in prompt + output
        p = t.const("rep", lambda: t.repetition_penalty[:, None])
        x = torch.where(x > _zero(t, x.device), x / p, x * p)
    if t.history_counts is not None:
        c = t.history_counts
        x = x - t.frequency_penalty[:, None] * c - t.presence_penalty[:, None] * (c > 0).float()
    return (logits if inplace else logits.clone()).scatter_(1, ids, x)


# Slack of the top-k window past the largest k: ties with the k-th value that reach past it send the row to the
# full-row redo. On the demo model's bf16 logits, a window of k+1 left ties outside in 17% of rows at k=20 and
# 56% at k=50; k+4 in 0-5%; k+8 in none of 41 rows. k + 16 + k/2 also covers larger k (denser values there).
def window_width(k_max: int, vocab: int) -> int:
    return min(vocab, k_max + 16 + k_max // 2)


# A window wider than this fraction of the vocabulary is no cheaper than sorting: such rows take the full path.
WINDOW_MAX_FRACTION = 0.25


def make_plan(temperature, top_k, top_p, min_p, vocab: int, device, repetition: bool = False,
              frequency: bool = False, masked: bool = False) -> SamplingPlan:
    """Split a batch into greedy, window and full rows from its settings (host arrays, one entry per row; top_k
    >= vocab or < 1 means off)."""
    temperature, top_k, top_p, min_p = (np.asarray(x) for x in (temperature, top_k, top_p, min_p))
    greedy = temperature == 0
    window = ~greedy & (top_k > 0) & (top_k < vocab) & \
        (np.minimum(vocab, top_k + 16 + top_k // 2) <= WINDOW_MAX_FRACTION * vocab)  # window_width, vectorised
    full = ~greedy & ~window
    n = len(temperature)

    def group(mask):
        count = int(mask.sum())
        if count == 0:
            return None
        if count == n:
            return ALL
        return torch.from_numpy(np.flatnonzero(mask)).to(device, non_blocking=True)

    return SamplingPlan(
        greedy_rows=group(greedy), window_rows=group(window), full_rows=group(full),
        window=window_width(int(top_k[window].max()), vocab) if window.any() else 0,
        window_k=int(top_k[window][0]) if window.any() and (top_k[window] == top_k[window][0]).all() else 0,
        window_top_p=bool((top_p[window] < 1).any()), window_min_p=bool((min_p[window] > 0).any()),
        full_top_p=bool((top_p[full] < 1).any()), full_min_p=bool((min_p[full] > 0).any()),
        repetition=repetition, frequency=frequency, masked=masked)


def plan_from_tensors(t: SamplingTensors, vocab: int) -> SamplingPlan:
    """The plan of a batch whose settings are only on the device (tests, tools): reads them back once."""
    temp, k, top_p, min_p = (x.cpu().numpy() for x in (t.temperature, t.top_k, t.top_p, t.min_p))
    rep = t.seen_mask is not None or (t.history_ids is not None and bool((t.repetition_penalty != 1).any()))
    return make_plan(temp, k, top_p, min_p, vocab, t.temperature.device, repetition=rep,
                     frequency=t.output_counts is not None or t.history_counts is not None)


# ------------------------------------------------------------------------------------------------------ filters
def _inf_where(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    return x.masked_fill_(drop, float("-inf"))


def _zero(t: SamplingTensors, device) -> torch.Tensor:
    """A 0-dim float32 zero: comparing with it costs half what a Python scalar does (wrapped per op, ~1 us)."""
    return t.const("zero", lambda: torch.zeros((), device=device))


def _safe_temperature(t: SamplingTensors) -> torch.Tensor:
    """(B, 1): the temperature, 1 for greedy rows."""
    return t.const("temp", lambda: torch.where(t.temperature > 0, t.temperature, 1.0)[:, None])


TAIL_MASS_MAX_WIDTH = 1024


def _tail_mass(t: SamplingTensors, width: int) -> torch.Tensor:
    """(B, width): 1 - top_p in every column but the last, -1 there (the top token always stays), so top-p's
    comparison runs on whole rows, no slices."""
    def make():
        m = (1 - t.top_p)[:, None].repeat(1, width)
        m[:, -1] = -1.0
        return m
    return t.const(("1-top_p", width), make)


def _top_p_min_p(asc: torch.Tensor, t: SamplingTensors, top_p: bool, min_p: bool) -> torch.Tensor:
    """asc: (B, N) temperature-scaled logits sorted ascending (top-k already -inf), written in place. Drops the low
    tail whose cumulative probability is <= 1 - top_p (the top token always stays), then tokens below min_p x
    the top probability: the arithmetic of transformers' TopPLogitsWarper and MinPLogitsWarper."""
    if top_p:
        cum = asc.softmax(-1).cumsum_(-1)
        if asc.shape[1] <= TAIL_MASS_MAX_WIDTH:  # a window: compare whole rows with a cached (B, width) constant
            _inf_where(asc, cum <= _tail_mass(t, asc.shape[1]))
        else:  # sorted full rows: no (B, V) constant
            _inf_where(asc[:, :-1], cum[:, :-1] <= t.const("1-top_p", lambda: (1 - t.top_p)[:, None]))
    if min_p:
        probs = asc.softmax(-1)
        _inf_where(asc, probs < t.const("min_p", lambda: t.min_p[:, None]) * probs[:, -1:])
    return asc


def filter_sorted(logits: torch.Tensor, t: SamplingTensors, top_p: bool = True, min_p: bool = True) -> torch.Tensor:
    """The full-row filter: temperature-scaled logits with -inf where top-k, top-p or min-p removes a token, by
    sorting every row. Only for rows that need it (top-k off with top_p < 1, and the rare tie redo)."""
    logits = logits / _safe_temperature(t)
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending, as transformers' top-p does
    # top-k: drop everything below the k-th largest value (ties with it stay, as in transformers)
    kth = sorted_logits.gather(-1, (V - t.top_k.clamp(1, V))[:, None])
    _inf_where(sorted_logits, sorted_logits < kth)
    _top_p_min_p(sorted_logits, t, top_p, min_p)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _filter_full(x: torch.Tensor, t: SamplingTensors, plan: SamplingPlan) -> torch.Tensor:
    """Rows with top-k off: sort only for top-p; min-p needs only the row's top probability."""
    if plan.full_top_p:
        return filter_sorted(x, t, min_p=plan.full_min_p)
    x = x / _safe_temperature(t)
    if plan.full_min_p:
        probs = x.softmax(-1)
        _inf_where(x, probs < t.const("min_p", lambda: t.min_p[:, None]) * probs.amax(-1, keepdim=True))
    return x  # neutral filters: temperature only


def _window(logits: torch.Tensor, t: SamplingTensors, width: int, top_p: bool, min_p: bool, masked: bool,
            k: int = 0):
    """Top-k rows on the ``width`` largest logits of each row. Returns the window's filtered logits and token ids,
    ascending (B, width), and (B, 1) bool: rows whose ties with the k-th value may reach past the window.
    ``k``: the k of every row when they share one (the k-th value is then a column, no gather), else 0."""
    vals, ids = largest(logits, width, mostly_equal=masked)  # descending
    asc = vals.flip(-1).div_(_safe_temperature(t))
    if 0 < k <= width:
        kth = asc.narrow(1, width - k, 1)  # a view: read before any write below
    else:
        kth = asc.gather(-1, t.const("kth", lambda: (width - t.top_k.clamp(1, width))[:, None]))
    # a tie past the window: the window's last value equals the k-th. Under a grammar mask not when both are -inf
    # (fewer tokens left than k: ties only with tokens of probability 0), where the difference is NaN; without
    # one no value is -inf, and one comparison does
    if width >= logits.shape[-1]:
        edge = None
    elif masked:
        edge = (asc.narrow(1, 0, 1) - kth) == _zero(t, asc.device)
    else:
        edge = asc.narrow(1, 0, 1) == kth
    drop = asc < kth  # computed before the masked fill: kth may be a view of asc
    _inf_where(asc, drop)
    return _top_p_min_p(asc, t, top_p, min_p), ids.flip(-1), edge


def _group(t: SamplingTensors, name: str, rows) -> SamplingTensors:
    """The settings of one row group, built once per batch."""
    if rows is ALL:
        return t
    cached = t.cache.get(name)
    if cached is None or cached[0] is not rows:
        cached = t.cache[name] = (rows, t.rows(rows))
    sub = cached[1]
    sub.step_offset = t.step_offset
    return sub


def _take(x: torch.Tensor, rows) -> torch.Tensor:
    return x if rows is ALL else x.index_select(0, rows)


def filter_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Temperature-scaled logits (B, V) with -inf where top-k, top-p or min-p removes a token: what a sampled row
    draws from, materialised (for tests; ``draw`` never builds the full rows of window rows). Greedy rows are
    returned unfiltered."""
    plan = t.plan or plan_from_tensors(t, logits.shape[-1])
    out = logits / _safe_temperature(t)
    if plan.window_rows is not None:
        rows = plan.window_rows
        tw = _group(t, "window", rows)
        x = _take(logits, rows)
        asc, ids, edge = _window(x, tw, plan.window, plan.window_top_p, plan.window_min_p, plan.masked,
                                 plan.window_k)
        part = torch.full_like(x, float("-inf")).scatter_(1, ids, asc)
        if edge is not None and bool(edge.any()):
            redo = torch.nonzero(edge[:, 0]).flatten()
            part[redo] = filter_sorted(x[redo], tw.rows(redo))
        out = _put(out, rows, part)
    if plan.full_rows is not None:
        out = _put(out, plan.full_rows, _filter_full(_take(logits, plan.full_rows),
                                                    _group(t, "full", plan.full_rows), plan))
    return out


def _put(out: torch.Tensor, rows, part: torch.Tensor) -> torch.Tensor:
    return part if rows is ALL else out.index_copy_(0, rows, part)


# --------------------------------------------------------------------------------------------------------- draw
@dataclass
class Draft:
    """A batch's drawn tokens before the read-back: (B,) int64 on the device, -1 for a window row whose ties with
    the k-th value may reach past its window (``resolve`` redraws those on the full row)."""
    tokens: torch.Tensor
    logits: torch.Tensor  # penalised
    t: SamplingTensors | None  # None: greedy rows without penalties (nothing to redo)
    flagged: bool = False  # some row may be -1

    def resolve(self) -> tuple[torch.Tensor, list[int]]:
        """(tokens on the device, the same as a host list): one device->host copy, a second only for a redo."""
        toks = self.tokens.tolist()
        if not self.flagged or min(toks) >= 0:
            return self.tokens, toks
        redo = [i for i, tok in enumerate(toks) if tok < 0]
        idx = torch.tensor(redo, dtype=torch.int64, device=self.tokens.device)
        probs = filter_sorted(self.logits.index_select(0, idx), self.t.rows(idx)).softmax(-1)
        fixed = race(probs, self.t.keys()[idx], torch.arange(probs.shape[-1], device=idx.device)).squeeze(1)
        for i, tok in zip(redo, fixed.tolist()):
            toks[i] = tok
        return self.tokens.index_copy(0, idx, fixed), toks


def draw(logits: torch.Tensor, t: SamplingTensors, writable: bool = False) -> Draft:
    """logits: (B, V) float32 raw model output -> the batch's Draft. ``writable``: the penalties may be applied in
    place (the engine's logits are the step's own); otherwise ``logits`` is left as it is."""
    plan = t.plan or plan_from_tensors(t, logits.shape[-1])
    logits = apply_penalties(logits, t, inplace=writable)
    if plan.all_greedy:
        return Draft(argmax(logits), logits, t)
    groups = [g for g in (plan.greedy_rows, plan.window_rows, plan.full_rows) if g is not None]
    tokens = None if len(groups) == 1 else torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    flagged = False
    if plan.greedy_rows is not None:
        tokens = _put(tokens, plan.greedy_rows, argmax(_take(logits, plan.greedy_rows)))
    if plan.window_rows is not None:
        rows = plan.window_rows
        tw = _group(t, "window", rows)
        asc, ids, edge = _window(_take(logits, rows), tw, plan.window, plan.window_top_p, plan.window_min_p,
                                plan.masked, plan.window_k)
        tok = ids.gather(1, race(asc.softmax(-1), tw.keys(), ids))
        if edge is not None:
            tok, flagged = tok.masked_fill_(edge, -1), True
        tokens = _put(tokens, rows, tok.squeeze(1))
    if plan.full_rows is not None:
        rows = plan.full_rows
        tf = _group(t, "full", rows)
        probs = _filter_full(_take(logits, rows), tf, plan).softmax(-1)
        vocab_ids = t.const("vocab_ids", lambda: torch.arange(logits.shape[-1], device=logits.device))
        tokens = _put(tokens, rows, race(probs, tf.keys(), vocab_ids).squeeze(1))
    return Draft(tokens, logits, t, flagged)


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits: (B, V) float32 raw model output (not written) -> (B,) int64 token ids."""
    return draw(logits, t).resolve()[0]


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int):
    """Per row: the chosen token's log-prob and the k best (ids, values). logprobs: (N, V)."""
    chosen_lp = logprobs.gather(-1, chosen[:, None]).squeeze(-1)
    if k > 0:
        vals, ids = logprobs.topk(k, dim=-1)
    else:
        vals = ids = None
    return chosen_lp, ids, vals
