"""Token labels and losses: next-token labels, pairwise (Bradley-Terry) reward-model loss and DPO/IPO.

Torch only. B = number of preference pairs, T = response length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of a position no loss is taken on (PyTorch's cross_entropy default)


def shift_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels: labels[:, t] = input_ids[:, t+1] where loss_mask[:, t+1], else IGNORE.

    input_ids (B, T), loss_mask (B, T) -> labels (B, T); the last column is always IGNORE.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(loss_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)
    return labels


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _as_vector(name: str, t: torch.Tensor) -> torch.Tensor:
    """Accept (B,) or a value-head style (B, 1); return (B,)."""
    if t.dim() == 2 and t.shape[1] == 1:
        t = t.squeeze(1)
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape (B,) or (B, 1), got {tuple(t.shape)}")
    return t


def pairwise_reward_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry reward-model loss, mean over pairs.

    rewards_chosen, rewards_rejected: (B,) (or (B, 1)); margin: (B,) or None
    -> loss (scalar), stats {accuracy, ties, reward_margin, chosen_mean, rejected_mean}.
    accuracy counts strict wins only (a tie is wrong); ties is a fraction.
    """
    # Ouyang et al. 2022, eq. 1: -log sigma(r_c - r_r); the optional margin is
    # Llama-2's / TRL's; centering term from Eisenstein et al. 2023 "Helping or Herding".
    rewards_chosen = _as_vector("rewards_chosen", rewards_chosen)
    rewards_rejected = _as_vector("rewards_rejected", rewards_rejected)
    if rewards_chosen.shape != rewards_rejected.shape:
        raise ValueError(
            f"rewards_chosen {tuple(rewards_chosen.shape)} and rewards_rejected "
            f"{tuple(rewards_rejected.shape)} differ in shape"
        )
    diff = rewards_chosen - rewards_rejected
    logits = diff if margin is None else diff - _as_vector("margin", margin)
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * (rewards_chosen + rewards_rejected).square().mean()
    with torch.no_grad():
        stats = {
            "accuracy": (diff > 0).float().mean(),
            "ties": (diff == 0).float().mean(),
            "reward_margin": diff.float().mean(),
            "chosen_mean": rewards_chosen.float().mean(),
            "rejected_mean": rewards_rejected.float().mean(),
        }
    return loss, stats


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-prob from per-token log-probs.

    token_logps, mask: (B, T) -> (B,); sum over real tokens, or their mean
    when `average` (what TRL feeds to the IPO loss).
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    total = torch.where(m, token_logps, torch.zeros_like(token_logps)).sum(dim=1)
    if not average:
        return total
    return total / m.sum(dim=1).clamp(min=1).to(total.dtype)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and implicit rewards.

    All four logps: (B,) per-sequence log-probs -> losses (B,),
    chosen_rewards (B,), rejected_rewards (B,) (rewards are detached).
    With h = (pi_c - pi_r) - (ref_c - ref_r):
      sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
      ipo:     (h - 1 / (2 beta))^2
      hinge:   relu(1 - beta h)
    The caller decides whether logps are sums (DPO) or per-token means (TRL's
    IPO); see `sequence_logps`. chosen_rewards = beta * (pi_c - ref_c).
    """
    # Rafailov et al. 2023 eq. 7; eps > 0 is conservative DPO (Mitchell 2023);
    # IPO is Azar et al. 2023 eq. 17 (beta = tau); hinge is SLiC (Zhao et al. 2023).
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing only applies to loss_type='sigmoid', not {loss_type!r}")
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of two (N,) vectors (0 when either is constant)."""
    xc, yc = x - x.mean(), y.float() - y.float().mean()
    return (xc * yc).sum() / (xc.norm() * yc.norm()).clamp(min=eps)


def odin_reward_loss(
    scores_chosen: torch.Tensor,
    scores_rejected: torch.Tensor,
    len_chosen: torch.Tensor,
    len_rejected: torch.Tensor,
    w_quality: torch.Tensor,
    w_length: torch.Tensor,
    length_coef: float = 1.0,
    orth_coef: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ODIN's disentangled reward loss (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking
    in RLHF", sec. 5): two linear heads on shared features, r = r_Q + r_L trained Bradley–Terry, plus
      length_coef · (|ρ(r_Q, L)| − ρ(r_L, L))   (the length head takes the length signal, the quality head none)
      orth_coef · |w_Q · w_L|                   (the two heads' weight vectors orthogonal)
    with ρ Pearson's correlation over the batch's 2B responses and L their lengths in tokens.

    scores_*: (B, 2) = (quality, length); len_*: (B,); w_*: (H,) -> loss (scalar), stats.
    """
    if scores_chosen.dim() != 2 or scores_chosen.shape[1] != 2 or scores_chosen.shape != scores_rejected.shape:
        raise ValueError(
            f"ODIN scores must be (B, 2) each, got {tuple(scores_chosen.shape)}, {tuple(scores_rejected.shape)}"
        )
    bt, stats = pairwise_reward_loss(scores_chosen.sum(1), scores_rejected.sum(1))
    q = torch.cat([scores_chosen[:, 0], scores_rejected[:, 0]])
    lh = torch.cat([scores_chosen[:, 1], scores_rejected[:, 1]])
    lengths = torch.cat([len_chosen, len_rejected]).to(q.dtype)
    rho_q, rho_l = pearson(q, lengths), pearson(lh, lengths)
    orth = (w_quality * w_length).sum().abs()
    loss = bt + length_coef * (rho_q.abs() - rho_l) + orth_coef * orth
    with torch.no_grad():
        diff_q = scores_chosen[:, 0] - scores_rejected[:, 0]
        stats.update(
            {
                "bt_loss": bt.detach(),
                "quality_accuracy": (diff_q > 0).float().mean(),
                "quality_length_corr": rho_q.detach(),
                "length_head_corr": rho_l.detach(),
                "head_dot": orth.detach(),
            }
        )
    return loss, stats
