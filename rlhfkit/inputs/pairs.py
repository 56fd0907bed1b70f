"""Preference pairs shared by the reward-model and DPO stages: loading, splitting, encoding, collating.

Rows carry `prompt`, `chosen`, `rejected` (aliases: question / response_j / response_k, as in
lvwerra/stack-exchange-paired). Held-out pairs are split by prompt, so no prompt is in both splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from rlhfkit.inputs.tables import load_table
from rlhfkit.inputs.templates import cut_prompt, same_text
from rlhfkit.runtime.errors import RlhfkitError
from rlhfkit.runtime.training import StepPlan

PROMPT_FIELDS = ("prompt", "question")
CHOSEN_FIELDS = ("chosen", "response_j")
REJECTED_FIELDS = ("rejected", "response_k")


@dataclass
class PairDataConfig:
    path: str = ""
    """Pairs: an `rlhfkit data` output folder, a datasets folder, JSONL/Parquet/CSV or a hub id."""
    split: str | None = "rm_train"
    """Training split (used when the source has splits)."""
    eval_path: str | None = None
    """Held-out pairs; None uses eval_split of `path`, or carves eval_fraction by prompt."""
    eval_split: str | None = "rm_eval"
    """Held-out split name within eval_path (or path)."""
    eval_fraction: float = 0.1
    """Held-out fraction when the source has no eval split (assigned by a hash of the prompt)."""
    max_length: int = 512
    """Pairs whose chosen or rejected text is longer than this many tokens are dropped (counted),
    or cut to it when `truncate` is on."""
    truncate: bool = False
    """Cut over-long pairs instead of dropping them: one cut of the prompt for both sides (its head and
    its last 16 tokens, the template's answer cue; the budget the longer answer leaves, at least half of
    max_length), then each response keeps its head. Long Stack Exchange answers are the norm, so
    dropping keeps only the short ones (a biased sample)."""
    max_samples: int = -1
    """Use at most this many training pairs (-1: all)."""
    max_eval_samples: int = -1
    """Use at most this many held-out pairs (-1: all)."""


def _col(cols, candidates, what) -> str:
    for c in candidates:
        if c in cols:
            return c
    raise RlhfkitError(f"pair data has no {what} column (looked for {', '.join(candidates)}; columns: {sorted(cols)})")


def normalise_pairs(table) -> list[dict]:
    """Rows of any pair schema (prompt/question, chosen/response_j, rejected/response_k) as prompt/chosen/rejected."""
    cols = table.column_names if hasattr(table, "column_names") else list(table[0].keys())
    p, c, r = (
        _col(cols, PROMPT_FIELDS, "prompt"),
        _col(cols, CHOSEN_FIELDS, "chosen"),
        _col(cols, REJECTED_FIELDS, "rejected"),
    )
    return [{"prompt": row[p], "chosen": row[c], "rejected": row[r]} for row in table]


def _has_split(path: str, split: str | None) -> bool:
    from pathlib import Path

    if split is None or Path(path).is_file():  # a single file has no named splits
        return False
    try:
        load_table(path, split)
        return True
    except RlhfkitError:
        return False


def read_pairs(source: str, split: str | None = None) -> list[dict]:
    """Every pair of one source as prompt/chosen/rejected: `split` of a source that has splits (an
    `rlhfkit data` folder, a DatasetDict), else the whole file, folder or hub dataset."""
    return normalise_pairs(load_table(source, split if _has_split(source, split) else None))


def prompt_bucket(prompt: str) -> float:
    """Stable uniform number in [0, 1) from the prompt text (split assignment)."""
    return int(hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def load_pairs(dc: PairDataConfig) -> tuple[list[dict], list[dict]]:
    if not dc.path:
        raise RlhfkitError("data.path is required: a folder or file of preference pairs")
    if dc.eval_path:
        train = normalise_pairs(load_table(dc.path, dc.split if _has_split(dc.path, dc.split) else None))
        held = normalise_pairs(
            load_table(dc.eval_path, dc.eval_split if _has_split(dc.eval_path, dc.eval_split) else None)
        )
    elif _has_split(dc.path, dc.split) and _has_split(dc.path, dc.eval_split):
        train, held = (
            normalise_pairs(load_table(dc.path, dc.split)),
            normalise_pairs(load_table(dc.path, dc.eval_split)),
        )
    else:
        rows = normalise_pairs(load_table(dc.path, dc.split if _has_split(dc.path, dc.split) else None))
        held = [r for r in rows if prompt_bucket(r["prompt"]) < dc.eval_fraction]
        train = [r for r in rows if prompt_bucket(r["prompt"]) >= dc.eval_fraction]
    if dc.max_samples > 0:
        train = train[: dc.max_samples]
    if dc.max_eval_samples > 0:
        held = held[: dc.max_eval_samples]
    if not train:
        raise RlhfkitError(f"{dc.path}: no training pairs")
    return train, held


def truncate_sequence(ids: list[int], mask: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """One (prompt + response) sequence cut to max_length, as one side of truncate_pair."""
    if len(ids) <= max_length:
        return ids, mask
    n = mask.index(1) if 1 in mask else len(ids)
    return truncate_pair(ids[:n], ids[n:], ids[n:], max_length)[0]


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int):
    """Cut one comparison to max_length tokens per side, conditioning both sides on the *same* prompt:
    the prompt gets the budget the longer answer leaves (at least half of max_length; templates.cut_prompt),
    then each answer keeps its head (as TRL's DPO tokenize_row). Returns the two (ids, response mask)."""
    budget = max(max_length - max(len(chosen), len(rejected)), max_length // 2)
    prompt = cut_prompt(prompt, budget)
    room = max_length - len(prompt)
    return tuple((prompt + resp[:room], [0] * len(prompt) + [1] * len(resp[:room])) for resp in (chosen, rejected))


def encode_pairs(rows: list[dict], fmt, max_length: int, stage: str = "pairs", truncate: bool = False) -> list[dict]:
    """Token ids + response masks of chosen and rejected; empty pairs are dropped, over-long ones are
    dropped or (truncate) cut by truncate_pair."""
    out, too_long, cut, bad, same = [], 0, 0, 0, 0
    for r in rows:
        if (
            not all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected"))
            or not r["chosen"]
            or not r["rejected"]
        ):
            bad += 1
            continue
        if same_text(r["chosen"], r["rejected"]):  # a tie in disguise: nothing to learn
            same += 1
            continue
        c_ids, c_mask = fmt.encode(r["prompt"], r["chosen"])
        r_ids, r_mask = fmt.encode(r["prompt"], r["rejected"])
        # Full (uncut) answer lengths, for length baselines that truncation must not blur.
        full = {
            "chosen_chars": len(r["chosen"]),
            "rejected_chars": len(r["rejected"]),
            "chosen_tokens": sum(c_mask),
            "rejected_tokens": sum(r_mask),
        }
        if max(len(c_ids), len(r_ids)) > max_length:
            if not truncate:
                too_long += 1
                continue
            cut += 1
            n = c_mask.index(1) if 1 in c_mask else len(c_ids)  # both sides share these prompt tokens
            (c_ids, c_mask), (r_ids, r_mask) = truncate_pair(c_ids[:n], c_ids[n:], r_ids[n:], max_length)
        out.append({"chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids, "rejected_mask": r_mask, **full})
    if too_long or bad or same:
        print(
            f"[{stage}] dropped {too_long} pairs longer than {max_length} tokens, {bad} malformed pairs and "
            f"{same} whose chosen == rejected (kept {len(out)} of {len(rows)})"
        )

    if cut:
        print(f"[{stage}] cut {cut} of {len(rows)} pairs to {max_length} tokens")
    return out


def collate_pairs(pairs: list[dict], pad_id: int) -> dict:
    """Chosen rows then rejected rows, right-padded: input_ids, attention_mask, response_mask (2B, T)."""
    seqs = [(p["chosen_ids"], p["chosen_mask"]) for p in pairs] + [
        (p["rejected_ids"], p["rejected_mask"]) for p in pairs
    ]
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    response_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        response_mask[i, : len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


# --------------------------------------------------------------------------- less padding
def pair_length(pair: dict) -> int:
    """A pair's padded width in a batch: its longer sequence."""
    return max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))


class LengthGroupedPlan(StepPlan):
    """StepPlan whose epoch order puts pairs of similar length in the same global batch: the epoch's
    seeded permutation is cut into mega-batches of `mega_batches` global batches, each sorted by
    length, longest batch first (transformers' get_length_grouped_indices, as Trainer's
    group_by_length). A permutation per epoch still, a function of seed and epoch only, so every
    pair is used once per epoch, resume is exact and ranks split each step as StepPlan does."""

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        grad_accum: int,
        world: int,
        rank: int,
        seed: int,
        mega_batches: int = 50,
    ):
        super().__init__(len(lengths), batch_size, grad_accum, world, rank, seed)
        self.lengths, self.mega_batches = list(lengths), mega_batches

    @classmethod
    def like(cls, plan: StepPlan, lengths: list[int], mega_batches: int) -> LengthGroupedPlan:
        """The grouped plan with `plan`'s batch, ranks and seed (its steps per epoch are the same)."""
        if len(lengths) != plan.n:
            raise ValueError(f"{len(lengths)} lengths for a plan of {plan.n} items")
        return cls(lengths, plan.b, plan.g, plan.world, plan.rank, plan.seed, mega_batches)

    def order(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            g = torch.Generator().manual_seed(self.seed + 1000003 * epoch)
            self._perm = get_length_grouped_indices(self.lengths, self.global_batch, self.mega_batches, generator=g)
            self._perm_epoch = epoch
        return self._perm
