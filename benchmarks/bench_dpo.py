"""DPO training throughput: rlhfkit `dpo` vs TRL's DPOTrainer on SmolLM2-135M (CPU, fp32).

    python benchmarks/bench_dpo.py                      # 1 warm-up + 8 timed steps each, reference = adapter disabled
    python benchmarks/bench_dpo.py --repeats 2          # alternate rlhfkit/TRL twice, report medians
    python benchmarks/bench_dpo.py --precompute-ref     # both frameworks with precomputed reference log-probs
    python benchmarks/bench_dpo.py --sequential         # one framework after the other (quiet machines)

Same model (the offline default SmolLM2-135M-Instruct), LoRA r=16/α=32/dropout 0.05 on q,k,v,o (dropout
then disabled by both, their default), same pairs in the *same order* (TRL reads them sequentially in
the order rlhfkit's step plan draws them, so every step holds the same 4 pairs), max length 256, batch 4
pairs, grad_accum 1, fp32, sigmoid loss β=0.1, lr 5e-5, no gradient checkpointing, no eval, no
checkpoints. Each framework runs in its own subprocess (clean peak RSS from ru_maxrss).

Schedule: by default both subprocesses start together and then alternate optimizer steps in lock-step
(rlhfkit step k, TRL step k, rlhfkit step k+1, …; the idle one sleeps on a turn file), so only one
computes at a time and both see the same background load — the development machine is shared, and
load that changes over minutes biased run-after-run comparisons by ±40%. `--sequential` runs them one
after the other instead.

Step time: rlhfkit — Trainer.train_step (collate + forward/backward + clip + optimizer step), timed by
wrapping it; TRL — on_step_begin → on_step_end of a TrainerCallback (forward/backward + clip + optimizer
step; the batch is fetched before on_step_begin). The first step is warm-up and not timed.

Data: preference pairs from the coffee.stackexchange.com dump through `rlhfkit data` when that stage
works, else pairs synthesized from Anthropic hh-rlhf harmless-base/test.jsonl.gz (prompt = the dialogue
up to the last "\\n\\nAssistant:", chosen/rejected = the two final replies).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Turns, machine

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COFFEE = SHARED / "stackexchange" / "coffee.stackexchange.com" / "Posts.xml"
HH = SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
HH_TEMPLATE = "{prompt}{response}"  # hh prompts already end in "\n\nAssistant:"


# --------------------------------------------------------------------------- data
def stackexchange_pairs(tmp: Path) -> list[dict]:
    from rlhfkit.inputs.tables import load_table
    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import data as data_stage

    cfg = load_config(
        data_stage.CONFIG, overrides={"paths": [str(COFFEE)], "out_dir": str(tmp / "se"), "format": "parquet"}
    )
    data_stage.run(cfg)
    return [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in load_table(str(tmp / "se"), "rm_train")
    ]


def hh_pairs() -> list[dict]:
    key = "\n\nAssistant:"
    rows = []
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            c, j = r["chosen"].rfind(key), r["rejected"].rfind(key)
            if c < 0 or j < 0:
                continue
            prompt, chosen, rejected = (
                r["chosen"][: c + len(key)],
                r["chosen"][c + len(key) :],
                r["rejected"][j + len(key) :],
            )
            if (
                prompt != r["rejected"][: j + len(key)]
                or not chosen.strip()
                or not rejected.strip()
                or chosen == rejected
            ):
                continue
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def prepare(tmp: Path, n_pairs: int, max_length: int, seed: int) -> dict:
    """Write ours.jsonl (pairs ≤ max_length in rlhfkit's tokenization) and trl.jsonl (the same pairs in the
    order rlhfkit's StepPlan draws them, text already templated)."""
    from transformers import AutoTokenizer

    from rlhfkit.inputs.pairs import encode_pairs
    from rlhfkit.inputs.templates import STACKLLAMA_TEMPLATE, PromptFormat, TemplateConfig
    from rlhfkit.models.loading import resolve_default_model
    from rlhfkit.runtime.training import StepPlan

    source, template = None, None
    if COFFEE.exists():
        try:
            rows, source, template = stackexchange_pairs(tmp), f"rlhfkit data: {COFFEE}", STACKLLAMA_TEMPLATE
        except Exception as exc:  # the data stage is optional here
            print(
                f"[bench] rlhfkit data on {COFFEE.name} unavailable ({type(exc).__name__}: {exc}); using hh-rlhf",
                file=sys.stderr,
            )
    tok = AutoTokenizer.from_pretrained(resolve_default_model(verbose=False))
    if source is not None:
        fmt = PromptFormat(TemplateConfig(template=template), tok)
        kept = [r for r, p in zip(rows, _encode_each(rows, fmt, max_length)) if p]
        if len(kept) < n_pairs:
            print(
                f"[bench] only {len(kept)} Stack Exchange pairs fit {max_length} tokens; using hh-rlhf", file=sys.stderr
            )
            source = None
    if source is None:
        rows, source, template = hh_pairs(), f"hh-rlhf: {HH}", HH_TEMPLATE
        fmt = PromptFormat(TemplateConfig(template=template), tok)
        kept = [r for r, p in zip(rows, _encode_each(rows, fmt, max_length)) if p]
    kept = kept[: max(n_pairs, 64)]
    (tmp / "ours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    plan = StepPlan(len(kept), batch_size=4, grad_accum=1, world=1, rank=0, seed=seed)
    order = [i for step in range(n_pairs // 4) for i in plan.step_items(step)]
    trl_rows = [
        {"prompt": fmt.prompt_text(kept[i]["prompt"]), "chosen": kept[i]["chosen"], "rejected": kept[i]["rejected"]}
        for i in order
    ]
    (tmp / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    enc = encode_pairs([kept[i] for i in order], fmt, max_length, "bench")
    tokens = [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in enc]
    return {
        "source": source,
        "template": template,
        "pairs_available": len(kept),
        "order": order,
        "tokens_per_pair_mean": sum(tokens) / len(tokens),
        "tokens_timed_steps": sum(tokens[4:]),
    }


def _encode_each(rows, fmt, max_length):
    """Which rows rlhfkit keeps at this max_length (encode_pairs' rule, without its per-call message)."""
    keep = []
    for r in rows:
        ok = all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected")) and r["chosen"] and r["rejected"]
        keep.append(
            bool(ok)
            and max(len(fmt.encode(r["prompt"], r["chosen"])[0]), len(fmt.encode(r["prompt"], r["rejected"])[0]))
            <= max_length
        )
    return keep


# --------------------------------------------------------------------------- lock-step
# --------------------------------------------------------------------------- workers
def worker_rlhfkit(a) -> dict:
    from rlhfkit.models.loading import resolve_default_model
    from rlhfkit.runtime.config import load_config
    from rlhfkit.runtime.io import read_jsonl
    from rlhfkit.stages import dpo

    out = Path(a.tmp) / "out_rlhfkit"
    cfg = load_config(
        dpo.DPOConfig,
        overrides={
            "out_dir": str(out),
            "overwrite": True,
            "model": {"name": str(resolve_default_model(verbose=False))},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": TARGETS},
            "template": {"template": a.template},
            "data": {
                "path": str(Path(a.tmp) / "ours.jsonl"),
                "split": None,
                "eval_split": None,
                "eval_fraction": 0.0,
                "max_length": a.max_length,
            },
            "train": {
                "lr": 5e-5,
                "max_steps": a.steps + 1,
                "batch_size": 4,
                "grad_accum": 1,
                "seed": a.seed,
                "save_every": 0,
                "log_every": 1,
            },
            "beta": 0.1,
            "loss_type": "sigmoid",
            "precompute_ref": a.precompute_ref,
        },
    )
    from rlhfkit.runtime.training import Trainer

    turns, step_s = Turns(a.lockstep, "rlhfkit"), []
    original = Trainer.train_step

    def timed_step(self):  # the Trainer's own step (collate + forward/backward + optimizer step), timed alone
        turns.acquire()
        t = time.perf_counter()
        record = original(self)
        step_s.append(time.perf_counter() - t)
        turns.release()
        return record

    Trainer.train_step = timed_step
    t0 = time.perf_counter()
    dpo.run(cfg)
    wall = time.perf_counter() - t0
    recs = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    return {"step_s": step_s[1:], "losses": [r["loss"] for r in recs], "wall_s": wall}


def worker_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rlhfkit.models.loading import resolve_default_model

    torch.manual_seed(a.seed)
    path = str(resolve_default_model(verbose=False))
    rows = [json.loads(line) for line in (Path(a.tmp) / "trl.jsonl").read_text().splitlines()]

    turns = Turns(a.lockstep, "trl")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_s, self.t = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            turns.acquire()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.t)
            turns.release()

    timer = StepTimer()
    t0 = time.perf_counter()
    args = DPOConfig(
        output_dir=str(Path(a.tmp) / "out_trl"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=a.steps + 1,
        learning_rate=5e-5,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        max_length=a.max_length,
        beta=0.1,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=a.precompute_ref,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=a.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    tok = AutoTokenizer.from_pretrained(path)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=args,
        processing_class=tok,
        train_dataset=Dataset.from_list(rows),
        callbacks=[timer],
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    ds = trainer.train_dataset
    tokens = [2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "step_s": timer.step_s[1:],
        "losses": losses,
        "wall_s": wall,
        "tokens_timed_steps": sum(tokens[4 : 4 * (a.steps + 1)]),
    }


def worker(a) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    res = worker_rlhfkit(a) if a.worker == "rlhfkit" else worker_trl(a)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- driver
def _cmd(name: str, a, tmp: Path, template: str, lockstep: Path | None) -> list[str]:
    return (
        [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--tmp",
            str(tmp),
            "--template",
            template,
            "--steps",
            str(a.steps),
            "--max-length",
            str(a.max_length),
            "--seed",
            str(a.seed),
        ]
        + (["--precompute-ref"] if a.precompute_ref else [])
        + (["--lockstep", str(lockstep)] if lockstep else [])
        + ["--threads", str(a.threads)]
    )


def _collect(name: str, proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed (rc {proc.returncode}):\n{err[-4000:]}")
    res = json.loads(line[len("RESULT ") :])
    res["pairs_per_s"] = 4 * len(res["step_s"]) / sum(res["step_s"])
    print(
        f"[bench] {name}: {res['pairs_per_s']:.4f} pairs/s, peak RSS {res['peak_rss_mb']:.0f} MB",
        file=sys.stderr,
        flush=True,
    )
    return res


def run_pair(a, tmp: Path, template: str, repeat: int) -> dict[str, dict]:
    """Both workers: concurrently in lock-step (default), or one after the other (--sequential)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    names = ("rlhfkit", "trl")
    if a.sequential:
        results = {}
        for name in names:
            print(f"[bench] running {name} …", file=sys.stderr, flush=True)
            proc = subprocess.Popen(
                _cmd(name, a, tmp, template, None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            results[name] = _collect(name, proc)
        return results
    lock = tmp / f"lockstep-{repeat}"
    lock.mkdir()
    print("[bench] running rlhfkit and TRL in lock-step (alternating optimizer steps) …", file=sys.stderr, flush=True)
    procs = {
        n: subprocess.Popen(
            _cmd(n, a, tmp, template, lock), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for n in names
    }
    return {n: _collect(n, procs[n]) for n in names}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after 1 warm-up step)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="alternate the two frameworks this many times")
    p.add_argument("--precompute-ref", action="store_true", help="both frameworks precompute reference log-probs")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="run the frameworks one after the other instead of in lock-step (for a quiet machine)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads in both workers (0: torch's default)")
    p.add_argument("--lockstep", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["rlhfkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--template", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0

    import torch
    import transformers
    import trl

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as d:
        tmp = Path(d)
        data = prepare(tmp, 4 * (a.steps + 1), a.max_length, a.seed)
        runs: dict[str, list[dict]] = {"rlhfkit": [], "trl": []}
        for i in range(a.repeats):
            for name, res in run_pair(a, tmp, data["template"], i).items():
                runs[name].append(res)

    def agg(rs):
        return {
            "pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
            "pairs_per_s_runs": [round(r["pairs_per_s"], 4) for r in rs],
            "step_s_median": statistics.median(s for r in rs for s in r["step_s"]),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "losses": [round(x, 5) for x in rs[0]["losses"]],
            "step_s": [[round(x, 2) for x in r["step_s"]] for r in rs],
        }

    result = {
        "benchmark": "dpo",
        "model": "SmolLM2-135M-Instruct",
        "lora": "r=16 alpha=32 q,k,v,o",
        "dtype": "float32",
        "batch_pairs": 4,
        "grad_accum": 1,
        "max_length": a.max_length,
        "timed_steps": a.steps,
        "warmup_steps": 1,
        "reference": "precomputed" if a.precompute_ref else "adapter disabled (on the fly)",
        "schedule": "sequential" if a.sequential else "lock-step (alternating optimizer steps)",
        "repeats": a.repeats,
        "load_avg_1_5_15": {"start": load_start, "end": os.getloadavg()},
        "data": data["source"],
        "tokens_per_pair_mean": round(data["tokens_per_pair_mean"], 1),
        "tokens_timed_steps": {"rlhfkit": data["tokens_timed_steps"], "trl": runs["trl"][0].get("tokens_timed_steps")},
        "machine": f"{machine()['cpu']}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}",
        "threads": runs["rlhfkit"][0]["threads"],
        "rlhfkit": agg(runs["rlhfkit"]),
        "trl": agg(runs["trl"]),
    }
    result["ratio"] = result["rlhfkit"]["pairs_per_s"] / result["trl"]["pairs_per_s"]
    print(json.dumps(result, indent=2))
    print(
        f"dpo: rlhfkit {result['rlhfkit']['pairs_per_s']:.3f} pairs/s vs TRL {result['trl']['pairs_per_s']:.3f} "
        f"pairs/s "
        f"= {result['ratio']:.2f}x (peak RSS {result['rlhfkit']['peak_rss_mb']:.0f} vs "
        f"{result['trl']['peak_rss_mb']:.0f} MB; "
        f"{a.steps} steps × 4 pairs, SmolLM2-135M LoRA r=16, fp32, {result['threads']} threads, {result['reference']}, "
        f"{result['schedule']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
