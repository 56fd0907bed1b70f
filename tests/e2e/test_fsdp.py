"""FSDP on CPU: torch's FSDP2 (`fully_shard` over gloo), applied by the supervised Trainer and the RL stage
when accelerate asks for FSDP (ACCELERATE_USE_FSDP, as recipes/accelerate/fsdp2_cpu.yaml sets it). 2
processes equal one process, final/ holds whole weights (not a rank's shard), and an FSDP checkpoint
resumes to the uninterrupted run. The one-process references run in this process (a launch costs ~20 s here).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.runtime.config import load_config
from tests.conftest import REPO
from tests.e2e import test_distributed
from tests.e2e.test_distributed import (
    _assert_close,
    _losses,
    _weights,
    assert_same_rl_run,
    launch,
    rm_args,
    sft_args,
)
from tests.stages.test_dpo import fresh_accelerate_state  # noqa: F401  (autouse: a clean AcceleratorState)

FSDP = {"ACCELERATE_USE_FSDP": "true"}  # what `accelerate launch --config_file .../fsdp2_cpu.yaml` sets
ADAPTER = "adapter_model.safetensors"
WORKER = str(REPO / "tests" / "ddp_ppo_worker.py")  # the RL run with fed rollouts, shared with DDP and DeepSpeed
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


def _fed_rl_in_process(monkeypatch, *argv: str) -> None:
    """tests/ddp_ppo_worker.py in this process (one process: a launch costs ~15 s here)."""
    from rlhfkit.stages import ppo
    from tests import ddp_ppo_worker

    monkeypatch.setattr(ppo, "generate", ppo.generate)  # the worker feeds rollouts; restored after the test
    ddp_ppo_worker.main(list(argv))


def test_fsdp_rl_two_processes_equal_one_and_checkpoints_resume(tiny_sft_dir, tmp_path, monkeypatch):
    """PPO (value head on the sharded policy) and GRPO, LoRA with the adapter-off reference, rollouts fed
    identically: FSDP2 on 2 processes == 1 process. Its step-2 checkpoint resumes on FSDP (in the same
    launch) to the uninterrupted FSDP run, and one plain process resumes it too (the same files)."""
    algos, model = ("ppo", "grpo"), str(tiny_sft_dir)
    ckpt = ["train.save_every=2"]
    two = launch(2, WORKER, model, str(tmp_path / "two"), "4", ",".join(algos), *ckpt, "--resume-copy", env=FSDP)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("engine: FSDP2 (fully_shard, 3 sharded modules)") == 4, two.stdout[-3000:]
    assert two.stdout.count("resumed from") == 2
    _fed_rl_in_process(monkeypatch, model, str(tmp_path / "one"), "8", ",".join(algos), *ckpt)
    for algo in algos:
        one, fsdp = tmp_path / "one" / algo, tmp_path / "two" / algo
        step2 = [load_file(d / "checkpoints" / "step-000002" / "trainable.safetensors") for d in (one, fsdp)]
        assert step2[0] and {k: v.shape for k, v in step2[0].items()} == {k: v.shape for k, v in step2[1].items()}
        assert_same_rl_run(one, fsdp, algo)
        assert_same_rl_run(fsdp, tmp_path / "two" / f"{algo}-resumed", algo, tol=1e-6)
    # the FSDP checkpoints resumed by one plain process (mini_batch_size is per process: 4 × 2 → 8)
    for algo in algos:
        shutil.copytree(tmp_path / "two" / algo, tmp_path / "plain" / algo)
        shutil.rmtree(tmp_path / "plain" / algo / "final")
    more = ["resume=true", "overwrite=false", "allow_config_change=true"]
    _fed_rl_in_process(monkeypatch, model, str(tmp_path / "plain"), "8", ",".join(algos), *ckpt, *more)
    for algo in algos:
        assert_same_rl_run(tmp_path / "one" / algo, tmp_path / "plain" / algo, algo)


def test_fsdp_rl_real_rollouts_equal_ddp(tiny_sft_dir, tmp_path):
    """RLOO sampling with the policy itself (HF generate, merge_lora on by default: skipped under FSDP),
    evaluation on 5 prompts (3 and 2 per rank: different forward counts), on FSDP2 and on DDP: each rank
    samples the same tokens from the same weights, so the runs agree."""
    args = [str(tiny_sft_dir), "4", "rloo", "--real-rollouts", "generation.response_min=4", "generation.response_max=8"]
    # a forward left collective (sharded) on uneven work hangs: 180 s, not the 10 minutes of a launch
    fsdp = launch(2, WORKER, args[0], str(tmp_path / "fsdp"), *args[1:], env=FSDP, timeout=180)
    ddp = launch(2, WORKER, args[0], str(tmp_path / "ddp"), *args[1:], "generation.merge_lora=false")
    assert fsdp.returncode == 0 and ddp.returncode == 0, (fsdp.stderr[-3000:], ddp.stderr[-3000:])
    assert "engine: FSDP2" in fsdp.stdout and "engine: FSDP2" not in ddp.stdout
    a, b = tmp_path / "ddp" / "rloo", tmp_path / "fsdp" / "rloo"
    assert_same_rl_run(a, b, "rloo")
    for key in ("eval/reward", "eval/kl", "eval/response_length"):
        assert len(_losses(a, key)) == 2 and _losses(a, key) == pytest.approx(_losses(b, key), abs=1e-5), key
    assert (b / "samples.jsonl").read_text() == (a / "samples.jsonl").read_text()
    assert (b / "before_after.md").exists()


def test_lora_merge_is_skipped_on_fsdp_sharded_layers(tiny_model_dir):
    """generation.merge_lora folds the adapter into the base weights; under FSDP2 (even unsharded) those
    are all-gathered copies FSDP does not track, so sampling runs unmerged (a one-process gloo group here)."""
    import socket

    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.adapters import lora_merged
    from rlhfkit.runtime import engines

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        models = [
            get_peft_model(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear")
            )
            for _ in range(2)
        ]
        engines.fully_shard_blocks(models[1])
        engines.unshard(models[1])
        for model, merges in zip(models, (True, False)):
            with lora_merged(model):
                merged = [m.merged for m in model.modules() if isinstance(m, LoraLayer)]
            assert (
                merged
                and all(merged) == merges
                and not any(m.merged for m in model.modules() if isinstance(m, LoraLayer))
            )
    finally:
        dist.destroy_process_group()
