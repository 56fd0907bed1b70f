"""Pure-math building blocks for PPO-based RLHF (torch only).

Shapes: B = batch, T = response length, V = vocabulary. A `mask` is a float or
bool (B, T) tensor with 1 = real response token; padded positions never affect
any value or gradient returned here.

`all_reduce` hooks: a callable that returns the sum of a tensor across
processes (None = single process). `torch.distributed.all_reduce` itself also
works: when the callable returns None the tensor is taken as reduced in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from rlhfkit.runtime.config import check_positive

AllReduce = Callable[[torch.Tensor], torch.Tensor | None] | None

KL_KINDS = ("kl", "abs", "mse", "k3", "full")


# --------------------------------------------------------------------------- #
# Masked statistics
# --------------------------------------------------------------------------- #


def _reduce(t: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
    """Sum `t` across processes with `all_reduce` (identity when None)."""
    if all_reduce is None:
        return t
    out = all_reduce(t)
    return t if out is None else out


def _bool(mask: torch.Tensor) -> torch.Tensor:
    """Float or bool (B, T) mask -> bool (B, T)."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over positions where `mask` is 1.

    x, mask: (B, T) -> scalar, or the reduced shape when `dim` is given.
    """
    # torch.where (not x * mask) so inf/nan in padding cannot leak in as nan.
    x = torch.where(_bool(mask), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(
    x: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    all_reduce: AllReduce = None,
) -> torch.Tensor:
    """Mean of `x` over masked entries; an all-zero mask gives 0.

    x, mask: (B, T) -> scalar, or the reduced shape when `dim` is given.
    `all_reduce` (only with dim=None) makes it the mean over all processes.
    """
    total = masked_sum(x, mask, dim)
    count = masked_sum(torch.ones_like(x), mask, dim)
    if all_reduce is not None:
        if dim is not None:
            raise ValueError("all_reduce is only supported with dim=None")
        total, count = _reduce(torch.stack([total, count]), all_reduce).unbind(0)
    return total / count.clamp(min=1)


def _masked_mean_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool, all_reduce: AllReduce
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) of `x` over masked entries; x, mask: (B, T) -> two scalars."""
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    sq_dev = masked_sum((x - mean) ** 2, mask)
    count = masked_sum(torch.ones_like(x), mask)
    sq_dev, count = _reduce(torch.stack([sq_dev, count]), all_reduce).unbind(0)
    denom = count - 1 if unbiased else count
    return mean, sq_dev / denom.clamp(min=1)


def masked_var(
    x: torch.Tensor,
    mask: torch.Tensor,
    unbiased: bool = True,
    all_reduce: AllReduce = None,
) -> torch.Tensor:
    """Variance of `x` over masked entries (Bessel-corrected when `unbiased`).

    x, mask: (B, T) -> scalar. A mask with < 2 real entries gives 0, not nan.
    """
    return _masked_mean_var(x, mask, unbiased, all_reduce)[1]


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: AllReduce = None,
) -> torch.Tensor:
    """Normalise `x` to zero mean / unit variance using masked entries only.

    x, mask: (B, T) -> (B, T); positions where mask is 0 are exactly 0.
    shift_mean=False keeps the original mean (TRL does this for rewards).
    """
    mean, var = _masked_mean_var(x, mask, unbiased=True, all_reduce=all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_bool(mask), whitened, torch.zeros_like(whitened))


# --------------------------------------------------------------------------- #
# Advantages
# --------------------------------------------------------------------------- #


def compute_gae(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation over the response tokens.

    values, rewards, mask: (B, T) -> advantages (B, T), returns (B, T).
    After the last real token the episode ends (next value 0); masked tokens
    get advantage 0 and return 0. Interior masked tokens are skipped over
    (the next *real* token's value is used), which equals the usual
    TRL / Huang et al. (2024) loop for right-padded masks.
    returns = advantages + values.
    """
    # Schulman et al. 2016, eq. 16: A_t = sum_l (gamma*lam)^l delta_{t+l};
    # vectorised over B with a backward loop over T as in TRL / Huang et al.
    m = _bool(mask)
    zeros = torch.zeros_like(values[:, 0])
    next_value, lastgaelam = zeros, zeros
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        real = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae_t = delta + gamma * lam * lastgaelam
        lastgaelam = torch.where(real, gae_t, lastgaelam)
        next_value = torch.where(real, values[:, t], next_value)
        advantages[:, t] = torch.where(real, gae_t, zeros)
    returns = torch.where(m, advantages + values, torch.zeros_like(values))
    return advantages, returns


# --------------------------------------------------------------------------- #
# KL penalty and rewards
# --------------------------------------------------------------------------- #


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits -> float32 so log_softmax sums stay accurate."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str = "kl",
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from sampled-token log-probs.

    logprobs, ref_logprobs: (B, T) -> (B, T).
    kind: "kl" (k1 = logp - ref_logp), "abs" (|k1|), "mse" (k2 = 0.5 * k1^2),
    "k3" ((r - 1) - log r with r = ref_p / p), or "full" (exact KL summed
    over the vocabulary; needs logits and ref_logits of shape (B, T, V)).
    """
    # k1/k2/k3 are the estimators of Schulman's "Approximating KL divergence"
    # blog; k1 is what Ziegler et al. 2019 / Ouyang et al. 2022 penalise.
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")
    if kind == "full":
        if logits is None or ref_logits is None:
            raise ValueError('kind="full" needs logits and ref_logits of shape (B, T, V)')
        log_p = F.log_softmax(_upcast(logits), dim=-1)
        log_q = F.log_softmax(_upcast(ref_logits), dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    logr = logprobs - ref_logprobs
    if kind == "kl":
        return logr
    if kind == "abs":
        return logr.abs()
    if kind == "mse":
        return 0.5 * logr.square()
    # k3: unbiased and always >= 0; written with -logr = log(ref_p / p).
    return torch.expm1(-logr) + logr


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (0 for an all-padding row).

    mask: (B, T) -> (B,) long.
    """
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (positions * _bool(mask).long()).argmax(dim=1)


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float | torch.Tensor
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL_t, plus the score on the last real token.

    scores: (B,); kl, mask: (B, T) -> rewards (B, T), 0 where mask is 0. Rows with no real token
    receive no score.
    """
    # Ziegler et al. 2019 / Ouyang et al. 2022: R(x, y) = r(x, y) - beta * KL,
    # with the sequence score credited at the final token (TRL compute_rewards).
    m = _bool(mask)
    non_score_reward = torch.where(m, -kl_coef * kl, torch.zeros_like(kl))
    scores = scores.to(kl.dtype)
    score = torch.where(m.any(dim=1), scores, torch.zeros_like(scores))
    return non_score_reward.scatter_add(1, last_token_index(mask).unsqueeze(1), score.unsqueeze(1))


# --------------------------------------------------------------------------- #
# PPO losses and diagnostics
# --------------------------------------------------------------------------- #


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate max(−A r, −A clip(r, 1−ε_low, 1+ε_high)) and where it clipped.

    logprobs, old_logprobs, mask: (B, T); advantages: (B, T) or (B,) (broadcast over T)
    -> losses (B, T), clipped (B, T) bool; both 0/False where mask is 0.
    """
    # Schulman et al. 2017, eq. 7; clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025, §3.1).
    m = _bool(mask)
    adv = advantages.unsqueeze(1).expand_as(logprobs) if advantages.dim() == 1 else advantages
    logratio = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))  # zeroed before exp
    ratio = torch.exp(logratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    losses = torch.where(m, torch.max(unclipped, clipped), torch.zeros_like(unclipped))
    return losses, m & (clipped > unclipped)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss, token-level masked mean.

    logprobs, old_logprobs, advantages, mask: (B, T)
    -> pg_loss (scalar), stats {clipfrac, approxkl, policykl, ratio} (detached scalars).
    """
    m = _bool(mask)
    high = cliprange if cliprange_high is None else cliprange_high
    losses, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, m, cliprange, high)
    pg_loss = masked_mean(losses, m)
    stats = ratio_stats(logprobs, old_logprobs, m)
    stats["clipfrac"] = masked_mean(clipped.to(logprobs.dtype), m)
    return pg_loss, stats


@torch.no_grad()
def ratio_stats(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token-level ratio diagnostics: approxkl (k2), policykl (k1), mean ratio.

    logprobs, old_logprobs, mask: (B, T) -> detached scalars.
    """
    m = _bool(mask)
    logratio = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))
    return {
        # approxkl = 0.5 * E[(logp - old_logp)^2] (k2), as logged by TRL-classic.
        "approxkl": 0.5 * masked_mean(logratio.square(), m),
        "policykl": masked_mean(-logratio, m),
        "ratio": masked_mean(torch.exp(logratio), m),
    }


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value-function loss 0.5 * masked_mean(max(sq, sq_clipped)).

    values, old_values, returns, mask: (B, T) -> vf_loss (scalar), stats {vf_clipfrac}.
    """
    # Value clipping around old_values as in OpenAI baselines ppo2 / TRL
    # (Huang et al. 2024 detail); the 0.5 factor matches TRL's vf_loss.
    m = _bool(mask)
    values = torch.where(m, values, torch.zeros_like(values))
    old_values = torch.where(m, old_values, torch.zeros_like(old_values))
    returns = torch.where(m, returns, torch.zeros_like(returns))
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (values - returns).square()
    vf_losses2 = (values_clipped - returns).square()
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), m)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).to(values.dtype), m)}
    return vf_loss, stats


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at every position, from its normalised log-probs (a
    log_softmax the caller already has: one pass over V fewer than from logits).

    logp: (B, T, V) -> entropy (B, T). Entries with probability 0 (0 · -inf = nan) add 0: nansum, as fast
    as sum where a torch.where costs 2× (NaN logits still show in the guarded log-probs and losses).
    """
    return -(logp.exp() * logp).nansum(dim=-1)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = None
) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over masked entries (of all ranks with all_reduce).

    values, returns, mask: (B, T) -> scalar float tensor (nan if Var[returns] is 0).
    """
    var_returns = masked_var(returns, mask, all_reduce=all_reduce)
    var_error = masked_var(returns - values, mask, all_reduce=all_reduce)
    # torch.where instead of `if` keeps it free of a host-device sync.
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns == 0, nan, 1 - var_error / var_returns)


# --------------------------------------------------------------------------- #
# KL coefficient controllers
# --------------------------------------------------------------------------- #


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2).

    value <- value * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Adapt `value` after `n_steps` samples that showed mean KL `current_kl`."""
        # Proportional controller, error clipped to +-0.2 (Ziegler et al. 2019).
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        """Plain floats, safe for torch.save / json."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from `state_dict()` output."""
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """No-op; returns the fixed `value`."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        """Plain floats, safe for torch.save / json."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from `state_dict()` output."""
        self.value = float(state["value"])


# --------------------------------------------------------------------------- #
# Running statistics and samplers
# --------------------------------------------------------------------------- #


class RunningMoments:
    """Running mean / std of scalar scores across updates (and processes).

    Keeps (count, mean, m2) in float64 and merges each batch with the
    parallel formula of Chan et al. (1979); `.std` is Bessel-corrected.
    """

    def __init__(self):
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        """Bessel-corrected variance of everything seen (0 before 2 samples)."""
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        """Square root of `var`."""
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, x: torch.Tensor, all_reduce: AllReduce = None) -> tuple[float, float]:
        """Merge a batch of scores (any shape, e.g. (B,)) into the running moments.

        Returns (batch_mean, batch_std) of this batch (global when `all_reduce`
        is given; batch_std Bessel-corrected).
        """
        # Two reductions (sum/count, then squared deviations) as in TRL's
        # get_global_statistics; the merge is Chan et al.'s parallel algorithm.
        x = x.detach().reshape(-1).to(torch.float64)
        sums = _reduce(torch.stack([x.sum(), x.new_tensor(float(x.numel()))]), all_reduce)
        n_b = float(sums[1])
        if n_b == 0:
            raise ValueError("RunningMoments.update got an empty batch")
        mean_b = float(sums[0]) / n_b
        m2_b = float(_reduce((x - mean_b).square().sum().reshape(1), all_reduce)[0])
        delta = mean_b - self.mean
        total = self.count + n_b
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta * delta * self.count * n_b / total
        self.count = total
        batch_std = math.sqrt(m2_b / (n_b - 1)) if n_b > 1 else 0.0
        return mean_b, batch_std

    def state_dict(self) -> dict[str, float]:
        """Plain floats, safe for torch.save / json."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from `state_dict()` output."""
        self.count = float(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


class LengthSampler:
    """Uniform integer sampler over [min_value, max_value] (both inclusive)."""

    def __init__(self, min_value: int, max_value: int):
        if min_value > max_value:
            raise ValueError(f"min_value ({min_value}) must be <= max_value ({max_value})")
        self.min_value = int(min_value)
        self.max_value = int(max_value)

    def __call__(self, generator: torch.Generator | None = None) -> int:
        """One length drawn with `generator` (torch's default RNG when None)."""
        return int(torch.randint(self.min_value, self.max_value + 1, (1,), generator=generator))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` lengths as a (n,) long tensor."""
        return torch.randint(self.min_value, self.max_value + 1, (n,), generator=generator)


# --------------------------------------------------------------------------- #
# Hyper-parameters (the RL stage's `ppo:` section)
# --------------------------------------------------------------------------- #


@dataclass
class PPOHyperConfig:
    """Policy-gradient and KL hyper-parameters; the estimator-specific ones say which `algo` reads them."""

    init_kl_coef: float = 0.2
    """β: weight of the per-token KL penalty (initial value when adaptive)."""
    adaptive_kl: bool = True
    """Adapt β towards target_kl (Ziegler et al. 2019); false keeps β fixed."""
    target_kl: float = 6.0
    """KL (nats per sequence) the adaptive controller aims for."""
    horizon: int = 10000
    """Adaptive controller horizon (in rollouts)."""
    kl_estimator: Literal["kl", "abs", "mse", "full"] = "kl"
    """Per-token KL estimator for the penalty: k1 'kl', 'abs', 'mse' (k2), or exact 'full' over the vocab."""
    gamma: float = 1.0
    """Discount (ppo, reinforce_pp)."""
    lam: float = 0.95
    """GAE λ (ppo)."""
    cliprange: float = 0.2
    """Policy ratio clip ε (the lower side too when clip_high is set)."""
    clip_high: float = 0.0
    """Upper ratio clip ε_high, e.g. 0.28 for DAPO's clip-higher (Yu et al. 2025); 0 = cliprange."""
    cliprange_value: float = 0.2
    """Value clip around the rollout values (ppo)."""
    vf_coef: float = 0.1
    """Value-loss weight (ppo)."""
    loss_agg: Literal["auto", "token", "sequence", "constant"] = "auto"
    """How per-token losses make the batch loss: 'token' (mean over all tokens: PPO, DAPO), 'sequence'
    (mean per response, then over responses: GRPO), 'constant' (sum over tokens / (responses ×
    generation.response_max): Dr. GRPO). auto = sequence for grpo, token otherwise; rloo has one ratio
    per response (sequence)."""
    group_std: bool = True
    """grpo: divide group advantages by the group's std; false = Dr. GRPO (Liu et al. 2025)."""
    dynamic_sampling: bool = False
    """Group estimators: re-draw groups whose k scores are all equal (no learning signal) with other
    prompts, up to max_refills rounds; groups still equal stay out of the loss (DAPO)."""
    max_refills: int = 3
    """Rounds of re-drawing for dynamic_sampling."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts."""
    mini_batch_size: int = 4
    """Rollouts per gradient step (per process)."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch (across processes)."""
    reward_baseline: float = 0.0
    """Subtracted from every score (StackLLaMA used the RM's mean)."""
    score_norm: Literal["none", "scale", "normalize"] = "none"
    """Running score statistics: 'scale' divides by the running std, 'normalize' also subtracts the mean."""
    score_clip: float = 0.0
    """Clip scores to ±score_clip after scaling (0 = off)."""
    ratio_threshold: float = 10.0
    """Skip a mini-batch whose mean probability ratio exceeds this (a stability guard from TRL-classic):
    it adds no gradient, and an optimizer step whose mini-batches were all skipped is not taken."""
    early_stop_kl: float = 0.0
    """Stop the epoch loop early once approx KL of a mini-batch exceeds this (0 = off)."""
    padding_free: bool = True
    """Run each forward's rows (phase 3 and the update) as one row of their real tokens, attention per row,
    instead of padded (models/packed.py): the same numbers up to float rounding, fewer tokens through the
    model. Where the model does not allow it (flash/flex attention, soft-capping, gradient checkpointing, a
    failed check on a toy batch) rows run padded, said once."""

    def __post_init__(self):
        check_positive(self, ("mini_batch_size", "ppo_epochs", "horizon", "cliprange"))
        check_positive(self, ("init_kl_coef", "vf_coef", "score_clip", "early_stop_kl", "clip_high"), zero_ok=True)
        check_positive(self, ("max_refills",), zero_ok=True)
