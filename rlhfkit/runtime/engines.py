"""Which distributed engine a run is on (DDP, DeepSpeed ZeRO, FSDP) and the few places the
training loops (the supervised Trainer, the RL stage) must treat DeepSpeed or FSDP differently.
`accelerate launch --config_file recipes/accelerate/<engine>.yaml` chooses the engine through
environment variables; plain `torchrun` or `python` is DDP (or one process).

FSDP on a CPU machine is torch's own FSDP2 (`fully_shard` over gloo), applied here: accelerate 1.15
runs no FSDP without CUDA (docs/distributed.md). The model is sharded before the optimizer is built,
never handed to accelerate's prepare (which would wrap it in DDP).
"""

from __future__ import annotations

import contextlib
import os
import weakref
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


def accelerator_kwargs(fsdp_ready: bool = False) -> dict:
    """Extra Accelerator arguments. DeepSpeed on a CPU machine must not get cpu=True (that flag
    alone turns the run back into MULTI_CPU DDP) and must be told gloo, else accelerate 1.15 finds
    no backend and runs every rank as a lone process of world size 1 (accelerate state.py).
    FSDP on CPUs is MULTI_CPU for accelerate (gloo) and sharded by the caller: only a loop that
    does it (`fsdp_ready`: the supervised Trainer, the RL stage) may run it; anything else would
    silently be DDP."""
    from accelerate.utils import InitProcessGroupKwargs

    gpu = torch.cuda.is_available()
    if engine() == "fsdp" and not gpu and not fsdp_ready:
        raise ConfigError(
            "FSDP on CPUs (torch FSDP2, recipes/accelerate/fsdp2_cpu.yaml) runs the stages that shard their "
            "model (sft, rm, dpo, ppo) only; run this one with ddp_cpu.yaml"
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
    if is_sharded(model):
        return f"FSDP2 (fully_shard, {len(fsdp_modules(model))} sharded modules)"
    return f"DeepSpeed ZeRO-{zero_stage(model)}" if zero_stage(model) else type(model).__name__


def configure_deepspeed(acc, batch_size: int, grad_accum: int, max_grad_norm: float, sampling=None) -> None:
    """The DeepSpeed config follows train.*: micro-batch size and clipping (DeepSpeed clips inside
    its own step, so accelerate's clip_grad_norm_ does not) — one meaning of each key everywhere.
    `sampling`: the generation config of a stage that samples (the RL stage), checked for ZeRO-3.
    Nothing to do on another engine."""
    if engine() != "deepspeed":
        return
    if sampling is not None and acc.state.deepspeed_plugin.zero_stage == 3:
        check_zero3_sampling(sampling)
    if grad_accum != 1:
        raise ConfigError(
            "train.grad_accum > 1 is not supported with DeepSpeed yet (its engine steps inside every "
            "backward); raise train.batch_size or the process count instead"
        )
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=1)
    ds["gradient_clipping"] = max_grad_norm


def check_zero3_sampling(g) -> None:
    """ZeRO-3 all-gathers each layer's weights inside its forward (a collective), yet rollouts end at
    different lengths on each rank: HF generate keeps the ranks in step with synced_gpus, which
    transformers turns on when its DeepSpeed config is ZeRO-3 (accelerate sets it with zero3_init_flag).
    Sampling paths that read whole weights outside a forward are refused."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        raise ConfigError(
            "DeepSpeed ZeRO-3 in the RL stage needs `zero3_init_flag: true` in the accelerate config (then "
            "transformers samples with synced_gpus and ranks stay in step), as deepspeed_zero3_cpu.yaml sets"
        )
    if g.backend != "hf" or g.compile:
        raise ConfigError(
            "DeepSpeed ZeRO-3 shards every weight: generation.backend=vllm and generation.compile need whole "
            "weights on every rank; use generation.backend=hf without compile, or ZeRO-2"
        )


def steps_in_backward(model) -> bool:
    """A DeepSpeed engine steps its optimizer inside accelerate's backward (optimizer.step() is a no-op
    there): a loop that skips a step must skip that backward too, or Adam moves on a zero gradient."""
    return callable(getattr(model, "zero_optimization_stage", None))


@contextlib.contextmanager
def gathered(model, modify: bool = False):
    """ZeRO-3 shards every parameter across ranks: reading (saving) or writing (resuming) whole
    weights needs them gathered. A collective: every rank must enter. Anything else: no-op."""
    if is_sharded(model):
        reshard(model)  # FSDP's own unsharded state is not what state_dict() reads
        with _fsdp_full_params(model, modify):
            yield
        return
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


# --------------------------------------------------------------------------- FSDP2 on CPU (gloo)
def fsdp_on_cpu(world: int) -> bool:
    """rlhfkit shards the model itself: FSDP asked for, no CUDA, and more than one process."""
    return engine() == "fsdp" and not torch.cuda.is_available() and world > 1


def fully_shard_blocks(model) -> None:
    """FSDP2 in place: every transformer block (the classes a model in it lists in `_no_split_modules`,
    as accelerate's TRANSFORMER_BASED_WRAP; the RL policy holds the LM one level down) and then the
    root, which takes the rest (embeddings, heads, a value head).
    Frozen and trainable parameters share a block: FSDP2 shards each parameter on its own, so a LoRA
    on a frozen base needs no ignored_params (FSDP1 with use_orig_params needed uniform groups)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    # Rank 0's weights everywhere first, as DDP broadcasts them when it wraps a model: each rank keeps
    # its own slice of what it holds, and the RL stage builds its LoRA after the rank-dependent seed.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    found = [m for m in model.modules() if type(m).__name__ in blocks]
    if not found:
        raise ConfigError(f"FSDP: {type(model).__name__} names no transformer block class (_no_split_modules)")
    for block in found:
        fully_shard(block)
    fully_shard(model)
    # FSDP2 makes root whichever module runs forward first; RL sampling runs the LM's blocks without
    # the root's forward (policy.generate), so the root is settled now (torch _fsdp_state._lazy_init).
    model._get_fsdp_state()._lazy_init()


def fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


_UNSHARDED: weakref.WeakSet = weakref.WeakSet()  # FSDP2 models whose blocks are all-gathered for evaluation


def gathers_per_forward(model) -> bool:
    """Weights all-gathered at each forward call (ZeRO-3, FSDP2 outside `unshard`): every rank must make the
    same calls, and FSDP2 frees a block's gathered weights before a second call's backward ("setStorage:
    … out of bounds for storage of size 0"), so a module runs once per backward there."""
    from torch.distributed.fsdp import FullyShardedDataParallel  # FSDP1 (accelerate's FSDP on GPUs) gathers too

    fsdp2 = is_sharded(model) and model not in _UNSHARDED
    return zero_stage(model) == 3 or fsdp2 or isinstance(model, FullyShardedDataParallel)


def unshard(model) -> None:
    """All-gather every block and keep it whole until `reshard`: forwards then run no collective, so
    ranks may run different numbers of them (evaluation shards, DPO's reference pass). Collective."""
    if not is_sharded(model) or model in _UNSHARDED:
        return
    for m in fsdp_modules(model):
        if m is not model:  # the root never reshards after forward (FSDP2's lazy init)
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    _UNSHARDED.add(model)


def reshard(model) -> None:
    """Back to the sharded parameters (before a training step). Every rank calls it at the same point."""
    if model not in _UNSHARDED:
        return
    for m in fsdp_modules(model):
        m.reshard()
        if m is not model:
            m.set_reshard_after_forward(True, recurse=False)
    _UNSHARDED.discard(model)


@contextlib.contextmanager
def _fsdp_full_params(model, modify: bool):
    """Every DTensor parameter temporarily replaced by its full tensor (DTensor.full_tensor, a
    collective), so saving reads whole weights and resuming writes them; with `modify` the full
    values are written back into this rank's shards. Tied weights stay one Parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full: dict[int, torch.nn.Parameter] = {}
    swapped = []
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if not isinstance(p, DTensor):
                continue
            if id(p) not in full:
                full[id(p)] = torch.nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
            mod.register_parameter(name, full[id(p)])
            swapped.append((mod, name, p))
    try:
        yield
        if modify:
            with torch.no_grad():
                for p in {id(p): p for _, _, p in swapped}.values():
                    shard = distribute_tensor(full[id(p)].detach(), p.device_mesh, p.placements, src_data_rank=None)
                    p.to_local().copy_(shard.to_local())
    finally:
        for mod, name, p in swapped:
            mod.register_parameter(name, p)


class FullOptimizerState:
    """A FSDP2 optimizer seen whole, for step checkpoints in the same format as DDP's (so they resume on
    any engine and process count): `gather` (a collective, every rank) turns each DTensor state into its
    full tensor; `load_state_dict` shards full tensors like their parameter before loading."""

    def __init__(self, optimizer):
        self.optimizer, self.full = optimizer, None

    def gather(self) -> FullOptimizerState:
        from torch.distributed.tensor import DTensor

        sd = self.optimizer.state_dict()
        whole = {
            i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in st.items()}
            for i, st in sd["state"].items()
        }
        self.full = {**sd, "state": whole}
        return self

    def state_dict(self) -> dict:
        return self.full

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        by_index = dict(zip(ids, params))
        state = {}
        for i, st in sd["state"].items():
            p = by_index.get(i)
            state[i] = {
                k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape
                else v
                for k, v in st.items()
            }
        self.optimizer.load_state_dict({**sd, "state": state})


def plain(x):
    """A DTensor (FSDP2's grad norm) as a plain tensor; anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x
