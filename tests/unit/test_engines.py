"""runtime/engines.py: which engine accelerate asked for, and FSDP refused where accelerate would
silently run something else (CPU)."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.runtime import engines
from rlhfkit.runtime.errors import ConfigError


@pytest.mark.parametrize(
    "env,expected",
    [({}, "ddp"), ({"ACCELERATE_USE_DEEPSPEED": "true"}, "deepspeed"), ({"ACCELERATE_USE_FSDP": "True"}, "fsdp")],
)
def test_engine_follows_accelerate_launch(monkeypatch, env, expected):
    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert engines.engine() == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_fsdp_on_cpu_is_refused_to_a_loop_that_does_not_shard_and_deepspeed_gets_gloo(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"shard their model \(sft, rm, dpo, ppo\) only; run this one with ddp_cpu"):
        engines.accelerator_kwargs()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    kw = engines.accelerator_kwargs()
    assert kw["cpu"] is False and kw["kwargs_handlers"][0].backend == "gloo"
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert engines.accelerator_kwargs() == {"cpu": True, "kwargs_handlers": []}
