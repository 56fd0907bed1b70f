"""Offline raters usable as reward functions or gold judges: (prompts, responses) -> scores.

`vader_positive` is seed 003's "positive sentiment" on this machine with no hub access: VADER's
lexicon ships inside the `vaderSentiment` package (Hutto & Gilbert 2014).
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:  # pragma: no cover
        from rlhfkit.runtime.errors import RlhfkitError

        raise RlhfkitError("the vader rater needs the vaderSentiment package: pip install vaderSentiment") from exc
    return SentimentIntensityAnalyzer()


def vader_positive(prompts, responses) -> list[float]:
    """Positivity of the whole review (opener + continuation) in [0, 1]: (compound + 1) / 2."""
    sia = _vader()
    return [(sia.polarity_scores(p + r)["compound"] + 1.0) / 2.0 for p, r in zip(prompts, responses)]


def vader_positive_response(prompts, responses) -> list[float]:
    """As vader_positive, but judging the continuation alone."""
    sia = _vader()
    return [(sia.polarity_scores(r)["compound"] + 1.0) / 2.0 for r in responses]
