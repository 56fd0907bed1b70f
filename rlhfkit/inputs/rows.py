"""SFT rows: (prompt, response) pairs or raw text from any table, encoded with the stage's template.

Used by the SFT stage for training and held-out data, and by eval for perplexity on held-out text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.inputs.packing import Sample
from rlhfkit.inputs.tables import load_table
from rlhfkit.inputs.templates import PromptFormat
from rlhfkit.runtime.errors import RlhfkitError

BUILTIN_CORPUS = "builtin:qa"
PROMPT_FIELDS = ("prompt", "question")
RESPONSE_FIELDS = ("response", "response_j", "chosen", "answer")


@dataclass
class SFTDataConfig:
    path: str = BUILTIN_CORPUS
    """Training data: JSONL/Parquet/CSV file, a datasets folder (e.g. `rlhfkit data` output), a hub
    id, or 'builtin:qa' (a small Q/A corpus shipped with rlhfkit)."""
    split: str | None = None
    """Split to read from a multi-split source (e.g. 'sft' from `rlhfkit data`)."""
    eval_path: str | None = None
    """Held-out data (same formats); None carves eval_fraction out of the training rows."""
    eval_split: str | None = None
    """Split of eval_path to read."""
    eval_fraction: float = 0.1
    """Fraction of rows held out for eval loss/perplexity when eval_path is None."""
    text_field: str | None = None
    """Train on this raw-text column (domain pre-training) instead of prompt/response pairs."""
    prompt_field: str | None = None
    """Prompt column; None picks the first of prompt, question."""
    response_field: str | None = None
    """Response column; None picks the first of response, response_j, chosen, answer."""
    max_samples: int = -1
    """Use at most this many training rows (-1: all)."""
    seq_len: int = 512
    """Block length (packed) or maximum row length (unpacked), in tokens."""
    packing: bool = True
    """Pack samples into seq_len blocks (no pads, no cross-sample attention)."""
    completion_only: bool | None = None
    """Loss only on response tokens; None: off when packing (as StackLLaMA), on when unpacked."""


def builtin_path(name: str) -> Path:
    path = Path(__file__).resolve().parent.parent / "resources" / f"{name}.jsonl"
    if not path.exists():
        raise RlhfkitError(f"no builtin dataset '{name}'")
    return path


def load_rows(path: str, split: str | None, max_rows: int = -1) -> list[dict]:
    if path.startswith("builtin:"):
        with open(builtin_path(path.split(":", 1)[1]), encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    else:
        rows = list(load_table(path, split))
    if not rows:
        raise RlhfkitError(f"{path}: no rows")
    return rows[:max_rows] if max_rows > 0 else rows


def _pick(columns, explicit: str | None, candidates: tuple[str, ...], what: str) -> str:
    if explicit:
        if explicit not in columns:
            raise RlhfkitError(f"data has no {what} column '{explicit}' (columns: {sorted(columns)})")
        return explicit
    for c in candidates:
        if c in columns:
            return c
    raise RlhfkitError(f"data has no {what} column (looked for {', '.join(candidates)}; columns: {sorted(columns)})")


def encode_rows(rows: list[dict], fmt: PromptFormat, dc: SFTDataConfig, completion_only: bool) -> list[Sample]:
    """Rows → token Samples; rows with an empty prompt/response/text are skipped and counted."""
    cols = rows[0].keys()
    samples, skipped = [], 0
    if dc.text_field:
        field_ = _pick(cols, dc.text_field, (), "text")
        for r in rows:
            text = r.get(field_)
            if not isinstance(text, str) or not text.strip():
                skipped += 1
                continue
            ids = fmt.encode_text(text)
            samples.append(Sample(ids, [1] * len(ids)))
    else:
        pf = _pick(cols, dc.prompt_field, PROMPT_FIELDS, "prompt")
        rf = _pick(cols, dc.response_field, RESPONSE_FIELDS, "response")
        for r in rows:
            p, resp = r.get(pf), r.get(rf)
            if not isinstance(p, str) or not isinstance(resp, str) or not resp.strip():
                skipped += 1
                continue
            ids, rmask = fmt.encode(p, resp)
            samples.append(Sample(ids, rmask if completion_only else [1] * len(ids)))
    if skipped:
        print(f"[sft] skipped {skipped} rows with an empty or non-text field")
    if not samples:
        raise RlhfkitError("no usable rows after skipping empty ones")
    return samples
