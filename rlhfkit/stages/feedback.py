"""Simulated human feedback: the policy samples k responses per prompt, a rater picks the better.

This is how the embedded default gets preference data offline: an automatic rater (e.g. VADER
positivity) stands in for human labellers, labelling pairs of the policy's *own* samples, as in
Ziegler et al. 2019 / Stiennon et al. 2020. Writes a datasets folder with the splits rm_train,
rm_eval (prompt/chosen/rejected + rater scores), rl_prompts and eval_prompts (held out from all).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit.inputs.prompts import read_prompts
from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
from rlhfkit.models.generation import FixedLengthSampling, generate
from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
from rlhfkit.rewards.scoring import load_scorer
from rlhfkit.runtime.config import save_config
from rlhfkit.runtime.errors import RlhfkitError
from rlhfkit.runtime.io import atomic_dir, atomic_write_json


@dataclass
class FeedbackConfig:
    out_dir: str = "runs/feedback"
    """Output datasets folder (splits rm_train, rm_eval, rl_prompts, eval_prompts) + stats.json."""
    overwrite: bool = False
    """Replace an existing out_dir."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy whose samples are labelled."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    """Prompt template (the one PPO will use)."""
    prompts: str = "builtin:review_openers"
    """Prompts: .txt (one per line), a table, or builtin:review_openers."""
    rater: str = "rlhfkit.rewards.raters:vader_positive"
    """The simulated labeller: any scorer spec ('module:function', RM folder, 'pipeline:<model>:<label>')."""
    samples_per_prompt: int = 2
    """Responses sampled per prompt; every pair with different rater scores becomes a preference."""
    max_pairs_per_prompt: int = 1
    """Keep at most this many pairs per prompt (the widest-gap ones first)."""
    min_gap: float = 0.0
    """Drop pairs whose rater scores differ by no more than this (ties and near-ties)."""
    n_label_prompts: int = 256
    """Prompts whose samples are labelled (rm_train + rm_eval)."""
    n_eval_prompts: int = 64
    """Prompts held out from everything, for the final gold-judge evaluation."""
    rm_eval_fraction: float = 0.15
    """Share of labelled prompts whose pairs go to rm_eval."""
    generation: FixedLengthSampling = field(
        default_factory=lambda: FixedLengthSampling(max_new_tokens=32, batch_size=32)
    )
    """Sampling settings."""
    seed: int = 0
    """Seed for the prompt split and sampling."""


CONFIG = FeedbackConfig


def run(cfg: FeedbackConfig) -> dict:
    import datasets

    prompts = read_prompts(cfg.prompts, None, None)
    rng = random.Random(cfg.seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    n_eval = min(cfg.n_eval_prompts, len(prompts) // 4)
    eval_idx, rest = order[:n_eval], order[n_eval:]
    label_prompts = [prompts[i] for i in rest[: cfg.n_label_prompts]]
    if len(label_prompts) < 4:
        raise RlhfkitError(f"only {len(prompts)} prompts: too few to label and hold out")
    rater = load_scorer(cfg.rater)
    flat = [p for p in label_prompts for _ in range(cfg.samples_per_prompt)]
    texts = _sample(cfg, flat)
    scores = rater(flat, texts)
    pairs, ties = _pairs(cfg, label_prompts, texts, scores)
    n_rm_eval = max(1, int(round(len(label_prompts) * cfg.rm_eval_fraction)))
    eval_prompt_set = set(label_prompts[:n_rm_eval])  # split by prompt: none in both
    rm_eval = [p for p in pairs if p["prompt"] in eval_prompt_set]
    rm_train = [p for p in pairs if p["prompt"] not in eval_prompt_set]
    if not rm_train:
        raise RlhfkitError("the rater found no preference among the samples (all ties?)")
    rl_prompts = [prompts[i] for i in rest]
    splits = datasets.DatasetDict(
        {
            "rm_train": datasets.Dataset.from_list(rm_train),
            "rm_eval": datasets.Dataset.from_list(rm_eval)
            if rm_eval
            else datasets.Dataset.from_dict({k: [] for k in rm_train[0]}),
            "rl_prompts": datasets.Dataset.from_dict({"prompt": rl_prompts}),
            "eval_prompts": datasets.Dataset.from_dict({"prompt": [prompts[i] for i in eval_idx]}),
        }
    )
    stats = {
        "prompts": len(prompts),
        "labelled_prompts": len(label_prompts),
        "samples": len(texts),
        "pairs": len(pairs),
        "ties_dropped": ties,
        "rm_train": len(rm_train),
        "rm_eval": len(rm_eval),
        "rl_prompts": len(rl_prompts),
        "eval_prompts": len(eval_idx),
        "sample_score_mean": sum(scores) / len(scores),
        "rater": rater.name,
    }
    with atomic_dir(Path(cfg.out_dir), overwrite=cfg.overwrite, mark="feedback") as tmp:
        splits.save_to_disk(str(tmp))
        atomic_write_json(tmp / "stats.json", stats)
        save_config(cfg, tmp / "config.yaml")
    print(
        f"[feedback] {len(pairs)} pairs ({len(rm_train)} train / {len(rm_eval)} eval), {ties} ties dropped; "
        f"mean rater score of the samples {stats['sample_score_mean']:.3f}"
    )
    return stats


def _sample(cfg: FeedbackConfig, flat: list[str]) -> list[str]:
    """The model's answers to `flat` (each label prompt repeated samples_per_prompt times), as text."""
    model, tok = load_model(cfg.model, LoraConfig(enabled=False), trainable=False, verbose=False)
    fmt = PromptFormat(cfg.template, tok)
    queries = [fmt.encode_prompt(p) for p in flat]
    texts: list[str] = []
    share = cfg.samples_per_prompt > 1  # each prompt's prefill runs once for its samples
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for i in range(0, len(queries), cfg.generation.batch_size):
            q = queries[i : i + cfg.generation.batch_size]
            lengths = [cfg.generation.max_new_tokens] * len(q)
            resp, rmask = generate(model, tok, q, lengths, cfg.generation, "cpu", share_queries=share)
            texts += [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(resp, rmask)]
            print(f"[feedback] sampled {len(texts)}/{len(queries)}", flush=True)
    return texts


def _pairs(cfg: FeedbackConfig, label_prompts: list[str], texts: list[str], scores: list[float]):
    """Per prompt, every two samples whose rater scores differ by more than min_gap (ties dropped and
    counted), the widest-gap max_pairs_per_prompt of them kept."""
    pairs, ties = [], 0
    k = cfg.samples_per_prompt
    for j, prompt in enumerate(label_prompts):
        cands = list(zip(texts[j * k : (j + 1) * k], scores[j * k : (j + 1) * k]))
        found = []
        for (a, sa), (b, sb) in itertools.combinations(cands, 2):
            if abs(sa - sb) <= cfg.min_gap or a == b:
                ties += 1
                continue
            (c, sc), (r, sr) = ((a, sa), (b, sb)) if sa > sb else ((b, sb), (a, sa))
            found.append({"prompt": prompt, "chosen": c, "rejected": r, "chosen_score": sc, "rejected_score": sr})
        found.sort(key=lambda x: x["chosen_score"] - x["rejected_score"], reverse=True)
        pairs += found[: cfg.max_pairs_per_prompt]
    return pairs, ties
