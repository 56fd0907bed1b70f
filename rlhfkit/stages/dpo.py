"""DPO / IPO / conservative DPO on preference pairs.

Skeleton as every stage: config → pairs (PairDataConfig, same template as SFT/RM) → policy
(`load_model`) → Trainer(collate, count, loss, evaluate, save_final).fit() → summary. One micro-batch
is a `collate_pairs` batch (chosen rows then rejected rows) run through `sequence_logprobs` once for
the policy and once for the reference; `losses.dpo_loss` turns the four log-probs into per-pair losses
and implicit rewards r = β·(log π − log π_ref). The loss function returns sums over pairs; the Trainer
divides by the pair count of the whole optimizer step.

Where the reference log-probs come from (`Reference`):

* "adapter": the policy with its LoRA adapter disabled (`peft_model.disable_adapter()`). A fresh LoRA
  starts with B = 0, so that *is* the starting policy, at no extra memory. The default.
* "model": a frozen separate model (`ref_model`), loaded with trainable=False.
* "cache": log-probs computed once before the first update (`precompute_ref`) over every train and
  eval pair and saved to out_dir/ref_logps.safetensors, so --resume reuses them. Saves the reference forward
  on every step.

Every on-the-fly reference pass runs under torch.no_grad() with the model in eval mode (dropout off),
then the model's train/eval mode is restored. When the starting policy cannot be recovered by disabling
an adapter — `lora.continue_adapter=true` on an adapter folder (disabling it would give the bare base,
not the starting policy) or full fine-tuning — and no `ref_model` is given, the reference log-probs are
precomputed from the policy before its first update (forced `precompute_ref`): exact, no second model
in memory, and the per-step reference forward disappears.

IPO uses per-token-mean log-probs (as TRL, confirmed with the IPO authors), so for loss_type=ipo the
logged rewards are β × the per-token-mean log-ratio, the quantity the IPO loss regresses.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.algorithms.losses import DPO_LOSS_TYPES, dpo_loss
from rlhfkit.inputs.pairs import PairDataConfig, collate_pairs, encode_pairs, load_pairs
from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
from rlhfkit.models.adapters import disable_dropout, peft_model, save_model
from rlhfkit.models.forward import eval_mode, sequence_logprobs
from rlhfkit.models.loading import (
    LoraConfig,
    ModelConfig,
    check_positions,
    is_adapter_dir,
    load_model,
    resolve_model_path,
)
from rlhfkit.runtime.errors import RlhfkitError
from rlhfkit.runtime.io import fsync_path
from rlhfkit.runtime.training import StageConfig, TrainConfig, Trainer

REF_CACHE = "ref_logps.safetensors"
STAT_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class DPOConfig(StageConfig):
    out_dir: str = "runs/dpo"
    """Output directory of this stage (config.yaml, metrics.jsonl, checkpoints/, final/, ref_logps.safetensors)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy to start from: usually the SFT output (an adapter folder is merged and a fresh LoRA
    trained on top, unless lora.continue_adapter)."""
    ref_model: str | None = None
    """Frozen reference model (any model.name form); None: the starting policy (the policy with its
    fresh LoRA disabled, or precomputed log-probs of the starting policy)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter (or full fine-tuning with lora.enabled=false)."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    """How (prompt, response) becomes text — keep it the same as SFT and RM."""
    data: PairDataConfig = field(default_factory=PairDataConfig)
    """Preference pairs (train and held-out)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5))
    """Optimisation, checkpointing and logging."""
    beta: float = 0.1
    """β: strength of the KL anchor to the reference (for ipo: τ, the target margin is 1/(2τ))."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid: DPO (Rafailov et al. 2023); ipo: IPO on per-token-mean log-probs (Azar et al. 2023);
    hinge: SLiC (Zhao et al. 2023)."""
    label_smoothing: float = 0.0
    """Conservative DPO ε (Mitchell 2023): assumed probability that a label is flipped, in [0, 0.5];
    sigmoid only."""
    precompute_ref: bool = False
    """Compute the reference log-probs of every train/eval pair once before training (saved in
    out_dir/ref_logps.safetensors, reused by --resume) instead of a reference forward on every step."""
    disable_dropout: bool = True
    """Set every dropout probability of the policy to 0 (as TRL): the policy and reference
    log-probs then differ only by the weights. The reference pass always runs with dropout off."""
    eval_batch_size: int = 16
    """Pairs per batch at evaluation and when precomputing reference log-probs."""

    def __post_init__(self):
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss_type=sigmoid only, not {self.loss_type!r}")
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be >= 1")


CONFIG = DPOConfig


# --------------------------------------------------------------------------- batches
def make_micro(pairs: list[dict], indices: list[int], pad_id: int, split: str = "train") -> dict:
    """A micro-batch: the collate_pairs tensors plus which pairs they are (for cached reference log-probs)."""
    return {
        "batch": collate_pairs([pairs[i] for i in indices], pad_id),
        "idx": torch.tensor(indices, dtype=torch.long),
        "split": split,
    }


def count_pairs(micro: dict) -> int:
    return int(micro["idx"].numel())


def _device(model) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- reference
class Reference:
    """Reference log-probs for a micro-batch: (chosen (B,), rejected (B,)).

    kind "adapter": the policy with its adapter disabled; "model": a frozen separate model;
    "policy": the policy as it is now (only used to precompute before the first update);
    "cache": precomputed per pair, looked up by the micro-batch's pair indices.
    """

    def __init__(self, kind: str, average: bool, model=None, cache: dict[str, torch.Tensor] | None = None):
        if kind not in ("adapter", "model", "policy", "cache"):
            raise ValueError(f"unknown reference kind {kind!r}")
        self.kind, self.average, self.model, self.cache = kind, average, model, cache

    @torch.no_grad()
    def logps(self, policy, micro: dict) -> tuple[torch.Tensor, torch.Tensor]:
        dev = _device(policy)
        if self.kind == "cache":
            table = self.cache[micro["split"]]
            ref = table[micro["idx"]].to(dev)
            return ref[:, 0], ref[:, 1]
        batch = {k: v.to(dev) for k, v in micro["batch"].items()}
        if self.kind == "model":
            net, ctx = self.model, contextlib.nullcontext()
        elif self.kind == "adapter":
            net = peft_model(policy)
            if net is None:
                raise RlhfkitError("reference 'adapter' needs a LoRA policy")
            ctx = net.disable_adapter()
        else:
            net, ctx = policy, contextlib.nullcontext()
        with eval_mode(net), ctx:
            logps = sequence_logprobs(net, batch, average=self.average)
        return logps.chunk(2)


def micro_loss(
    policy, micro: dict, reference: Reference, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed DPO-family loss over the micro-batch's pairs, and summed stats (the Trainer's contract)."""
    ref_c, ref_r = reference.logps(policy, micro)
    dev = _device(policy)
    batch = {k: v.to(dev) for k, v in micro["batch"].items()}
    pol_c, pol_r = sequence_logprobs(policy, batch, average=loss_type == "ipo").chunk(2)
    losses, rew_c, rew_r = dpo_loss(
        pol_c, pol_r, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
    )
    stats = {
        "rewards/chosen": rew_c.sum(),
        "rewards/rejected": rew_r.sum(),
        "rewards/margin": (rew_c - rew_r).sum(),
        "rewards/accuracy": (rew_c > rew_r).float().sum(),  # a tie counts wrong
        "logps/chosen": pol_c.detach().sum(),
        "logps/rejected": pol_r.detach().sum(),
    }
    return losses.sum(), stats


@torch.no_grad()
def evaluate_pairs(
    model, pairs: list[dict], split: str, reference: Reference, cfg: DPOConfig, pad_id: int, accelerator=None
) -> dict:
    """Held-out loss and reward stats (means over pairs), sharded over ranks, model in eval mode."""
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    dev = _device(model)
    mine = list(range(rank, len(pairs), world))
    sums = torch.zeros(len(STAT_KEYS) + 2, device=dev, dtype=torch.float64)
    with eval_mode(model):
        for i in range(0, len(mine), cfg.eval_batch_size):
            micro = make_micro(pairs, mine[i : i + cfg.eval_batch_size], pad_id, split)
            loss, stats = micro_loss(model, micro, reference, cfg.beta, cfg.loss_type, cfg.label_smoothing)
            sums += torch.stack(
                [
                    loss.double(),
                    *(stats[k].double() for k in STAT_KEYS),
                    torch.tensor(float(count_pairs(micro)), device=dev, dtype=torch.float64),
                ]
            )
    if world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    n = sums[-1].item()
    if n == 0:
        return {}
    out = {"loss": sums[0].item() / n}
    out.update({k: sums[1 + j].item() / n for j, k in enumerate(STAT_KEYS)})
    out["pairs"] = int(n)
    return out


# --------------------------------------------------------------------------- precomputed reference
@torch.no_grad()
def compute_reference_logps(
    policy, pairs: list[dict], reference: Reference, pad_id: int, batch_size: int, accelerator=None
) -> torch.Tensor:
    """(N, 2) float32 CPU tensor of (chosen, rejected) reference log-probs for every pair, sharded over ranks."""
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    n = len(pairs)
    mine = list(range(rank, n, world))
    vals = torch.zeros(math.ceil(n / world) if n else 0, 2, dtype=torch.float32, device=_device(policy))
    for i in range(0, len(mine), batch_size):
        ix = mine[i : i + batch_size]
        c, r = reference.logps(policy, make_micro(pairs, ix, pad_id))
        vals[i : i + len(ix)] = torch.stack([c, r], 1).float()
    if world == 1:
        return vals[:n].cpu()
    gathered = accelerator.gather(vals).view(world, -1, 2).cpu()
    out = torch.empty(n, 2)
    for r in range(world):
        idx = torch.arange(r, n, world)
        out[idx] = gathered[r, : len(idx)]
    return out


def _fingerprint(cfg: DPOConfig, ref_kind: str, pairs: list[dict], eval_pairs: list[dict]) -> str:
    h = hashlib.sha256()
    ident = (
        cfg.model.name,
        cfg.model.revision,
        cfg.model.dtype,
        cfg.ref_model,
        ref_kind,
        cfg.loss_type == "ipo",
        cfg.lora.continue_adapter,
        cfg.lora.enabled,
    )
    h.update(repr(ident).encode())
    for split in (pairs, eval_pairs):
        h.update(b"|split|")
        for p in split:
            for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"):
                h.update(repr(p[k]).encode())
    return h.hexdigest()


def load_ref_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The cached (train, eval) reference log-probs and their metadata; a damaged file reads as no cache."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in ("train", "eval")}, fh.metadata() or {}
    except Exception:  # unreadable or from another version: recompute rather than fail
        return {}, {}


def precomputed_reference(trainer, source: Reference, cfg: DPOConfig, pairs, eval_pairs, pad_id: int) -> Reference:
    """Load out_dir/ref_logps.safetensors when it matches these pairs and reference, else compute and save it.

    Runs before Trainer.fit(), i.e. before any checkpoint is loaded: the policy still holds its
    starting weights, so a recomputation is correct even on --resume.
    """
    acc = trainer.accelerator
    path = Path(cfg.out_dir) / REF_CACHE
    fp = _fingerprint(cfg, source.kind, pairs, eval_pairs)
    if path.exists():
        saved, meta = load_ref_cache(path)
        if meta.get("fingerprint") == fp:
            if acc.is_main_process:
                print(f"[dpo] reusing reference log-probs from {path}")
            return Reference("cache", source.average, cache=saved)
        if acc.is_main_process:
            print(f"[dpo] {path} was computed for other pairs or another reference; recomputing")
    if acc.is_main_process:
        print(
            f"[dpo] precomputing reference log-probs ({source.kind}) for {len(pairs)} train + {len(eval_pairs)} "
            f"eval pairs"
        )
    model = acc.unwrap_model(trainer.model)  # no DDP wrapper: ranks may run different numbers of forwards
    table = {
        "train": compute_reference_logps(model, pairs, source, pad_id, cfg.eval_batch_size, acc),
        "eval": compute_reference_logps(model, eval_pairs, source, pad_id, cfg.eval_batch_size, acc),
    }
    if acc.is_main_process:
        from safetensors.torch import save_file

        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in table.items()}, str(tmp), metadata={"fingerprint": fp})
        fsync_path(tmp)
        os.replace(tmp, path)
    acc.wait_for_everyone()
    return Reference("cache", source.average, cache=table)


# --------------------------------------------------------------------------- stage
def _load_ref_model(cfg: DPOConfig, tok):
    ref_cfg = replace(cfg.model, name=cfg.ref_model, tokenizer=None, gradient_checkpointing=False)
    ref, ref_tok = load_model(ref_cfg, None, kind="causal_lm", trainable=False, verbose=False)
    if ref_tok.get_vocab() != tok.get_vocab():
        raise RlhfkitError(f"ref_model {cfg.ref_model} has a different tokenizer than the policy {cfg.model.name}")
    return ref


def _encode_data(cfg: DPOConfig, tok) -> tuple[list, list]:
    """Load and encode the train and held-out pairs; fail when no training pair fits data.max_length."""
    fmt = PromptFormat(cfg.template, tok)
    train_rows, eval_rows = load_pairs(cfg.data)
    pairs = encode_pairs(train_rows, fmt, cfg.data.max_length, "dpo", cfg.data.truncate)
    eval_pairs = encode_pairs(eval_rows, fmt, cfg.data.max_length, "dpo", cfg.data.truncate) if eval_rows else []
    if not pairs:
        raise RlhfkitError(f"no training pairs left after encoding (data.max_length={cfg.data.max_length})")
    print(
        f"[dpo] {len(pairs)} training pairs, {len(eval_pairs)} held-out pairs; loss {cfg.loss_type}, beta {cfg.beta}"
        + (f", label_smoothing {cfg.label_smoothing}" if cfg.label_smoothing else "")
    )
    return pairs, eval_pairs


def _choose_reference(cfg: DPOConfig, model, tok) -> tuple[Reference, bool]:
    """The reference (frozen model, adapter-disabled policy, or starting policy) and whether to precompute it."""
    # Only the starting policy itself cannot be recovered after the first update: always precomputed.
    average = cfg.loss_type == "ipo"
    # load_model keeps (does not merge) an adapter folder whenever lora.continue_adapter, even with lora.enabled=false
    continuing = cfg.lora.continue_adapter and is_adapter_dir(resolve_model_path(cfg.model.name))
    precompute = cfg.precompute_ref
    if cfg.ref_model:
        source = Reference("model", average, model=_load_ref_model(cfg, tok))
    elif peft_model(model) is not None and not continuing:
        source = Reference("adapter", average)
    else:
        why = (
            "lora.continue_adapter (disabling the adapter would give the bare base)"
            if continuing
            else "full fine-tuning"
        )
        if not precompute:
            print(f"[dpo] {why}: the reference is the starting policy, precomputed before the first update")
        source, precompute = Reference("policy", average), True
    return source, precompute


def run(cfg: DPOConfig) -> dict:
    torch.manual_seed(cfg.train.seed)
    model, tok = load_model(cfg.model, cfg.lora, kind="causal_lm")
    check_positions(model, cfg.data.max_length, "data.max_length")
    if cfg.disable_dropout:
        disable_dropout(model)
    pairs, eval_pairs = _encode_data(cfg, tok)
    source, precompute = _choose_reference(cfg, model, tok)
    reference = source
    trainer = Trainer(
        cfg,
        "dpo",
        model,
        len(pairs),
        unit="pairs",
        collate=lambda ix: make_micro(pairs, ix, tok.pad_token_id),
        count=count_pairs,
        loss=lambda m, micro: micro_loss(m, micro, reference, cfg.beta, cfg.loss_type, cfg.label_smoothing),
        evaluate=(
            lambda m: evaluate_pairs(m, eval_pairs, "eval", reference, cfg, tok.pad_token_id, trainer.accelerator)
        )
        if eval_pairs
        else None,
        save_final=lambda m, out: save_model(m, tok, out, cfg.model, cfg.lora),
    )
    if source.kind == "model" and not (cfg.model.load_in_8bit or cfg.model.load_in_4bit):  # quantized: placed at load
        source.model.to(trainer.accelerator.device)
    if precompute:
        reference = precomputed_reference(trainer, source, cfg, pairs, eval_pairs, tok.pad_token_id)
        source.model = None  # a separate reference model is not needed any more
    summary = trainer.fit()
    summary["reference"] = f"{source.kind} (precomputed)" if precompute else source.kind
    summary["out_dir"] = str(trainer.out / "final")
    if "eval_rewards/accuracy" in summary:
        print(
            f"[dpo] held-out: loss {summary['eval_loss']:.4f}, reward accuracy {summary['eval_rewards/accuracy']:.3f}, "
            f"margin {summary['eval_rewards/margin']:.3f} on {summary['eval_pairs']} pairs"
        )
    return summary
