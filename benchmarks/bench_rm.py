#!/usr/bin/env python
"""Reward-model training throughput and peak memory: rlhfkit `reward` against TRL's RewardTrainer.

    python benchmarks/bench_rm.py                         # both configurations, one after the other
    python benchmarks/bench_rm.py --warmup 2 --steps 6 --batch 4 --max-length 256 --json-out /tmp/rm.json
    python benchmarks/bench_rm.py --lockstep              # both at once, alternating optimizer steps (busy machine)
    python benchmarks/bench_rm.py --tiny --steps 1 --warmup 1 --batch 2   # smoke test only (random 2-layer model)

Stack Exchange pairs are long: of the ~3,950 pairs in the five dumps under ../shared, 741 fit 256
tokens, 92 fit 128 and none of coffee's 129 fit below 153, so keep --max-length >= ~200 even for smoke tests.

Same for both (issue 4): the offline default SmolLM2-135M-Instruct as a 1-label sequence classifier
(fp32), LoRA r=16/alpha=32/dropout 0.05 on q,k,v,o_proj with task_type SEQ_CLS (peft then trains the
`score` head fully, as modules_to_save), the *same* initial score-head weights (seeded here and copied
into both), AdamW lr 1e-4 with linear decay and no warm-up, weight decay 0, clip 1.0, grad_accum 1,
per-device batch of pairs, no gradient checkpointing, no eval, no checkpoints, a metrics record every
step, and the same Stack Exchange pairs in the same order with identical token ids.

Data: real Stack Exchange pairs from `rlhfkit.data.build_stackexchange` (all the dumps matched by
--posts, every question in `rm_train`), shuffled with --data-seed, keeping the first pairs whose chosen and
rejected sequences both fit --max-length tokens in rlhfkit's encoding of "Question: {prompt}\\n\\nAnswer:
{response}" + EOS. Neither framework truncates: both *drop* over-long pairs (rlhfkit `encode_pairs`,
TRL's `max_length` filter), so the pairs are pre-selected to fit and neither drops any. rlhfkit reads the
text pairs; TRL gets the same pairs already tokenized (`chosen_ids`/`rejected_ids` = rlhfkit's ids, in
the order rlhfkit's StepPlan draws them, read sequentially), because TRL's own text path tokenizes
prompt+response as one string and appends the EOS *text*, which gives other ids at the prompt/response
boundary (usually one token fewer per sequence; reported as `trl_text_path_diff`). Each child counts the
non-pad tokens of its batches; the report checks they match step by step.

Score position: rlhfkit reads the score at the last real token by attention mask (the EOS). HF's
sequence-classification pooling, which TRL relies on, reads it at the last token != pad_token_id; with
pad == eos (SmolLM2) that skips the final EOS. So TRL gets `pad_token="<|endoftext|>"` (id 0, the unk
token; pairs containing it are excluded), which makes both read the same position; `--trl-pad eos`
keeps TRL's default pad (== eos) and then the first-step losses differ. Compute is the same either way.

Dropout: TRL's RewardConfig defaults to disable_dropout=True (sets every nn.Dropout, LoRA's included,
to p=0); rlhfkit keeps LoRA dropout 0.05 in training. This benchmark sets disable_dropout=False so both
run the same LoRA dropout. At step 1 LoRA B is zero, so dropout cannot change the first-step loss: the
two first-step losses must agree (printed, |diff| checked against 1e-4). Later losses differ slightly
(different dropout masks).

Optimizer: each framework's own AdamW (same betas/eps/lr/decay): rlhfkit torch.optim.AdamW with torch's
defaults (the per-tensor loop on CPU), TRL transformers' default optim (adamw_torch_fused for torch >= 2.8);
reported as `optimizer`. ~1.8 M trainable parameters in ~240 tensors, so this is a few ms per step.

Each configuration runs in its own child process (`--one NAME`), so its peak RSS is its own: the
kernel's VmHWM of the child, read by the child at its end. (ru_maxrss is reported too, but on Linux a
child's ru_maxrss starts at the parent's RSS at fork time — exec keeps the old mm's high-water mark —
and this parent holds torch, the tokenizer and the data stage's tables: with a small model it shows the
parent's ~0.5 GB, not the child's.)

Throughput = pairs (and non-pad tokens) of the timed steps / wall seconds from the end of the last
warm-up step to the end of the last timed step. Both are timed the same way: a timestamp at the end of
every optimizer step (rlhfkit: a wrapper around `Trainer.train_step`; TRL: `TrainerCallback.on_step_end`),
so the interval holds data collation, forward, backward, clipping, optimizer step and per-step logging
for both. With --lockstep both children run at once and take turns step by step (only one computes at a
time, both see the same background load); the headline is then pairs / sum of step times (rlhfkit:
train_step incl. collate; TRL: on_step_begin → on_step_end, batch fetched before).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from _common import Turns, chosen_configs, machine, read_rows, shared_data, versions, vm_hwm_mb
from _rm_data import alt_pad_token, build_tiny_model, prepare, set_score_head, trainable_params

CONFIGS = ("rlhfkit", "trl")
POSTS_GLOB = str(shared_data("stackexchange", "*", "Posts.xml"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LR = 1e-4
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LOSS_TOL = 1e-4


class StepClock(_common.StepClock):
    """The common step clock plus the pairs / non-pad tokens / batch cells and loss of each step."""

    def __init__(self, warmup: int):
        super().__init__(warmup)
        self.pairs: list[int] = []
        self.tokens: list[int] = []
        self.cells: list[int] = []
        self.losses: list[float] = []
        self.t_start: float | None = None  # the start of training, when earlier than the first step
        self.cpu_start: float | None = None
        self.cpu_begin0: float | None = None
        self.trunk_s = 0.0  # rlhfkit's one-off trunk pass (0 for TRL / no cache)

    def begin(self):
        super().begin()
        if self.cpu_begin0 is None:
            t = os.times()
            self.cpu_begin0 = t.user + t.system

    def mark_start(self):
        self.t_start = time.perf_counter()
        t = os.times()
        self.cpu_start = t.user + t.system

    def summary(self) -> dict:
        res, inner = self.window()
        w, wall, cpu = res["warmup_steps"], res["wall_s"], res["cpu_s"]
        pairs, toks, cells = sum(self.pairs[w:]), sum(self.tokens[w:]), sum(self.cells[w:])
        return {
            **res,
            "pairs": pairs,
            "input_tokens": toks,
            "batch_cells": cells,
            "pad_fraction": 1 - toks / cells if cells else 0.0,
            "pairs_per_s_wall": pairs / wall,
            "tokens_per_s_wall": toks / wall,
            "pairs_per_s_steps": pairs / sum(inner),
            "tokens_per_s_steps": toks / sum(inner),
            "pairs_per_cpu_s": pairs / cpu,
            # End to end: every step's pairs (warm-up too) / wall s from the start of training (rlhfkit: before
            # its trunk cache is built, so the one-off trunk pass is charged) to the end of the last step.
            "pairs_per_s_e2e": sum(self.pairs) / (self.t_end[-1] - (self.t_start or self.t_begin[0])),
            "setup_s_before_first_step": self.t_begin[0] - (self.t_start or self.t_begin[0]),
            # the same per CPU-second of this process (less sensitive to other jobs on a shared machine)
            "pairs_per_cpu_s_e2e": sum(self.pairs) / (self.cpu_end[-1] - (self.cpu_start or self.cpu_begin0)),
            # lock-step's end to end: every step's pairs / (every step's own time + the trunk pass's)
            "pairs_per_s_steps_e2e": sum(self.pairs)
            / (sum(e - b for b, e in zip(self.t_begin, self.t_end)) + self.trunk_s),
            "tokens_per_step_all": self.tokens,
            "pairs_per_step_all": self.pairs,
            "first_step_loss": self.losses[0] if self.losses else None,
            "losses": [round(x, 7) for x in self.losses],
        }


def batch_counts(batch: dict) -> tuple[int, int, int]:
    """(pairs, non-pad tokens, B×T cells) of a chosen-then-rejected batch (token ids or trunk states)."""
    mask = batch["attention_mask"]
    return mask.shape[0] // 2, int(mask.sum()), mask.numel()


# --------------------------------------------------------------------------- rlhfkit child
def run_rlhfkit(args, work: Path) -> dict:
    import rlhfkit.runtime.training as training
    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import reward

    clock, turns, info = StepClock(args.warmup), Turns(args.turn_dir, "rlhfkit"), {}
    orig_step, orig_load = training.Trainer.train_step, reward.load_model

    def load_with_head(*a, **kw):  # same seeded score head as TRL's
        model, tok = orig_load(*a, **kw)
        info["score_tensors_set"] = set_score_head(model, args.seed)
        info["trainable_params"] = trainable_params(model)
        info["pad_token_id"] = tok.pad_token_id
        return model, tok

    def timed_step(self):
        if not getattr(self, "_bench_wrapped", False):
            collate = self.collate

            def counting_collate(ix):
                batch = collate(ix)
                p, t, c = batch_counts(batch)
                clock.pairs[-1] += p
                clock.tokens[-1] += t
                clock.cells[-1] += c
                return batch

            self.collate, self._bench_wrapped = counting_collate, True
        clock.pairs.append(0)
        clock.tokens.append(0)
        clock.cells.append(0)
        turns.acquire()
        clock.begin()
        record = orig_step(self)
        clock.end()
        turns.release()
        clock.losses.append(record["loss"])
        return record

    orig_trunk = reward.build_trunk

    def timed_trunk(*a, **kw):  # the one-off trunk pass counts in the end-to-end time (lock-step: a turn of its own)
        turns.acquire()
        clock.mark_start()
        trunk = orig_trunk(*a, **kw)
        clock.trunk_s = info["trunk_s"] = time.perf_counter() - clock.t_start
        turns.release()
        info["trunk_cached"] = trunk is not None
        return trunk

    training.Trainer.train_step = timed_step
    reward.load_model = load_with_head
    reward.build_trunk = timed_trunk
    cfg = load_config(
        reward.RewardConfig,
        overrides={
            "out_dir": str(work / "out-rlhfkit"),
            "overwrite": True,
            "model": {"name": args.model_path, "dtype": "float32", "gradient_checkpointing": False},
            "lora": {**LORA, "target_modules": TARGETS, "num_layers_unfrozen": args.layers},
            "data": {
                "path": str(work / "ours.jsonl"),
                "split": None,
                "eval_split": None,
                "eval_fraction": 0.0,
                "max_length": args.max_length,
                "group_by_length": not args.no_group,
                "length_group_batches": args.group_batches,
            },
            "train": {
                "lr": LR,
                "lr_scheduler": "linear",
                "warmup_steps": 0,
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "batch_size": args.batch,
                "grad_accum": 1,
                "max_steps": args.warmup + args.steps,
                "seed": args.seed,
                "eval_every": 0,
                "save_every": 0,
                "log_every": 1,
            },
            "margin": 0.0,
            "center_coef": 0.0,
            "cache_trunk": not args.no_cache,
        },
    )
    reward.run(cfg)
    res = clock.summary()
    res.update(info)
    res["optimizer"] = "torch.optim.AdamW (defaults: foreach/fused off on CPU)"
    res["lora_dropout_active"] = True
    return res


# --------------------------------------------------------------------------- TRL child
def run_trl(args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    clock, turns = StepClock(args.warmup), Turns(args.turn_dir, "trl")
    ds = Dataset.from_list(read_rows(work / "trl.jsonl"))
    tok = AutoTokenizer.from_pretrained(args.model_path)
    pad = alt_pad_token(tok) if args.trl_pad == "distinct" else None
    if args.trl_pad == "distinct" and pad is None:
        raise SystemExit("no pad token distinct from EOS in this tokenizer; use --trl-pad eos")
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = (
        tok.convert_tokens_to_ids(pad) if pad else tok.convert_tokens_to_ids(tok.pad_token or tok.eos_token)
    )
    score_set = set_score_head(model, args.seed)  # before peft: modules_to_save copies it

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            turns.acquire()
            clock.begin()

        def on_step_end(self, a, state, control, **kw):
            clock.end()
            turns.release()

    class CountingRewardTrainer(RewardTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            p, t, c = batch_counts(inputs)
            clock.pairs.append(p)
            clock.tokens.append(t)
            clock.cells.append(c)
            loss = super().training_step(model, inputs, num_items_in_batch)
            clock.losses.append(float(loss))
            return loss

    cfg = RewardConfig(
        output_dir=str(work / "out-trl"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.warmup + args.steps,
        max_length=args.max_length,
        pad_token=pad,  # None: TRL's default (tokenizer pad == eos)
        # TRL's RewardConfig defaults that differ from rlhfkit's, set to rlhfkit's / this benchmark's:
        bf16=False,  # TRL default True; fp32 for both
        fp16=False,
        gradient_checkpointing=False,  # TRL default True; rlhfkit default False
        disable_dropout=False,  # TRL default True; rlhfkit trains with LoRA dropout 0.05
        train_sampling_strategy="sequential",  # rows are already in rlhfkit's StepPlan order
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    n_blocks = model.config.num_hidden_layers
    peft_cfg = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=TARGETS,
        task_type=TaskType.SEQ_CLS,
        # the same top blocks as rlhfkit's lora.num_layers_unfrozen (rlhfkit.models.loading.add_lora)
        layers_to_transform=None if args.layers < 0 else list(range(max(0, n_blocks - args.layers), n_blocks)),
    )
    trainer = CountingRewardTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg, callbacks=[Clock()]
    )
    out = trainer.train()
    res = clock.summary()
    res["score_tensors_set"] = score_set
    res["trainable_params"] = trainable_params(trainer.model)
    res["pad_token_id"] = trainer.model.config.get_text_config().pad_token_id
    res["optimizer"] = str(cfg.optim)
    res["lora_dropout_active"] = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in trainer.model.modules())
    res["train_runtime_s"] = out.metrics.get("train_runtime")
    return res


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.workdir)
    t0 = time.perf_counter()
    if args.one == "rlhfkit":
        res = run_rlhfkit(args, work)
    elif args.one == "trl":
        res = run_trl(args, work)
    else:
        sys.exit(f"unknown configuration {args.one}")
    res["total_child_s"] = time.perf_counter() - t0
    res["peak_rss_mb"] = vm_hwm_mb()  # this process's own high-water mark (see the module docstring)
    res["ru_maxrss_mb"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # KiB on Linux; >= parent's RSS at fork
    res["torch_threads"] = torch.get_num_threads()
    (work / f"{args.one}.json").write_text(json.dumps(res))


# --------------------------------------------------------------------------- parent
def child_cmd(name: str, args, tmp: str, model_path: str, lock: str | None) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--workdir", tmp, "--model-path", model_path]
    for key in ("warmup", "steps", "batch", "max_length", "threads", "seed", "trl_pad", "layers", "epochs"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--trl-order", args.trl_order, "--group-batches", str(args.group_batches)]
    flags = [("--no-cache", args.no_cache), ("--no-group", args.no_group)]
    return cmd + (["--turn-dir", lock] if lock else []) + [f for f, on in flags if on]


def wait_child(proc: subprocess.Popen) -> tuple[int, float]:
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--posts", default=POSTS_GLOB, help="glob of Stack Exchange Posts.xml files")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps excluded from timing (>= 1)")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    ap.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (grad_accum 1)")
    ap.add_argument(
        "--max-length", type=int, default=256, help="pairs with a longer chosen/rejected sequence are not used"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every child")
    ap.add_argument("--seed", type=int, default=42, help="training seed (data order, score head, dropout)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the data stage split hash and the pair shuffle")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument(
        "--trl-pad",
        choices=["distinct", "eos"],
        default="distinct",
        help="TRL pad token: distinct from EOS (score read at the EOS, as rlhfkit) or TRL's default (== eos)",
    )
    ap.add_argument(
        "--lockstep",
        action="store_true",
        help="run both children at once, alternating optimizer steps (shared machines)",
    )
    ap.add_argument("--tiny", action="store_true", help="smoke test: a random 2-layer Llama instead of SmolLM2-135M")
    ap.add_argument("--json-out", help="also write the result JSON here")
    ap.add_argument(
        "--layers", type=int, default=-1, help="LoRA on the top N blocks only, both frameworks (-1: every block)"
    )
    ap.add_argument("--epochs", type=int, default=1, help="passes over the pairs within the steps (divides them)")
    ap.add_argument("--no-cache", action="store_true", help="rlhfkit cache_trunk=false (the whole model every step)")
    ap.add_argument("--no-group", action="store_true", help="rlhfkit data.group_by_length=false (plain shuffle)")
    ap.add_argument("--group-batches", type=int, default=50, help="rlhfkit data.length_group_batches")
    ap.add_argument(
        "--trl-order",
        choices=["plain", "rlhfkit"],
        default="plain",
        help="TRL reads the pairs in the plain shuffle (its default: no length grouping) or in rlhfkit's grouped "
        "order (the same batches: first-step losses comparable)",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--turn-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        child(args)
        return 0

    names = chosen_configs(ap, args.configs, CONFIGS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlhfkit.models.loading import resolve_default_model

    info_machine, t_start = machine(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_rm_") as tmp:
        work = Path(tmp)
        model_path = str(resolve_default_model(verbose=False))
        if args.tiny:
            model_path = build_tiny_model(model_path, work / "tiny-model")
        data = prepare(args, work, model_path)
        print(
            f"[bench] {data['pairs_used']} pairs (of {data['pairs_total']} from {', '.join(data['files'])}), "
            f"{data['seq_tokens_mean']} tokens/sequence on average, max {data['seq_tokens_max']}",
            flush=True,
        )
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        }
        results: dict[str, dict] = {}
        lock = None
        if args.lockstep and len(names) == 2:
            lock = str(work / "lockstep")
            os.mkdir(lock)
        procs: dict[str, subprocess.Popen] = {}
        done: dict[str, tuple[int, float]] = {}  # name -> (exit code, ru_maxrss MB from wait4)

        def fail(name: str, rc: int) -> int:
            print((work / f"{name}.log").read_text()[-4000:], file=sys.stderr)
            print(f"[bench] {name} failed with exit code {rc}", file=sys.stderr)
            for other in procs.values():  # our own children only
                if other.poll() is None and other.returncode is None:
                    other.kill()
            return 1

        if lock:
            print("[bench] rlhfkit and TRL in lock-step (alternating optimizer steps) …", flush=True)
            t0 = time.perf_counter()
            for name in names:
                with open(work / f"{name}.log", "w") as fh:
                    procs[name] = subprocess.Popen(
                        child_cmd(name, args, tmp, model_path, lock), env=env, stdout=fh, stderr=subprocess.STDOUT
                    )
            by_pid = {p.pid: n for n, p in procs.items()}
            while len(done) < len(procs):  # whichever exits first; a crash must not leave its partner waiting
                pid, status, ru = os.wait4(-1, 0)
                if pid not in by_pid:
                    continue
                name = by_pid[pid]
                procs[name].returncode = os.waitstatus_to_exitcode(status)
                done[name] = (procs[name].returncode, ru.ru_maxrss / 1024)
                if done[name][0] != 0:
                    return fail(name, done[name][0])
        for name in names:
            if not lock:
                t0 = time.perf_counter()
                print(f"[bench] {name} …", flush=True)
                with open(work / f"{name}.log", "w") as fh:
                    procs[name] = subprocess.Popen(
                        child_cmd(name, args, tmp, model_path, None), stdout=fh, stderr=subprocess.STDOUT, env=env
                    )
                done[name] = wait_child(procs[name])
                if done[name][0] != 0:
                    return fail(name, done[name][0])
            res = json.loads((work / f"{name}.json").read_text())
            res["ru_maxrss_mb_wait4"] = done[name][1]
            res["pairs_per_s"] = res["pairs_per_s_steps"] if lock else res["pairs_per_s_wall"]
            res["tokens_per_s"] = res["tokens_per_s_steps"] if lock else res["tokens_per_s_wall"]
            order = "rlhfkit" if name == "rlhfkit" else "trl"  # each against the steps it was given
            res["tokens_match_rlhfkit_encoding"] = res.pop("tokens_per_step_all") == data["tokens_per_step"][order]
            res.pop("pairs_per_step_all")
            results[name] = res
            print(
                f"[bench] {name}: {res['pairs_per_s']:.3f} pairs/s, {res['tokens_per_s']:.0f} tok/s, "
                f"{res['s_per_step']:.2f} s/step, first-step loss {res['first_step_loss']:.6f}, load "
                f"{res['load_avg_1m']}, "
                f"peak RSS {res['peak_rss_mb']:.0f} MB ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

    def ratio(key):
        if "rlhfkit" in results and "trl" in results:
            return round(results["rlhfkit"][key] / results["trl"][key], 3)
        return None

    loss_diff = None  # comparable only when both ran the same first batch
    same_batches = data["tokens_per_step"]["rlhfkit"][:1] == data["tokens_per_step"]["trl"][:1]
    if "rlhfkit" in results and "trl" in results and (args.trl_order == "rlhfkit" or same_batches):
        loss_diff = abs(results["rlhfkit"]["first_step_loss"] - results["trl"]["first_step_loss"])
    timing = (
        "lock-step: pairs / sum of step times (rlhfkit train_step incl. collate; TRL on_step_begin→on_step_end)"
        if lock
        else "pairs of the timed steps / wall s from the end of the last warm-up step to the end of the last timed step"
    )
    report = {
        "benchmark": "rm",
        "command": " ".join(["python", "benchmarks/bench_rm.py"] + (argv if argv is not None else sys.argv[1:])),
        "machine": {**info_machine, "load_avg_1_5_15_end": os.getloadavg()},
        "versions": versions(),
        "settings": {
            "model": ("tiny random 2-layer Llama (smoke)" if args.tiny else "SmolLM2-135M-Instruct") + " seq-cls, fp32",
            "lora": {**LORA, "targets": TARGETS, "task_type": "SEQ_CLS (score head fully trained)"},
            "lr": LR,
            "scheduler": "linear, no warm-up",
            "max_grad_norm": 1.0,
            "batch_pairs": args.batch,
            "grad_accum": 1,
            "max_length": args.max_length,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "lora_top_blocks": args.layers,
            "epochs": args.epochs,
            "rlhfkit_cache_trunk": not args.no_cache and args.layers >= 0,
            "threads": args.threads,
            "seed": args.seed,
            "trl_pad": args.trl_pad,
            "schedule": "lock-step" if lock else "sequential",
            "throughput": timing,
            "data": data,
        },
        "results": {
            k: {kk: (round(vv, 4) if isinstance(vv, float) and "loss" not in kk else vv) for kk, vv in v.items()}
            for k, v in results.items()
        },
        "ratio_pairs_per_s": ratio("pairs_per_s"),
        "ratio_pairs_per_s_steps": ratio("pairs_per_s_steps"),
        "ratio_pairs_per_cpu_s": ratio("pairs_per_cpu_s"),
        "ratio_pairs_per_s_e2e": ratio("pairs_per_s_e2e"),
        "ratio_pairs_per_cpu_s_e2e": ratio("pairs_per_cpu_s_e2e"),
        "ratio_pairs_per_s_steps_e2e": ratio("pairs_per_s_steps_e2e"),
        "ratio_peak_rss": ratio("peak_rss_mb"),
        "first_step_loss_abs_diff": loss_diff,
        "first_step_loss_equal": None if loss_diff is None else loss_diff <= LOSS_TOL,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    print()
    print(
        f"{'config':<8} {'pairs/s':>8} {'tok/s':>8} {'s/step':>7} {'pairs/CPU-s':>11} {'peak RSS MB':>11} "
        f"{'1st-step loss':>14} {'tokens==':>8}"
    )
    for k, v in results.items():
        print(
            f"{k:<8} {v['pairs_per_s']:>8.3f} {v['tokens_per_s']:>8.0f} {v['s_per_step']:>7.2f} "
            f"{v['pairs_per_cpu_s']:>11.3f} "
            f"{v['peak_rss_mb']:>11.0f} {v['first_step_loss']:>14.6f} {str(v['tokens_match_rlhfkit_encoding']):>8}"
        )
    if report["ratio_pairs_per_s"] is not None:
        r = report["ratio_pairs_per_s"]
        e2e = report["ratio_pairs_per_s_steps_e2e" if lock else "ratio_pairs_per_s_e2e"]
        verdict = "target met" if e2e >= 1.5 else "below target"
        same = report["first_step_loss_equal"]
        loss_text = "n/a (TRL read other batches: --trl-order plain)"
        if loss_diff is not None:
            loss_text = f"|diff| {loss_diff:.2e} ({'equal' if same else 'DIFFERENT'} within {LOSS_TOL:g})"
        print(
            f"rm: rlhfkit/TRL {e2e:.2f}x pairs/s end to end, trunk pass included ({verdict}: >= 1.5x; issue 15), "
            f"{report['ratio_pairs_per_cpu_s_e2e']:.2f}x per CPU-second end to end, {r:.2f}x over the timed steps, "
            f"per CPU-second {report['ratio_pairs_per_cpu_s']:.2f}x, peak RSS {report['ratio_peak_rss']:.2f}x; "
            f"first-step loss {loss_text}; padding {results['rlhfkit']['pad_fraction']:.1%} vs TRL "
            f"{results['trl']['pad_fraction']:.1%} (rlhfkit in the plain order: "
            f"{data['pad_fraction_expected']['plain']:.1%})"
        )
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
