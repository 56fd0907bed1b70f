"""`rlhfkit data`: preference / SFT / prompt splits from Stack Exchange dumps or Hugging Face schemas.

    rlhfkit data stackexchange path/to/beer.stackexchange.com/Posts.xml out_dir=runs/data
    rlhfkit data stackexchange dumps/ --fractions.sft 0.3 ... --format parquet
    rlhfkit data hf Anthropic/hh-rlhf out_dir=runs/hh          # or a local .jsonl/.parquet file

Writes out_dir/ (a `datasets` folder or <split>.parquet files) with the splits sft, rm_train, rm_eval
and rl_prompts, plus stats.json and config.yaml. See docs/data.md.
"""

from __future__ import annotations

import sys

from rlhfkit.data.options import DataConfig, SplitFractions  # noqa: F401 - SplitFractions re-exported

CONFIG = DataConfig
POSITIONAL = ["source", "paths"]


def run(cfg: DataConfig) -> dict:
    """Build the splits; print a human summary (stderr) and return a short JSON-able summary."""
    from rlhfkit.data.pipeline import build, summary_text

    stats = build(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(summary_text(stats), file=sys.stderr, flush=True)
    return {
        "out_dir": stats["out_dir"],
        "format": stats["format"],
        "rows": stats["rows"],
        "questions": stats["questions"],
        "answers": stats["answers"],
        "skipped": sum(stats["skipped"].values()),
        "filtered": sum(stats["filtered"].values()),
        "partial": bool(stats["partial"]),
        "seconds": stats["seconds"],
    }
