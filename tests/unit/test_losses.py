"""Numeric tests for rlhfkit.algorithms.losses (reward-model and DPO-family losses)."""

import math

import pytest
import torch

from rlhfkit.algorithms.losses import dpo_loss, pairwise_reward_loss, sequence_logps

DT = torch.float64
LOG1P_EXP_M1 = math.log(1 + math.exp(-1))  # -log sigma(1) = 0.31326168751822286


def t(*xs):
    return torch.tensor(xs, dtype=DT)


# -------------------------------------------------------------- reward model


def test_pairwise_loss_worked_numbers_and_tie_is_wrong():
    # -log sigma(2 - 0) = log(1 + e^-2); -log sigma(0 - 0) = log 2.
    loss, stats = pairwise_reward_loss(t(2.0, 0.0), t(0.0, 0.0))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2, abs=1e-12)
    assert stats["accuracy"].item() == 0.5  # the tie in pair 2 counts as wrong
    assert stats["ties"].item() == 0.5
    assert stats["reward_margin"].item() == 1.0  # mean(2 - 0, 0 - 0)


def test_pairwise_loss_with_margin_and_centering():
    # margin [1, 0]: -log sigma(2 - 0 - 1) = log(1 + e^-1); second pair stays log 2.
    loss, _ = pairwise_reward_loss(t(2.0, 0.0), t(0.0, 0.0), margin=t(1.0, 0.0))
    assert loss.item() == pytest.approx((LOG1P_EXP_M1 + math.log(2)) / 2, abs=1e-12)
    # centering 0.01 * mean((2 + 0)^2, (0 + 0)^2) = 0.01 * 2 = 0.02 on top of the plain loss.
    plain, _ = pairwise_reward_loss(t(2.0, 0.0), t(0.0, 0.0))
    centered, _ = pairwise_reward_loss(t(2.0, 0.0), t(0.0, 0.0), center_coef=0.01)
    assert centered.item() == pytest.approx(plain.item() + 0.02, abs=1e-12)


def test_pairwise_loss_accepts_value_head_shape_and_is_stable():
    chosen, rejected = t(1000.0, -1000.0).unsqueeze(1), t(-1000.0, 1000.0).unsqueeze(1)
    loss, stats = pairwise_reward_loss(chosen, rejected)
    # Pair 1: log(1 + e^-2000) ~ 0; pair 2: -log sigma(-2000) = 2000 (logsigmoid: no inf).
    assert loss.item() == pytest.approx(1000.0, abs=1e-9)
    assert stats["accuracy"].item() == 0.5 and stats["ties"].item() == 0.0
    with pytest.raises(ValueError):
        pairwise_reward_loss(t(1.0, 2.0), t(1.0))


# ----------------------------------------------------------------------- DPO
# Shared example: pi_c = -1, pi_r = -3, ref_c = ref_r = -2
#   h = (pi_c - pi_r) - (ref_c - ref_r) = 2 - 0 = 2.


def dpo(beta, **kw):
    return dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=beta, **kw)


def test_dpo_sigmoid_worked_numbers_and_rewards():
    # beta 0.5: beta*h = 1 -> loss = -log sigma(1) = log(1 + e^-1).
    losses, chosen_rewards, rejected_rewards = dpo(0.5)
    assert losses.item() == pytest.approx(LOG1P_EXP_M1, abs=1e-12)
    # chosen = 0.5 * (-1 - -2) = 0.5; rejected = 0.5 * (-3 - -2) = -0.5.
    assert chosen_rewards.item() == 0.5 and rejected_rewards.item() == -0.5


def test_dpo_label_smoothing_worked_numbers():
    # eps 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1); log(1 + e) = 1 + log(1 + e^-1),
    # so the loss is log(1 + e^-1) + 0.1 = 0.41326168751822286.
    losses, _, _ = dpo(0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(LOG1P_EXP_M1 + 0.1, abs=1e-12)
    # eps 0.5 is symmetric: 0.5 * (log(1 + e^-1) + log(1 + e)) = log(1 + e^-1) + 0.5.
    assert dpo(0.5, label_smoothing=0.5)[0].item() == pytest.approx(LOG1P_EXP_M1 + 0.5, abs=1e-12)


def test_ipo_and_hinge_worked_numbers():
    # IPO: (h - 1/(2 beta))^2 with h = 2.
    # beta 0.5 -> (2 - 1)^2 = 1; beta 0.25 -> (2 - 2)^2 = 0; beta 0.1 -> (2 - 5)^2 = 9.
    assert dpo(0.5, loss_type="ipo")[0].item() == pytest.approx(1.0, abs=1e-12)
    assert dpo(0.25, loss_type="ipo")[0].item() == pytest.approx(0.0, abs=1e-12)
    assert dpo(0.1, loss_type="ipo")[0].item() == pytest.approx(9.0, abs=1e-12)
    # hinge: relu(1 - beta h). beta 0.5 -> 0; beta 0.25 -> 0.5.
    assert dpo(0.5, loss_type="hinge")[0].item() == 0.0
    assert dpo(0.25, loss_type="hinge")[0].item() == 0.5


def test_dpo_batch_shape_and_argument_errors():
    losses, c, r = dpo_loss(t(-1.0, -5.0), t(-3.0, -5.0), t(-2.0, -5.0), t(-2.0, -5.0), beta=0.5)
    assert losses.shape == c.shape == r.shape == (2,)
    assert losses[1].item() == pytest.approx(math.log(2), abs=1e-12)  # h = 0 -> -log sigma(0)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        dpo(0.5, loss_type="kto")
    with pytest.raises(ValueError):
        dpo(0.5, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        dpo(0.5, label_smoothing=0.7)


def test_dpo_gradient_signs():
    pc = t(-1.0).requires_grad_()
    pr = t(-3.0).requires_grad_()
    losses, chosen_rewards, _ = dpo_loss(pc, pr, t(-2.0), t(-2.0), beta=0.5)
    losses.sum().backward()
    # d/dpi_c [-log sigma(beta h)] = -beta * sigma(-beta h) = -0.5 * sigma(-1) < 0.
    assert pc.grad.item() == pytest.approx(-0.5 / (1 + math.e), abs=1e-12)
    assert pr.grad.item() == pytest.approx(0.5 / (1 + math.e), abs=1e-12)
    assert not chosen_rewards.requires_grad
    # Raising the chosen logp lowers the loss, numerically too.
    assert dpo_loss(t(-0.5), t(-3.0), t(-2.0), t(-2.0), beta=0.5)[0].item() < losses.item()
    # IPO below its target (h = 2 < 1/(2*0.1) = 5) also pushes chosen up: grad = 2 (h - 5) = -6.
    pc2 = t(-1.0).requires_grad_()
    dpo_loss(pc2, t(-3.0), t(-2.0), t(-2.0), beta=0.1, loss_type="ipo")[0].sum().backward()
    assert pc2.grad.item() == pytest.approx(-6.0, abs=1e-12)


def test_sequence_logps_sum_and_mean_ignore_padding():
    token_logps = t(-1.0, -2.0, -3.0, float("nan")).reshape(1, 4).repeat(2, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert sequence_logps(token_logps, mask).tolist() == [-6.0, -1.0]
    assert sequence_logps(token_logps, mask, average=True).tolist() == [-2.0, -1.0]
