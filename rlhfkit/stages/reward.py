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

from rlhfkit.algorithms.losses import odin_reward_loss, pairwise_reward_loss
from rlhfkit.inputs.pairs import LengthGroupedPlan, PairDataConfig, collate_pairs, encode_pairs, load_pairs, pair_length
from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
from rlhfkit.models.adapters import save_model
from rlhfkit.models.forward import score_weight, unwrap
from rlhfkit.models.loading import HEADS_FILE, LoraConfig, ModelConfig, check_positions, load_model
from rlhfkit.models.trunk import (
    SELF_CHECK_TOL,
    STATES,
    FrozenTrunk,
    attach_pair_states,
    collate_pair_states,
    self_check,
)
from rlhfkit.rewards.pair_eval import evaluate_pairs, pair_scores
from rlhfkit.runtime.config import check_positive
from rlhfkit.runtime.errors import ConfigError
from rlhfkit.runtime.training import StageConfig, TrainConfig, Trainer

__all__ = ["CONFIG", "RewardConfig", "evaluate_pairs", "pair_scores", "run"]  # evaluate_pairs: for scripts


@dataclass
class OdinConfig:
    enabled: bool = False
    """Train ODIN's two heads (Chen et al. 2024): a quality head and a length head whose sum is fitted
    Bradley–Terry; the folder records them (reward_heads.json) and PPO / eval / rm-eval score with the
    quality head, which the loss decorrelates from response length."""
    length_coef: float = 1.0
    """Weight of |ρ(quality, length)| − ρ(length head, length) (ρ: Pearson over a micro-batch's responses)."""
    orth_coef: float = 1.0
    """Weight of |w_quality · w_length|, keeping the two heads' weight vectors orthogonal."""


ODIN_HEADS = ["quality", "length"]


@dataclass
class RewardDataConfig(PairDataConfig):
    group_by_length: bool | None = None
    """Batch pairs of similar length (less padding; inputs.pairs.LengthGroupedPlan, as HF Trainer's
    group_by_length). None: on, except with odin.enabled, whose loss correlates scores with length
    within a micro-batch (grouped batches would narrow that spread)."""
    length_group_batches: int = 50
    """Global batches per length-sorted mega-batch (HF's megabatch_mult): more gives closer lengths
    within a batch; a mega-batch spanning the epoch gives the same batches every epoch (in a new order)."""

    def __post_init__(self):
        check_positive(self, ("length_group_batches",))


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
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    """Preference pairs, and how they are batched."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4))
    """Optimisation, checkpointing and logging."""
    margin: float = 0.0
    """Constant margin m in −log σ(r_c − r_r − m) (Llama 2 uses a rating-dependent one)."""
    center_coef: float = 0.0
    """Reward-centering weight: adds coef·mean((r_c + r_r)²), keeping scores near 0 (Eisenstein et al. 2023)."""
    eval_batch_size: int = 16
    """Pairs per batch at evaluation."""
    odin: OdinConfig = field(default_factory=OdinConfig)
    """A length-decorrelated reward: ODIN's quality + length heads (off: one reward head)."""
    cache_trunk: bool = True
    """With lora.num_layers_unfrozen=N ≥ 0: run the frozen lower blocks once per pair (training and
    held-out) and train the top N blocks over their kept outputs — exact (models/trunk.py), and each
    epoch after the first costs only the top blocks. Memory: 2 × tokens × hidden × 4 bytes per pair."""
    cache_trunk_max_gib: float = 8.0
    """Run the whole model per step instead when the kept states would exceed this many GiB."""


CONFIG = RewardConfig


class PairSteps:
    """What the Trainer calls per micro-batch (collate, loss) and the held-out forward, over token ids
    or, once `trunk` is set (cache_trunk), over the frozen trunk's kept states."""

    def __init__(self, cfg: RewardConfig, pairs: list[dict], pad_id: int, heads: list[str] | None):
        self.cfg, self.pairs, self.pad_id, self.heads = cfg, pairs, pad_id, heads
        self.trunk = None

    def scores(self, model_, batch: dict, head: int | None = 0):
        dev = next(model_.parameters()).device
        batch = {k: v.to(dev) for k, v in batch.items()}
        if self.trunk is None:
            return pair_scores(model_, batch, head=head)
        s = self.trunk.scores(model_, batch["hidden"], batch["attention_mask"], head=head)
        return s[: s.shape[0] // 2], s[s.shape[0] // 2 :]

    def score_fn(self, model_):
        """evaluate_pairs' forward over cached states (None: its own forward over token ids)."""
        if self.trunk is None:
            return None

        def fn(chunk):
            batch = collate_pair_states(chunk)
            c, r = self.scores(model_, batch, head=None)
            seen = batch["attention_mask"].sum(1)
            return c, r, seen[: len(chunk)] > seen[len(chunk) :]

        return fn

    def collate(self, ix: list[int]) -> dict:
        chunk = [self.pairs[i] for i in ix]
        batch = collate_pair_states(chunk) if self.trunk is not None else collate_pairs(chunk, self.pad_id)
        if self.heads:  # ODIN correlates with the full answers' token lengths
            batch["lengths"] = torch.tensor([p["chosen_tokens"] for p in chunk] + [p["rejected_tokens"] for p in chunk])
        return batch

    def loss(self, model_, batch: dict):
        """Summed loss of the micro-batch and summed stats (the Trainer divides by the step's pairs)."""
        cfg = self.cfg
        if self.heads:
            c, r = self.scores(model_, batch, head=None)
            lengths, w, B = batch["lengths"].to(c.device), score_weight(model_), c.shape[0]
            mean_loss, st = odin_reward_loss(
                c, r, lengths[:B], lengths[B:], w[0], w[1], cfg.odin.length_coef, cfg.odin.orth_coef
            )
            keys = ("accuracy", "quality_accuracy", "bt_loss", "quality_length_corr", "length_head_corr")
            return mean_loss * B, {k: st[k] * B for k in keys}
        c, r = self.scores(model_, batch)
        margin = torch.full_like(c, cfg.margin) if cfg.margin else None
        mean_loss, stats = pairwise_reward_loss(c, r, margin=margin, center_coef=cfg.center_coef)
        n = c.shape[0]
        return mean_loss * n, {"accuracy": stats["accuracy"] * n, "margin": stats["reward_margin"] * n}


def run(cfg: RewardConfig) -> dict:
    torch.manual_seed(cfg.train.seed)
    model, tok = load_model(cfg.model, cfg.lora, kind="seq_cls", num_labels=2 if cfg.odin.enabled else 1)
    check_positions(model, cfg.data.max_length, "data.max_length")
    heads = ODIN_HEADS if cfg.odin.enabled else None
    fmt = PromptFormat(cfg.template, tok)
    train_rows, eval_rows = load_pairs(cfg.data)
    pairs = encode_pairs(train_rows, fmt, cfg.data.max_length, "rm", cfg.data.truncate)
    eval_pairs = encode_pairs(eval_rows, fmt, cfg.data.max_length, "rm", cfg.data.truncate) if eval_rows else []
    print(f"[rm] {len(pairs)} training pairs, {len(eval_pairs)} held-out pairs")
    steps = PairSteps(cfg, pairs, tok.pad_token_id, heads)
    last_margins: list[float] = []  # of the latest evaluation, for the report's histogram
    last_bins: list[dict] = []  # accuracy by length-ratio bin, likewise

    def evaluate(model_):
        last_margins.clear()
        ev = evaluate_pairs(
            model_,
            eval_pairs,
            tok.pad_token_id,
            cfg.eval_batch_size,
            trainer.accelerator,
            last_margins,
            score_fn=steps.score_fn(model_),
            head_names=heads,
        )
        last_bins[:] = ev.pop("bins", [])
        return ev

    trainer = Trainer(
        cfg,
        "rm",
        model,
        len(pairs),
        unit="pairs",
        collate=steps.collate,
        count=lambda batch: batch["attention_mask"].shape[0] // 2,
        loss=steps.loss,
        evaluate=evaluate if eval_pairs else None,
        save_final=lambda m, out: save_rm(m, tok, out, cfg, heads),
    )
    if group_by_length(cfg):  # the same steps per epoch: only which pairs share a step changes
        trainer.plan = LengthGroupedPlan.like(
            trainer.plan, [pair_length(p) for p in pairs], cfg.data.length_group_batches
        )
    if cfg.cache_trunk and cfg.lora.num_layers_unfrozen >= 0:
        steps.trunk = build_trunk(model, cfg, pairs + eval_pairs, tok.pad_token_id)
    summary = trainer.fit()
    summary["out_dir"] = str(trainer.out / "final")
    if eval_pairs and trainer.accelerator.is_main_process:  # per-pair margins and bins for the report
        from rlhfkit.runtime.io import atomic_write_json

        atomic_write_json(trainer.out / "eval_margins.json", last_margins)
        atomic_write_json(trainer.out / "eval_length_bins.json", {"bins": last_bins})
    if "eval_accuracy" in summary:
        print(eval_line("[rm] held-out", {k.removeprefix("eval_"): v for k, v in summary.items()}))
    return summary


def group_by_length(cfg: RewardConfig) -> bool:
    """data.group_by_length resolved: None is on unless ODIN; on with ODIN is refused."""
    if cfg.data.group_by_length is None:
        return not cfg.odin.enabled
    if cfg.data.group_by_length and cfg.odin.enabled:
        raise ConfigError(
            "data.group_by_length=true with odin.enabled: ODIN's loss correlates scores with length within "
            "a micro-batch, which length-grouped batches narrow; leave data.group_by_length unset or false"
        )
    return cfg.data.group_by_length


def save_rm(model, tok, out, cfg: RewardConfig, heads: list[str] | None) -> None:
    """The model folder, and for several heads the file that names them (load_model and the scorers read it)."""
    import json
    from pathlib import Path

    save_model(model, tok, out, cfg.model, cfg.lora)
    if heads:
        doc = {"heads": heads, "method": "ODIN (Chen et al. 2024); head 0 is the reward RL reads"}
        (Path(out) / HEADS_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def build_trunk(model, cfg: RewardConfig, pairs: list[dict], pad_id: int):
    """The frozen trunk with every pair's states attached, or None (said why) when it would not be exact."""
    import time

    trunk = FrozenTrunk(model, cfg.lora.num_layers_unfrozen)
    reason = trunk.why_not_exact()
    if reason:
        print(f"[rm] cache_trunk: off ({reason}); every step runs the whole model")
        return None
    hidden = unwrap(model).config.get_text_config().hidden_size
    n_tok = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    gib = n_tok * hidden * torch.finfo(next(model.parameters()).dtype).bits / 8 / 2**30
    if gib > cfg.cache_trunk_max_gib:
        print(f"[rm] cache_trunk: off ({gib:.1f} GiB of states > cache_trunk_max_gib={cfg.cache_trunk_max_gib})")
        return None
    t0 = time.perf_counter()
    attach_pair_states(trunk, pairs, pad_id, cfg.eval_batch_size)
    gap = self_check(trunk, model, pairs, pad_id)
    if gap > SELF_CHECK_TOL:  # the split misses something this architecture does: fall back, exactly
        for p in pairs:
            p.pop(STATES, None)
        print(f"[rm] cache_trunk: off (cached scores differ from the model's by {gap:.1e}); whole model per step")
        return None
    print(
        f"[rm] cache_trunk: {len(trunk.lower)} frozen blocks run once over {len(pairs)} pairs in "
        f"{time.perf_counter() - t0:.1f}s ({gib:.2f} GiB kept); "
        f"training runs the top {len(trunk.top)}"
    )
    return trunk


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
