"""Critic-free advantage estimators, policy objectives and loss aggregation (torch only).

Shapes: B = rollouts, T = response length. Group estimators take B = P * k rollouts with the k
samples of each prompt in consecutive rows (a group never straddles processes). `mask` is a
(B, T) float/bool tensor with 1 = real response token; `weights` a (B,) float tensor with 1 = the
rollout is in the loss (0 = dropped by dynamic sampling).
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhfkit.algorithms.rl import masked_sum

Aggregation = Literal["token", "sequence", "constant"]
AGGREGATIONS = ("token", "sequence", "constant")


def _groups(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) -> (B / k, k); refuses a batch that is not whole groups."""
    if x.dim() != 1 or x.numel() % k:
        raise ValueError(f"expected a (B,) tensor with B a multiple of k={k}, got shape {tuple(x.shape)}")
    return x.view(-1, k)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i − mean of the other k−1 rewards of its group.

    rewards: (B,) -> (B,).
    """
    # Kool et al. 2019; Ahmadian et al. 2024 ("Back to Basics"), eq. 6.
    if k < 2:
        raise ValueError("RLOO needs k ≥ 2 samples per prompt")
    g = _groups(rewards, k)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def group_advantages(rewards: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (r − group mean) / (group std + eps); scale=False keeps r − mean (Dr. GRPO).

    rewards: (B,) -> (B,); std is Bessel-corrected, as TRL's GRPOTrainer.
    """
    # Shao et al. 2024 (DeepSeekMath) §4.1.2; Liu et al. 2025 ("Understanding R1-Zero") drop the std.
    if k < 2:
        raise ValueError("group-normalised advantages need k ≥ 2 samples per prompt")
    g = _groups(rewards, k)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def group_mean_baseline(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """r − mean of its group (itself included): REINFORCE++-baseline's score. (B,) -> (B,)."""
    g = _groups(rewards, k)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def degenerate_groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Groups whose k rewards are all equal (zero advantage for every group estimator).

    rewards: (B,) -> (B / k,) bool.
    """
    # DAPO's dynamic sampling (Yu et al. 2025, §3.2) drops and re-samples these groups.
    g = _groups(rewards, k)
    return (g == g[:, :1]).all(dim=1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go G_t = Σ_{s ≥ t} γ^(s−t) r_s over the real tokens of each row.

    rewards, mask: (B, T) -> (B, T), 0 where mask is 0.
    """
    # REINFORCE++ (Hu et al. 2025, eq. 6) with the token-level KL already inside `rewards`.
    m = mask if mask.dtype == torch.bool else mask != 0
    running = torch.zeros_like(rewards[:, 0])
    out = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(m[:, t], rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(m[:, t], running, torch.zeros_like(running))
    return out


def sequence_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate with one ratio per sequence, r = π(y)/π_old(y) (RLOO's whole-response action).

    logprobs, old_logprobs, mask: (B, T); advantages: (B,) -> losses (B,), clipped (B,) bool.
    """
    # The response is one action (Ahmadian et al. 2024, §3), as TRL's RLOOTrainer: ratio of summed log-probs.
    ratio = torch.exp(masked_sum(logprobs - old_logprobs, mask, dim=1))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.max(unclipped, clipped), clipped > unclipped


def aggregate(
    losses: torch.Tensor, mask: torch.Tensor, how: Aggregation, weights: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, denominator) of the batch loss; loss = Σ_ranks num / Σ_ranks den.

    losses, mask: (B, T) per-token losses, or losses (B,) per-sequence (mask then unused);
    weights: (B,). token: Σ w·l over Σ w·|y| (DAPO); sequence: Σ w·mean_t(l) over Σ w (GRPO);
    constant: Σ w·l over Σ w·max_len (Dr. GRPO: no 1/|y| length bias).
    """
    # Summing numerator and denominator across ranks before dividing gives the same loss (and
    # gradient) whatever the process count (Liu et al. 2025 §3.1 on the length bias of 'sequence').
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {how!r}; valid: {', '.join(AGGREGATIONS)}")
    w = weights.to(losses.dtype)
    if losses.dim() == 1:
        return (w * losses).sum(), w.sum()
    per_seq = masked_sum(losses, mask, dim=1)  # (B,)
    n_tok = masked_sum(torch.ones_like(losses), mask, dim=1)  # (B,)
    if how == "token":
        return (w * per_seq).sum(), (w * n_tok).sum()
    if how == "sequence":
        return (w * per_seq / n_tok.clamp(min=1)).sum(), w.sum()
    return (w * per_seq).sum(), w.sum() * max_len
