"""Multi-process (DDP over gloo on CPU) equals one process; checkpoints move between process counts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from rlhfkit.runtime.io import read_jsonl
from rlhfkit.runtime.training import StepPlan
from tests.conftest import REPO

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found next to the Python interpreter")


def launch(nproc: int, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = (
        [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(29500 + os.getpid() % 1000)]
        if nproc > 1
        else [sys.executable]
    )
    proc = subprocess.run(
        cmd + list(args),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=timeout,
    )
    return proc


def _weights(path, name):
    from safetensors.torch import load_file

    return load_file(path / "final" / name)


def _assert_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


def _losses(out, key="loss"):
    return [r[key] for r in read_jsonl(out / "metrics.jsonl") if key in r]


@pytest.mark.parametrize("world,b,g,n", [(2, 3, 2, 50), (3, 2, 1, 31), (2, 4, 1, 8)])
def test_each_item_once_per_epoch_across_ranks(world, b, g, n):
    plans = [StepPlan(n, b, g, world, r, seed=7) for r in range(world)]
    seen = []
    for step in range(plans[0].steps_per_epoch):
        counts = {len(p.micro_batches(step)) for p in plans}
        assert len(counts) == 1  # every rank runs the same number of micro-batches (DDP syncs)
        for p in plans:
            seen += [i for mb in p.micro_batches(step) for i in mb]
    assert sorted(seen) == list(range(n))  # no duplicates, nothing dropped


def sft_args(model_dir, corpus) -> list[str]:
    """The tiny SFT run (LoRA, 5 steps) compared across process counts and engines."""
    return [
        f"model.name={model_dir}",
        f"data.path={corpus}",
        "data.seq_len=64",
        "train.max_steps=5",
        "train.lr=3e-3",
        "lora.dropout=0",
        "train.seed=1",
    ]


def test_sft_two_processes_equal_one(tiny_model_dir, tiny_corpus, tmp_path):
    args = ["-m", "rlhfkit.cli", "sft", *sft_args(tiny_model_dir, tiny_corpus)]
    p1 = launch(1, *args, f"out_dir={tmp_path / 'one'}", "train.batch_size=8")
    p2 = launch(2, *args, f"out_dir={tmp_path / 'two'}", "train.batch_size=4")
    assert p1.returncode == 0 and p2.returncode == 0, (p1.stderr[-2000:], p2.stderr[-2000:])
    assert "× 2 processes" in p2.stdout
    _assert_close(
        _weights(tmp_path / "one", "adapter_model.safetensors"), _weights(tmp_path / "two", "adapter_model.safetensors")
    )
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), abs=1e-5)
    assert _losses(tmp_path / "one", "eval/loss") == pytest.approx(_losses(tmp_path / "two", "eval/loss"), abs=1e-5)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from tests.stages.conftest import preference_pairs

    path = tmp_path_factory.mktemp("ddp_pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(120, seed=3)))
    return path


def rm_args(model_dir, pairs) -> list[str]:
    """The tiny RM run (6 steps, a checkpoint at 3) compared across process counts and engines."""
    return [
        f"model.name={model_dir}",
        f"data.path={pairs}",
        "data.max_length=64",
        "train.max_steps=6",
        "train.lr=3e-3",
        "lora.r=4",
        "lora.dropout=0",
        "train.seed=0",
        "train.save_every=3",
    ]


def test_rm_two_processes_equal_one_and_checkpoints_cross_process_counts(tiny_model_dir, pairs, tmp_path):
    args = ["-m", "rlhfkit.cli", "rm", *rm_args(tiny_model_dir, pairs)]
    one = launch(1, *args, f"out_dir={tmp_path / 'one'}", "train.batch_size=8")
    two = launch(2, *args, f"out_dir={tmp_path / 'two'}", "train.batch_size=4")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    w1 = _weights(tmp_path / "one", "adapter_model.safetensors")
    _assert_close(w1, _weights(tmp_path / "two", "adapter_model.safetensors"))
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), abs=1e-5)
    assert _losses(tmp_path / "one", "eval/accuracy") == _losses(tmp_path / "two", "eval/accuracy")
    for key in ("eval/longer_wins", "eval/matched_accuracy", "eval/length_controlled_accuracy"):
        assert _losses(tmp_path / "one", key) == pytest.approx(_losses(tmp_path / "two", key), abs=1e-12), key
    b1, b2 = (json.loads((tmp_path / d / "eval_length_bins.json").read_text()) for d in ("one", "two"))
    assert b1 == b2 and sum(b["pairs"] for b in b1["bins"]) > 0  # per-pair margins gathered from both ranks
    # rank 0 holds half of the held-out pairs: the margin file must still cover them all, in order
    m1, m2 = (json.loads((tmp_path / d / "eval_margins.json").read_text()) for d in ("one", "two"))
    assert len(m1) == len(m2) > 0 and max(abs(a - b) for a, b in zip(m1, m2)) <= 1e-5

    # written by 2 processes, resumed by 1 — and written by 1, resumed by 2
    kill = {"RLHFKIT_FAULT_KILL_AFTER_STEP": "3"}
    for first, then, bs1, bs2, name in ((2, 1, 4, 8, "2to1"), (1, 2, 8, 4, "1to2")):
        out = tmp_path / name
        p = launch(first, *args, f"out_dir={out}", f"train.batch_size={bs1}", env=kill)
        assert p.returncode != 0 and (out / "checkpoints" / "step-000003").exists(), p.stderr[-2000:]
        p = launch(then, *args, f"out_dir={out}", f"train.batch_size={bs2}", "--resume")
        assert p.returncode == 0, p.stderr[-3000:]
        assert "resumed from" in p.stdout
        _assert_close(w1, _weights(out, "adapter_model.safetensors"))
        assert _losses(tmp_path / "one") == pytest.approx(_losses(out), abs=1e-5)


def test_rl_two_processes_equal_one_with_fed_rollouts(tiny_sft_dir, tmp_path):
    """PPO (value head, whitening, adaptive KL), GRPO (groups of k=4 whole on each rank, per-group
    advantages) and REINFORCE++-baseline (global whitening, cross-rank loss denominators) give the same
    run on 2 processes as on 1. All three estimators share one launch per process count."""
    worker, algos = str(REPO / "tests" / "ddp_ppo_worker.py"), ("ppo", "grpo", "reinforce_pp_baseline")
    one = launch(1, worker, str(tiny_sft_dir), str(tmp_path / "one"), "8", ",".join(algos))
    two = launch(2, worker, str(tiny_sft_dir), str(tmp_path / "two"), "4", ",".join(algos))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-3000:], two.stderr[-3000:])
    for algo in algos:
        assert_same_rl_run(tmp_path / "one" / algo, tmp_path / "two" / algo, algo)


def assert_same_rl_run(a, b, algo: str, tol: float = 1e-5, steps: int = 3) -> None:
    """Two RL runs (out_dirs a, b) ended with the same final/ weights (adapter, ppo's value head) and logged
    the same losses and statistics at every step."""
    _assert_close(_weights(a, "adapter_model.safetensors"), _weights(b, "adapter_model.safetensors"), tol)
    keys = ["score", "kl", "kl_coef", "pg_loss", "approxkl", "clipfrac"]
    if algo == "ppo":
        _assert_close(_weights(a, "value_head.safetensors"), _weights(b, "value_head.safetensors"), tol)
        keys += ["vf_loss", "explained_variance"]
    else:
        assert not (a / "final" / "value_head.safetensors").exists()
    ra = [[r[k] for k in keys] for r in read_jsonl(a / "metrics.jsonl") if "score" in r]
    rb = [[r[k] for k in keys] for r in read_jsonl(b / "metrics.jsonl") if "score" in r]
    assert len(ra) == steps and torch.allclose(torch.tensor(ra), torch.tensor(rb), rtol=1e-4, atol=1e-5), (ra, rb)
    assert any(abs(r[3]) > 1e-6 for r in ra), algo  # a real policy loss, not zero advantages everywhere
