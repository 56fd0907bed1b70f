#!/usr/bin/env python
"""1 process vs N DDP processes on this machine: SFT tokens/s at the same global batch.

    python benchmarks/bench_scaling.py                       # 1×2 threads vs 2 processes×1 thread
    python benchmarks/bench_scaling.py --steps 8 --seq-len 256 --json-out /tmp/scaling.json

Same work in every configuration: `rlhfkit sft` on the offline default SmolLM2-135M-Instruct and
the Q/A corpus shipped with rlhfkit, LoRA (the stage's defaults), seq_len blocks, global batch =
`--global-batch` blocks per optimizer step (1 process: batch × grad_accum; N processes: the
per-process batch shrinks). Processes are started with `torchrun` (gloo on CPU); each gets
`--threads // N` torch threads so the cores are never oversubscribed.

Throughput = tokens of the timed steps (after `--warmup`) / their summed step seconds, from the
stage's own metrics.jsonl (`tokens`, `tokens_per_s` per step; rank 0 logs global numbers).
Peak RSS: the sum over processes of VmHWM, sampled from /proc while the job runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, vm_hwm_mb


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().split(") ")[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(p.name))
    return out


def run_one(nproc: int, args, work: Path) -> dict:
    out = work / f"sft_{nproc}p"
    per_proc, rem = divmod(args.global_batch, nproc)
    if rem:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {nproc} processes")
    batch = min(per_proc, args.max_micro_batch)
    accum = per_proc // batch
    stage = [
        "sft",
        f"out_dir={out}",
        "overwrite=true",
        f"data.seq_len={args.seq_len}",
        f"train.batch_size={batch}",
        f"train.grad_accum={accum}",
        f"train.max_steps={args.warmup + args.steps}",
        "train.eval_every=0",
        "train.save_every=0",
        "data.eval_fraction=0.05",
        f"train.seed={args.seed}",
    ]
    threads = max(1, args.threads // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "rlhfkit.cli", *stage]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "rlhfkit.cli",
            *stage,
        ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, float] = {}
    log: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        pids = children(proc.pid) if nproc > 1 else [proc.pid]
        for p in pids:
            peaks[p] = max(peaks.get(p, 0.0), vm_hwm_mb(p))
        time.sleep(0.5)
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{nproc}-process run failed ({proc.returncode}):\n" + "".join(log[-40:]))
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    timed = steps[args.warmup :]
    secs = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    toks = sum(r["tokens"] for r in timed)
    return {
        "processes": nproc,
        "threads_per_process": threads,
        "micro_batch": batch,
        "grad_accum": accum,
        "timed_steps": len(timed),
        "tokens": toks,
        "seconds": round(secs, 2),
        "tokens_per_s": round(toks / secs, 1),
        "s_per_step": round(secs / len(timed), 2),
        "losses": [round(r["loss"], 5) for r in steps],
        "peak_rss_mb_sum": round(sum(peaks.values())),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", default="1,2", help="process counts to compare")
    ap.add_argument("--threads", type=int, default=2, help="total torch threads (split over processes)")
    ap.add_argument("--global-batch", type=int, default=4, help="blocks per optimizer step, all processes")
    ap.add_argument("--max-micro-batch", type=int, default=2, help="blocks per forward (the rest is accumulation)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    info = machine()  # load average at the start included
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        for n in [int(x) for x in args.procs.split(",")]:
            print(f"[scaling] {n} process(es) …", flush=True)
            r = run_one(n, args, Path(tmp))
            print(
                f"[scaling] {n}p: {r['tokens_per_s']} tok/s, {r['s_per_step']} s/step, peak RSS "
                f"{r['peak_rss_mb_sum']} MB",
                flush=True,
            )
            results.append(r)
    base = results[0]["tokens_per_s"]
    out = {
        "benchmark": "scaling",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {**info, "load_avg_end": os.getloadavg()},
        "results": results,
        "speedup_vs_first": [round(r["tokens_per_s"] / base, 3) for r in results],
    }
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    print("\nprocs threads/proc  tok/s   s/step  peak RSS MB (sum)  speed-up")
    for r, s in zip(results, out["speedup_vs_first"]):
        print(
            f"{r['processes']:>5} {r['threads_per_process']:>12} {r['tokens_per_s']:>6} {r['s_per_step']:>8} "
            f"{r['peak_rss_mb_sum']:>18} {s:>9}x"
        )


if __name__ == "__main__":
    main()
