"""Every bad input of docs/reliability.md, as a test: one line naming the file, row or key, the right
exit code, no traceback, and nothing of the user's lost (tests/reliability_probes.py holds the probes)."""

from __future__ import annotations

import json

import pytest

from tests.reliability_probes import PROBES, World


@pytest.fixture(scope="module")
def world(tiny_model_dir, tiny_corpus, tmp_path_factory) -> World:
    from tests.stages.conftest import preference_pairs

    tmp = tmp_path_factory.mktemp("reliability")
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(120, seed=5)))
    return World(tiny_model_dir, tiny_corpus, pairs, tmp / "probes")


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.__name__)
def test_bad_input_is_handled(probe, world):
    row = probe(world)
    failed = [what for what, ok in row.checks if not ok]
    assert row.checks and not failed, (failed, row.outcome.code, row.outcome.err[-2500:], row.outcome.out[-1500:])
