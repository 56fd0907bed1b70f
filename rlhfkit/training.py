"""The training loop shared by the supervised stages (SFT, reward model, DPO).

Each optimizer step takes a fixed set of items (a deterministic function of seed and step), splits
them over ranks and micro-batches, and normalises the summed loss by the unit count of the *whole*
step (tokens or pairs, across ranks). That makes grad accumulation 1×8 == 8×1 and N processes ==
one process, and makes resume exact: accelerate restores model/optimizer/scheduler/RNG state and
the step number alone decides which items come next.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from rlhfkit.config import save_config, to_dict
from rlhfkit.errors import RlhfkitError
from rlhfkit.io import append_jsonl, atomic_write_json, atomic_write_text, prepare_out_dir, read_jsonl

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
    """Micro-batch size per process (rows, blocks or pairs)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = batch_size × processes × grad_accum."""
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


@dataclass
class StageConfig:
    out_dir: str = "runs/stage"
    """Output directory of this stage (config.yaml, metrics.jsonl, checkpoints/, final/)."""
    overwrite: bool = False
    """Replace a non-empty out_dir."""
    resume: bool = False
    """Continue from the newest checkpoint in out_dir."""


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

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + 1000003 * epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm

    def step_items(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[k * self.global_batch : (k + 1) * self.global_batch]

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

    def __init__(self, cfg, stage: str, report_to: list[str], seed: int, keep_checkpoints: int = 2):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.stage, self.report_to, self.keep = cfg, stage, report_to, keep_checkpoints
        self.out = Path(cfg.out_dir)
        # mixed_precision="no": explicit, or a transformers.Trainer that ran earlier in this process
        # (TRL defaults to bf16) leaves its setting in accelerate's shared state.
        # cpu=True on a machine without CUDA: only then does accelerate run torchrun ranks as
        # MULTI_CPU over gloo instead of as unrelated single processes.
        from accelerate.utils import DistributedDataParallelKwargs

        # broadcast_buffers=False: buffers here are constants (RoPE inv_freq), and a broadcast in
        # every forward deadlocks when ranks run different numbers of forwards (packed sub-batches).
        self.accelerator = Accelerator(log_with=report_to or None, project_dir=str(self.out / "trackers"),
                                       cpu=not torch.cuda.is_available(), mixed_precision="no",
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        set_seed(seed, device_specific=True)  # rank-dependent: own dropout masks and rollouts per rank
        if self.accelerator.is_main_process:
            prepare_out_dir(self.out, overwrite=cfg.overwrite, resume=cfg.resume)
            save_config(cfg, self.out / "config.yaml")
        self.accelerator.wait_for_everyone()
        self.accelerator.register_save_state_pre_hook(_save_trainable_hook)
        self.accelerator.register_load_state_pre_hook(_load_trainable_hook)
        self.metrics_path = self.out / "metrics.jsonl"
        self.step = 0
        if report_to:
            self.accelerator.init_trackers(stage, config=_flat(to_dict(cfg)))

    def _checkpoints(self) -> list[Path]:
        d = self.out / CKPT_DIR
        found = [p for p in d.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name)] if d.exists() else []
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, extra: dict | None = None) -> Path:
        """accelerate state (trainable weights, optimizer, scheduler, RNG) + trainer_state.json."""
        acc = self.accelerator
        final = self.out / CKPT_DIR / f"step-{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            atomic_write_json(tmp / "trainer_state.json", {"step": self.step, "stage": self.stage, **(extra or {})})
            os.replace(tmp, final)
            for old in self._checkpoints()[: -max(1, self.keep)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def maybe_resume(self) -> dict | None:
        """Load the newest checkpoint when cfg.resume; returns its trainer_state (None if fresh)."""
        if not self.cfg.resume:
            return None
        ckpts = self._checkpoints()
        if not ckpts:
            if self.accelerator.is_main_process:
                print(f"[{self.stage}] --resume: no checkpoint in {self.out / CKPT_DIR}; starting from step 0")
            return None
        self.accelerator.load_state(str(ckpts[-1]))
        state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
        self.step = int(state["step"])
        if self.accelerator.is_main_process:
            # Records past the checkpoint came from the interrupted run: they will be redone.
            kept = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= self.step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            print(f"[{self.stage}] resumed from {ckpts[-1]} (step {self.step})")
        return state

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            append_jsonl(self.metrics_path, record)
        if self.report_to:
            self.accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                                 step=record["step"])

    def maybe_fault(self) -> None:
        """Fault injection for resume tests: SIGKILL right after the checkpoint of step N."""
        if int(os.environ.get("RLHFKIT_FAULT_KILL_AFTER_STEP", "0")) == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def save_final(self, save_fn: Callable) -> Path:
        from rlhfkit.io import atomic_dir

        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.out / FINAL_DIR
        if acc.is_main_process:
            with atomic_dir(final, overwrite=True) as tmp:
                save_fn(tmp)
                save_config(self.cfg, tmp / "config.yaml")
        acc.wait_for_everyone()
        return final


class Trainer(StageRun):
    """Runs optimizer steps for one supervised stage. The stage supplies:

    collate(indices) -> micro (anything), count(micro) -> units in it (tokens or pairs),
    loss(model, micro) -> (loss_sum tensor, stat_sums dict), evaluate(model) -> dict,
    save_final(model, dir) -> None.
    """

    def __init__(self, cfg, stage: str, model, n_items: int, collate: Callable, count: Callable, loss: Callable,
                 evaluate: Callable | None = None, save_final: Callable | None = None, unit: str = "tokens"):
        super().__init__(cfg, stage, cfg.train.report_to, cfg.train.seed, cfg.train.keep_checkpoints)
        self.tc, self.unit = cfg.train, unit
        acc = self.accelerator
        self.plan = StepPlan(n_items, self.tc.batch_size, self.tc.grad_accum, acc.num_processes, acc.process_index, self.tc.seed)
        self.total_steps = self.tc.max_steps if self.tc.max_steps > 0 else max(1, math.ceil(self.tc.epochs * self.plan.steps_per_epoch))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RlhfkitError("the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        from transformers import get_scheduler

        # Not passed to prepare(): accelerate would step it once per process per optimizer step.
        self.scheduler = get_scheduler(self.tc.lr_scheduler, optimizer, self.tc.warmup_steps, self.total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        self.collate, self.count, self.loss_fn = collate, count, loss
        self.evaluate_fn, self.save_final_fn = evaluate, save_final
        if acc.is_main_process:
            print(f"[{stage}] global batch = {self.tc.batch_size} per process × {acc.num_processes} processes × "
                  f"{self.tc.grad_accum} grad_accum = {self.plan.global_batch}; {self.total_steps} steps "
                  f"({self.plan.steps_per_epoch} per epoch of {n_items} items)")

    # ---------------------------------------------------------------- steps
    @property
    def eval_model(self):
        """The model without its DDP wrapper: eval shards differ in size across ranks, and every
        DDP forward is a collective (buffer broadcast) that would then deadlock."""
        return self.accelerator.unwrap_model(self.model)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, reduction="sum") if self.accelerator.num_processes > 1 else x

    def train_step(self) -> dict:
        acc, model = self.accelerator, self.model
        plan = self.plan.micro_batches(self.step)
        filler = next(ix for ix in plan if ix) if any(plan) else self.plan.step_items(self.step)[:1]
        # An empty micro-batch still runs forward/backward (weight 0) so every rank syncs the same.
        micros = [(self.collate(ix), 1.0) if ix else (self.collate(filler), 0.0) for ix in plan]
        units = torch.tensor(float(sum(self.count(m) * w for m, w in micros)), device=acc.device)
        total_units = self._reduce(units.clone())
        if total_units.item() == 0:
            raise RlhfkitError(f"step {self.step}: the batch holds no training {self.unit} (all masked?)")
        loss_sum = torch.zeros((), device=acc.device)
        stat_sums: dict[str, torch.Tensor] = {}
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
        grad_norm = acc.clip_grad_norm_(model.parameters(), self.tc.max_grad_norm) if self.tc.max_grad_norm > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss_total = self._reduce(loss_sum)
        record = {"step": self.step, "loss": (loss_total / total_units).item(), "lr": self.scheduler.get_last_lr()[0],
                  self.unit: int(total_units.item())}
        for k, v in stat_sums.items():
            record[k] = (self._reduce(v) / total_units).item()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        return record

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        self.maybe_resume()
        acc = self.accelerator
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.stage, disable=not acc.is_local_main_process, dynamic_ncols=True)
        last: dict[str, Any] = {}
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            record = self.train_step()
            dt = time.perf_counter() - t0
            record[f"{self.unit}_per_s"] = record[self.unit] / dt
            record["epoch"] = self.step / self.plan.steps_per_epoch
            last = record
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", **{f"{self.unit[:3]}/s": f"{record[f'{self.unit}_per_s']:.0f}"})
            if self.step % self.tc.log_every == 0 or self.step == self.total_steps:
                self.log(record)
            if self.evaluate_fn and self.tc.eval_every and self.step % self.tc.eval_every == 0 and self.step < self.total_steps:
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
        self.save_final(lambda out: self.save_final_fn(model, out) if self.save_final_fn else model.save_pretrained(out))
        if self.tc.report_to:
            acc.end_training()
        return summary

# --------------------------------------------------------------------------- helpers
def trainable_state(model) -> dict[str, torch.Tensor]:
    """Only what training changes (LoRA, heads, unfrozen blocks): checkpoints stay small."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _save_trainable_hook(models, weights, output_dir):
    from accelerate import PartialState
    from safetensors.torch import save_file

    if PartialState().is_main_process:  # DDP replicas are identical: one writer
        for i, model in enumerate(models):
            save_file(trainable_state(model), os.path.join(output_dir, f"trainable_{i}.safetensors"))
    weights.clear()  # accelerate would otherwise write every frozen base weight too


def _load_trainable_hook(models, input_dir):
    from safetensors.torch import load_file

    for i, model in enumerate(models):
        state = load_file(os.path.join(input_dir, f"trainable_{i}.safetensors"))
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise RlhfkitError(f"checkpoint does not match the model's trainable weights (missing {missing}, unexpected {extra})")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
    models.clear()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
