"""Critic-free estimators and loss aggregation: worked numbers and plain-Python reimplementations of each
reference formula on random rewards with masks and groups."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhfkit.algorithms import estimators as est
from rlhfkit.algorithms.rl import clipped_surrogate, kl_penalty, masked_whiten, token_rewards

DT = torch.float64


def _random_batch(seed: int, groups: int = 3, k: int = 4, T: int = 5):
    g = random.Random(seed)
    rewards = [g.gauss(0, 1) for _ in range(groups * k)]
    lengths = [g.randint(1, T) for _ in range(groups * k)]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=DT)
    return rewards, lengths, mask


# ------------------------------------------------------------------ worked numbers
def test_rloo_worked_numbers():
    # group [1, 2, 3, 6]: baselines (2+3+6)/3 = 11/3, (1+3+6)/3 = 10/3, 3, 2 -> A = [-8/3, -4/3, 0, 4]
    a = est.rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 1.0], dtype=DT), k=4)
    expected = [-8 / 3, -4 / 3, 0.0, 4.0, -1 / 3, -1 / 3, -1 / 3, 1.0]
    assert a.tolist() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="multiple of k=4"):
        est.rloo_advantages(torch.zeros(6), k=4)


def test_group_advantages_worked_numbers_and_dr_grpo():
    # group [1, 2, 3]: mean 2, Bessel std 1 -> (r - 2) / (1 + 1e-4); Dr. GRPO keeps r - 2
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=DT)
    a = est.group_advantages(r, k=3)
    assert a.tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0], abs=1e-12)
    assert est.group_advantages(r, k=3, scale=False).tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert est.degenerate_groups(r, k=3).tolist() == [False, True]


def test_discounted_returns_worked_numbers():
    # rewards [1, 2, 3 | pad], γ = 0.5: G = [1 + 0.5·(2 + 0.5·3), 2 + 0.5·3, 3] = [2.75, 3.5, 3]
    r = torch.tensor([[1.0, 2.0, 3.0, 99.0]], dtype=DT)
    m = torch.tensor([[1, 1, 1, 0]])
    assert est.discounted_returns(r, m, gamma=0.5).tolist() == [[2.75, 3.5, 3.0, 0.0]]


def test_aggregation_worked_numbers():
    # row 0: losses [1, 2] (2 tokens), row 1: [4, pad, pad] (1 token), max_len 3, weights 1
    losses = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]], dtype=DT)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = torch.ones(2, dtype=DT)
    num, den = est.aggregate(losses, m, "token", w, 3)
    assert (num / den).item() == pytest.approx(7 / 3)  # DAPO: every token counts once
    num, den = est.aggregate(losses, m, "sequence", w, 3)
    assert (num / den).item() == pytest.approx((1.5 + 4) / 2)  # GRPO: mean per response, then mean
    num, den = est.aggregate(losses, m, "constant", w, 3)
    assert (num / den).item() == pytest.approx(7 / 6)  # Dr. GRPO: Σ / (responses × max_len)
    num, den = est.aggregate(losses, m, "token", torch.tensor([0.0, 1.0], dtype=DT), 3)
    assert (num / den).item() == 4.0  # a weight-0 (dropped) response is out of numerator and denominator


def test_clip_higher_and_sequence_surrogate_worked_numbers():
    # ratio 1.3 with A = +1: clip (0.2, 0.2) caps at 1.2 -> loss -1.2; clip_high 0.28 keeps 1.28 -> -1.28
    old = torch.zeros(1, 1, dtype=DT)
    new = torch.full((1, 1), math.log(1.3), dtype=DT)
    m, adv = torch.ones(1, 1), torch.ones(1, dtype=DT)
    assert clipped_surrogate(new, old, adv, m, 0.2, 0.2)[0].item() == pytest.approx(-1.2)
    assert clipped_surrogate(new, old, adv, m, 0.2, 0.28)[0].item() == pytest.approx(-1.28)
    # sequence ratio = exp(Σ_t logratio) = 1.1 · 1.2 = 1.32 over two real tokens (padding ignored)
    new2 = torch.tensor([[math.log(1.1), math.log(1.2), 50.0]], dtype=DT)
    loss, clipped = est.sequence_surrogate(new2, torch.zeros(1, 3, dtype=DT), adv, torch.tensor([[1, 1, 0]]), 0.2, 0.2)
    assert loss.item() == pytest.approx(-1.2) and clipped.tolist() == [True]
    loss, clipped = est.sequence_surrogate(new2, torch.zeros(1, 3, dtype=DT), -adv, torch.tensor([[1, 1, 0]]), 0.2, 0.2)
    assert loss.item() == pytest.approx(1.32) and clipped.tolist() == [False]


def test_k3_is_nonnegative_and_zero_on_identical_distributions():
    g = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(64, 9, generator=g, dtype=DT) * 5, -torch.rand(64, 9, generator=g, dtype=DT) * 5
    k3 = kl_penalty(lp, ref, "k3")
    assert (k3 >= 0).all() and (k3 > 0).any()
    assert torch.equal(kl_penalty(lp, lp, "k3"), torch.zeros_like(lp))
    # k3 = exp(ref - lp) - (ref - lp) - 1 (Schulman's estimator, as TRL's GRPOTrainer writes it)
    assert torch.allclose(k3, torch.exp(ref - lp) - (ref - lp) - 1, atol=1e-12)


# ------------------------------------------------------------------ plain-Python references
@pytest.mark.parametrize("seed", range(3))
def test_estimators_match_plain_python_references(seed):
    k = 4
    rewards, lengths, mask = _random_batch(seed, k=k)
    r = torch.tensor(rewards, dtype=DT)
    rloo, grpo, drgrpo, base = [], [], [], []
    for g0 in range(0, len(rewards), k):
        grp = rewards[g0 : g0 + k]
        mean = sum(grp) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (k - 1))
        for i, x in enumerate(grp):
            rloo.append(x - (sum(grp) - x) / (k - 1))
            grpo.append((x - mean) / (std + 1e-4))
            drgrpo.append(x - mean)
            base.append(x - mean)
    assert est.rloo_advantages(r, k).tolist() == pytest.approx(rloo, abs=1e-12)
    assert est.group_advantages(r, k).tolist() == pytest.approx(grpo, abs=1e-12)
    assert est.group_advantages(r, k, scale=False).tolist() == pytest.approx(drgrpo, abs=1e-12)
    assert est.group_mean_baseline(r, k).tolist() == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_reinforce_pp_matches_plain_python(seed):
    """REINFORCE++: r_t = −β·KL_t (+ score at the last token), G_t = Σ_{s≥t} γ^{s−t} r_s, whitened over
    every real token of the batch (Hu et al. 2025)."""
    rewards, lengths, mask = _random_batch(seed)
    g = random.Random(seed + 10)
    T, beta, gamma = mask.shape[1], 0.1, 0.9
    kl = [[g.gauss(0, 0.3) if t < n else 0.0 for t in range(T)] for n in lengths]
    returns = []
    for b, n in enumerate(lengths):
        per_tok = [-beta * kl[b][t] + (rewards[b] if t == n - 1 else 0.0) for t in range(n)]
        row = [sum(gamma ** (s - t) * per_tok[s] for s in range(t, n)) for t in range(n)]
        returns.append(row)
    flat = [x for row in returns for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1))
    expected = [[(x - mean) / std for x in row] + [0.0] * (T - len(row)) for row in returns]
    tok = token_rewards(torch.tensor(rewards, dtype=DT), torch.tensor(kl, dtype=DT), mask, beta)
    got = masked_whiten(est.discounted_returns(tok, mask, gamma), mask, eps=0.0)
    assert got.tolist() == [pytest.approx(row, abs=1e-10) for row in expected]


@pytest.mark.parametrize("how", ["token", "sequence", "constant"])
def test_grpo_loss_under_each_aggregation_matches_the_formula(how):
    """GRPO per-token loss −min(r·A, clip(r)·A) + β·k3, aggregated as the literature writes it."""
    rewards, lengths, mask = _random_batch(1, k=4, T=6)
    g = torch.Generator().manual_seed(3)
    B, T, beta, eps, eps_high, max_len = mask.shape[0], mask.shape[1], 0.04, 0.2, 0.28, 6
    old = -torch.rand(B, T, generator=g, dtype=DT) * 3
    new = old + (torch.rand(B, T, generator=g, dtype=DT) - 0.5)
    ref = old + (torch.rand(B, T, generator=g, dtype=DT) - 0.5) * 0.2
    adv = est.group_advantages(torch.tensor(rewards, dtype=DT), 4)
    losses, _ = clipped_surrogate(new, old, adv, mask, eps, eps_high)
    losses = losses + beta * torch.where(mask.bool(), kl_penalty(new, ref, "k3"), torch.zeros_like(new))
    num, den = est.aggregate(losses, mask, how, torch.ones(B, dtype=DT), max_len)
    per = []
    for b, n in enumerate(lengths):
        row = []
        for t in range(n):
            r = math.exp(new[b, t].item() - old[b, t].item())
            a = adv[b].item()
            pg = -min(r * a, min(max(r, 1 - eps), 1 + eps_high) * a)
            d = ref[b, t].item() - new[b, t].item()
            row.append(pg + beta * (math.exp(d) - d - 1))
        per.append(row)
    expected = {
        "token": sum(map(sum, per)) / sum(lengths),
        "sequence": sum(sum(row) / len(row) for row in per) / B,
        "constant": sum(map(sum, per)) / (B * max_len),
    }[how]
    assert (num / den).item() == pytest.approx(expected, abs=1e-12)
