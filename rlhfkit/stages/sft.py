"""SFT / domain pre-training: causal-LM loss on (prompt, response) pairs or raw text.

Skeleton shared by every stage: config dataclass → load data → load model → Trainer(collate,
count, loss, evaluate, save_final).fit() → summary. Packed mode puts samples into fixed blocks
with no pad tokens and no attention across samples; unpacked mode pads per batch and defaults to a
completion-only loss. Perplexity = exp(token-weighted mean eval loss).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit.inputs.packing import collate_packed, collate_padded, count_targets, pack
from rlhfkit.inputs.rows import SFTDataConfig, encode_rows, load_rows
from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
from rlhfkit.models.adapters import save_model
from rlhfkit.models.forward import causal_lm_nll_sum, eval_perplexity
from rlhfkit.models.loading import LoraConfig, ModelConfig, check_positions, load_model
from rlhfkit.runtime.errors import RlhfkitError
from rlhfkit.runtime.training import StageConfig, TrainConfig, Trainer


@dataclass
class SFTConfig(StageConfig):
    out_dir: str = "runs/sft"
    """Output directory of this stage (config.yaml, metrics.jsonl, checkpoints/, final/)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter (or full fine-tuning with lora.enabled=false)."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    """How (prompt, response) pairs become text."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Training and eval data."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4))
    """Optimisation, checkpointing and logging."""


CONFIG = SFTConfig


# --------------------------------------------------------------------------- data
def check_packing(model) -> None:
    """Refuse packing where the model would attend across samples (its mask ignores position_ids)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    a, b = torch.randint(0, vocab, (1, 6), generator=g), torch.randint(0, vocab, (1, 5), generator=g)
    dev = next(model.parameters()).device
    with torch.no_grad():
        packed = model(
            input_ids=torch.cat([a, b], 1).to(dev),
            position_ids=torch.cat([torch.arange(6), torch.arange(5)])[None].to(dev),
            use_cache=False,
        ).logits
        alone = model(input_ids=b.to(dev), use_cache=False).logits
    model.train(was_training)
    err = (packed[0, 6:] - alone[0]).abs().max().item()
    if err > 1e-3:
        raise RlhfkitError(
            f"packing would leak attention across samples for {type(model).__name__} "
            f"(max logit diff {err:.2e}); set data.packing=false"
        )


# --------------------------------------------------------------------------- stage
def run(cfg: SFTConfig) -> dict:
    torch.manual_seed(cfg.train.seed)
    dc = cfg.data
    completion_only = (not dc.packing) if dc.completion_only is None else dc.completion_only
    model, tok = load_model(cfg.model, cfg.lora, kind="causal_lm")
    check_positions(model, cfg.data.seq_len, "data.seq_len")
    fmt = PromptFormat(cfg.template, tok)

    rows, eval_rows = _split_rows(cfg)
    train_samples = encode_rows(rows, fmt, dc, completion_only)
    eval_samples = encode_rows(eval_rows, fmt, dc, completion_only) if eval_rows else []
    if dc.packing:
        check_packing(model)
    items, eval_items, collate_items = _items(dc, tok.pad_token_id, train_samples, eval_samples)

    def loss(model_, micro):
        total = torch.zeros((), device=next(model_.parameters()).device)
        for sub in micro:
            s, _ = causal_lm_nll_sum(model_, {k: v.to(total.device) for k, v in sub.items()})
            total = total + s
        return total, {}

    def evaluate(model_) -> dict:
        return eval_perplexity(model_, eval_items, collate_items, cfg.train.batch_size, trainer.accelerator)

    trainer = Trainer(
        cfg,
        "sft",
        model,
        len(items),
        collate=lambda ix: collate_items([items[i] for i in ix]),
        count=count_targets,
        loss=loss,
        evaluate=evaluate if eval_items else None,
        save_final=lambda m, out: save_model(m, tok, out, cfg.model, cfg.lora),
    )
    before = None
    if eval_items and trainer.resume_from is None:
        before = evaluate(trainer.eval_model)
        trainer.log({"step": 0, **{f"eval/{k}": v for k, v in before.items()}})
        print(f"[sft] before training: eval loss {before['loss']:.4f}, perplexity {before['perplexity']:.2f}")
    summary = trainer.fit()
    if before:
        summary["eval_perplexity_before"] = before["perplexity"]
    if "eval_perplexity" in summary:
        print(
            f"[sft] after training: eval loss {summary['eval_loss']:.4f}, perplexity {summary['eval_perplexity']:.2f}"
        )
    summary["out_dir"] = str(Path(cfg.out_dir) / "final")
    return summary


def _split_rows(cfg: SFTConfig) -> tuple[list, list]:
    """Training rows and held-out rows: data.eval_path, else a seeded data.eval_fraction of the rows."""
    dc = cfg.data
    rows = load_rows(dc.path, dc.split)
    if dc.eval_path:
        eval_rows = load_rows(dc.eval_path, dc.eval_split)
    else:
        order = list(range(len(rows)))
        random.Random(cfg.train.seed).shuffle(order)
        n_eval = max(1, int(round(len(rows) * dc.eval_fraction))) if dc.eval_fraction > 0 else 0
        if n_eval >= len(rows):
            raise RlhfkitError(f"only {len(rows)} rows: too few to hold out {dc.eval_fraction:.0%} for eval")
        eval_rows = [rows[i] for i in order[:n_eval]]
        rows = [rows[i] for i in order[n_eval:]]
    return (rows[: dc.max_samples] if dc.max_samples > 0 else rows), eval_rows


def _items(dc, pad_id: int, train_samples: list, eval_samples: list):
    """Training and eval items (packed blocks or padded samples) and the collate function for them."""
    if dc.packing:
        items = pack(train_samples, dc.seq_len)
        print(
            f"[sft] packed {len(train_samples)} samples ({sum(len(s.input_ids) for s in train_samples):,} tokens) "
            f"into {len(items)} blocks of {dc.seq_len}"
        )
        return items, pack(eval_samples, dc.seq_len), lambda batch: collate_packed(batch, pad_id)
    n_trunc = sum(len(s.input_ids) > dc.seq_len for s in train_samples)
    if n_trunc:
        print(f"[sft] {n_trunc} of {len(train_samples)} samples longer than seq_len={dc.seq_len} are truncated")
    return train_samples, eval_samples, lambda batch: collate_padded(batch, pad_id, dc.seq_len)
