"""Padding-free forwards: a padded batch run as one row of its real tokens.

The rows' tokens are laid end to end, position_ids restart at 0 for each row, and attention runs row by
row (one SDPA call per row and layer, through transformers' attention interface): no pad token goes
through the model, and no (N, N) mask over the packed row is made, which costs more attention than the
padding saves (transformers' own packed-sequence mask; measured, docs/benchmarks/ppo.md ninth run).
Outputs are the per-position predictions of the rows' last K tokens, put back as (B, K[, ·]).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "rlhfkit_packed"
SEGMENTS = "rlhfkit_cu_seqlens"  # forward kwarg: row boundaries in the packed row, [0, n_0, n_0 + n_1, ...]


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (1, H, N, D), key/value (1, H_kv, N, D) of a packed row -> (1, N, H, D): causal attention
    within each segment of kwargs[SEGMENTS] only."""
    cu = kwargs.pop(SEGMENTS, None)
    if cu is None:
        raise RuntimeError(f"the {ATTENTION} attention runs only inside rlhfkit's padding-free forward")
    window = kwargs.pop("sliding_window", None)
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        if a == b:  # a row with no tokens
            continue
        mask = None
        if window and b - a > window:  # sliding-window models: the band, as transformers' mask makes it
            i = torch.arange(b - a, device=query.device)
            mask = ((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window))[None, None]
        out, _ = sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], mask,
            dropout=dropout, scaling=scaling, is_causal=True, **kwargs,
        )  # fmt: skip
        outs.append(out)
    return torch.cat(outs, dim=1), None


AttentionInterface.register(ATTENTION, packed_attention)


@dataclass
class Packing:
    """Where a (B, T) batch's tokens go in the packed row and which of its last K predictions exist."""

    input_ids: torch.Tensor  # (1, N) the real tokens, row after row
    position_ids: torch.Tensor  # (1, N) restarting at 0 for each row
    segments: list[int]  # (B + 1,) row boundaries in the packed row
    predictors: torch.Tensor  # (P,) packed positions predicting the kept real targets
    targets: torch.Tensor  # (P,) those targets' token ids
    kept: torch.Tensor  # (B, K) bool: the target at this output position is a real token with a real predictor

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(P[, ·]) per-prediction values -> (B, K[, ·]), 0 where no prediction (a pad target)."""
        out = x.new_zeros(tuple(self.kept.shape) + tuple(x.shape[1:]))
        out[self.kept] = x
        return out


def contiguous_rows(attention_mask: torch.Tensor) -> bool:
    """Every row's real tokens form one run (left and/or right padding only, no holes)."""
    m = attention_mask.bool()
    n = m.sum(1)
    first = m.int().argmax(1)
    last = m.shape[1] - 1 - m.flip(1).int().argmax(1)
    return bool(((n == 0) | (last - first + 1 == n)).all())


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, keep: int) -> Packing:
    """input_ids, attention_mask, position_ids (B, T), rows contiguous -> the packed row and the map of the last
    `keep` predictions (what forward_logprobs(keep=K) returns) into it."""
    real = attention_mask.bool()
    B, T = real.shape
    index = real.flatten().cumsum(0).view(B, T) - 1  # (B, T) packed position of each real token
    kept = real[:, T - keep :] & real[:, T - keep - 1 : T - 1]  # (B, K)
    rows = real.sum(1)
    return Packing(
        input_ids=input_ids[real][None],
        position_ids=position_ids[real][None],
        segments=[0, *rows.cumsum(0).tolist()],
        predictors=index[:, T - keep - 1 : T - 1][kept],
        targets=input_ids[:, T - keep :][kept],
        kept=kept,
    )


@contextlib.contextmanager
def packed_attention_on(hf_model):
    """The model's attention is `packed_attention` inside the block (transformers reads the config at every
    call, and builds no mask for an implementation it has no mask function for)."""
    config = hf_model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def refusal(hf_model, forward_params: frozenset[str]) -> str | None:
    """Why a padding-free forward cannot run on `hf_model` (None: it can); the numeric check is separate."""
    impl = hf_model.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (sdpa or eager only)"
    if getattr(hf_model.config.get_text_config(), "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    if not {"position_ids", "logits_to_keep"} <= forward_params:
        return f"{type(hf_model).__name__}.forward takes no position_ids / logits_to_keep"
    # the forward recomputed in the backward runs outside packed_attention_on: it would not attend per row
    if any(getattr(m, "gradient_checkpointing", False) is True for m in hf_model.modules()):
        return "gradient checkpointing is on"
    return None
