"""The tiny end-to-end run (recipes/tiny.yaml on the in-process tiny model), made once per session
and shared: the resume test compares against it, the headline/card/push tests read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.stages.conftest import preference_pairs

RECIPE = REPO / "recipes" / "tiny.yaml"


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pp") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(400, seed=5)))
    return path


def run_tiny(run_dir, model, pairs, env=None, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "rlhfkit.cli",
        "run",
        str(RECIPE),
        f"run_dir={run_dir}",
        f"vars.model={model}",
        f"vars.pairs={pairs}",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir, pairs_file):
    """A finished tiny run directory (every stage done, report written). Read it, never write into it."""
    run = tmp_path_factory.mktemp("tiny_run") / "straight"
    p = run_tiny(run, tiny_model_dir, pairs_file)
    assert p.returncode == 0, p.stderr[-3000:]
    return run
