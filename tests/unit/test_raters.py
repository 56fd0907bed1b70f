"""Offline raters give ordered, bounded scores (the gold judge of the sentiment task)."""

from rlhfkit.rewards.raters import vader_positive, vader_positive_response


def test_vader_orders_positive_above_negative_and_stays_in_unit_interval():
    p = ["This movie was one"] * 3
    r = [
        " of the best films I have ever seen, wonderful and moving.",
        " of many films.",
        " of the dullest, most boring wastes of time.",
    ]
    s = vader_positive(p, r)
    assert s[0] > s[1] > s[2]
    assert all(0.0 <= x <= 1.0 for x in s)
    assert vader_positive_response(["x"], [" of many films."])[0] == 0.5  # no sentiment words: neutral
