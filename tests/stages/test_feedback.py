"""Simulated feedback: the rater labels pairs of the policy's own samples; splits stay disjoint."""

from __future__ import annotations

from rlhfkit.inputs.tables import load_table
from rlhfkit.runtime.config import load_config
from rlhfkit.stages import feedback
from tests.stages.test_ppo import PROMPTS, good_count  # noqa: F401  (rater used by spec string)


def test_feedback_pairs_follow_the_rater_and_splits_are_disjoint(tiny_sft_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = load_config(
        feedback.FeedbackConfig,
        overrides={
            "out_dir": str(tmp_path / "fb"),
            "model": {"name": str(tiny_sft_dir)},
            "prompts": str(prompts),
            "rater": "tests.stages.test_ppo:good_count",
            "samples_per_prompt": 3,
            "n_label_prompts": 40,
            "n_eval_prompts": 12,
            "generation": {"max_new_tokens": 10},
        },
    )
    stats = feedback.run(cfg)
    train = load_table(tmp_path / "fb", "rm_train")
    held = load_table(tmp_path / "fb", "rm_eval")
    assert stats["pairs"] == len(train) + len(held) > 10
    for row in list(train) + list(held):
        assert row["chosen"].count("good") > row["rejected"].count("good")  # the rater decided
        assert row["chosen_score"] > row["rejected_score"]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    eval_prompts = set(load_table(tmp_path / "fb", "eval_prompts")["prompt"])
    assert len(eval_prompts) == 12
    assert not eval_prompts & set(load_table(tmp_path / "fb", "rl_prompts")["prompt"])
    assert not eval_prompts & {r["prompt"] for r in train}


def test_feedback_is_a_cli_command(capsys):
    """Every pipeline stage can run alone: `rlhfkit feedback --help` lists its typed config."""
    from rlhfkit.cli import main

    assert main(["feedback", "--help"]) == 0
    out = capsys.readouterr().out
    for key in (
        "--samples_per_prompt",
        "--max_pairs_per_prompt",
        "--min_gap",
        "--rater",
        "--generation.max_new_tokens",
    ):
        assert key in out, key
