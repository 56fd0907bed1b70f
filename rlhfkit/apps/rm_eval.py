"""`rlhfkit rm-eval RM_DIR PAIRS…`: score a reward-model folder on any pair sources, length-aware.

    rlhfkit rm-eval runs/x/rm/final runs/x/data other_site.parquet out=rm_eval.json

Each source is whatever the data loaders read (an `rlhfkit data` folder — its `split`, default
rm_eval —, JSONL/Parquet/CSV, a datasets folder or a hub id). Pairs are encoded with the template the
RM was trained with (its saved config.yaml) and cut to its training max_length as its training pairs
were cut (inputs.pairs.truncate_pair; an RM trained with truncate=false is still scored on every pair,
cut, and the count of cut pairs is reported). Prints and writes the JSON of rewards.pair_eval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.runtime.errors import ConfigError, RlhfkitError

MARK = "rm-eval"  # the "written_by" of our JSON: a file without it is the user's and is not replaced


@dataclass
class RmEvalConfig:
    rm_dir: str = ""
    """Reward model: the final/ folder of `rlhfkit rm` (or its run folder, whose final/ is used)."""
    pairs: list[str] = field(default_factory=list)
    """Pair sources: `rlhfkit data` folders, JSONL/Parquet/CSV files, datasets folders or hub ids."""
    split: str | None = "rm_eval"
    """Split read from sources that have splits (ignored for a single file)."""
    max_pairs: int = -1
    """Score at most this many pairs per source (-1: all)."""
    batch_size: int = 16
    """Pairs per forward batch."""
    out: str = "rm_eval.json"
    """JSON file written with the results (a file not written by rm-eval is never replaced)."""
    overwrite: bool = False
    """Replace `out` even when rm-eval did not write it."""


CONFIG = RmEvalConfig
POSITIONAL = ["rm_dir", "pairs"]


def rm_folder(path: str) -> Path:
    """The folder holding the trained RM: `path`, or `path`/final for an `rlhfkit rm` run folder."""
    from rlhfkit.models.adapters import is_adapter_dir, read_adapter_config

    p = Path(path)
    if not p.exists():
        raise RlhfkitError(f"{path}: no such reward-model folder")
    if (p / "final").is_dir() and not (p / "config.json").exists() and not is_adapter_dir(p):
        p = p / "final"
    if is_adapter_dir(p):
        if read_adapter_config(p).get("task_type") != "SEQ_CLS":
            raise RlhfkitError(f"{p}: a causal-LM adapter, not a reward model (its task_type is not SEQ_CLS)")
        return p
    try:
        archs = json.loads((p / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        raise RlhfkitError(f"{p}: holds neither config.json nor adapter_config.json: not a model folder") from None
    if not any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in archs):
        raise RlhfkitError(f"{p}: a {', '.join(archs) or 'model'} folder, not a reward model (sequence classifier)")
    return p


def check_out(cfg: RmEvalConfig) -> Path:
    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(f"out={out} is a folder; give a .json file")
    if out.exists() and not cfg.overwrite:
        try:
            mine = json.loads(out.read_text()).get("written_by") == MARK
        except (OSError, ValueError, AttributeError):
            mine = False
        if not mine:
            raise ConfigError(f"{out} exists and was not written by rm-eval; pass overwrite=true or another out=")
    return out


def read_sources(cfg: RmEvalConfig) -> dict[str, list[dict]]:
    """Every source's rows, read before the model loads (a bad source fails fast, in one line)."""
    from rlhfkit.inputs.pairs import read_pairs

    out = {}
    for source in cfg.pairs:
        rows = read_pairs(source, cfg.split)
        out[source] = rows[: cfg.max_pairs] if cfg.max_pairs > 0 else rows
    return out


def score_source(scorer, source: str, rows: list[dict], cfg: RmEvalConfig, heads: list[str]):
    """(numbers, encoded pairs, margins) of one source."""
    from rlhfkit.inputs.pairs import encode_pairs
    from rlhfkit.rewards.pair_eval import evaluate_pairs

    enc = encode_pairs(rows, scorer.fmt, scorer.max_length or 10**9, "rm-eval", truncate=True)
    if not enc:
        raise RlhfkitError(f"{source}: no usable pairs (of {len(rows)} rows)")
    cut = sum(sum(p["chosen_mask"]) < p["chosen_tokens"] or sum(p["rejected_mask"]) < p["rejected_tokens"] for p in enc)
    margins: list[float] = []
    ev = evaluate_pairs(scorer.model, enc, scorer.tok.pad_token_id, cfg.batch_size, margins=margins, head_names=heads)
    return {"source": source, "rows": len(rows), "answers_cut": cut, **ev}, enc, margins


def run(cfg: RmEvalConfig) -> dict:
    from rlhfkit.algorithms.preference_eval import length_aware_metrics
    from rlhfkit.models.loading import reward_heads
    from rlhfkit.rewards.pair_eval import LENGTH_KEYS
    from rlhfkit.rewards.scoring import RewardModelScorer
    from rlhfkit.runtime.config import to_dict
    from rlhfkit.runtime.io import atomic_write_json

    if not cfg.rm_dir or not cfg.pairs:
        raise ConfigError("usage: rlhfkit rm-eval RM_DIR PAIRS… (a reward-model folder and at least one pair source)")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {cfg.batch_size}")
    out = check_out(cfg)
    folder = rm_folder(cfg.rm_dir)
    heads = reward_heads(folder)
    sources = read_sources(cfg)
    scorer = RewardModelScorer(str(folder), batch_size=cfg.batch_size)
    results, all_enc, all_margins = [], [], []
    for source, rows in sources.items():
        res, enc, margins = score_source(scorer, source, rows, cfg, heads)
        print(
            f"[rm-eval] {source}: accuracy {res['accuracy']:.3f} on {res['pairs']} pairs, "
            f"longer wins {res['longer_wins']:.3f}, matched {res['matched_accuracy']} on {res['matched_pairs']}"
        )
        results.append(res)
        all_enc += enc
        all_margins += margins
    summary = {
        "written_by": MARK,
        "rm_dir": str(folder),
        "heads": heads,
        "template": to_dict(scorer.fmt.cfg),
        "max_length": scorer.max_length,
        "sources": results,
    }
    if len(results) > 1:  # the pooled numbers of every source's pairs (head 0)
        summary["pooled"] = length_aware_metrics(all_margins, **{k: [p[k] for p in all_enc] for k in LENGTH_KEYS})
    atomic_write_json(out, summary)
    summary["out"] = str(out)
    return summary
