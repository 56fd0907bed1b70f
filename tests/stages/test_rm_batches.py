"""RM pair batches with less padding: the length-grouped plan (data.group_by_length)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from rlhfkit.inputs.pairs import LengthGroupedPlan
from rlhfkit.runtime.errors import ConfigError
from rlhfkit.runtime.io import read_jsonl
from rlhfkit.runtime.training import StepPlan
from rlhfkit.stages import reward
from tests.conftest import WORDS
from tests.stages.test_reward import rm_cfg


def mixed_pairs(n: int, seed: int) -> list[dict]:
    """'good' beats 'bad', answers of 0–24 filler words: pair lengths spread ~10× apart."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(25)))
        w = rng.choice(WORDS)
        rows.append({"prompt": f"q{i} how {w}?", "chosen": f"{w} {filler} is good.", "rejected": f"{w} is bad."})
    return rows


@pytest.mark.parametrize("world,b,g,n", [(1, 4, 1, 37), (2, 3, 2, 50), (3, 2, 1, 31)])
def test_grouped_plan_uses_every_pair_once_per_epoch_with_equal_rank_batches(world, b, g, n):
    lengths = [random.Random(i).randrange(5, 500) for i in range(n)]
    plans = [LengthGroupedPlan(lengths, b, g, world, r, seed=7, mega_batches=3) for r in range(world)]
    assert plans[0].steps_per_epoch == StepPlan(n, b, g, world, 0, seed=7).steps_per_epoch
    orders = []
    for epoch in range(2):
        seen = []
        for k in range(plans[0].steps_per_epoch):
            step = epoch * plans[0].steps_per_epoch + k
            assert len({len(p.micro_batches(step)) for p in plans}) == 1  # DDP: the same count on every rank
            seen += [i for p in plans for mb in p.micro_batches(step) for i in mb]
        assert sorted(seen) == list(range(n))  # every pair once, none dropped
        orders.append(plans[0].order(epoch))
    assert orders[0] != orders[1]  # a new grouping each epoch ...
    fresh = LengthGroupedPlan(lengths, b, g, world, 0, seed=7, mega_batches=3)
    assert fresh.order(1) == orders[1] and fresh.order(0) == orders[0]  # ... a function of seed and epoch only


def pad_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of padded cells when every batch is padded to its longest item."""
    cells = sum(len(bt) * max(lengths[i] for i in bt) for bt in batches)
    return 1 - sum(lengths) / cells


def test_padding_falls_on_mixed_lengths_worked_numbers():
    # 8 pairs (their longer sequence), batch 2, one mega-batch of all 4 batches: sorted descending,
    # (105,100) (95,90) (12,11) (10,9) → 2·105 + 2·95 + 2·12 + 2·10 = 444 cells for 432 tokens.
    lengths = [10, 100, 12, 95, 11, 90, 9, 105]
    grouped = LengthGroupedPlan(lengths, 2, 1, 1, 0, seed=0, mega_batches=4).order(0)
    batches = [grouped[i : i + 2] for i in range(0, 8, 2)]
    assert [sorted(lengths[i] for i in bt) for bt in batches] == [[100, 105], [90, 95], [11, 12], [9, 10]]

    def pad(order):
        return pad_fraction(lengths, [order[i : i + 2] for i in range(0, 8, 2)])

    assert pad(grouped) == pytest.approx(1 - 432 / 444)  # 2.7%
    assert pad(list(range(8))) == pytest.approx(1 - 432 / 780)  # file order: 44.6%
    assert pad(StepPlan(8, 2, 1, 1, 0, seed=0).order(0)) > 10 * pad(grouped)  # the plain shuffle: 29%


def padded_to(batch: dict, max_length: int) -> dict:
    """The batch with every row padded on to max_length (zeros: masked cells)."""
    return {
        k: torch.cat([v, v.new_zeros((v.shape[0], max_length - v.shape[1], *v.shape[2:]))], 1) for k, v in batch.items()
    }


@pytest.mark.parametrize("trunk", [False, True])
def test_a_step_is_the_same_trimmed_or_padded_to_max_length(tiny_model_dir, tmp_path, trunk):
    """Loss, gradients and the weights after one AdamW step: the batch as collated (trimmed to its own
    longest row) vs padded to data.max_length (LoRA dropout 0: dropout masks would differ in shape)."""
    from rlhfkit.inputs.pairs import encode_pairs
    from rlhfkit.inputs.templates import PromptFormat
    from rlhfkit.models.loading import load_model
    from rlhfkit.models.trunk import FrozenTrunk, attach_pair_states

    top = "lora.num_layers_unfrozen=" + ("1" if trunk else "-1")
    cfg = rm_cfg(tiny_model_dir, tmp_path / "p.jsonl", tmp_path / "o", "lora.enabled=true", "lora.dropout=0", top)
    torch.manual_seed(0)
    model, tok = load_model(cfg.model, cfg.lora, kind="seq_cls", num_labels=1)
    pairs = encode_pairs(mixed_pairs(6, seed=1), PromptFormat(cfg.template, tok), 128)
    spread = sorted(len(p["chosen_ids"]) for p in pairs) + sorted(len(p["rejected_ids"]) for p in pairs)
    assert len(pairs) == 6 and max(spread) > 2 * min(spread)
    results = []
    for pad_all in (False, True):
        m = copy.deepcopy(model)
        steps = reward.PairSteps(cfg, pairs, tok.pad_token_id, None)
        if trunk:
            steps.trunk = FrozenTrunk(m, 1)
            attach_pair_states(steps.trunk, pairs, tok.pad_token_id)
        batch = steps.collate(list(range(6)))
        if pad_all:
            batch = padded_to(batch, 128)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        m.train()
        loss, stats = steps.loss(m, batch)
        loss.backward()
        grads = [p.grad.clone() for p in m.parameters() if p.requires_grad]
        opt.step()
        weights = [p.detach().clone() for p in m.parameters() if p.requires_grad]
        cells = batch["attention_mask"].numel()
        results.append((loss.item(), float(stats["accuracy"]), grads, weights, cells))
    (la, aa, ga, wa, ca), (lb, ab, gb, wb, cb) = results
    assert ca < cb == 12 * 128  # trimmed: fewer cells
    assert abs(la - lb) <= 1e-6 and aa == ab
    scale = max(g.abs().max().item() for g in ga)
    assert scale > 0 and max((x - y).abs().max().item() for x, y in zip(ga, gb)) <= 1e-5 * scale  # fp32 sums
    assert max((x - y).abs().max().item() for x, y in zip(wa, wb)) <= 1e-6


def test_group_by_length_default_is_off_for_odin_and_refused_with_it(tiny_model_dir, tmp_path):
    cfg = rm_cfg(tiny_model_dir, tmp_path / "p.jsonl", tmp_path / "o")
    assert reward.group_by_length(cfg) is True
    cfg.odin.enabled = True
    assert reward.group_by_length(cfg) is False
    cfg.data.group_by_length = True
    with pytest.raises(ConfigError, match="data.group_by_length=true with odin.enabled"):
        reward.group_by_length(cfg)
    with pytest.raises(ConfigError, match="length_group_batches"):
        rm_cfg(tiny_model_dir, tmp_path / "p.jsonl", tmp_path / "o", "data.length_group_batches=0")


def test_grouped_rm_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    """Stopped at its step-5 checkpoint, then resumed to step 12 (5 steps per epoch: the resumed run
    crosses epoch boundaries and builds their grouping afresh): weights and losses equal the straight
    run's bitwise. A constant lr, so the 5-step first leg has the same schedule as the 12-step run."""
    from safetensors.torch import load_file

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in mixed_pairs(50, seed=2)))
    args = ["lora.enabled=true", "lora.r=4", "train.save_every=5", "data.max_eval_samples=4", "train.batch_size=4"]
    args += ["data.max_samples=20", "data.length_group_batches=2", "train.lr_scheduler=constant"]
    straight, plain, resumed = tmp_path / "straight", tmp_path / "plain", tmp_path / "resumed"
    reward.run(rm_cfg(tiny_model_dir, pairs, straight, *args, "train.max_steps=12"))
    reward.run(rm_cfg(tiny_model_dir, pairs, plain, *args, "train.max_steps=12", "data.group_by_length=false"))
    reward.run(rm_cfg(tiny_model_dir, pairs, resumed, *args, "train.max_steps=5"))
    reward.run(rm_cfg(tiny_model_dir, pairs, resumed, *args, "train.max_steps=12", "resume=true"))
    name = "adapter_model.safetensors"
    a, b = load_file(straight / "final" / name), load_file(resumed / "final" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb, lp = (
        [r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for d in (straight, resumed, plain)
    )
    assert la == lb and len(la) == 12
    assert la != lp  # the grouped plan did change which pairs share a step
