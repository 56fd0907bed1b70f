"""Prompts for PPO and evaluation: a table column, a text file (one per line), or a builtin list."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.inputs.tables import load_table
from rlhfkit.inputs.templates import PROMPT_TAIL, cut_prompt
from rlhfkit.runtime.errors import RlhfkitError

PROMPT_FIELDS = ("prompt", "query", "question", "text")
RESOURCES = Path(__file__).resolve().parent.parent / "resources"


@dataclass
class PromptDataConfig:
    path: str = ""
    """Prompts: a .txt file (one per line), a table file/folder/hub id (e.g. `rlhfkit data` output), or
    'builtin:review_openers'."""
    split: str | None = "rl_prompts"
    """Split to read when the source has splits."""
    field: str | None = None
    """Column holding the prompt; None picks the first of prompt, query, question, text."""
    eval_path: str | None = None
    """Held-out eval prompts (same formats); None holds out n_eval prompts from path."""
    eval_split: str | None = None
    """Split of eval_path."""
    n_eval: int = 16
    """Eval prompts held out from `path` when eval_path is None."""
    max_prompts: int = -1
    """Use at most this many training prompts (-1: all)."""
    max_length: int = 512
    """Longest templated prompt, in tokens (StackLLaMA kept queries under 512): longer ones are cut
    (`truncate`) or dropped, counted either way, never passed through."""
    truncate: bool = True
    """Cut an over-long prompt to its head and its answer cue (templates.cut_prompt) instead of dropping it."""


def read_prompts(path: str, split: str | None, field: str | None) -> list[str]:
    if path.startswith("builtin:"):
        path = str(RESOURCES / f"{path.split(':', 1)[1]}.txt")
        if not Path(path).exists():
            raise RlhfkitError(f"no builtin prompt list '{path}'")
    p = Path(path)
    if p.suffix == ".txt":
        if not p.is_file():
            raise RlhfkitError(f"prompt file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = p.read_bytes()[: exc.start].count(b"\n") + 1
            raise RlhfkitError(f"{p}: line {line} is not UTF-8 text; save the prompts file as UTF-8") from None
        prompts = [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    else:
        try:
            table = load_table(path, split)
        except RlhfkitError:
            if split is None:
                raise
            table = load_table(path, None)
        cols = table.column_names
        col = field or next((c for c in PROMPT_FIELDS if c in cols), None)
        if col is None or col not in cols:
            raise RlhfkitError(
                f"{path}: no prompt column (looked for {field or ', '.join(PROMPT_FIELDS)}; columns: {cols})"
            )
        prompts = [x for x in table[col] if isinstance(x, str) and x.strip()]
    if not prompts:
        raise RlhfkitError(f"{path}: no prompts")
    return prompts


def load_prompts(cfg: PromptDataConfig, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train prompts, eval prompts); the eval ones are disjoint from training when carved out."""
    if not cfg.path:
        raise RlhfkitError("prompts.path is required")
    prompts = read_prompts(cfg.path, cfg.split, cfg.field)
    if cfg.eval_path:
        eval_prompts = read_prompts(cfg.eval_path, cfg.eval_split, cfg.field)
    else:
        order = list(range(len(prompts)))
        random.Random(seed).shuffle(order)
        n = min(cfg.n_eval, len(prompts) - 1)
        eval_prompts = [prompts[i] for i in order[:n]]
        prompts = [prompts[i] for i in sorted(order[n:])]
    if cfg.max_prompts > 0:
        prompts = prompts[: cfg.max_prompts]
    return prompts, eval_prompts


def encode_prompts(
    prompts: list[str], fmt, cfg: PromptDataConfig, stage: str
) -> tuple[list[str], list[list[int]], dict]:
    """Templated token ids of `prompts`, each at most cfg.max_length long: over-long ones are cut or
    (truncate=false) dropped. Returns (kept prompts, their ids, {"prompts_cut": n, "prompts_dropped": n})."""
    if cfg.max_length < 2 * PROMPT_TAIL:
        raise RlhfkitError(f"prompts.max_length={cfg.max_length}: too short to keep a prompt's head and answer cue")
    kept, queries, cut, dropped = [], [], 0, 0
    for p in prompts:
        ids = fmt.encode_prompt(p)
        if len(ids) > cfg.max_length:
            if not cfg.truncate:
                dropped += 1
                continue
            ids, cut = cut_prompt(ids, cfg.max_length), cut + 1
        kept.append(p)
        queries.append(ids)
    if cut or dropped:
        print(
            f"[{stage}] {cut} prompts cut and {dropped} dropped: longer than "
            f"prompts.max_length={cfg.max_length} tokens "
            f"(kept {len(kept)} of {len(prompts)})"
        )
    if prompts and not kept:
        raise RlhfkitError(f"every prompt is longer than prompts.max_length={cfg.max_length} tokens")
    return kept, queries, {"prompts_cut": cut, "prompts_dropped": dropped}
