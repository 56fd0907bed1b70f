"""Length-aware evaluation of a reward model on preference pairs: pure Python/torch statistics.

Stack Exchange votes favour long answers, so an RM's accuracy means little without the length
baselines beside it (Singhal et al. 2023, "A Long Way to Go"). Inputs are per pair: the RM margin
r_chosen − r_rejected and the *full* (untruncated) lengths of both answers. Lengths in characters
decide matching, bins and the length rule; token lengths give a second `longer_wins_tokens`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MATCHED_RATIO = 1.25  # a pair is length-matched when longer ≤ 1.25 × shorter
RATIO_BINS = (1.0, 1.25, 1.5, 2.0, 3.0, None)  # bin edges of longer/shorter; None = ∞


def length_ratio(a: float, b: float) -> float:
    """longer / shorter (≥ 1); an empty side against a non-empty one is ∞, two empty sides 1."""
    lo, hi = min(a, b), max(a, b)
    if lo <= 0:
        return 1.0 if hi <= 0 else math.inf
    return hi / lo


def _frac(num: float, den: float) -> float | None:
    return num / den if den else None


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's correlation of two equal-length sequences (None when either is constant or empty)."""
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def length_controlled(margins: Sequence[float], log_ratios: Sequence[float]) -> dict:
    """The RM margin with its linear dependence on log(len_chosen / len_rejected) removed.

    Fit m = β·ℓ by least squares without intercept (flipping a pair negates both m and ℓ, so the
    fit must be odd), then count pairs whose residual m − β·ℓ is > 0. By Frisch–Waugh–Lovell this
    residual is the part of the margin orthogonal to length: a pure length detector scores ≈ 0.5
    (ties count wrong), an RM that judges content keeps its accuracy. Also returns β and the
    uncentred correlation of margin with ℓ (the odd-symmetric analogue of Pearson's r).
    """
    sll = sum(x * x for x in log_ratios)
    sml = sum(m * x for m, x in zip(margins, log_ratios))
    smm = sum(m * m for m in margins)
    beta = sml / sll if sll else 0.0
    tol = 1e-9 * max((abs(m) for m in margins), default=0.0)  # a residual of rounding error is a tie
    resid = [m - beta * x for m, x in zip(margins, log_ratios)]
    corr = sml / math.sqrt(sll * smm) if sll and smm else 0.0
    return {
        "length_controlled_accuracy": _frac(sum(e > tol for e in resid), len(resid)),
        "length_slope": beta,
        "margin_length_corr": corr,
    }


def length_bins(
    margins: Sequence[float], ratios: Sequence[float], chosen_longer: Sequence[bool], edges=RATIO_BINS
) -> list[dict]:
    """Accuracy and "longer wins" per bin of longer/shorter ratio. Bin k holds edges[k] < r ≤ edges[k+1]
    (the first also r = edges[0]), so the first bin [1, 1.25] is exactly the length-matched pairs."""
    if edges[-1] is not None:  # an open last bin, so that every ratio falls in one
        edges = (*edges, None)
    which = [next(k for k, hi in enumerate(edges[1:]) if hi is None or r <= hi) for r in ratios]
    out = []
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        idx = [i for i, b in enumerate(which) if b == k]
        out.append(
            {
                "lo": lo,
                "hi": hi,
                "pairs": len(idx),
                "accuracy": _frac(sum(margins[i] > 0 for i in idx), len(idx)),
                "longer_wins": _frac(sum(chosen_longer[i] for i in idx), len(idx)),
            }
        )
    return out


def length_aware_metrics(
    margins: Sequence[float],
    chosen_chars: Sequence[int],
    rejected_chars: Sequence[int],
    chosen_tokens: Sequence[int] | None = None,
    rejected_tokens: Sequence[int] | None = None,
    matched_ratio: float = MATCHED_RATIO,
    edges=RATIO_BINS,
) -> dict:
    """Every length-aware number of one evaluation (see the module docstring); `bins` is a list.

    accuracy: margin > 0 (a tie is wrong); longer_wins: chosen strictly longer (chars / tokens), the
    score of the rule "pick the longer answer"; matched_*: pairs with longer ≤ matched_ratio × shorter;
    length_agreement: among pairs of unequal length, how often the RM prefers the longer answer
    (a tie of margins counts as not).
    """
    n = len(margins)
    if not (len(chosen_chars) == len(rejected_chars) == n):
        raise ValueError(f"{n} margins but {len(chosen_chars)}/{len(rejected_chars)} chosen/rejected lengths")
    wins = [m > 0 for m in margins]
    longer = [c > r for c, r in zip(chosen_chars, rejected_chars)]
    ratios = [length_ratio(c, r) for c, r in zip(chosen_chars, rejected_chars)]
    matched = [i for i in range(n) if ratios[i] <= matched_ratio]
    unequal = [i for i in range(n) if chosen_chars[i] != rejected_chars[i]]
    agree = sum((margins[i] > 0) == longer[i] and margins[i] != 0 for i in unequal)
    log_ratios = [math.log(max(c, 1) / max(r, 1)) for c, r in zip(chosen_chars, rejected_chars)]
    out = {
        "pairs": n,
        "accuracy": _frac(sum(wins), n),
        "ties": _frac(sum(m == 0 for m in margins), n),
        "margin": _frac(sum(margins), n),
        "longer_wins": _frac(sum(longer), n),
        "matched_pairs": len(matched),
        "matched_accuracy": _frac(sum(wins[i] for i in matched), len(matched)),
        "matched_longer_wins": _frac(sum(longer[i] for i in matched), len(matched)),
        "length_agreement": _frac(agree, len(unequal)),
        **length_controlled(margins, log_ratios),
    }
    if chosen_tokens is not None and rejected_tokens is not None:
        out["longer_wins_tokens"] = _frac(sum(c > r for c, r in zip(chosen_tokens, rejected_tokens)), n)
    out["bins"] = length_bins(margins, ratios, longer, edges)
    return out
