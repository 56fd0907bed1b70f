"""Reward-model stage and the scoring API."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.io import read_jsonl
from rlhfkit.modeling import sequence_scores
from rlhfkit.stages import reward
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


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(320, seed=0)))
    return path


def rm_cfg(model_dir, pairs, out, *extra):
    return load_config(reward.RewardConfig, overrides=[
        f"out_dir={out}", f"model.name={model_dir}", f"data.path={pairs}", "data.eval_fraction=0.2",
        "data.max_length=64", "train.batch_size=8", "train.lr=3e-3", "train.max_steps=40", "train.seed=0",
        "lora.enabled=false", *extra])


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir, pair_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "run"
    summary = reward.run(rm_cfg(tiny_model_dir, pair_file, out))
    return out, summary


def test_rm_learns_preference_rule_to_95_percent_held_out(trained_rm):
    out, summary = trained_rm
    assert summary["eval_accuracy"] >= 0.95, summary
    assert summary["eval_pairs"] >= 40
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in r]
    assert evals[-1]["eval/accuracy"] == summary["eval_accuracy"]
    assert summary["eval_margin"] > 0
    margins = json.loads((out / "eval_margins.json").read_text())
    assert len(margins) == summary["eval_pairs"]
    assert sum(m > 0 for m in margins) / len(margins) == pytest.approx(summary["eval_accuracy"])


def test_held_out_prompts_never_trained_on(pair_file):
    from rlhfkit.pairs import PairDataConfig, load_pairs

    train, held = load_pairs(PairDataConfig(path=str(pair_file), eval_fraction=0.2))
    assert held and train
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_score_same_alone_and_in_left_or_right_padded_batches(trained_rm):
    """Read at the last real token by attention mask: padding side and batch mates change nothing,
    even though pad == eos and every text ends in eos."""
    from rlhfkit.scoring import RewardModelScorer

    out, _ = trained_rm
    scorer = RewardModelScorer(str(out / "final"), batch_size=4)
    prompts = ["how tea water?", "how brew a", "why bread yeast dough oven hot?"]
    responses = ["tea is good.", "no", "dough dough is bad and slow, cold and stale."]
    alone = [scorer([p], [r])[0] for p, r in zip(prompts, responses)]
    batched = scorer(prompts, responses)
    assert batched == pytest.approx(alone, abs=1e-5)
    shuffled = scorer(prompts[::-1], responses[::-1])[::-1]
    assert shuffled == pytest.approx(alone, abs=1e-5)
    # explicit left padding
    seqs = [scorer.fmt.encode(p, r)[0] for p, r in zip(prompts, responses)]
    assert all(s[-1] == scorer.tok.eos_token_id == scorer.tok.pad_token_id for s in seqs)
    T = max(map(len, seqs))
    ids = torch.full((3, T), scorer.tok.pad_token_id)
    mask = torch.zeros((3, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    with torch.no_grad():
        left = sequence_scores(scorer.model, ids, mask).tolist()
    assert left == pytest.approx(alone, abs=1e-5)


def test_scorer_matches_training_template_and_orders_pairs(trained_rm):
    from rlhfkit.scoring import load_scorer

    out, _ = trained_rm
    scorer = load_scorer(str(out / "final"))
    good, bad = scorer(["how tea hot?"] * 2, ["tea hot is good.", "tea hot is bad."])
    assert good > bad


def test_lora_rm_resume_is_bitwise(tiny_model_dir, pair_file, tmp_path):
    from safetensors.torch import load_file

    args = ["lora.enabled=true", "lora.r=4", "train.max_steps=12", "train.save_every=6"]
    straight = tmp_path / "straight"
    reward.run(rm_cfg(tiny_model_dir, pair_file, straight, *args))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rlhfkit.cli", "rm", f"out_dir={killed}", f"model.name={tiny_model_dir}",
           f"data.path={pair_file}", "data.eval_fraction=0.2", "data.max_length=64", "train.batch_size=8",
           "train.lr=3e-3", "train.seed=0", *args]
    import os

    env = {**os.environ, "RLHFKIT_FAULT_KILL_AFTER_STEP": "6"}
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == -9
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("score" in k for k in a)  # the head is saved with the adapter
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(killed / "metrics.jsonl") if "loss" in r]
    assert la == lb and len(la) == 12


def test_callable_and_spec_errors():
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.scoring import load_scorer

    s = load_scorer(lambda ps, rs: [len(r) for r in rs])
    assert s(["a", "b"], ["xx", "yyy"]) == [2.0, 3.0]
    bad = load_scorer(lambda ps, rs: [1.0])
    with pytest.raises(RlhfkitError, match="returned 1 scores for 2"):
        bad(["a", "b"], ["x", "y"])
    with pytest.raises(RlhfkitError, match="not an RM folder"):
        load_scorer("no/such/thing")
