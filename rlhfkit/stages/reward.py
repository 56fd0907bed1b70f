"""Reward model: a 1-label sequence classifier trained on preference pairs.

Skeleton as every stage: config → pairs → model (seq-cls, full or LoRA; head always trained) →
Trainer(collate, count, loss, evaluate, save_final).fit(). Loss −log σ(r_chosen − r_rejected [− m])
(+ reward centering); the score is read at the last real token by attention mask
(modeling.sequence_scores). Eval: accuracy with ties counted wrong, margin, reward mean/std, and the
accuracy of "the longer answer wins" on the same pairs as a baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhfkit.algorithms.losses import pairwise_reward_loss
from rlhfkit.inputs.pairs import PairDataConfig, collate_pairs, encode_pairs, load_pairs
from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
from rlhfkit.models.adapters import save_model
from rlhfkit.models.forward import sequence_scores
from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
from rlhfkit.runtime.training import StageConfig, TrainConfig, Trainer


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


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores (B,) each for a collate_pairs batch."""
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    B = scores.shape[0] // 2
    return scores[:B], scores[B:]


@torch.no_grad()
def evaluate_pairs(
    model, pairs: list[dict], pad_id: int, batch_size: int, accelerator=None, margins: list | None = None
) -> dict:
    """Held-out accuracy (ties wrong, reported), mean margin, reward mean/std, loss; sharded over
    ranks and reduced as sums, so any number of processes gives the same numbers. `margins`, when
    given, is filled with this rank's per-pair margins (all of them with one process)."""
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    dev = next(model.parameters()).device
    # n, correct, ties, margin, loss, reward sum, reward sum of squares, chosen longer (in tokens)
    sums = torch.zeros(8, dtype=torch.float64, device=dev)
    mine = pairs[rank::world]
    for i in range(0, len(mine), batch_size):
        batch = {k: v.to(dev) for k, v in collate_pairs(mine[i : i + batch_size], pad_id).items()}
        c, r = (x.double() for x in pair_scores(model, batch))
        d = c - r
        lengths = batch["attention_mask"].sum(1)  # tokens the RM sees (after data.truncate, if on)
        longer = (lengths[: len(c)] > lengths[len(c) :]).sum().double()
        if margins is not None:
            margins += d.float().cpu().tolist()
        both = torch.cat([c, r])
        sums += torch.stack(
            [
                torch.tensor(float(len(c)), dtype=torch.float64, device=dev),
                (d > 0).sum().double(),
                (d == 0).sum().double(),
                d.sum(),
                -F.logsigmoid(d).sum(),
                both.sum(),
                both.square().sum(),
                longer,
            ]
        )
    if world > 1:
        sums = accelerator.reduce(sums, "sum")
    model.train(was_training)
    n, correct, ties, margin, loss, rsum, rsq, longer = sums.tolist()
    if n == 0:
        return {}
    mean = rsum / (2 * n)
    var = max(rsq / (2 * n) - mean**2, 0.0) * (2 * n) / max(2 * n - 1, 1)
    return {
        "loss": loss / n,
        "accuracy": correct / n,
        "ties": ties / n,
        "margin": margin / n,
        "reward_mean": mean,
        "reward_std": var**0.5,
        "pairs": int(n),
        # Baseline "the longer answer wins": Stack Exchange votes favour length (Singhal et al. 2023).
        "longer_wins": longer / n,
    }


def run(cfg: RewardConfig) -> dict:
    torch.manual_seed(cfg.train.seed)
    model, tok = load_model(cfg.model, cfg.lora, kind="seq_cls")
    fmt = PromptFormat(cfg.template, tok)
    train_rows, eval_rows = load_pairs(cfg.data)
    pairs = encode_pairs(train_rows, fmt, cfg.data.max_length, "rm", cfg.data.truncate)
    eval_pairs = encode_pairs(eval_rows, fmt, cfg.data.max_length, "rm", cfg.data.truncate) if eval_rows else []
    print(f"[rm] {len(pairs)} training pairs, {len(eval_pairs)} held-out pairs")

    last_margins: list[float] = []  # of the latest evaluation, for the report's histogram

    def evaluate(model_):
        last_margins.clear()
        return evaluate_pairs(
            model_, eval_pairs, tok.pad_token_id, cfg.eval_batch_size, trainer.accelerator, last_margins
        )

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
    if eval_pairs and trainer.accelerator.is_main_process:  # per-pair margins for the report's histogram
        from rlhfkit.runtime.io import atomic_write_json

        if len(last_margins) != len(eval_pairs):  # several processes each hold a shard: score them all here
            last_margins.clear()
            evaluate_pairs(
                trainer.accelerator.unwrap_model(trainer.model),
                eval_pairs,
                tok.pad_token_id,
                cfg.eval_batch_size,
                margins=last_margins,
            )
        atomic_write_json(trainer.out / "eval_margins.json", last_margins)
    if "eval_accuracy" in summary:
        print(
            f"[rm] held-out accuracy {summary['eval_accuracy']:.3f} (ties {summary['eval_ties']:.3f}) "
            f"on {summary['eval_pairs']} pairs, mean margin {summary['eval_margin']:.3f}; "
            f"'the longer answer wins' scores {summary['eval_longer_wins']:.3f} on them"
        )
    return summary
