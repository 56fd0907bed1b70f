"""Which distributed engine a run is on (DDP, DeepSpeed ZeRO, FSDP) and the few places the
supervised Trainer must treat DeepSpeed differently. `accelerate launch --config_file
recipes/accelerate/<engine>.yaml` chooses the engine through environment variables; plain
`torchrun` or `python` is DDP (or one process).
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch

from rlhfkit.runtime.errors import ConfigError


def engine() -> Literal["ddp", "deepspeed", "fsdp"]:
    """The engine `accelerate launch` asked for (its config file sets these variables)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp"


def accelerator_kwargs() -> dict:
    """Extra Accelerator arguments. DeepSpeed on a CPU machine must not get cpu=True (that flag
    alone turns the run back into MULTI_CPU DDP) and must be told gloo, else accelerate 1.15 finds
    no backend and runs every rank as a lone process of world size 1 (accelerate state.py)."""
    from accelerate.utils import InitProcessGroupKwargs

    gpu = torch.cuda.is_available()
    if engine() == "fsdp" and not gpu:
        # accelerate 1.15 with distributed_type FSDP on a CPU machine runs DDP (use_cpu) or, without
        # it, every rank alone: never FSDP. Refused rather than silently something else.
        raise ConfigError(
            "FSDP through accelerate needs GPUs (accelerate 1.15 runs no FSDP on CPUs); on CPUs use "
            "recipes/accelerate/deepspeed_zero3_cpu.yaml (parameters sharded too) or ddp_cpu.yaml"
        )
    if engine() == "deepspeed":
        return {"cpu": False, "kwargs_handlers": [] if gpu else [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": not gpu, "kwargs_handlers": []}


def zero_stage(model) -> int:
    """The ZeRO stage of a prepared DeepSpeed engine; 0 for anything else."""
    stage = getattr(model, "zero_optimization_stage", None)
    return int(stage()) if callable(stage) else 0


def describe(model) -> str:
    """What the prepared model runs on, as printed at start."""
    return f"DeepSpeed ZeRO-{zero_stage(model)}" if zero_stage(model) else type(model).__name__


def configure_deepspeed(acc, batch_size: int, grad_accum: int, max_grad_norm: float) -> None:
    """The DeepSpeed config follows train.*: micro-batch size and clipping (DeepSpeed clips inside
    its own step, so accelerate's clip_grad_norm_ does not) — one meaning of each key everywhere."""
    if grad_accum != 1:
        raise ConfigError(
            "train.grad_accum > 1 is not supported with DeepSpeed yet (its engine steps inside every "
            "backward); raise train.batch_size or the process count instead"
        )
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=1)
    ds["gradient_clipping"] = max_grad_norm


@contextlib.contextmanager
def gathered(model, modify: bool = False):
    """ZeRO-3 shards every parameter across ranks: reading (saving) or writing (resuming) whole
    weights needs them gathered. A collective: every rank must enter. Anything else: no-op."""
    if zero_stage(model) != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0 if modify else None):
        yield


def _fp32_shards(model) -> list[torch.Tensor] | None:
    """This rank's fp32 master shards, the tensors ZeRO's torch optimizer steps (None: not ZeRO)."""
    stage = zero_stage(model)
    if not stage:
        return None
    zero = model.optimizer
    return list(zero.fp32_partitioned_groups_flat if stage == 3 else zero.single_partition_of_fp32_groups)


def zero_optimizer_state(model) -> dict | None:
    """ZeRO's optimizer state on this rank (its fp32 shards and their Adam moments), or None when the
    optimizer is not sharded. Read from the tensors themselves: ZeRO's own state_dict holds Python
    objects (loss scaler, fragment maps) that only a pickle could store."""
    shards = _fp32_shards(model)
    if shards is None:
        return None
    base = model.optimizer.optimizer
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]  # lr, betas …
    return {"fp32": shards, "moments": [dict(base.state.get(t, {})) for t in shards], "groups": groups}


def load_zero_optimizer_state(model, state: dict) -> None:
    shards = _fp32_shards(model)
    if [tuple(t.shape) for t in shards] != [tuple(t.shape) for t in state["fp32"]]:
        raise ConfigError("--resume: the ZeRO optimizer shards differ in shape (another process count or model?)")
    base = model.optimizer.optimizer
    with torch.no_grad():
        for t, saved, moments in zip(shards, state["fp32"], state["moments"]):
            t.copy_(saved)
            base.state[t] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in moments.items()}
    for group, saved in zip(base.param_groups, state["groups"]):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
