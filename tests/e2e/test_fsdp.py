"""FSDP on CPU: torch's FSDP2 (`fully_shard` over gloo), applied by the supervised Trainer when accelerate
asks for FSDP (ACCELERATE_USE_FSDP, as recipes/accelerate/fsdp2_cpu.yaml sets it). 2 processes equal one
process, final/ holds whole weights (not a rank's shard), and an FSDP checkpoint resumes to the
uninterrupted run. The one-process references run in this process (a launch costs ~20 s here).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.runtime.config import load_config
from tests.e2e import test_distributed
from tests.e2e.test_distributed import _assert_close, _losses, _weights, launch, rm_args, sft_args
from tests.stages.test_dpo import fresh_accelerate_state  # noqa: F401  (autouse: a clean AcceleratorState)

FSDP = {"ACCELERATE_USE_FSDP": "true"}  # what `accelerate launch --config_file .../fsdp2_cpu.yaml` sets
ADAPTER = "adapter_model.safetensors"
pairs = test_distributed.pairs  # the fixture: 120 preference pairs
pytestmark = [
    test_distributed.pytestmark,  # torchrun next to the interpreter
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="the CPU path: with CUDA, FSDP is accelerate's own (recipes/accelerate/fsdp.yaml)",
    ),
]


def _cli(stage: str, overrides: list[str]) -> list[str]:
    return ["-m", "rlhfkit.cli", stage, *overrides]


def _in_process(module, config_cls, overrides: list[str]) -> None:
    module.run(load_config(config_cls, overrides=overrides))


def test_fsdp_sft_two_processes_equal_one(tiny_model_dir, tiny_corpus, tmp_path):
    from rlhfkit.stages import sft

    args = sft_args(tiny_model_dir, tiny_corpus)
    _in_process(sft, sft.SFTConfig, [*args, f"out_dir={tmp_path / 'one'}", "train.batch_size=8"])
    # 2 × 2 per process × grad_accum 2 == 8: micro-batches accumulate into the sharded gradients
    two = launch(
        2, *_cli("sft", [*args, f"out_dir={tmp_path / 'two'}", "train.batch_size=2", "train.grad_accum=2"]), env=FSDP
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "engine: FSDP2 (fully_shard, 3 sharded modules)" in two.stdout and "× 2 processes" in two.stdout
    w_one, w_two = _weights(tmp_path / "one", ADAPTER), _weights(tmp_path / "two", ADAPTER)
    assert {k: v.shape for k, v in w_one.items()} == {k: v.shape for k, v in w_two.items()}  # whole, not shards
    _assert_close(w_one, w_two)
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), abs=1e-5)
    # evaluation (before training and at the end) runs on each rank's share of the held-out blocks
    assert _losses(tmp_path / "one", "eval/loss") == pytest.approx(_losses(tmp_path / "two", "eval/loss"), abs=1e-5)


def test_fsdp_rm_two_processes_equal_one_through_a_resumed_checkpoint(tiny_model_dir, pairs, tmp_path):
    """Killed after the checkpoint of step 3, resumed on FSDP: the same weights, losses and held-out
    accuracy as one uninterrupted process (a resume that lost the sharded Adam moments would not be)."""
    from rlhfkit.stages import reward

    args = rm_args(tiny_model_dir, pairs)
    _in_process(reward, reward.RewardConfig, [*args, f"out_dir={tmp_path / 'one'}", "train.batch_size=8"])
    out = tmp_path / "fsdp"
    two = [*args, f"out_dir={out}", "train.batch_size=4"]
    killed = launch(2, *_cli("rm", two), env={**FSDP, "RLHFKIT_FAULT_KILL_AFTER_STEP": "3"})
    ckpt = out / "checkpoints" / "step-000003"
    assert killed.returncode != 0 and (ckpt / "optimizer.json").exists(), killed.stderr[-3000:]
    again = launch(2, *_cli("rm", [*two, "--resume"]), env=FSDP)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "engine: FSDP2" in again.stdout
    w_one = _weights(tmp_path / "one", ADAPTER)
    saved = load_file(ckpt / "trainable.safetensors")  # the checkpoint too holds whole tensors
    assert saved and all(saved[k].shape == w_one[k].shape for k in saved if k in w_one)
    _assert_close(w_one, _weights(out, ADAPTER))
    assert _losses(tmp_path / "one") == pytest.approx(_losses(out), abs=1e-5)
    assert len(_losses(out)) == 6
    assert _losses(tmp_path / "one", "eval/accuracy") == _losses(out, "eval/accuracy")


def test_fsdp_on_cpu_refuses_the_rl_stage_in_one_line(monkeypatch, tmp_path):
    """Its update loop does not shard the model: under FSDP it would silently train DDP."""
    from rlhfkit.runtime.errors import ConfigError
    from rlhfkit.stages import ppo

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"runs the supervised stages \(sft, rm, dpo\) only"):
        ppo.run(load_config(ppo.PPOConfig, overrides=[f"out_dir={tmp_path / 'ppo'}", "reward=tests.x:y"]))
    assert not (tmp_path / "ppo").exists()  # refused before anything is written
