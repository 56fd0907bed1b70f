"""Evaluation: detectors on crafted outputs, win-rates, KL to reference, over-optimisation verdict."""

from __future__ import annotations

import json

import pytest

from rlhfkit.rewards.detectors import detect, fence_count, repeated_ngram_fraction
from rlhfkit.runtime.config import load_config
from rlhfkit.stages import evaluate

NORMAL = [
    "Grind the beans just before brewing and use water a little below boiling.",
    "A good loaf needs time: let the dough rise until it has doubled, then shape it gently.",
    "Use a list comprehension:\n```python\nsquares = [x * x for x in range(10)]\n```\nIt is short and clear.",
    "Check the tyre pressure every week; it changes with temperature and slow leaks.",
]
DEGENERATE_REPEAT = ["thank you thank you thank you thank you thank you thank you thank you"] * 4
DEGENERATE_FENCES = ["```\n```\n```\n```\n```\n``` code ``` ```"] * 4


def test_detectors_fire_on_degenerate_outputs_and_stay_quiet_on_normal_text():
    quiet = detect(NORMAL, baseline_mean_length=sum(len(t.split()) for t in NORMAL) / 4)
    assert quiet["flags"] == {"repetition": False, "fence_spam": False, "length_drift": False}
    assert detect(DEGENERATE_REPEAT)["flags"]["repetition"] is True
    assert detect(DEGENERATE_FENCES)["flags"]["fence_spam"] is True
    long = [t + " " + t + " " + t for t in NORMAL]
    assert detect(long, baseline_mean_length=quiet["mean_words"])["flags"]["length_drift"] is True
    assert repeated_ngram_fraction("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert fence_count(NORMAL[2]) == 2


def test_over_optimisation_verdict():
    up_flat = evaluate.over_optimisation({"rm_score": 0.1, "judge_score": 0.5}, {"rm_score": 0.9, "judge_score": 0.5})
    assert up_flat["flag"] is True and "reward hacking" in up_flat["note"]
    agree = evaluate.over_optimisation({"rm_score": 0.1, "judge_score": 0.5}, {"rm_score": 0.9, "judge_score": 0.8})
    assert agree["flag"] is False


def good_count(prompts, responses):
    return [float(r.count("good")) for r in responses]


def length_judge(prompts, responses):
    return [float(len(r)) for r in responses]


def test_eval_compares_models(tiny_model_dir, tiny_sft_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "\n".join(f"how tea {w}?" for w in ("hot", "cold", "water", "milk", "sugar", "pot", "cup", "bean"))
    )
    cfg = load_config(
        evaluate.EvalConfig,
        overrides={
            "out_dir": str(tmp_path / "eval"),
            "models": [f"random={tiny_model_dir}", f"sft={tiny_sft_dir}"],
            "rm": "tests.stages.test_evaluate:good_count",
            "judge": "tests.stages.test_evaluate:length_judge",
            "prompts": {"path": str(prompts)},
            "generation": {"max_new_tokens": 12},
        },
    )
    m = evaluate.run(cfg)
    assert set(m["models"]) == {"random", "sft"}
    assert m["models"]["random"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference against itself
    assert m["models"]["sft"]["kl"] > 0.5  # SFT moved far from the random model
    assert m["models"]["sft"]["rm_score"] > m["models"]["random"]["rm_score"]
    assert m["win_rate"]["sft_vs_random"]["rm"] > 0.5
    rows = [json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {r["model"] for r in rows} == {"random", "sft"}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["prompts"] == 8
