"""Answer scores and preference pairs, as in Askell et al. 2021 / StackLLaMA / H4 stack-exchange-preferences.

Score of an answer (the rule quoted on the H4 dataset card): "log2(1 + upvotes) rounded to the nearest
integer, plus 1 if the answer was accepted by the questioner (we assign a score of -1 if the number of
upvotes is negative)". Decisions:

* `upvotes` is the dump's `Score` attribute (up minus down votes).
* A negative vote count gives -1 *whatever the acceptance*: the parenthesis overrides the whole formula
  (an accepted answer at -2 votes scores -1, not 0).
* Rounding: log2(1 + u) is irrational unless 1 + u is a power of two, so it is never exactly k + 0.5 for
  an integer u; Python's banker's `round` and round-half-up can therefore never disagree. We compute the
  value with integers only — round(log2(n)) == bit_length(n*n) // 2 — so no float error can creep in near
  the boundaries (n = 2^(k+1/2)).

Pairs: every two answers of a question with different scores; the higher score is `chosen`. When a
question has more than `max_pairs` such pairs, a seeded sample of `max_pairs` is kept (StackLLaMA: at
most 10 per question): the pairs with the smallest hash of (seed, site, question id, answer ids).
"""

from __future__ import annotations

from collections.abc import Sequence


def answer_score(upvotes: int, accepted: bool = False) -> int:
    """round(log2(1 + upvotes)) + 1 if accepted; -1 for negative upvotes (accepted or not)."""
    if upvotes < 0:
        return -1
    n = upvotes + 1
    return (n * n).bit_length() // 2 + (1 if accepted else 0)


def count_pairs(scores: Sequence[int]) -> int:
    """Number of answer pairs with different scores."""
    n = len(scores)
    total = n * (n - 1) // 2
    counts: dict[int, int] = {}
    for s in scores:
        counts[s] = counts.get(s, 0) + 1
    return total - sum(c * (c - 1) // 2 for c in counts.values())


def candidate_pairs(scores: Sequence[int]) -> list[tuple[int, int]]:
    """All (chosen_index, rejected_index) with scores[chosen] > scores[rejected], in (i, j), i < j order."""
    out = []
    n = len(scores)
    for i in range(n):
        si = scores[i]
        for j in range(i + 1, n):
            sj = scores[j]
            if si > sj:
                out.append((i, j))
            elif sj > si:
                out.append((j, i))
    return out


def sample_pairs(
    scores: Sequence[int], max_pairs: int, key: tuple = (), ids: Sequence | None = None
) -> list[tuple[int, int]]:
    """Candidate pairs, or `max_pairs` of them (kept in candidate order) when there are more; <= 0: all.

    The sample keeps the pairs with the smallest hash of (key, chosen id, rejected id) — `key` is
    (seed, site, question id) — so it is deterministic across runs and Python versions, and a pair's
    fate does not depend on the order of the answers (ids default to the indices).
    """
    pairs = candidate_pairs(scores)
    if max_pairs > 0 and len(pairs) > max_pairs:
        from rlhfkit.data.splits import unit_hash

        names = ids if ids is not None else range(len(scores))
        rank = sorted(range(len(pairs)), key=lambda k: unit_hash("pair", *key, names[pairs[k][0]], names[pairs[k][1]]))
        pairs = [pairs[k] for k in sorted(rank[:max_pairs])]
    return pairs


def pick_sft_answer(
    scores: Sequence[int], accepted: Sequence[bool], upvotes: Sequence[int] | None = None
) -> int | None:
    """Index of the SFT answer: the accepted one, else the top score (ties: more upvotes, then the earlier)."""
    if not scores:
        return None
    for i, acc in enumerate(accepted):
        if acc:
            return i
    votes = upvotes if upvotes is not None else [0] * len(scores)
    return max(range(len(scores)), key=lambda i: (scores[i], votes[i], -i))
