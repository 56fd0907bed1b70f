"""DeepSpeed ZeRO-2 / ZeRO-3 on CPU (gloo) through the shipped accelerate configs: 2 processes equal
one process, and a ZeRO checkpoint resumes to exactly the uninterrupted run (SFT, RM, DPO, and the RL
stage on ZeRO-2; ZeRO-3 refused there in one line).

Each `accelerate launch` of DeepSpeed takes ~45 s on a shared 2-core AMD EPYC, so these run where
deepspeed is installed (`pip install deepspeed torch==2.13.0`), not in the default test extra.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from rlhfkit.runtime.io import read_jsonl
from tests.conftest import REPO
from tests.e2e.test_distributed import _assert_close, _losses, _weights, launch

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or ACCELERATE is None,
    reason="deepspeed not installed in this interpreter (pip install deepspeed torch==2.13.0)",
)
CONFIGS = {2: "recipes/accelerate/deepspeed_zero2_cpu.yaml", 3: "recipes/accelerate/deepspeed_zero3_cpu.yaml"}


def ds_launch(zero: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    port = str(29700 + zero * 10 + os.getpid() % 7)
    cmd = [ACCELERATE, "launch", "--main_process_port", port, "--config_file", CONFIGS[zero], *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})},
        timeout=900,
    )


def sft_args(model, corpus, out, batch_size):
    return [
        "-m",
        "rlhfkit.cli",
        "sft",
        f"model.name={model}",
        f"data.path={corpus}",
        "data.seq_len=64",
        "train.max_steps=5",
        "train.lr=3e-3",
        "lora.dropout=0",
        "train.seed=1",
        "train.save_every=2",
        f"train.batch_size={batch_size}",
        f"out_dir={out}",
    ]


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_sft_two_processes_equal_one_and_resume_is_exact(zero, tiny_model_dir, tiny_corpus, tmp_path):
    one = launch(1, *sft_args(tiny_model_dir, tiny_corpus, tmp_path / "one", 8))
    two = ds_launch(zero, *sft_args(tiny_model_dir, tiny_corpus, tmp_path / "ds", 4))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-3000:])
    assert f"engine: DeepSpeed ZeRO-{zero}" in two.stdout and "× 2 processes" in two.stdout
    adapter = "adapter_model.safetensors"
    w_one, w_ds = _weights(tmp_path / "one", adapter), _weights(tmp_path / "ds", adapter)
    assert all(t.numel() > 0 for t in w_ds.values())  # ZeRO-3 shards: saved whole, not rank 0's empty shard
    _assert_close(w_one, w_ds)
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "ds"), abs=1e-5)

    res = tmp_path / "resumed"
    killed = ds_launch(zero, *sft_args(tiny_model_dir, tiny_corpus, res, 4), env={"RLHFKIT_FAULT_KILL_AFTER_STEP": "2"})
    assert killed.returncode != 0 and (res / "checkpoints" / "step-000002" / "optimizer-1.json").exists()
    again = ds_launch(zero, *sft_args(tiny_model_dir, tiny_corpus, res, 4), "--resume")
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    _assert_close(w_ds, _weights(res, adapter), tol=0.0)  # same engine, same shards: bit for bit
    assert _losses(tmp_path / "ds") == _losses(res)


def test_zero2_rm_two_processes_equal_one(tiny_model_dir, tmp_path):
    from tests.stages.conftest import preference_pairs

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(120, seed=3)))
    args = [
        "-m",
        "rlhfkit.cli",
        "rm",
        f"model.name={tiny_model_dir}",
        f"data.path={pairs}",
        "data.max_length=64",
        "train.max_steps=4",
        "train.lr=3e-3",
        "lora.r=4",
        "lora.dropout=0",
        "train.seed=0",
    ]
    one = launch(1, *args, f"out_dir={tmp_path / 'one'}", "train.batch_size=8")
    two = ds_launch(2, *args, f"out_dir={tmp_path / 'ds'}", "train.batch_size=4")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-3000:])
    assert "engine: DeepSpeed ZeRO-2" in two.stdout
    _assert_close(
        _weights(tmp_path / "one", "adapter_model.safetensors"), _weights(tmp_path / "ds", "adapter_model.safetensors")
    )
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "ds"), abs=1e-5)
    assert _losses(tmp_path / "one", "eval/accuracy") == _losses(tmp_path / "ds", "eval/accuracy")


def test_deepspeed_refuses_grad_accum(tiny_model_dir, tiny_corpus, tmp_path):
    p = ds_launch(2, *sft_args(tiny_model_dir, tiny_corpus, tmp_path / "ga", 2), "train.grad_accum=2")
    assert p.returncode != 0 and "train.grad_accum > 1 is not supported with DeepSpeed" in p.stderr + p.stdout


RL_KEYS = ["score", "kl", "kl_coef", "pg_loss", "approxkl"]
WORKER = str(REPO / "tests" / "ddp_ppo_worker.py")
# ratio_threshold=1: a mini-batch after an update whose mean ratio is > 1 is skipped (GRPO's epoch 2 here),
# and DeepSpeed, which steps inside backward, must not take that step (Adam's momentum would move the
# weights: 5.2e-3 on a tiny model's adapter before engines.steps_in_backward).
GUARD = "ppo.ratio_threshold=1.0"


def _rl_records(out, keys):
    return [[r[k] for k in keys] for r in read_jsonl(out / "metrics.jsonl") if "score" in r]


@pytest.fixture(scope="module")
def rl_one(tiny_sft_dir, tmp_path_factory):
    """The 1-process reference run of PPO and GRPO (fed rollouts), shared by both ZeRO stages."""
    out = tmp_path_factory.mktemp("rl_one")
    one = launch(1, WORKER, str(tiny_sft_dir), str(out), "8", "ppo,grpo", GUARD)
    assert one.returncode == 0, one.stderr[-3000:]
    return out


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_rl_two_processes_equal_one_and_ppo_resume_is_exact(zero, rl_one, tiny_sft_dir, tmp_path):
    """PPO (value head, its own update loop) and GRPO under ZeRO-2/3: 2 processes == 1 (one launch per
    process count for both estimators); then a ZeRO PPO run SIGKILLed after its step-2 checkpoint and
    resumed equals the uninterrupted one bit for bit (same engine, same shards)."""
    two = ds_launch(zero, WORKER, str(tiny_sft_dir), str(tmp_path / "ds"), "4", "ppo,grpo", GUARD)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"engine: DeepSpeed ZeRO-{zero}" in two.stdout
    for algo in ("ppo", "grpo"):
        a, b = rl_one / algo, tmp_path / "ds" / algo
        names = ["adapter_model.safetensors"] + (["value_head.safetensors"] if algo == "ppo" else [])
        for name in names:
            _assert_close(_weights(a, name), _weights(b, name))
        keys = RL_KEYS + (["vf_loss"] if algo == "ppo" else [])
        ra, rb = _rl_records(a, keys), _rl_records(b, keys)
        assert len(ra) == 3 and len(rb) == 3
        worst = max(abs(x - y) for r1, r2 in zip(ra, rb) for x, y in zip(r1, r2))
        assert worst <= 1e-5, (algo, ra, rb)
        assert any(abs(r[3]) > 1e-6 for r in ra), algo  # a real policy loss, not zero advantages everywhere
    assert sum(_losses(tmp_path / "ds" / "grpo", "skipped_minibatches")) > 0  # the guard fired after an update

    res, args = tmp_path / "res", [WORKER, str(tiny_sft_dir), str(tmp_path / "res"), "4", "ppo", GUARD]
    killed = ds_launch(zero, *args, "train.save_every=1", env={"RLHFKIT_FAULT_KILL_AFTER_STEP": "2"})
    assert killed.returncode != 0 and (res / "ppo" / "checkpoints" / "step-000002" / "optimizer-1.json").exists()
    again = ds_launch(zero, *args, "train.save_every=1", "resume=true")
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        _assert_close(_weights(tmp_path / "ds" / "ppo", name), _weights(res / "ppo", name), tol=0.0)
    keys = RL_KEYS + ["vf_loss", "explained_variance"]
    assert _rl_records(tmp_path / "ds" / "ppo", keys) == _rl_records(res / "ppo", keys)


def test_zero3_rollouts_sample_as_zero2(tiny_sft_dir, tmp_path):
    """Real rollouts (HF generate) and an evaluation on 5 prompts (3 on one rank, 2 on the other): under
    ZeRO-3 every forward all-gathers, and ranks whose responses end early must keep joining (synced_gpus).
    Same seeds per rank, so ZeRO-3 samples what ZeRO-2 (whole weights on every rank) samples."""
    args = ["4", "ppo", "--real-rollouts", "generation.response_min=4", "generation.response_max=24"]
    runs = {z: ds_launch(z, WORKER, str(tiny_sft_dir), str(tmp_path / f"z{z}"), *args) for z in (2, 3)}
    assert all(p.returncode == 0 for p in runs.values()), {z: p.stderr[-2000:] for z, p in runs.items()}
    z2, z3 = tmp_path / "z2" / "ppo", tmp_path / "z3" / "ppo"
    keys = ["score", "response_length", "kl", "pg_loss", "vf_loss"]
    flat = lambda out: [x for r in _rl_records(out, keys) for x in r]  # noqa: E731
    assert len(flat(z3)) == 3 * len(keys) and flat(z2) == pytest.approx(flat(z3), abs=1e-5)
    text = lambda out: [(r["tag"], r["prompt"], r["response"]) for r in read_jsonl(out / "samples.jsonl")]  # noqa: E731
    assert text(z2) == text(z3) and len(text(z3)) == 6  # before + after on rank 0's 3 of the 5 prompts
    assert len({len(r) for _, _, r in text(z3)}) > 1  # responses end apart (EOS): what synced_gpus must keep in step
    assert _losses(z3, "eval/kl")[0] == 0.0  # the reference is the policy at step 0


def test_zero3_refuses_sampling_that_needs_whole_weights():
    from types import SimpleNamespace

    from transformers.integrations import HfDeepSpeedConfig

    from rlhfkit.runtime import engines
    from rlhfkit.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="needs `zero3_init_flag: true`"):
        engines.check_zero3_sampling(SimpleNamespace(backend="hf", compile=False))
    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}})  # what accelerate sets with zero3_init_flag
    engines.check_zero3_sampling(SimpleNamespace(backend="hf", compile=False))
    for g in (SimpleNamespace(backend="vllm", compile=False), SimpleNamespace(backend="hf", compile=True)):
        with pytest.raises(ConfigError, match="vllm and generation.compile need whole weights"):
            engines.check_zero3_sampling(g)
    del keep  # transformers holds it by weak reference: ZeRO-3 is off again for this process


def test_zero2_dpo_two_processes_equal_one(tiny_model_dir, tmp_path):
    from tests.stages.test_dpo import preference_rows

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(96, seed=1)))
    args = [
        "-m",
        "rlhfkit.cli",
        "dpo",
        f"model.name={tiny_model_dir}",
        f"data.path={pairs}",
        "data.max_length=64",
        "data.eval_fraction=0.2",
        "train.max_steps=4",
        "train.lr=1e-3",  # at 1e-2 Adam turns summation-order noise of near-zero gradients into 6e-4 (DDP too)
        "lora.r=8",
        "lora.dropout=0",
        "train.seed=1",
    ]
    one = launch(1, *args, f"out_dir={tmp_path / 'one'}", "train.batch_size=8")
    two = ds_launch(2, *args, f"out_dir={tmp_path / 'ds'}", "train.batch_size=4")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-3000:])
    assert "engine: DeepSpeed ZeRO-2" in two.stdout
    adapter = "adapter_model.safetensors"
    _assert_close(_weights(tmp_path / "one", adapter), _weights(tmp_path / "ds", adapter))
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "ds"), abs=1e-5)
    assert _losses(tmp_path / "one")[-1] < _losses(tmp_path / "one")[0]  # it trained: the loss moved off log 2
    for key in ("rewards/margin", "eval/loss"):
        assert _losses(tmp_path / "one", key) == pytest.approx(_losses(tmp_path / "ds", key), abs=1e-5)
