"""Step checkpoints that load without unpickling anything.

Checkpoints are exactly the files people send each other ("resume my run"), and accelerate's
`load_state` unpickles its scheduler and RNG files with `weights_only=False`: a crafted file there
runs code. So a checkpoint here is tensors in safetensors plus plain JSON, nothing else:

    trainable.safetensors            what training changes (LoRA, heads, unfrozen blocks)
    optimizer.safetensors/.json      optimizer state tensors / everything else (param groups, steps)
    scheduler.json                   LR scheduler state (Trainer stages)
    rng-<rank>.safetensors/.json     torch (+CUDA) generator states / python and numpy states
    trainer_state.json               step, stage, and the stage's own state (PPO: KL controller …)

Every file is fsynced before the folder is renamed into place; `check` names the first damaged file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from rlhfkit.runtime.errors import RlhfkitError

TRAINABLE, OPTIM, SCHED, STATE = "trainable.safetensors", "optimizer", "scheduler.json", "trainer_state.json"
TENSOR = "__tensor__"


# --------------------------------------------------------------------------- tensors + JSON
def _encode(obj, key: str, tensors: dict[str, torch.Tensor]):
    """A nested state (dicts with int keys, tuples, tensors) as JSON, its tensors moved to `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {TENSOR: key}
    if isinstance(obj, dict):
        return {"__items__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise RlhfkitError(f"checkpoint: cannot store a {type(obj).__name__} at {key} as JSON")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if TENSOR in obj:
            return tensors[obj[TENSOR]]
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _save_state(state, folder: Path, name: str) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "s", tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(encoded))


def _load_state(folder: Path, name: str):
    from safetensors.torch import load_file

    return _decode(json.loads((folder / f"{name}.json").read_text()), load_file(str(folder / f"{name}.safetensors")))


def _rng_state() -> dict:
    import numpy as np

    py = random.getstate()
    npy = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), *npy[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / check / load
def trainable_state(model) -> dict[str, torch.Tensor]:
    """Only what training changes (LoRA, heads, unfrozen blocks): checkpoints stay small."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def write_rank_files(folder: Path, rank: int) -> None:
    """What differs per process: its RNG states (each rank samples and drops out on its own)."""
    _save_state(_rng_state(), folder, f"rng-{rank}")


def write_shared_files(folder: Path, model, optimizer, scheduler, state: dict) -> None:
    """What every rank shares (DDP replicas are identical): written once, by the main process."""
    from safetensors.torch import save_file

    save_file(trainable_state(model), str(folder / TRAINABLE))
    if optimizer is not None:  # None: sharded (ZeRO), each rank writes its own (write_rank_optimizer)
        _save_state(optimizer.state_dict(), folder, OPTIM)
    if scheduler is not None:
        (folder / SCHED).write_text(json.dumps(_encode(scheduler.state_dict(), "sched", {})))
    (folder / STATE).write_text(json.dumps(state))


def write_rank_optimizer(folder: Path, rank: int, state: dict) -> None:
    """A sharded optimizer's state (DeepSpeed ZeRO: this rank's fp32 shard and its moments)."""
    _save_state(state, folder, f"{OPTIM}-{rank}")


def load_rank_optimizer(folder: Path, rank: int) -> dict:
    if not (folder / f"{OPTIM}-{rank}.json").is_file():
        raise RlhfkitError(f"{folder / f'{OPTIM}-{rank}.json'} is missing: no optimizer shard for rank {rank}")
    return _load_state(folder, f"{OPTIM}-{rank}")


def check(folder: Path) -> str | None:
    """None if the checkpoint at `folder` is complete and readable, else what is wrong (naming the file)."""
    from safetensors import safe_open

    optim = OPTIM if (folder / f"{OPTIM}.json").exists() or not (folder / f"{OPTIM}-0.json").exists() else f"{OPTIM}-0"
    for name in [TRAINABLE, f"{optim}.safetensors", f"{optim}.json", STATE, SCHED]:
        path = folder / name
        if not path.is_file():
            if name == SCHED:  # optional: only stages with a scheduler write it (load() insists when needed)
                continue
            return f"{path} is missing"
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(path), framework="pt") as fh:
                    list(fh.keys())
            else:
                json.loads(path.read_text())
        except Exception as exc:  # any parse failure means a damaged file
            return f"{path} is damaged ({type(exc).__name__}: {str(exc)[:120]})"
    if "step" not in json.loads((folder / STATE).read_text()):
        return f"{folder / STATE} has no 'step'"
    return None


def load(folder: Path, model, optimizer, scheduler, rank: int) -> dict:
    """Restore a checkpoint written by write_*_files into `model`, `optimizer`, `scheduler` and the RNGs;
    returns trainer_state. A checkpoint from another process count restores what it can (its RNG
    files are per rank: a rank it did not have keeps its seeded state)."""
    from safetensors.torch import load_file

    state = load_file(str(folder / TRAINABLE))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state))[:3], sorted(set(state) - set(params))[:3]
        raise RlhfkitError(
            f"{folder}: checkpoint does not match the model's trainable weights (missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    if optimizer is not None:  # None: sharded, see load_rank_optimizer
        optimizer.load_state_dict(_load_state(folder, OPTIM))
    if scheduler is not None:
        if not (folder / SCHED).is_file():
            raise RlhfkitError(f"{folder / SCHED} is missing: the checkpoint has no LR scheduler state")
        scheduler.load_state_dict(_decode(json.loads((folder / SCHED).read_text()), {}))
    if (folder / f"rng-{rank}.json").exists():
        _set_rng_state(_load_state(folder, f"rng-{rank}"))
    return json.loads((folder / STATE).read_text())
