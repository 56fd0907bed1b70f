"""Packing tokenized samples into fixed-length blocks, and collating packed or padded batches.

Packed blocks hold no pad tokens (only the epoch's one short last block is topped up in its batch).
Each sample ends in EOS and restarts `position_ids` at 0; the model is then called with
`attention_mask=None`, so transformers builds a block-diagonal causal mask (no attention across
samples, as the padding-free collators of TRL/HF do). A sample longer
than the room left is continued in the next block as a new segment (group_texts style): every
token appears exactly once, and no target ever crosses a segment start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.algorithms.losses import IGNORE_INDEX, shift_labels


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target (response tokens, or all)


def pack(samples: list[Sample], seq_len: int) -> list[dict]:
    """Greedy sequential packing into blocks of exactly `seq_len` tokens (the last may be shorter).

    Returns dicts with input_ids, position_ids, loss_mask (lists of equal length).
    """
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    blocks: list[dict] = []
    cur = {"input_ids": [], "position_ids": [], "loss_mask": []}
    for s in samples:
        ids, mask, pos = s.input_ids, s.loss_mask, 0
        while ids:
            room = seq_len - len(cur["input_ids"])
            take_ids, take_mask = ids[:room], mask[:room]
            cur["input_ids"] += take_ids
            cur["loss_mask"] += take_mask
            # A continuation in a new block restarts at 0: it cannot attend to its first part.
            cur["position_ids"] += list(range(pos, pos + len(take_ids)))
            ids, mask = ids[room:], mask[room:]
            pos = 0
            if len(cur["input_ids"]) == seq_len:
                blocks.append(cur)
                cur = {"input_ids": [], "position_ids": [], "loss_mask": []}
    if cur["input_ids"]:
        blocks.append(cur)
    return blocks


def collate_packed(blocks: list[dict], pad_id: int = 0) -> list[dict]:
    """Stack packed blocks into one batch: input_ids, position_ids, labels (B, T), no attention_mask.

    Targets: next token, only where it is in the same segment (its position id is not 0). A block
    shorter than the others (the epoch's last) is topped up with a separate pad segment — its own
    position ids, no targets — so real tokens see exactly what they would alone, and the batch is
    one forward (under DDP every rank must run the same number of forwards).
    """
    T = max(len(b["input_ids"]) for b in blocks)
    rows = []
    for b in blocks:
        extra = T - len(b["input_ids"])
        rows.append(
            (b["input_ids"] + [pad_id] * extra, b["position_ids"] + list(range(extra)), b["loss_mask"] + [0] * extra)
        )
    input_ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    position_ids = torch.tensor([r[1] for r in rows], dtype=torch.long)
    loss_mask = torch.tensor([r[2] for r in rows], dtype=torch.long)
    target = loss_mask.bool() & (position_ids != 0)
    return [{"input_ids": input_ids, "position_ids": position_ids, "labels": shift_labels(input_ids, target)}]


def collate_padded(samples: list[Sample], pad_id: int, seq_len: int) -> list[dict]:
    """Unpacked mode: one sample per row (truncated to seq_len), right-padded to the batch maximum."""
    rows = [(s.input_ids[:seq_len], s.loss_mask[:seq_len]) for s in samples]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, : len(ids)] = torch.tensor(mask)
    labels = shift_labels(input_ids, loss_mask.bool() & attention_mask.bool())
    return [{"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}]


def count_targets(micro: list[dict]) -> int:
    return int(sum((b["labels"] != IGNORE_INDEX).sum() for b in micro))
