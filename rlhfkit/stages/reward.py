"""Reward model: a 1-label sequence classifier trained on preference pairs.

Skeleton as every stage: config → pairs → model (seq-cls, full or LoRA; head always trained) →
Trainer(collate, count, loss, evaluate, save_final).fit(). Loss −log σ(r_chosen − r_rejected [− m])
(+ reward centering); the score is read at the last real token by attention mask
(modeling.sequence_scores). Eval: accuracy with ties counted wrong, margin, reward mean/std, and the
length-aware numbers of rewards/pair_eval (the length rule on the full answers, accuracy on
length-matched pairs and per length-ratio bin, a length-controlled accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhfkit.algorithms.losses import pairwise_reward_loss
from rlhfkit.inputs.pairs import PairDataConfig, collate_pairs, encode_pairs, load_pairs
from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
from rlhfkit.models.adapters import save_model
from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
from rlhfkit.rewards.pair_eval import evaluate_pairs, pair_scores
from rlhfkit.runtime.training import StageConfig, TrainConfig, Trainer

__all__ = ["CONFIG", "RewardConfig", "evaluate_pairs", "pair_scores", "run"]  # evaluate_pairs: for scripts


@dataclass
class RewardConfig(StageConfig):
    out_dir: str = "runs/rm"
    """Output directory of this stage (config.yaml, metrics.jsonl, checkpoints/, final/)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone: a base model, an SFT output (adapter folders are merged first) or a merged model."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=8, alpha=32, dropout=0.1))
    """LoRA on the backbone (the score head is always fully trained and saved with it)."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    """How (prompt, response) becomes text — keep it the same as SFT and PPO."""
    data: PairDataConfig = field(default_factory=PairDataConfig)
    """Preference pairs."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4))
    """Optimisation, checkpointing and logging."""
    margin: float = 0.0
    """Constant margin m in −log σ(r_c − r_r − m) (Llama 2 uses a rating-dependent one)."""
    center_coef: float = 0.0
    """Reward-centering weight: adds coef·mean((r_c + r_r)²), keeping scores near 0 (Eisenstein et al. 2023)."""
    eval_batch_size: int = 16
    """Pairs per batch at evaluation."""


CONFIG = RewardConfig


def run(cfg: RewardConfig) -> dict:
    torch.manual_seed(cfg.train.seed)
    model, tok = load_model(cfg.model, cfg.lora, kind="seq_cls")
    fmt = PromptFormat(cfg.template, tok)
    train_rows, eval_rows = load_pairs(cfg.data)
    pairs = encode_pairs(train_rows, fmt, cfg.data.max_length, "rm", cfg.data.truncate)
    eval_pairs = encode_pairs(eval_rows, fmt, cfg.data.max_length, "rm", cfg.data.truncate) if eval_rows else []
    print(f"[rm] {len(pairs)} training pairs, {len(eval_pairs)} held-out pairs")

    last_margins: list[float] = []  # of the latest evaluation, for the report's histogram
    last_bins: list[dict] = []  # accuracy by length-ratio bin, likewise

    def evaluate(model_):
        last_margins.clear()
        ev = evaluate_pairs(
            model_, eval_pairs, tok.pad_token_id, cfg.eval_batch_size, trainer.accelerator, last_margins
        )
        last_bins[:] = ev.pop("bins", [])
        return ev

    def loss(model_, batch):
        dev = next(model_.parameters()).device
        c, r = pair_scores(model_, {k: v.to(dev) for k, v in batch.items()})
        margin = torch.full_like(c, cfg.margin) if cfg.margin else None
        mean_loss, stats = pairwise_reward_loss(c, r, margin=margin, center_coef=cfg.center_coef)
        n = c.shape[0]  # the Trainer wants sums; it divides by the step's pair count
        return mean_loss * n, {"accuracy": stats["accuracy"] * n, "margin": stats["reward_margin"] * n}

    trainer = Trainer(
        cfg,
        "rm",
        model,
        len(pairs),
        unit="pairs",
        collate=lambda ix: collate_pairs([pairs[i] for i in ix], tok.pad_token_id),
        count=lambda batch: batch["input_ids"].shape[0] // 2,
        loss=loss,
        evaluate=evaluate if eval_pairs else None,
        save_final=lambda m, out: save_model(m, tok, out, cfg.model, cfg.lora),
    )
    summary = trainer.fit()
    summary["out_dir"] = str(trainer.out / "final")
    if eval_pairs and trainer.accelerator.is_main_process:  # per-pair margins and bins for the report
        from rlhfkit.runtime.io import atomic_write_json

        atomic_write_json(trainer.out / "eval_margins.json", last_margins)
        atomic_write_json(trainer.out / "eval_length_bins.json", {"bins": last_bins})
    if "eval_accuracy" in summary:
        print(eval_line("[rm] held-out", {k.removeprefix("eval_"): v for k, v in summary.items()}))
    return summary


def eval_line(what: str, ev: dict) -> str:
    """One line of the numbers that matter: accuracy beside the length baselines."""
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    return (
        f"{what}: accuracy {fmt(ev.get('accuracy'))} on {ev.get('pairs')} pairs (ties {fmt(ev.get('ties'))}, "
        f"mean margin {fmt(ev.get('margin'))}); 'the longer answer wins' {fmt(ev.get('longer_wins'))}; "
        f"length-matched accuracy {fmt(ev.get('matched_accuracy'))} on {ev.get('matched_pairs')} pairs; "
        f"length-controlled {fmt(ev.get('length_controlled_accuracy'))}; agrees with the length rule on "
        f"{fmt(ev.get('length_agreement'))}"
    )
