"""The training loop shared by the supervised stages (SFT, reward model, DPO).

Each optimizer step takes a fixed set of items (a deterministic function of seed and step), splits
them over ranks and micro-batches, and normalises the summed loss by the unit count of the *whole*
step (tokens or pairs, across ranks). That makes grad accumulation 1×8 == 8×1 and N processes ==
one process, and makes resume exact: a checkpoint restores trainable weights, optimizer, scheduler
and RNG state (rlhfkit/runtime/checkpoint.py: tensors and JSON, never a pickle) and the step number alone
decides which items come next.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rlhfkit.runtime import checkpoint, engines
from rlhfkit.runtime.config import check_positive, read_yaml, save_config, to_dict
from rlhfkit.runtime.errors import ConfigError, RlhfkitError
from rlhfkit.runtime.io import (
    append_jsonl,
    atomic_write_text,
    fsync_path,
    fsync_tree,
    lock_dir,
    prepare_out_dir,
    read_jsonl,
)

CKPT_DIR = "checkpoints"
FINAL_DIR = "final"


@dataclass
class TrainConfig:
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Schedule after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up optimizer steps."""
    epochs: float = 1.0
    """Passes over the training data (used when max_steps is -1)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 derives them from epochs."""
    batch_size: int = 8
    """Micro-batch size per process (rows, blocks or pairs; RL: rollouts per step)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = batch_size × processes × grad_accum (RL: mini-batches
    of ppo.mini_batch_size rollouts per optimizer step)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    seed: int = 42
    """Seed for data order, initialisation and dropout."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end)."""
    save_every: int = 0
    """Checkpoint every N optimizer steps for --resume (0: only the final model)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep."""
    log_every: int = 1
    """Write a metrics.jsonl record every N steps."""
    report_to: list[str] = field(default_factory=list)
    """Extra trackers through accelerate: tensorboard, wandb."""
    reuse_memory: bool = True
    """CPU runs (Linux): the process keeps memory it frees for its next tensors (glibc malloc: no mmap, no trim)
    rather than handing it back to the OS, so the 40+ MB logits of every forward are not page-faulted in
    anew (zeroing 40 MB: 22 vs 2 ms, 2-core AMD EPYC). The process holds its peak memory until it exits."""

    def __post_init__(self):
        check_positive(self, ("lr", "batch_size", "grad_accum", "epochs", "keep_checkpoints", "log_every"))
        check_positive(
            self, ("weight_decay", "warmup_steps", "max_grad_norm", "eval_every", "save_every"), zero_ok=True
        )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (from epochs) or ≥ 1, got {self.max_steps}")


def reuse_freed_memory() -> bool:
    """glibc malloc keeps freed memory for reuse: allocations over 32 MB (its largest mmap threshold) are
    otherwise mmapped and page-faulted in on every use, and the heap top trimmed back to the OS (the
    caching that jemalloc/tcmalloc give; PyTorch's CPU tuning guide). False where libc is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and others have other mallopt semantics
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


@dataclass
class StageConfig:
    out_dir: str = "runs/stage"
    """Output directory of this stage (config.yaml, metrics.jsonl, checkpoints/, final/)."""
    overwrite: bool = False
    """Replace a non-empty out_dir."""
    resume: bool = False
    """Continue from the newest complete checkpoint in out_dir."""
    allow_config_change: bool = False
    """Let --resume continue a run whose saved config differs in more than run-length keys."""
    push_to_hub: str | None = None
    """Hub repo id ('org/name') to upload final/ to when the stage has finished (as `rlhfkit push`);
    in a recipe the pushes run after the last stage, with the eval figures in the model cards."""


# --------------------------------------------------------------------------- data plan
class StepPlan:
    """Which items each rank uses at each optimizer step (no duplicates, no drops per epoch)."""

    def __init__(self, n_items: int, batch_size: int, grad_accum: int, world: int, rank: int, seed: int):
        if n_items == 0:
            raise RlhfkitError("no training items")
        self.n, self.b, self.g, self.world, self.rank, self.seed = n_items, batch_size, grad_accum, world, rank, seed
        self.global_batch = batch_size * grad_accum * world
        self.steps_per_epoch = math.ceil(n_items / self.global_batch)
        self._perm_epoch, self._perm = -1, None

    def order(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + 1000003 * epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm

    def step_items(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[k * self.global_batch : (k + 1) * self.global_batch]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches for `step`. Every rank gets the same number of them (DDP must
        all-reduce equally often); on the short last step of an epoch a rank may get empty ones."""
        items = self.step_items(step)
        mine = items[self.rank :: self.world]
        n_micro = math.ceil(math.ceil(len(items) / self.world) / self.b)
        return [mine[i * self.b : (i + 1) * self.b] for i in range(n_micro)]


# --------------------------------------------------------------------------- the loop
class StageRun:
    """What every stage's run shares: accelerator, out_dir rules, config.yaml, metrics.jsonl,
    trackers, and step checkpoints that hold only trainable weights plus the stage's own state."""

    fsdp_ready = False  # shards its model itself under FSDP on CPUs (`shard` + `prepare`: Trainer, RLTrainer)

    def __init__(self, cfg, stage: str):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.stage, self.report_to, self.keep = cfg, stage, cfg.train.report_to, cfg.train.keep_checkpoints
        self.out = Path(cfg.out_dir)
        # mixed_precision="no": explicit, or a transformers.Trainer that ran earlier in this process
        # (TRL defaults to bf16) leaves its setting in accelerate's shared state.
        # cpu=True on a machine without CUDA: only then does accelerate run torchrun ranks as
        # MULTI_CPU over gloo instead of as unrelated single processes.
        from accelerate.utils import DistributedDataParallelKwargs

        # DDP here; DeepSpeed or FSDP when accelerate launch asks
        engine_kwargs = engines.accelerator_kwargs(fsdp_ready=self.fsdp_ready)

        # broadcast_buffers=False: buffers here are constants (RoPE inv_freq), and a broadcast in
        # every forward deadlocks when ranks run different numbers of forwards (packed sub-batches).
        self.accelerator = Accelerator(
            log_with=self.report_to or None,
            project_dir=str(self.out / "trackers"),
            mixed_precision="no",
            cpu=engine_kwargs["cpu"],
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False), *engine_kwargs["kwargs_handlers"]],
        )
        set_seed(cfg.train.seed, device_specific=True)  # rank-dependent: own dropout masks and rollouts per rank
        if cfg.train.reuse_memory and self.accelerator.device.type == "cpu":
            reuse_freed_memory()
        self.metrics_path = self.out / "metrics.jsonl"
        self.step = 0
        self.scheduler = None
        # Decided before anything is written, so a refused resume leaves the folder as it was.
        self.resume_from = self._pick_checkpoint() if cfg.resume else None
        self._lock = None
        if self.accelerator.is_main_process:
            self._lock = lock_dir(self.out)  # one writer per out_dir; released when the process ends
            if cfg.resume:
                saved = json.loads((self.resume_from / "trainer_state.json").read_text()) if self.resume_from else {}
                _check_resume_config(
                    cfg, self.out / "config.yaml", saved.get("processes", 1), self.accelerator.num_processes
                )
            prepare_out_dir(self.out, overwrite=cfg.overwrite, resume=cfg.resume, owner=stage)
            if cfg.resume and self.resume_from is None:  # nothing to resume: a clean start, not a second run appended
                for name in ("metrics.jsonl", "samples.jsonl"):
                    (self.out / name).unlink(missing_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self.accelerator.wait_for_everyone()
        if self.report_to:
            self.accelerator.init_trackers(stage, config=_flat(to_dict(cfg)))

    def fit(self) -> dict:
        """Run the stage (`_fit`); the out_dir lock is released when it ends, however it ends."""
        try:
            return self._fit()
        finally:
            self.release()

    def shard(self, model) -> None:
        """FSDP on CPUs: FSDP2 over the model's blocks (engines.fully_shard_blocks), in place. Called
        before the optimizer is built: it must step the sharded parameters."""
        if engines.fsdp_on_cpu(self.accelerator.num_processes):
            engines.fully_shard_blocks(model)

    def prepare(self, model, optimizer):
        """accelerate's prepare; a FSDP2-sharded model is not handed to it (it would wrap it in DDP) and
        is left whole until the first step: what a stage runs before it (SFT's eval, DPO's reference
        log-probs, RL rollouts) may take a different number of forwards on each rank."""
        if not engines.is_sharded(model):
            return self.accelerator.prepare(model, optimizer)
        engines.unshard(model)
        return model, self.accelerator.prepare(optimizer)

    def sum_across(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over all processes (x itself with one process): the one cross-rank reduction."""
        return self.accelerator.reduce(x, reduction="sum") if self.accelerator.num_processes > 1 else x

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _checkpoints(self) -> list[Path]:
        d = self.out / CKPT_DIR
        found = [p for p in d.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name)] if d.exists() else []
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def _pick_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (a damaged newest one is reported and skipped); None when
        there is none and the run has not finished; an error when it has (never retrain over final/)."""
        ckpts, problems = self._checkpoints(), []
        for ck in reversed(ckpts):
            problem = checkpoint.check(ck)
            if problem is None:
                for p in problems:
                    print(f"[{self.stage}] skipping a damaged checkpoint: {p}")
                return ck
            problems.append(problem)
        if problems:
            raise RlhfkitError(f"--resume: no complete checkpoint in {self.out / CKPT_DIR} ({'; '.join(problems)})")
        if (self.out / FINAL_DIR).exists():
            raise RlhfkitError(
                f"--resume: {self.out} has no checkpoint and the run has finished ({FINAL_DIR}/ exists): "
                f"nothing to resume; pass --overwrite to train again"
            )
        print(f"[{self.stage}] --resume: no checkpoint in {self.out / CKPT_DIR}; starting from step 0")
        return None

    def save_checkpoint(self, extra: dict | None = None) -> Path:
        """Trainable weights, optimizer, scheduler, per-rank RNG and trainer_state.json (checkpoint.py),
        every file fsynced before the folder is renamed into place."""
        acc = self.accelerator
        final = self.out / CKPT_DIR / f"step-{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        checkpoint.write_rank_files(tmp, acc.process_index)
        zero = engines.zero_optimizer_state(self.model)
        if zero is not None:
            checkpoint.write_rank_optimizer(tmp, acc.process_index, zero)
        optimizer = self._checkpoint_optimizer(gather=True)
        with engines.gathered(self.model):
            if acc.is_main_process:
                checkpoint.write_shared_files(
                    tmp,
                    acc.unwrap_model(self.model),
                    None if zero is not None else optimizer,
                    self.scheduler,
                    {"step": self.step, "stage": self.stage, "processes": acc.num_processes, **(extra or {})},
                )
        acc.wait_for_everyone()
        if acc.is_main_process:
            fsync_tree(tmp)
            os.replace(tmp, final)
            fsync_path(final.parent)  # the rename itself
            for old in self._checkpoints()[: -max(1, self.keep)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _checkpoint_optimizer(self, gather: bool):
        """The optimizer as checkpoints store it: whole (FSDP2's sharded state gathered, a collective)."""
        if not engines.is_sharded(self.model):
            return self.optimizer
        view = engines.FullOptimizerState(self.optimizer)
        return view.gather() if gather else view

    def maybe_resume(self) -> dict | None:
        """Load the checkpoint chosen at start-up when cfg.resume; returns its trainer_state (None if fresh)."""
        if self.resume_from is None:
            return None
        acc = self.accelerator
        zero = engines.zero_stage(self.model)
        with engines.gathered(self.model, modify=True):
            state = checkpoint.load(
                self.resume_from,
                acc.unwrap_model(self.model),
                None if zero else self._checkpoint_optimizer(gather=False),
                self.scheduler,
                acc.process_index,
            )
        if zero:  # ZeRO shards optimizer state by rank: only the same process count resumes it
            if state.get("processes") != acc.num_processes:
                raise RlhfkitError(
                    f"--resume: {self.resume_from} was written by {state.get('processes')} DeepSpeed processes; "
                    f"resume it with the same count (now {acc.num_processes})"
                )
            engines.load_zero_optimizer_state(
                self.model, checkpoint.load_rank_optimizer(self.resume_from, acc.process_index)
            )
        self.step = int(state["step"])
        if acc.is_main_process:
            # Records past the checkpoint came from the interrupted run: they will be redone.
            kept = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= self.step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            print(f"[{self.stage}] resumed from {self.resume_from} (step {self.step})")
        return state

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            append_jsonl(self.metrics_path, record)
        if self.report_to:
            self.accelerator.log(
                {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=record["step"]
            )

    def maybe_fault(self) -> None:
        """Fault injection for resume tests: SIGKILL right after the checkpoint of step N."""
        if int(os.environ.get("RLHFKIT_FAULT_KILL_AFTER_STEP", "0")) == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def save_final(self, save_fn: Callable) -> Path:
        from rlhfkit.runtime.io import atomic_dir

        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.out / FINAL_DIR
        with engines.gathered(self.model):
            if acc.is_main_process:
                with atomic_dir(final, overwrite=True) as tmp:
                    save_fn(tmp)
                    save_config(self.cfg, tmp / "config.yaml")
                    self._write_card(tmp)
        acc.wait_for_everyone()
        return final

    def _write_card(self, folder: Path) -> None:
        """README.md model card (runtime/card.py) for every stage's final/. A card that cannot be built
        is reported, not raised: the trained model is already saved and matters more."""
        from rlhfkit.runtime.card import write_card

        try:
            write_card(folder, stage=self.stage, stage_dir=self.out, force=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"[{self.stage}] model card not written: {exc.__class__.__name__}: {exc}")


class Trainer(StageRun):
    """Runs optimizer steps for one supervised stage. The stage supplies:

    collate(indices) -> micro (anything), count(micro) -> units in it (tokens or pairs),
    loss(model, micro) -> (loss_sum tensor, stat_sums dict), evaluate(model) -> dict,
    save_final(model, dir) -> None.
    """

    fsdp_ready = True  # self.shard / self.prepare below

    def __init__(
        self,
        cfg,
        stage: str,
        model,
        n_items: int,
        collate: Callable,
        count: Callable,
        loss: Callable,
        evaluate: Callable | None = None,
        save_final: Callable | None = None,
        unit: str = "tokens",
    ):
        super().__init__(cfg, stage)
        self.tc, self.unit = cfg.train, unit
        acc = self.accelerator
        self.plan = StepPlan(
            n_items, self.tc.batch_size, self.tc.grad_accum, acc.num_processes, acc.process_index, self.tc.seed
        )
        self.total_steps = (
            self.tc.max_steps
            if self.tc.max_steps > 0
            else max(1, math.ceil(self.tc.epochs * self.plan.steps_per_epoch))
        )
        self.shard(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RlhfkitError("the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        from transformers import get_scheduler

        # Not passed to prepare(): accelerate would step it once per process per optimizer step.
        self.scheduler = get_scheduler(self.tc.lr_scheduler, optimizer, self.tc.warmup_steps, self.total_steps)
        if engines.engine() == "deepspeed":
            engines.configure_deepspeed(acc, self.tc.batch_size, self.tc.grad_accum, self.tc.max_grad_norm)
        self.model, self.optimizer = self.prepare(model, optimizer)
        self.collate, self.count, self.loss_fn = collate, count, loss
        self.evaluate_fn, self.save_final_fn = evaluate, save_final
        if acc.is_main_process:
            print(
                f"[{stage}] global batch = {self.tc.batch_size} per process × {acc.num_processes} processes × "
                f"{self.tc.grad_accum} grad_accum = {self.plan.global_batch}; {self.total_steps} steps "
                f"({self.plan.steps_per_epoch} per epoch of {n_items} items); engine: {engines.describe(self.model)}"
            )

    # ---------------------------------------------------------------- steps
    @property
    def eval_model(self):
        """The model without its DDP wrapper: eval shards differ in size across ranks, and every
        DDP forward is a collective (buffer broadcast) that would then deadlock. FSDP2: all-gathered
        until the next training step, so its forwards run no collective either."""
        model = self.accelerator.unwrap_model(self.model)
        engines.unshard(model)
        return model

    def train_step(self) -> dict:
        acc, model = self.accelerator, self.model
        plan = self.plan.micro_batches(self.step)
        filler = next(ix for ix in plan if ix) if any(plan) else self.plan.step_items(self.step)[:1]
        # An empty micro-batch still runs forward/backward (weight 0) so every rank syncs the same.
        micros = [(self.collate(ix), 1.0) if ix else (self.collate(filler), 0.0) for ix in plan]
        units = torch.tensor(float(sum(self.count(m) * w for m, w in micros)), device=acc.device)
        total_units = self.sum_across(units.clone())
        if total_units.item() == 0:
            raise RlhfkitError(f"step {self.step}: the batch holds no training {self.unit} (all masked?)")
        loss_sum = torch.zeros((), device=acc.device)
        stat_sums: dict[str, torch.Tensor] = {}
        engines.reshard(model)  # FSDP2 left whole by an evaluation
        model.train()
        for i, (micro, weight) in enumerate(micros):
            sync = i == len(micros) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                loss, stats = self.loss_fn(model, micro)
                loss = loss * weight
                # DDP averages gradients over ranks; scale back so the step loss is sum / global units.
                acc.backward(loss * acc.num_processes / total_units)
            loss_sum += loss.detach()
            for k, v in stats.items():
                v = torch.as_tensor(v, device=acc.device, dtype=torch.float32) * weight
                stat_sums[k] = stat_sums.get(k, torch.zeros((), device=acc.device)) + v
        grad_norm = (
            acc.clip_grad_norm_(model.parameters(), self.tc.max_grad_norm) if self.tc.max_grad_norm > 0 else None
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss_total = self.sum_across(loss_sum)
        record = {
            "step": self.step,
            "loss": (loss_total / total_units).item(),
            "lr": self.scheduler.get_last_lr()[0],
            self.unit: int(total_units.item()),
        }
        for k, v in stat_sums.items():
            record[k] = (self.sum_across(v) / total_units).item()
        if grad_norm is not None:
            record["grad_norm"] = float(engines.plain(grad_norm))
        return record

    def _fit(self) -> dict:
        from tqdm.auto import tqdm

        self.maybe_resume()
        acc = self.accelerator
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.stage,
            disable=not acc.is_local_main_process,
            dynamic_ncols=True,
        )
        last: dict[str, Any] = {}
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            record = self.train_step()
            dt = time.perf_counter() - t0
            record[f"{self.unit}_per_s"] = record[self.unit] / dt
            record["epoch"] = self.step / self.plan.steps_per_epoch
            last = record
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                **{f"{self.unit}/s": f"{record[f'{self.unit}_per_s']:.3g}"},
            )
            if self.step % self.tc.log_every == 0 or self.step == self.total_steps:
                self.log(record)
            if (
                self.evaluate_fn
                and self.tc.eval_every
                and self.step % self.tc.eval_every == 0
                and self.step < self.total_steps
            ):
                self.log({"step": self.step, **{f"eval/{k}": v for k, v in self.evaluate_fn(self.eval_model).items()}})
            if self.tc.save_every and self.step % self.tc.save_every == 0:
                self.save_checkpoint()
                self.maybe_fault()
        bar.close()
        summary = {"stage": self.stage, "steps": self.step, "train_loss": last.get("loss")}
        if self.evaluate_fn:
            ev = self.evaluate_fn(self.eval_model)
            self.log({"step": self.step, **{f"eval/{k}": v for k, v in ev.items()}})
            summary.update({f"eval_{k}": v for k, v in ev.items()})
        model = self.accelerator.unwrap_model(self.model)
        self.save_final(
            lambda out: self.save_final_fn(model, out) if self.save_final_fn else model.save_pretrained(out)
        )
        if self.tc.report_to:
            acc.end_training()
        return summary


# --------------------------------------------------------------------------- helpers
# Keys a resume may change: how long to run and how often to save or log, not what is trained.
RUN_LENGTH_KEYS = {
    "out_dir",
    "overwrite",
    "resume",
    "allow_config_change",
    "train.max_steps",
    "train.epochs",
    "train.save_every",
    "train.eval_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.report_to",
    "push_to_hub",
}


def _check_resume_config(cfg, saved: Path, saved_world: int, world: int) -> None:
    """Refuse a resume whose config differs from the saved one in anything but run-length keys. The
    per-process batch may change with the process count as long as the global batch stays the same."""
    if cfg.allow_config_change or not saved.exists():
        return
    old = _flat(read_yaml(saved, "saved config"))
    new = _flat(to_dict(cfg))
    changed = sorted(k for k in set(old) | set(new) if k not in RUN_LENGTH_KEYS and old.get(k) != new.get(k))
    for key in ("train.batch_size",):
        if key in changed and isinstance(old.get(key), int) and old[key] * saved_world == new[key] * world:
            changed.remove(key)
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in changed[:6])
        raise ConfigError(
            f"--resume: the config differs from {saved} in {diffs}"
            + (f" (+{len(changed) - 6} more)" if len(changed) > 6 else "")
            + "; pass --allow-config-change to resume anyway"
        )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
