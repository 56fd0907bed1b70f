"""Configuration of the data stage (`rlhfkit data`), shared by the CLI and the Python API.

Each field is documented by the string right under it; `rlhfkit data --help` prints them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

SPLITS = ("sft", "rm_train", "rm_eval", "rl_prompts")


@dataclass
class SplitFractions:
    sft: float = 0.25
    """Share of questions whose accepted (else top-scored) answer becomes an SFT example."""
    rm_train: float = 0.45
    """Share of questions whose answer pairs train the reward model."""
    rm_eval: float = 0.05
    """Share of questions whose answer pairs evaluate the reward model."""
    rl_prompts: float = 0.25
    """Share of questions used only as RL prompts."""

    def __post_init__(self) -> None:
        values = [self.sft, self.rm_train, self.rm_eval, self.rl_prompts]
        if any(v < 0 or math.isnan(v) for v in values):
            raise ValueError(f"split fractions must be >= 0, got {dict(zip(SPLITS, values))}")
        if abs(sum(values) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must add up to 1, got {sum(values):g} ({dict(zip(SPLITS, values))})")

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.sft, self.rm_train, self.rm_eval, self.rl_prompts)


@dataclass
class DataConfig:
    source: Literal["stackexchange", "hf"] = "stackexchange"
    """Kind of input: 'stackexchange' (Posts.xml dumps) or 'hf' (a Hugging Face schema, by hub id or file)."""
    paths: list[str] = field(default_factory=list)
    """Inputs. stackexchange: Posts.xml, Posts.xml.gz, a site's .7z archive, a site folder, or a folder of
    sites. hf: a hub id or a local JSONL/Parquet/CSV file or datasets folder."""
    out_dir: str = "runs/data"
    """Output folder: the splits (a datasets folder, or one Parquet file per split), stats.json, config.yaml."""
    format: Literal["arrow", "parquet"] = "arrow"
    """'arrow': one `datasets` folder (DatasetDict.save_to_disk); 'parquet': <split>.parquet files."""
    overwrite: bool = False
    """Replace an existing out_dir."""
    allow_partial: bool = False
    """On a malformed or truncated input, keep what parsed before the error (recorded in stats.json)
    instead of failing."""
    seed: int = 0
    """Seed of the split assignment and of the pair sampling."""
    fractions: SplitFractions = field(default_factory=SplitFractions)
    """Share of questions in each split (a question goes to exactly one split, by a seeded hash of its id)."""
    max_pairs_per_question: int = 10
    """At most this many answer pairs per question (a seeded sample when there are more); 0 or less: all."""
    prompt_style: Literal["title_body", "body"] = "title_body"
    """What `prompt` holds for a Stack Exchange question: title + blank line + body, or the body only."""
    markdown: bool | None = None
    """Convert HTML bodies to Markdown (markdownify-rs when installed, else markdownify; env
    RLHFKIT_MARKDOWN=python|rust|auto). None: on for Stack Exchange dumps and the H4 schema (HTML), off for
    the other HF schemas (already text)."""
    max_chars: int | None = None
    """Drop rows whose prompt + response (for pairs: prompt + the longer answer) exceed this many characters."""
    max_tokens: int | None = None
    """Drop rows whose prompt + response (for pairs: the longer answer) exceed this many tokens; needs `tokenizer`."""
    tokenizer: str | None = None
    """Tokenizer (hub id or local folder) used by max_tokens."""
    schema: Literal["auto", "h4", "paired", "hh", "generic"] = "auto"
    """For source=hf: 'h4' (question, answers[{text, pm_score, selected}]), 'paired' (question, response_j,
    response_k), 'hh' (chosen/rejected dialogues), 'generic' (prompt, chosen, rejected); 'auto' picks from
    the columns."""
    input_split: str | None = None
    """For source=hf: the split to read from a hub dataset or a multi-split folder (default: train)."""
    workers: int = 0
    """Processes converting HTML to Markdown. 0: automatic (1 with markdownify-rs or for small inputs, else
    up to 4)."""

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if self.max_tokens is not None and not self.tokenizer:
            raise ValueError("max_tokens needs a tokenizer (tokenizer=<hub id or folder>)")
        for name in ("max_chars", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
