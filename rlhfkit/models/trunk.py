"""A frozen trunk run once: the lower blocks of a reward model whose top N blocks alone are trained.

With `lora.num_layers_unfrozen=N` the embeddings and the lower L−N blocks have no trainable weight
(and, checked here, no active dropout), so their output for a sequence never changes during training:
compute it once per sequence, keep it, and run only the top N blocks + norm + score head over the
kept states at every step and epoch. The math is the uncached model's exactly (the same ops on the
same inputs; tests/stages/test_reward.py compares loss curves and weights). The split is made by
swapping the backbone's block list for the call, so peft/DDP wrappers and the score hook run as usual.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from rlhfkit.models.forward import (
    is_pooled,
    last_token_index,
    position_ids_from_mask,
    sequence_scores,
    token_scores,
    unwrap,
)
from rlhfkit.models.loading import layer_list

SELF_CHECK_TOL = 1e-4  # cached vs full forward on real sequences, relative to the score's size


class FrozenTrunk:
    """The lower blocks of `model` (all but the top `n_top`) as a cache of their outputs."""

    def __init__(self, model, n_top: int):
        hf = unwrap(model)
        self.backbone = getattr(hf, hf.base_model_prefix)
        blocks = layer_list(hf)
        self.attr = next((name for name, mod in self.backbone.named_children() if mod is blocks), None)
        self.pooled = is_pooled(hf)  # an encoder's [CLS] classifier, not per-token scores
        self.blocks = blocks
        cut = max(len(blocks) - n_top, 0)
        self.lower, self.top = nn.ModuleList(blocks[:cut]), nn.ModuleList(blocks[cut:])
        self.last = self.lower[-1] if len(self.lower) else self.backbone.get_input_embeddings()

    def why_not_exact(self) -> str | None:
        """Why the cache would differ from the full model (a trainable weight or active dropout below
        the top blocks), or None."""
        from torch.distributed.fsdp import FSDPModule

        if self.pooled:  # BERT: blocks nested in `encoder`, positions added at the embedding
            return "an encoder backbone (the split supports decoder reward models)"
        if self.attr is None:
            return "its transformer blocks are not a direct child of the backbone"
        if any(isinstance(b, FSDPModule) for b in self.blocks):  # FSDP2 runs its blocks only inside the root's forward
            return "the blocks are sharded by FSDP"
        below = [self.backbone.get_input_embeddings(), *self.lower]
        if any(p.requires_grad for m in below for p in m.parameters()):
            return "a weight below the top blocks is trainable"
        for m in (mod for b in below for mod in b.modules()):
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                return "dropout is active below the top blocks"
            if any("dropout" in k and isinstance(v, float) and v > 0 for k, v in vars(m).items()):
                return "attention dropout is active below the top blocks"
        return None

    @contextlib.contextmanager
    def _only(self, blocks: nn.ModuleList):
        setattr(self.backbone, self.attr, blocks)
        try:
            yield
        finally:
            setattr(self.backbone, self.attr, self.blocks)

    @torch.no_grad()
    def encode(self, seqs: list[list[int]], pad_id: int, batch_size: int = 8) -> list[torch.Tensor]:
        """The trunk's output (T_i, H) for each token sequence; batched by length (little padding)."""
        dev = next(self.backbone.parameters()).device
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list[torch.Tensor | None] = [None] * len(seqs)
        captured = {}
        hook = self.last.register_forward_hook(
            lambda m, a, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o)
        )
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with self._only(self.lower):
                for i in range(0, len(order), batch_size):
                    idx = order[i : i + batch_size]
                    ids, mask = pad([seqs[j] for j in idx], pad_id)
                    ids, mask = ids.to(dev), mask.to(dev)
                    self.backbone(
                        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
                    )
                    for row, j in enumerate(idx):
                        out[j] = captured["h"][row, : len(seqs[j])].clone()
        finally:
            hook.remove()
            self.backbone.train(was_training)
        return out

    def scores(self, model, hidden: torch.Tensor, attention_mask: torch.Tensor, head: int | None = 0) -> torch.Tensor:
        """Scores (B,) — (B, K) with head=None — of sequences given by their trunk states (B, T, H)."""
        with self._only(self.top):
            per_token = token_scores(model, None, attention_mask, head=head, inputs_embeds=hidden)
        idx = last_token_index(attention_mask).clamp(min=0)
        return per_token[torch.arange(per_token.shape[0], device=per_token.device), idx]


STATES = "trunk_states"  # the key of a pair dict holding its (chosen, rejected) trunk outputs


def attach_pair_states(trunk: FrozenTrunk, pairs: list[dict], pad_id: int, batch_size: int = 8) -> None:
    """Run the trunk once over every pair's two sequences; kept in each pair dict under STATES."""
    seqs = [p[k] for p in pairs for k in ("chosen_ids", "rejected_ids")]
    states = trunk.encode(seqs, pad_id, batch_size)
    for i, p in enumerate(pairs):
        p[STATES] = (states[2 * i], states[2 * i + 1])


def collate_pair_states(pairs: list[dict]) -> dict:
    """As inputs.pairs.collate_pairs (chosen rows, then rejected rows), with trunk states for tokens:
    hidden (2B, T, H), attention_mask (2B, T)."""
    hidden, mask = pad_states([p[STATES][0] for p in pairs] + [p[STATES][1] for p in pairs])
    return {"hidden": hidden, "attention_mask": mask}


@torch.no_grad()
def self_check(trunk: FrozenTrunk, model, pairs: list[dict], pad_id: int) -> float:
    """Largest relative difference between cached and full-model scores of a few pairs (eval mode).
    A model whose forward does something the split misses (e.g. scales inputs_embeds) shows here."""
    was_training = model.training
    model.eval()
    try:
        few = pairs[:2]
        seqs = [p["chosen_ids"] for p in few] + [p["rejected_ids"] for p in few]  # collate's row order
        ids, mask = pad(seqs, pad_id)
        dev = next(model.parameters()).device
        full = sequence_scores(model, ids.to(dev), mask.to(dev))
        batch = {k: v.to(dev) for k, v in collate_pair_states(few).items()}
        cached = trunk.scores(model, batch["hidden"], batch["attention_mask"])
    finally:
        model.train(was_training)
    return ((full - cached).abs() / (1 + full.abs())).max().item()


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (B, T) of token lists."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded trunk states (B, T, H) with zeros and their attention mask (B, T)."""
    T = max(s.shape[0] for s in states)
    hidden = states[0].new_zeros((len(states), T, states[0].shape[1]))
    mask = torch.zeros((len(states), T), dtype=torch.long, device=states[0].device)
    for i, s in enumerate(states):
        hidden[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return hidden, mask
