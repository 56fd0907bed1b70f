"""Fixtures the stage tests share: the toy preference pairs of the reward-model tests."""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import WORDS


def preference_pairs(n: int, seed: int) -> list[dict]:
    """Rule: the chosen answer says 'good', the rejected one 'bad' (else identical)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w, x = rng.choice(WORDS), rng.choice(WORDS)
        good, bad = f"{w} {x} is good.", f"{w} {x} is bad."
        rows.append({"prompt": f"q{i} how {w} {x}?", "chosen": good, "rejected": bad})
    return rows


@pytest.fixture(scope="session")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(320, seed=0)))
    return path
