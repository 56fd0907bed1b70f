"""Compare models (e.g. SFT vs PPO vs DPO) on held-out prompts.

Per model: mean RM score, mean score of an optional second judge (held-out RM, classifier or
callable — the gold judge that exposes RM over-optimisation), KL to the reference model on the
model's own samples, response length, reward-hacking detectors, perplexity on held-out text.
Across models: win-rates against the first model by the RM and by the judge.
Writes metrics.json and samples.jsonl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit.inputs.prompts import PromptDataConfig, encode_prompts, load_prompts, read_prompts
from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
from rlhfkit.models.generation import FixedLengthSampling, generate, response_logprobs
from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
from rlhfkit.rewards.detectors import detect
from rlhfkit.rewards.scoring import load_scorer
from rlhfkit.runtime.config import save_config
from rlhfkit.runtime.errors import ConfigError, RlhfkitError
from rlhfkit.runtime.io import append_jsonl, atomic_write_json, lock_dir, prepare_out_dir

OVEROPT_EPS = 0.01  # a gold-judge change smaller than this counts as flat


@dataclass
class EvalConfig:
    out_dir: str = "runs/eval"
    """Output directory (metrics.json, samples.jsonl, config.yaml)."""
    overwrite: bool = False
    """Replace a non-empty out_dir."""
    models: list[str] = field(default_factory=list)
    """Models to compare, first = baseline: 'name=path' or a path (adapter folders are merged)."""
    reference: str | None = None
    """Reference model for KL; None = the first model."""
    rm: str = ""
    """Reward model (folder, 'pipeline:<model>:<label>' or 'module:function')."""
    judge: str | None = None
    """Optional second judge, ideally independent of the RM (held-out RM, classifier, callable)."""
    prompts: PromptDataConfig = field(default_factory=lambda: PromptDataConfig(split="rl_prompts", n_eval=0))
    """Held-out prompts (prompts.path with prompts.max_prompts)."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    """Prompt template (the one the models were trained with)."""
    generation: FixedLengthSampling = field(default_factory=lambda: FixedLengthSampling())
    """Sampling settings."""
    perplexity_data: str | None = None
    """Held-out prompt/response or text file for perplexity (SFT data formats)."""
    seed: int = 0
    """Sampling seed (the same for every model)."""


CONFIG = EvalConfig


def _named(spec: str) -> tuple[str, str]:
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, path
    p = Path(spec)
    return (p.parent.name if p.name == "final" else p.name) or spec, spec


def run(cfg: EvalConfig, rm=None, judge=None) -> dict:
    if not cfg.models:
        raise ConfigError("models: give at least one model (name=path or path)")
    if not cfg.rm and rm is None:
        raise ConfigError("rm: a reward model or scorer is required")
    lock = lock_dir(Path(cfg.out_dir))  # noqa: F841  (one writer per out_dir, until this process ends)
    out = prepare_out_dir(Path(cfg.out_dir), overwrite=cfg.overwrite, owner="eval")
    save_config(cfg, out / "config.yaml")
    rm_scorer = load_scorer(rm if rm is not None else cfg.rm)
    judge_scorer = load_scorer(judge if judge is not None else cfg.judge) if (judge is not None or cfg.judge) else None
    models = [_named(s) for s in cfg.models]
    prompts, samples, per_model = _sample_models(cfg, models, _prompts(cfg))
    _score_models(cfg, models, prompts, samples, per_model, rm_scorer, judge_scorer)

    base, last = models[0][0], models[-1][0]
    win = {
        f"{name}_vs_{base}": {
            "rm": _win_rate(samples[name]["rm"], samples[base]["rm"]),
            "judge": _win_rate(samples[name]["judge"], samples[base]["judge"]) if judge_scorer else None,
        }
        for name, _ in models[1:]
    }
    for name, _ in models:
        s = samples[name]
        for p, t, r, j in zip(prompts, s["texts"], s["rm"], s["judge"] or [None] * len(prompts)):
            append_jsonl(
                out / "samples.jsonl", {"model": name, "prompt": p, "response": t, "rm_score": r, "judge_score": j}
            )
    metrics = {
        "prompts": len(prompts),
        "rm_inputs_cut": getattr(rm_scorer, "n_cut", None),  # (prompt, response) texts longer than the RM's max_length
        "models": {n: {k: v for k, v in m.items() if k != "flags"} for n, m in per_model.items()},
        "win_rate": win,
        "detectors": {n: m["flags"] for n, m in per_model.items()},
        "over_optimisation": over_optimisation(per_model[base], per_model[last]) if len(models) > 1 else None,
    }
    atomic_write_json(out / "metrics.json", metrics)
    _print_table(metrics)
    return metrics


def _prompts(cfg: EvalConfig) -> list[str]:
    prompts = (
        read_prompts(cfg.prompts.path, cfg.prompts.split, cfg.prompts.field)
        if cfg.prompts.n_eval == 0
        else load_prompts(cfg.prompts)[1]
    )
    return prompts[: cfg.prompts.max_prompts] if cfg.prompts.max_prompts > 0 else prompts


def _sample_models(cfg: EvalConfig, models: list[tuple[str, str]], prompts: list[str]):
    """Each model answers every prompt (same seed); returns the prompts all of them kept, the samples
    (texts, token ids, own log-probs) and per-model metrics so far."""
    per_model, samples = {}, {}
    for name, path in models:
        model, tok = load_model(ModelConfig(name=path), LoraConfig(enabled=False), trainable=False, verbose=False)
        fmt = PromptFormat(cfg.template, tok)
        kept, queries, bounded = encode_prompts(prompts, fmt, cfg.prompts, f"eval {name}")
        if len(kept) != len(prompts):
            if per_model:  # every model must answer the same prompts
                raise RlhfkitError(
                    f"{name}: its tokenizer drops other prompts than {models[0][0]}'s; set prompts.truncate=true"
                )
            prompts = kept
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            resp, rmask = generate(
                model, tok, queries, [cfg.generation.max_new_tokens] * len(queries), cfg.generation, "cpu"
            )
        texts = [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(resp, rmask)]
        logp = response_logprobs(model, queries, resp, rmask, tok.pad_token_id).sum(1)
        samples[name] = {"texts": texts, "queries": queries, "resp": resp, "rmask": rmask, "logp": logp, "tok": tok}
        per_model[name] = {"perplexity": _perplexity(model, tok, cfg) if cfg.perplexity_data else None, **bounded}
        del model
    return prompts, samples, per_model


def _score_models(cfg: EvalConfig, models, prompts, samples: dict, per_model: dict, rm_scorer, judge_scorer) -> None:
    """KL to the reference on each model's own samples, RM and judge scores, detectors: into per_model."""
    _, ref_path = _named(cfg.reference) if cfg.reference else models[0]
    ref, ref_tok = load_model(ModelConfig(name=ref_path), LoraConfig(enabled=False), trainable=False, verbose=False)
    baseline_words = None
    for name, _ in models:
        s = samples[name]
        kl = None
        if s["tok"].get_vocab() == ref_tok.get_vocab():  # KL needs one vocabulary
            ref_logp = response_logprobs(ref, s["queries"], s["resp"], s["rmask"], ref_tok.pad_token_id).sum(1)
            kl = (s["logp"] - ref_logp).mean().item()
        s["rm"] = rm_scorer(prompts, s["texts"])
        s["judge"] = judge_scorer(prompts, s["texts"]) if judge_scorer else None
        det = detect(s["texts"], baseline_words)
        if baseline_words is None:
            baseline_words = det["mean_words"]
        per_model[name].update(
            {
                "rm_score": sum(s["rm"]) / len(s["rm"]),
                "judge_score": sum(s["judge"]) / len(s["judge"]) if s["judge"] else None,
                "kl": kl,
                "response_length": s["rmask"].sum(1).float().mean().item(),
                "repetition_rate": det["repetition_rate"],
                "fence_rate": det["fence_rate"],
                "length_drift": det["length_drift"],
                "flags": det["flags"],
            }
        )


def over_optimisation(first: dict, last: dict) -> dict:
    """RM score up while the independent judge is flat or down: the policy is gaming the RM."""
    rm_delta = last["rm_score"] - first["rm_score"]
    judge_delta = None if first["judge_score"] is None else last["judge_score"] - first["judge_score"]
    flag = judge_delta is not None and rm_delta > 0 and judge_delta < OVEROPT_EPS
    if judge_delta is None:
        note = "no independent judge: over-optimisation cannot be assessed"
    elif flag:
        note = f"RM score rose by {rm_delta:+.3f} while the judge moved {judge_delta:+.3f}: likely reward hacking"
    else:
        note = f"RM {rm_delta:+.3f}, judge {judge_delta:+.3f}: gains agree"
    return {"rm_delta": rm_delta, "judge_delta": judge_delta, "flag": flag, "note": note}


def _win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where a beats b (ties count half)."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def _perplexity(model, tok, cfg: EvalConfig) -> float:
    from rlhfkit.inputs.packing import collate_padded
    from rlhfkit.inputs.rows import SFTDataConfig, encode_rows, load_rows
    from rlhfkit.models.forward import eval_perplexity

    rows = load_rows(cfg.perplexity_data, None)
    dc = SFTDataConfig(path=cfg.perplexity_data, packing=False, text_field="text" if "text" in rows[0] else None)
    samples = encode_rows(rows, PromptFormat(cfg.template, tok), dc, completion_only=False)
    res = eval_perplexity(
        model, samples, lambda b: collate_padded(b, tok.pad_token_id, 1024), cfg.generation.batch_size
    )
    return res["perplexity"]


def _print_table(metrics: dict) -> None:
    cols = ("rm_score", "judge_score", "kl", "response_length", "repetition_rate", "fence_rate", "perplexity")
    print("model".ljust(16) + "".join(c[:14].rjust(15) for c in cols))
    for name, m in metrics["models"].items():
        cells = ["-" if m.get(c) is None else f"{m[c]:.4f}" for c in cols]
        print(name[:16].ljust(16) + "".join(x.rjust(15) for x in cells))
    for k, v in metrics["win_rate"].items():
        print(f"win-rate {k}: RM {v['rm']:.3f}" + (f", judge {v['judge']:.3f}" if v["judge"] is not None else ""))
    if metrics["over_optimisation"]:
        print("over-optimisation:", metrics["over_optimisation"]["note"])
    if not all(math.isfinite(m["rm_score"]) for m in metrics["models"].values()):
        print("warning: non-finite RM scores")
