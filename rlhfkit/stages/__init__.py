"""Layer 6 — one file per stage (`CONFIG` dataclass + `run(cfg) -> dict`), and the one registry of
stages that both the CLI (`rlhfkit <stage>`) and the recipe runner (`rlhfkit run`) read. Stages
talk to each other only through the run directory."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    module: str
    """Module holding CONFIG and run() (or main(argv) for commands with their own arguments)."""
    doc: str
    """One line for `rlhfkit --help`."""
    in_recipes: bool = True
    """Whether a recipe's `stages:` list may name it."""
    resumable: bool = False
    """Whether an interrupted run continues from its checkpoints (`--resume`)."""


STAGES: dict[str, Stage] = {
    "data": Stage(
        "rlhfkit.stages.data", "build preference / SFT / prompt splits from Stack Exchange dumps or HF schemas"
    ),
    "feedback": Stage(
        "rlhfkit.stages.feedback", "simulated feedback: a rater labels pairs of the policy's own samples"
    ),
    "sft": Stage("rlhfkit.stages.sft", "supervised fine-tuning / domain pre-training with packing", resumable=True),
    "rm": Stage("rlhfkit.stages.reward", "train a reward model on preference pairs", resumable=True),
    "ppo": Stage(
        "rlhfkit.stages.ppo",
        "RL (algo: ppo | rloo | grpo | reinforce_pp) against a reward model, classifier or Python function",
        resumable=True,
    ),
    "rl": Stage("rlhfkit.stages.ppo", "the same stage as `ppo` (an alias)", in_recipes=False, resumable=True),
    "dpo": Stage("rlhfkit.stages.dpo", "DPO / IPO on preference pairs", resumable=True),
    "eval": Stage("rlhfkit.stages.evaluate", "compare models on held-out prompts"),
    "report": Stage("rlhfkit.apps.report", "write report.html / report.md for a run directory"),
    "merge": Stage("rlhfkit.stages.merge", "merge a LoRA adapter into a plain Hugging Face model", in_recipes=False),
}
