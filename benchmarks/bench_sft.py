#!/usr/bin/env python
"""SFT throughput and peak memory: rlhfkit (packed / unpacked) against TRL's SFTTrainer.

    python benchmarks/bench_sft.py                    # all four configurations, back to back
    python benchmarks/bench_sft.py --steps 8 --warmup 2 --batch 4 --json-out /tmp/sft.json

Same model (the offline default SmolLM2-135M-Instruct), same Stack Exchange Q/A rows, same
template ("Question: {prompt}\\n\\nAnswer: {response}"), LoRA r=16/alpha=32/dropout 0.05 on
q,k,v,o_proj, seq_len 512, per-device batch, grad_accum 1, lr 2e-4, fp32, same optimizer steps.

Each configuration runs in its own child process (`--one NAME`), so its peak RSS is its own.

Throughput = input tokens processed (non-pad tokens fed to the model: every token of a packed
block / padding-free row, attention_mask.sum() of a padded batch) during the timed steps / wall
seconds from the end of the last warm-up step to the end of the last timed step. Both frameworks
are timed the same way: a timestamp at the end of every optimizer step (rlhfkit: a wrapper around
`Trainer.train_step`; TRL: `TrainerCallback.on_step_end`), so the interval includes data
collation, forward, backward, clipping, optimizer step and per-step logging for both.
"""

from __future__ import annotations

import argparse
import glob
import html
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import _common
from _common import chosen_configs, machine, read_rows, shared_data, versions

CONFIGS = ("rlhfkit_packed", "trl_packed", "rlhfkit_unpacked", "trl_unpacked")
POSTS_GLOB = str(shared_data("stackexchange", "*", "Posts.xml"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPT_PREFIX = "Question: {prompt}\n\nAnswer: "  # + response == rlhfkit's default StackLLaMA template


# --------------------------------------------------------------------------- data
_TAG = re.compile(r"<[^>]+>")
_BLANKS = re.compile(r"\n\s*\n+")


def strip_html(text: str) -> str:
    """Rough HTML → text (enough for a benchmark): drop tags, unescape entities, squeeze blank lines."""
    text = re.sub(r"(?i)<br\s*/?>|</p>|</li>|</h\d>|</pre>", "\n", text)
    text = html.unescape(_TAG.sub("", text))
    return _BLANKS.sub("\n\n", text).strip()


def qa_pairs(posts_xml: str) -> list[dict]:
    """(question, accepted answer or else the top-scored answer) pairs from one Posts.xml."""
    questions: dict[str, dict] = {}
    answers: dict[str, list[tuple[int, str, str]]] = {}
    for _, el in ET.iterparse(posts_xml, events=("end",)):
        if el.tag != "row":
            continue
        a = el.attrib
        kind = a.get("PostTypeId")
        if kind == "1":
            questions[a["Id"]] = {
                "title": a.get("Title", ""),
                "body": a.get("Body", ""),
                "accepted": a.get("AcceptedAnswerId"),
            }
        elif kind == "2" and a.get("ParentId"):
            answers.setdefault(a["ParentId"], []).append((int(a.get("Score", "0")), a["Id"], a.get("Body", "")))
        el.clear()
    rows = []
    for qid, q in questions.items():
        cands = answers.get(qid)
        if not cands:
            continue
        by_id = {aid: body for _, aid, body in cands}
        body = by_id.get(q["accepted"]) if q["accepted"] in by_id else max(cands, key=lambda c: c[0])[2]
        prompt = (q["title"].strip() + "\n\n" + strip_html(q["body"])).strip()
        response = strip_html(body)
        if prompt and response:
            rows.append({"prompt": prompt, "response": response})
    return rows


def build_data(pattern: str, n_rows: int, out: Path, seed: int = 0) -> dict:
    files = sorted(glob.glob(pattern))
    if not files:
        sys.exit(f"no Posts.xml matches {pattern}")
    rows = [r for f in files for r in qa_pairs(f)]
    random.Random(seed).shuffle(rows)
    rows = rows[:n_rows] if n_rows > 0 else rows
    with open(out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"files": [str(Path(f).parent.name) for f in files], "rows": len(rows)}


# --------------------------------------------------------------------------- timing / memory helpers
class StepClock(_common.StepClock):
    """The common step clock plus the input tokens of each step."""

    def __init__(self, warmup: int):
        super().__init__(warmup)
        self.tokens: list[int] = []  # non-pad input tokens per step
        self.cells: list[int] = []  # batch cells (B×T, pads included) per step
        self.rss_before_train_mb: float | None = None

    def begin(self):
        if self.rss_before_train_mb is None:
            self.rss_before_train_mb = rss_mb()
        super().begin()

    def summary(self) -> dict:
        res, inner = self.window()
        w, n = res["warmup_steps"], res["timed_steps"]
        toks = sum(self.tokens[w : w + n])
        cells = sum(self.cells[w : w + n])
        step_tps = sorted(t / d for t, d in zip(self.tokens[w : w + n], inner))
        return {
            **res,
            "input_tokens": toks,
            "batch_cells": cells,
            "pad_fraction": 1 - toks / cells if cells else 0.0,
            "tokens_per_s": toks / res["wall_s"],
            "tokens_per_cpu_s": toks / res["cpu_s"],
            # Per-step view, for a machine shared with other work: the best step is the least disturbed one.
            "best_step_tokens_per_s": step_tps[-1],
            "median_step_tokens_per_s": step_tps[len(step_tps) // 2],
            "tokens_per_step": self.tokens[w : w + n],
        }


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def batch_tokens(batch: dict) -> tuple[int, int]:
    """(non-pad input tokens, B×T cells) of one model batch."""
    ids = batch["input_ids"]
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum()), ids.numel()
    return ids.numel(), ids.numel()  # packed block / padding-free row: no pads


# --------------------------------------------------------------------------- rlhfkit child
def run_rlhfkit(args, packed: bool, workdir: Path) -> dict:
    import rlhfkit.runtime.training as training
    from rlhfkit.runtime.config import load_config
    from rlhfkit.runtime.io import read_jsonl
    from rlhfkit.stages.sft import SFTConfig, run

    clock = StepClock(args.warmup)
    orig_step = training.Trainer.train_step

    def timed_step(self):
        if not getattr(self, "_bench_wrapped", False):
            collate = self.collate

            def counting_collate(ix):
                micro = collate(ix)
                t = [batch_tokens(b) for b in micro]
                clock.tokens[-1] += sum(x for x, _ in t)
                clock.cells[-1] += sum(c for _, c in t)
                return micro

            self.collate, self._bench_wrapped = counting_collate, True
        clock.tokens.append(0)
        clock.cells.append(0)
        clock.begin()
        record = orig_step(self)
        clock.end()
        return record

    training.Trainer.train_step = timed_step
    out_dir = workdir / ("rlhfkit-packed" if packed else "rlhfkit-unpacked")
    overrides = [
        f"out_dir={out_dir}",
        "overwrite=true",
        f"data.path={args.data}",
        f"data.packing={'true' if packed else 'false'}",
        f"data.seq_len={args.seq_len}",
        "data.eval_fraction=0",
        "lora.r=16",
        "lora.alpha=32",
        "lora.dropout=0.05",
        f"lora.target_modules=[{','.join(TARGETS)}]",
        f"train.batch_size={args.batch}",
        "train.grad_accum=1",
        "train.lr=2e-4",
        f"train.max_steps={args.warmup + args.steps}",
        f"train.seed={args.seed}",
        "model.dtype=float32",
    ]
    cfg = load_config(SFTConfig, overrides=overrides)
    run(cfg)
    res = clock.summary()
    metrics = [r for r in read_jsonl(out_dir / "metrics.jsonl") if "tokens_per_s" in r]
    timed = metrics[args.warmup :]
    # rlhfkit's own metric: *target* tokens (labels != -100) / train_step seconds, per step.
    res["rlhfkit_metric_target_tokens_per_s_mean"] = sum(r["tokens_per_s"] for r in timed) / len(timed)
    res["target_tokens"] = sum(r["tokens"] for r in timed)
    res["loss_first_last"] = [metrics[0]["loss"], metrics[-1]["loss"]]
    return res


# --------------------------------------------------------------------------- TRL child
def rlhfkit_item_order(n: int, seed: int) -> list[int]:
    """The row order rlhfkit's unpacked SFT consumes (stages.sft.run shuffle, then StepPlan epoch 0),
    so TRL's sequential sampler sees exactly the same batches."""
    import torch

    order = list(range(n))
    random.Random(seed).shuffle(order)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i] for i in perm]


def run_trl(args, packed: bool, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from rlhfkit.models.loading import resolve_default_model

    rows = read_rows(args.data)
    if not packed:
        rows = [rows[i] for i in rlhfkit_item_order(len(rows), args.seed)]
    ds = Dataset.from_list(
        [{"prompt": PROMPT_PREFIX.format(prompt=r["prompt"]), "completion": r["response"]} for r in rows]
    )
    path = str(resolve_default_model(verbose=False))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    clock = StepClock(args.warmup)

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            clock.begin()

        def on_step_end(self, a, state, control, **kw):
            clock.end()

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            t, c = batch_tokens(inputs)
            clock.tokens.append(t)
            clock.cells.append(c)
            return super().training_step(model, inputs, num_items_in_batch)

    cfg = SFTConfig(
        output_dir=str(workdir / ("trl-packed" if packed else "trl-unpacked")),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.warmup + args.steps,
        max_length=args.seq_len,
        packing=packed,
        packing_strategy="bfd",  # TRL 1.16 default; with packing it turns on padding_free
        completion_only_loss=not packed,  # as rlhfkit's defaults: full loss packed, response-only unpacked
        # TRL's SFTConfig defaults that differ from rlhfkit's, set to rlhfkit's / this benchmark's:
        bf16=False,  # TRL default True; fp32 for both
        fp16=False,
        gradient_checkpointing=False,  # TRL default True; rlhfkit default False
        train_sampling_strategy="sequential" if not packed else "random",
        shuffle_dataset=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = CountingSFTTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg, callbacks=[Clock()]
    )
    out = trainer.train()
    res = clock.summary()
    res["padding_free"] = bool(trainer.padding_free)
    res["packing_strategy"] = cfg.packing_strategy if packed else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res["loss_first_last"] = [losses[0], losses[-1]] if losses else None
    res["train_runtime_s"] = out.metrics.get("train_runtime")
    return res


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    workdir = Path(args.workdir)
    name = args.one
    t0 = time.perf_counter()
    if name.startswith("rlhfkit_"):
        res = run_rlhfkit(args, name.endswith("_packed"), workdir)
    elif name.startswith("trl_"):
        res = run_trl(args, name.endswith("_packed"), workdir)
    else:
        sys.exit(f"unknown configuration {name}")
    res["total_child_s"] = time.perf_counter() - t0
    res["peak_rss_mb"] = peak_rss_mb()
    res["torch_threads"] = torch.get_num_threads()
    (workdir / f"{name}.json").write_text(json.dumps(res))


# --------------------------------------------------------------------------- parent
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--posts", default=POSTS_GLOB, help="glob of Stack Exchange Posts.xml files")
    ap.add_argument("--rows", type=int, default=600, help="Q/A rows to use (0: all)")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps excluded from timing")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    ap.add_argument("--batch", type=int, default=4, help="per-device batch (rows or packed blocks)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every child")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--json-out", help="also write the result JSON here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        child(args)
        return 0

    names = chosen_configs(ap, args.configs, CONFIGS)
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        work = Path(tmp)
        data = work / "qa.jsonl"
        data_info = build_data(args.posts, args.rows, data, seed=0)
        print(f"[bench] {data_info['rows']} Q/A rows from {', '.join(data_info['files'])} -> {data}", flush=True)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        }
        info_machine = machine()  # load average before the first child
        results: dict[str, dict] = {}
        for name in names:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--one",
                name,
                "--data",
                str(data),
                "--workdir",
                tmp,
                "--warmup",
                str(args.warmup),
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--seq-len",
                str(args.seq_len),
                "--threads",
                str(args.threads),
                "--seed",
                str(args.seed),
            ]
            log = work / f"{name}.log"
            print(f"[bench] {name} …", flush=True)
            t0 = time.perf_counter()
            with open(log, "w") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
                _, status, ru = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                print(log.read_text()[-4000:], file=sys.stderr)
                print(f"[bench] {name} failed with exit code {proc.returncode}", file=sys.stderr)
                return 1
            res = json.loads((work / f"{name}.json").read_text())
            res["peak_rss_mb_wait4"] = ru.ru_maxrss / 1024
            results[name] = res
            print(
                f"[bench] {name}: {res['tokens_per_s']:.0f} tok/s, {res['s_per_step']:.2f} s/step, "
                f"{res['tokens_per_cpu_s']:.1f} tok/CPU-s, load {res['load_avg_1m']}, peak RSS "
                f"{res['peak_rss_mb']:.0f} MB ({time.perf_counter() - t0:.0f} s in all)",
                flush=True,
            )

    def ratio(a, b, key="tokens_per_s"):
        if a in results and b in results:
            return results[a][key] / results[b][key]
        return None

    pairs = {
        "rlhfkit_packed/trl_packed": ("rlhfkit_packed", "trl_packed"),
        "rlhfkit_unpacked/trl_unpacked": ("rlhfkit_unpacked", "trl_unpacked"),
        "rlhfkit_packed/rlhfkit_unpacked": ("rlhfkit_packed", "rlhfkit_unpacked"),
    }
    ratios = {k: ratio(*v) for k, v in pairs.items()}
    cpu_ratios = {k: ratio(*v, key="tokens_per_cpu_s") for k, v in pairs.items()}
    best_ratios = {k: ratio(*v, key="best_step_tokens_per_s") for k, v in pairs.items()}
    report = {
        "command": " ".join(["python", "benchmarks/bench_sft.py"] + (argv if argv is not None else sys.argv[1:])),
        "machine": {**info_machine, "load_avg_1_5_15_end": os.getloadavg()},
        "versions": versions(),
        "settings": {
            "model": "SmolLM2-135M-Instruct (fp32)",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": TARGETS},
            "seq_len": args.seq_len,
            "batch": args.batch,
            "grad_accum": 1,
            "lr": 2e-4,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "threads": args.threads,
            "data": data_info,
            "throughput": "non-pad input tokens of the timed steps / wall s from end of last warm-up step to "
            "end of last timed step",
        },
        "results": {
            k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in results.items()
        },
        "ratios": {k: (round(v, 3) if v is not None else None) for k, v in ratios.items()},
        "ratios_per_cpu_s": {k: (round(v, 3) if v is not None else None) for k, v in cpu_ratios.items()},
        "ratios_best_step": {k: (round(v, 3) if v is not None else None) for k, v in best_ratios.items()},
    }
    parts = [f"{k}: {v['tokens_per_s']:.0f} tok/s, {v['peak_rss_mb']:.0f} MB" for k, v in results.items()]
    rp, ru_ = ratios["rlhfkit_packed/trl_packed"], ratios["rlhfkit_unpacked/trl_unpacked"]
    report["summary"] = (
        "; ".join(parts)
        + (f" | rlhfkit/TRL packed {rp:.2f}x" if rp else "")
        + (f", unpacked {ru_:.2f}x" if ru_ else "")
        + " (target >= 1.2x; per CPU-second: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in cpu_ratios.items() if v and "trl" in k)
        + ")"
    )
    text = json.dumps(report, indent=2)
    print(text)
    print(report["summary"])
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
