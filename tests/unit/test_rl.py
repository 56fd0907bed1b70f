"""Numeric tests for rlhfkit.algorithms.rl (PPO math)."""

import math
import threading

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from rlhfkit.algorithms.rl import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    LengthSampler,
    RunningMoments,
    compute_gae,
    entropy_from_logprobs,
    explained_variance,
    kl_penalty,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

DT = torch.float64


def right_padded_mask(lengths, T):
    """(B,) lengths -> (B, T) float mask 1...1 0...0."""
    return (torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]).to(DT)


class FakeGroup:
    """Simulates `world` processes (one thread each) summing tensors in all_reduce."""

    def __init__(self, world):
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def all_reduce_for(self, rank, in_place=False):
        def all_reduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait(timeout=10)
            total = sum(self.slots)
            self.barrier.wait(timeout=10)  # nobody overwrites a slot before all have read
            if in_place:  # the torch.distributed.all_reduce contract: mutate, return None
                t.copy_(total)
                return None
            return total

        return all_reduce

    def run(self, fns):
        results = [None] * len(fns)

        def target(i):
            results[i] = fns[i]()

        threads = [threading.Thread(target=target, args=(i,)) for i in range(len(fns))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=20)
        assert all(r is not None for r in results)
        return results


# ----------------------------------------------------------------- masked stats


def test_masked_mean_var_worked_numbers():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # Real entries 1, 2, 3, 4: mean 2.5; squared deviations 2.25+0.25+0.25+2.25 = 5.
    assert masked_sum(x, mask).item() == 10.0
    assert masked_mean(x, mask).item() == 2.5
    assert masked_var(x, mask).item() == pytest.approx(5 / 3, abs=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(5 / 4, abs=1e-12)
    # Per row: row 0 mean (1+2+3)/3 = 2, row 1 only the 4.
    assert masked_mean(x, mask, dim=1).tolist() == [2.0, 4.0]
    assert masked_sum(x, mask.bool(), dim=1).tolist() == [6.0, 4.0]


def test_masked_stats_ignore_inf_and_nan_in_padding():
    x = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]], dtype=DT)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=DT)
    assert masked_mean(x, mask).item() == 2.0
    assert masked_var(x, mask).item() == 2.0  # ((1-2)^2 + (3-2)^2) / (2-1)


def test_masked_whiten_normalises_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=DT) * 3 + 5
    mask = right_padded_mask([9, 1, 4, 7, 0, 5], 9)
    out = masked_whiten(x, mask)
    m = mask.bool()
    assert out[m].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert out[m].std().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(out[~m] == 0)
    # Garbage (even nan/inf) at masked-out positions must not change anything.
    x2 = x.clone()
    x2[~m] = torch.tensor([1e6, float("nan"), float("inf")], dtype=DT).repeat(50)[: int((~m).sum())]
    assert torch.equal(masked_whiten(x2, mask), out)
    # shift_mean=False keeps the masked mean, only the spread is normalised.
    kept = masked_whiten(x, mask, shift_mean=False)
    assert kept[m].mean().item() == pytest.approx(x[m].mean().item(), abs=1e-9)
    assert kept[m].std().item() == pytest.approx(1.0, abs=1e-6)


def test_masked_whiten_two_fake_ranks_equal_single_process():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=DT)
    mask = right_padded_mask([6, 2, 3, 1, 6, 4, 5, 2], 6)
    group = FakeGroup(2)
    parts = group.run(
        [
            lambda: masked_whiten(x[:4], mask[:4], all_reduce=group.all_reduce_for(0)),
            lambda: masked_whiten(x[4:], mask[4:], all_reduce=group.all_reduce_for(1, in_place=True)),
        ]
    )
    assert torch.allclose(torch.cat(parts), masked_whiten(x, mask), atol=1e-12)


# ------------------------------------------------------------------------- GAE


def gae_reference(values, rewards, mask, gamma, lam):
    """Plain double loop; mask assumed right-padded; terminal after last real token."""
    B, T = values.shape
    advantages = torch.zeros(B, T, dtype=values.dtype)
    returns = torch.zeros(B, T, dtype=values.dtype)
    for b in range(B):
        length = int(mask[b].sum())
        lastgaelam = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1].item() if t + 1 < length else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages[b, t] = lastgaelam
            returns[b, t] = lastgaelam + values[b, t].item()
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0), (1.0, 1.0)])
def test_gae_matches_double_loop_reference(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    B, T = 7, 11
    values = torch.randn(B, T, generator=g, dtype=DT)
    rewards = torch.randn(B, T, generator=g, dtype=DT)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 0  # always cover a full row and an empty row
    mask = right_padded_mask(lengths, T)
    adv, ret = compute_gae(values, rewards, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(values, rewards, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-6)
    assert torch.allclose(ret, ref_ret, atol=1e-6)
    assert torch.all(adv[mask == 0] == 0)


def test_gae_worked_three_token_example():
    # gamma = lam = 0.5, values [0.5, 1, 2], rewards [0, 0, 1], then one pad token.
    # t=2: delta = 1 + 0.5*0 - 2 = -1            A2 = -1
    # t=1: delta = 0 + 0.5*2 - 1 = 0             A1 = 0 + 0.25*(-1)    = -0.25
    # t=0: delta = 0 + 0.5*1 - 0.5 = 0           A0 = 0 + 0.25*(-0.25) = -0.0625
    # returns = A + V = [0.4375, 0.75, 1.0]; the pad's value 100 must be ignored.
    values = torch.tensor([[0.5, 1.0, 2.0, 100.0]], dtype=DT)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = compute_gae(values, rewards, mask, gamma=0.5, lam=0.5)
    assert adv.tolist() == [[-0.0625, -0.25, -1.0, 0.0]]
    assert ret.tolist() == [[0.4375, 0.75, 1.0, 0.0]]


def test_gae_skips_interior_masked_tokens():
    # A hole in the mask (e.g. environment tokens) is transparent: same result
    # as running GAE on the sequence with the hole removed.
    g = torch.Generator().manual_seed(3)
    values = torch.randn(1, 6, generator=g, dtype=DT)
    rewards = torch.randn(1, 6, generator=g, dtype=DT)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0]])
    keep = mask[0].bool()
    adv, _ = compute_gae(values, rewards, mask, 0.9, 0.8)
    ref_adv, _ = gae_reference(values[:, keep], rewards[:, keep], torch.ones(1, 3), 0.9, 0.8)
    assert torch.allclose(adv[:, keep], ref_adv, atol=1e-12)
    assert torch.all(adv[:, ~keep] == 0)


# -------------------------------------------------------------- KL and rewards


def test_kl_full_equals_categorical_kl_divergence():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 17, generator=g, dtype=DT)
    ref_logits = torch.randn(3, 5, 17, generator=g, dtype=DT)
    expected = kl_divergence(Categorical(logits=logits), Categorical(logits=ref_logits))
    got = kl_penalty(None, None, "full", logits=logits, ref_logits=ref_logits)
    assert got.shape == (3, 5)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.all(got > 0)


def test_kl_kinds_worked_numbers_and_zero_for_identical():
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=DT)
    ref_logprobs = torch.tensor([[-1.5, -1.0]], dtype=DT)
    # k1 = logp - ref = [0.5, -1]; abs = [0.5, 1]; k2 = 0.5 k1^2 = [0.125, 0.5];
    # k3 = exp(-k1) - 1 + k1 = [e^-0.5 - 0.5, e - 2].
    assert kl_penalty(logprobs, ref_logprobs, "kl").tolist() == [[0.5, -1.0]]
    assert kl_penalty(logprobs, ref_logprobs, "abs").tolist() == [[0.5, 1.0]]
    assert kl_penalty(logprobs, ref_logprobs, "mse").tolist() == [[0.125, 0.5]]
    k3 = kl_penalty(logprobs, ref_logprobs, "k3")
    assert torch.allclose(k3, torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2]], dtype=DT), atol=1e-12)
    logits = torch.randn(2, 3, 5, dtype=DT)
    same = torch.log_softmax(logits, -1)[..., 0]
    for kind in KL_KINDS:
        out = kl_penalty(same, same.clone(), kind, logits=logits, ref_logits=logits.clone())
        assert torch.all(out == 0), kind


def test_kl_unknown_kind_names_valid_kinds():
    with pytest.raises(ValueError, match="kl, abs, mse, k3, full"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "forward")
    with pytest.raises(ValueError, match="logits"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "full")


def test_token_rewards_score_on_last_real_token():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0, 9.0], [-2.0, 9.0, 9.0, 9.0], [0.0] * 4], dtype=DT)
    ref_logprobs = torch.tensor([[-1.5, -0.5, -1.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0] * 4], dtype=DT)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    scores = torch.tensor([3.0, -2.0, 5.0], dtype=DT)
    kl = torch.where(mask.bool(), kl_penalty(logprobs, ref_logprobs, "kl"), torch.zeros_like(logprobs))
    rewards = token_rewards(scores, kl, mask, kl_coef=0.1)
    # kl (k1) row 0 = [0.5, -0.5, 0, pad]; row 1 = [-1, pads]; -0.1*kl is the penalty.
    assert kl.tolist() == [[0.5, -0.5, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0] * 4]
    non_score = -0.1 * kl
    # Score lands on index 2 (row 0) and 0 (row 1); an empty row gets nothing.
    expected = non_score.clone()
    expected[0, 2] += 3.0
    expected[1, 0] += -2.0
    assert torch.equal(rewards, expected)
    assert last_token_index(mask).tolist() == [2, 0, 0]


# ------------------------------------------------------------------ PPO losses


def test_policy_loss_worked_numbers_with_one_clipped_ratio():
    # cliprange 0.2. Token 1: r = 1.5, A = +1 -> -A r = -1.5, -A clip(r) = -1.2, max = -1.2 (clipped).
    # Token 2: r = 0.9, A = -2 -> -A r = 1.8, clip(0.9) = 0.9 -> 1.8, max = 1.8 (not clipped).
    # pg_loss = (-1.2 + 1.8) / 2 = 0.3; clipfrac = 1/2; ratio mean = (1.5 + 0.9) / 2 = 1.2.
    # Token 3 is padding with absurd numbers and must change nothing.
    old = torch.tensor([[-1.0, -1.0, 0.0]], dtype=DT)
    logprobs = (old + torch.tensor([[math.log(1.5), math.log(0.9), 500.0]], dtype=DT)).requires_grad_()
    advantages = torch.tensor([[1.0, -2.0, float("nan")]], dtype=DT)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    pg_loss, stats = policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    assert pg_loss.item() == pytest.approx(0.3, abs=1e-12)
    assert stats["clipfrac"].item() == 0.5
    assert stats["ratio"].item() == pytest.approx(1.2, abs=1e-12)
    # approxkl = 0.5 * mean(log(1.5)^2, log(0.9)^2)
    expected_approxkl = 0.25 * (math.log(1.5) ** 2 + math.log(0.9) ** 2)
    assert stats["approxkl"].item() == pytest.approx(expected_approxkl, abs=1e-12)
    pg_loss.backward()
    # Clipped token has zero gradient; token 2: d/dlogp (-A r)/2 = 2 * 0.9 / 2 = 0.9; pad 0.
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 0.9, 0.0], abs=1e-12)


def test_value_loss_worked_numbers_with_clipping():
    # cliprange_value 0.2. Token 1: old 1.0, v 1.5 -> clipped 1.2, return 2:
    #   (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> max 0.64 (clip active).
    # Token 2: old 1.0, v 0.9 (inside the range), return 0: 0.81 both -> 0.81.
    # vf_loss = 0.5 * (0.64 + 0.81) / 2 = 0.3625; vf_clipfrac = 1/2.
    values = torch.tensor([[1.5, 0.9, 1e9]], dtype=DT)
    old_values = torch.tensor([[1.0, 1.0, -1e9]], dtype=DT)
    returns = torch.tensor([[2.0, 0.0, float("nan")]], dtype=DT)
    mask = torch.tensor([[1, 1, 0]])
    vf_loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    assert vf_loss.item() == pytest.approx(0.3625, abs=1e-12)
    assert stats["vf_clipfrac"].item() == 0.5


def test_entropy_and_explained_variance():
    logits = torch.randn(2, 3, 7, dtype=DT)
    logp = torch.log_softmax(logits, -1)
    assert torch.allclose(entropy_from_logprobs(logp), Categorical(logits=logits).entropy(), atol=1e-12)
    assert entropy_from_logprobs(torch.full((1, 1, 8), -math.log(8))).item() == pytest.approx(math.log(8), abs=1e-6)
    # a token with probability 0 adds 0 (not 0 · -inf = nan): [1/2, 1/2, 0] has entropy log 2
    half = torch.tensor([[[-math.log(2), -math.log(2), -math.inf]]], dtype=DT)
    assert entropy_from_logprobs(half).item() == pytest.approx(math.log(2), abs=1e-12)
    mask = torch.tensor([[1, 1, 1, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]], dtype=DT)
    assert explained_variance(returns.clone(), returns, mask).item() == 1.0
    # Residual [0, 0, 1]: var = (1/9 + 1/9 + 4/9) / 2 = 1/3; Var[returns] = 1 -> 1 - 1/3.
    values = torch.tensor([[1.0, 2.0, 2.0, -50.0]], dtype=DT)
    assert explained_variance(values, returns, mask).item() == pytest.approx(2 / 3, abs=1e-12)
    assert math.isnan(explained_variance(values, torch.ones(1, 4, dtype=DT), mask).item())


# ------------------------------------------------------------------ controllers


def test_adaptive_kl_controller_worked_numbers_and_clip():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6, horizon=10000)
    # error = 12/6 - 1 = 1 -> clipped to 0.2; mult = 1 + 0.2*256/10000 = 1.00512 -> 0.201024.
    assert ctl.update(12, 256) == pytest.approx(0.201024, abs=1e-15)
    # error = 6.6/6 - 1 = 0.1 (inside the clip); mult = 1 + 0.1*256/10000 = 1.00256.
    ctl.load_state_dict({"value": 0.2, "target": 6, "horizon": 10000})
    assert ctl.update(torch.tensor(6.6, dtype=DT), 256) == pytest.approx(0.2 * 1.00256, abs=1e-15)
    # error = 0/6 - 1 = -1 -> clipped to -0.2; mult = 1 - 0.00512. Huge KL also stops at +0.2.
    ctl.value = 0.2
    assert ctl.update(0.0, 256) == pytest.approx(0.2 * 0.99488, abs=1e-15)
    ctl.value = 0.2
    assert ctl.update(1e6, 256) == pytest.approx(0.201024, abs=1e-15)


def test_kl_controllers_state_dict_round_trip():
    ctl = AdaptiveKLController(0.05, 4.0, 500)
    for kl in (1.0, 9.0, 3.0):
        ctl.update(kl, 64)
    fresh = AdaptiveKLController(1.0, 1.0, 1.0)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.state_dict() == ctl.state_dict()
    assert fresh.update(5.0, 64) == ctl.update(5.0, 64)
    fixed = FixedKLController(0.1)
    assert fixed.update(100.0, 1000) == 0.1 and fixed.value == 0.1
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.1


# ------------------------------------------------------------- running moments


def test_running_moments_equal_concatenation_stats():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, generator=g, dtype=DT) * 4 + 1000 for n in (3, 17, 1, 64, 9)]
    rm = RunningMoments()
    for x in batches:
        batch_mean, batch_std = rm.update(x)
        assert batch_mean == pytest.approx(x.mean().item(), abs=1e-9)
        assert batch_std == pytest.approx(x.std().item() if x.numel() > 1 else 0.0, abs=1e-9)
    all_x = torch.cat(batches)
    assert rm.count == all_x.numel()
    assert rm.mean == pytest.approx(all_x.mean().item(), abs=1e-9)
    assert rm.std == pytest.approx(all_x.std().item(), abs=1e-9)
    copy = RunningMoments()
    copy.load_state_dict(rm.state_dict())
    assert (copy.mean, copy.std, copy.count) == (rm.mean, rm.std, rm.count)


def test_running_moments_two_fake_ranks_equal_single_process():
    g = torch.Generator().manual_seed(6)
    sizes = ((4, 6), (1, 9), (12, 2))
    batches = [(torch.randn(a, generator=g), torch.randn(b, generator=g) + 3) for a, b in sizes]
    group = FakeGroup(2)
    ranks = [RunningMoments(), RunningMoments()]

    def run_rank(r):
        all_reduce = group.all_reduce_for(r, in_place=r == 1)
        return [ranks[r].update(pair[r], all_reduce=all_reduce) for pair in batches]

    per_rank = group.run([lambda: run_rank(0), lambda: run_rank(1)])
    single = RunningMoments()
    for i, pair in enumerate(batches):
        expected = single.update(torch.cat(pair))
        assert per_rank[0][i] == pytest.approx(expected, abs=1e-12)
        assert per_rank[1][i] == pytest.approx(expected, abs=1e-12)
    for rm in ranks:
        assert rm.count == single.count == 34
        assert rm.mean == pytest.approx(single.mean, abs=1e-12)
        assert rm.std == pytest.approx(single.std, abs=1e-12)


def test_length_sampler_inclusive_and_reproducible():
    sampler = LengthSampler(3, 5)
    draws = [sampler(torch.Generator().manual_seed(0))] + [sampler() for _ in range(3)]
    assert all(3 <= d <= 5 for d in draws)
    many = sampler.sample(500, torch.Generator().manual_seed(1))
    assert set(many.tolist()) == {3, 4, 5}
    assert torch.equal(many, sampler.sample(500, torch.Generator().manual_seed(1)))
    assert LengthSampler(7, 7)(torch.Generator().manual_seed(2)) == 7
    with pytest.raises(ValueError):
        LengthSampler(5, 4)
