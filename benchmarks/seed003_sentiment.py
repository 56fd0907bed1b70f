#!/usr/bin/env python
"""Seed 003 on this CPU: PPO makes SmolLM2-135M-Instruct continue IMDb review openers positively.

    python benchmarks/seed003_sentiment.py                          # prepare prompts, run the recipe, summarise
    python benchmarks/seed003_sentiment.py train.max_steps=4 train.eval_every=0   # a short pilot (any ppo overrides)
    python benchmarks/seed003_sentiment.py --prepare-only           # only write the opener files
    python benchmarks/seed003_sentiment.py --summarize runs/ppo_sentiment   # summarise a finished run

Prompts: the first 4 words of every review in ../shared/data/imdb/imdb_sample.csv (`<br />` markup
removed), one per line, written to --work-dir (outside the repo; the data is never copied into it).
32 openers (a seeded shuffle) are held out for evaluation; training openers equal to a held-out one
are dropped, so eval prompts are unseen. Template "{prompt}{response}" (raw continuation), reward
`rlhfkit.rewards.raters:vader_positive` (VADER compound of opener + continuation, mapped to [0, 1]).

The run itself is `rlhfkit ppo --config recipes/ppo_sentiment.yaml prompts.path=… prompts.eval_path=…
out_dir=… overwrite=true [overrides]` in a child process; wall time, the load average before/after
and the summary (eval reward at step 0 and at the end, KL, per-phase times, before/after rows) are
printed as JSON and written to <out_dir>/seed003_summary.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import shared_data

REPO = Path(__file__).resolve().parents[1]
CSV = shared_data("imdb", "imdb_sample.csv")
RECIPE = REPO / "recipes" / "ppo_sentiment.yaml"


def openers(n_words: int = 4) -> list[str]:
    with CSV.open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        words = r["text"].replace("<br />", " ").split()[:n_words]
        if words:
            out.append(" ".join(words))
    return out


def prepare(work_dir: Path, n_eval: int, seed: int) -> tuple[Path, Path, int, int]:
    ops = openers()
    order = list(range(len(ops)))
    random.Random(seed).shuffle(order)
    eval_ops = [ops[i] for i in order[:n_eval]]
    held = set(eval_ops)
    train_ops = [ops[i] for i in sorted(order[n_eval:]) if ops[i] not in held]
    work_dir.mkdir(parents=True, exist_ok=True)
    tr, ev = work_dir / "imdb_openers_train.txt", work_dir / "imdb_openers_eval.txt"
    tr.write_text("\n".join(train_ops) + "\n", encoding="utf-8")
    ev.write_text("\n".join(eval_ops) + "\n", encoding="utf-8")
    return tr, ev, len(train_ops), len(eval_ops)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def summarize(out_dir: Path, n_rows: int = 8) -> dict:
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "score" in r]
    evals = [r for r in recs if "eval/reward" in r]
    phases = ("time/generate", "time/score", "time/forward", "time/update")
    med = lambda k: statistics.median(r[k] for r in steps) if steps else None  # noqa: E731
    first = lambda k, rs: sum(r[k] for r in rs) / len(rs) if rs else None  # noqa: E731
    k = max(1, min(10, len(steps) // 4))
    s = {
        "out_dir": str(out_dir),
        "steps": len(steps),
        "eval": [
            {
                "step": r["step"],
                "reward": r["eval/reward"],
                "kl": r["eval/kl"],
                "response_length": r["eval/response_length"],
            }
            for r in evals
        ],
        "eval_reward_before": evals[0]["eval/reward"] if evals else None,
        "eval_reward_after": evals[-1]["eval/reward"] if len(evals) > 1 else None,
        "eval_kl_after": evals[-1]["eval/kl"] if len(evals) > 1 else None,
        f"train_score_first{k}": first("score", steps[:k]),
        f"train_score_last{k}": first("score", steps[-k:]),
        f"train_kl_last{k}": first("kl", steps[-k:]),
        "kl_coef_last": steps[-1]["kl_coef"] if steps else None,
        "max_train_kl": max((r["kl"] for r in steps), default=None),
        "max_ratio": max((r.get("ratio", 1.0) for r in steps), default=None),
        "skipped_minibatches": sum(r.get("skipped_minibatches", 0) for r in steps),
        "median_step_s": statistics.median(sum(r[p] for p in phases) for r in steps) if steps else None,
        **{f"median_{p.split('/')[1]}_s": med(p) for p in phases},
        "median_tokens_per_s": med("tokens_per_s"),
        "curve": [
            {
                k2: round(r[k2], 4)
                for k2 in (
                    "step",
                    "score",
                    "kl",
                    "kl_coef",
                    "response_length",
                    "approxkl",
                    "clipfrac",
                    "vf_loss",
                    "entropy",
                )
                if k2 in r
            }
            for r in steps
        ],
    }
    ba = out_dir / "before_after.md"
    if ba.exists():
        lines = ba.read_text().splitlines()
        s["before_after_rows"] = lines[: 2 + n_rows]
        s["before_after_mean"] = next((x for x in lines if x.startswith("mean reward")), None)
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--work-dir", default="/tmp/rlhfkit_seed003", help="where the opener .txt files go (outside the repo)"
    )
    ap.add_argument("--out-dir", default="/tmp/rlhfkit_seed003/run")
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--split-seed", type=int, default=3)
    ap.add_argument("--config", default=str(RECIPE))
    ap.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="torch threads (OMP_NUM_THREADS) for the run; 1 is 3-4x faster than 2 when other jobs load the 2 vCPUs",
    )
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--summarize", metavar="OUT_DIR", help="only summarise a finished run")
    ap.add_argument("overrides", nargs="*", help="extra `rlhfkit ppo` key=value overrides")
    args = ap.parse_args()

    if args.summarize:
        print(json.dumps(summarize(Path(args.summarize)), indent=1))
        return 0
    tr, ev, n_tr, n_ev = prepare(Path(args.work_dir), args.n_eval, args.split_seed)
    print(f"[seed003] {n_tr} training openers -> {tr}; {n_ev} held-out openers -> {ev}", flush=True)
    if args.prepare_only:
        return 0
    exe = Path(sys.executable).with_name("rlhfkit")
    cmd = [
        str(exe) if exe.exists() else sys.executable,
        *([] if exe.exists() else ["-m", "rlhfkit.cli"]),
        "ppo",
        "--config",
        args.config,
        f"prompts.path={tr}",
        f"prompts.eval_path={ev}",
        f"out_dir={args.out_dir}",
        "overwrite=true",
        *args.overrides,
    ]
    print("[seed003] " + " ".join(cmd), flush=True)
    load_before = loadavg()
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    load_after = loadavg()
    if proc.returncode != 0:
        print(f"[seed003] rlhfkit ppo failed (exit {proc.returncode}) after {wall:.0f} s", file=sys.stderr)
        return proc.returncode
    s = {
        "command": f"OMP_NUM_THREADS={args.threads} " + " ".join(cmd),
        "wall_s": round(wall, 1),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        **summarize(Path(args.out_dir)),
    }
    (Path(args.out_dir) / "seed003_summary.json").write_text(json.dumps(s, indent=1))
    print(json.dumps({k: v for k, v in s.items() if k != "curve"}, indent=1))
    print(
        f"[seed003] eval positivity {s['eval_reward_before']:.3f} -> {s['eval_reward_after']:.3f} on {n_ev} held-out "
        f"openers; eval KL {s['eval_kl_after']:.2f} nats; {s['steps']} steps in {wall / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
