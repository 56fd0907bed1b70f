#!/usr/bin/env python
"""The embedded default task's RL stage re-run with each estimator, same rollout budget, then eval.

    python benchmarks/rl_estimators_default.py RUN_DIR [--algos ppo rloo grpo] [--out WORK] [key=value ...]

RUN_DIR is a finished `rlhfkit run` of the default (its feedback/ and rm/ are reused, never written).
For each algo: `rlhfkit ppo --config RUN_DIR/ppo/config.yaml algo=ALGO out_dir=WORK/ALGO/ppo`, then
`rlhfkit eval --config RUN_DIR/eval/config.yaml` on that policy (base vs it, the VADER rater as gold
judge). Same budget: train.max_steps × train.batch_size rollouts for every algo (group estimators use
batch_size / k prompts × k samples). Prints one JSON line per algo: gold (judge) positivity base →
trained, RM score, win-rates, KL, response length, wall time and peak RSS of the RL stage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from _common import REPO

# The child runs the CLI and reports its own peak RSS (ru_maxrss, KiB on Linux) on its last line.
CHILD = (
    "import json, resource, sys; from rlhfkit.cli import main; rc = main(sys.argv[1:]); "
    "print('RSS', json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); sys.exit(rc)"
)


def stage(args: list[str], log: Path) -> tuple[float, float]:
    """Run `rlhfkit ARGS` in a child; returns (wall seconds, peak RSS GiB)."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.run([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=f, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    log.with_suffix(".out").write_text(p.stdout)
    if p.returncode != 0:
        raise SystemExit(f"rlhfkit {' '.join(args[:1])} failed ({p.returncode}); see {log}")
    rss = [line for line in p.stdout.splitlines() if line.startswith("RSS ")]
    return wall, (float(rss[-1].split()[1]) / 2**20 if rss else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--algos", nargs="+", default=["ppo", "rloo", "grpo"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/rl_estimators"))
    ap.add_argument("overrides", nargs="*", help="extra key=value for every RL run")
    a = ap.parse_intermixed_args()
    for algo in a.algos:
        work = a.out / algo
        work.mkdir(parents=True, exist_ok=True)
        ppo_args = ["ppo", "--config", str(a.run_dir / "ppo" / "config.yaml"), f"algo={algo}"]
        ppo_args += ["samples_per_prompt=0", f"out_dir={work / 'ppo'}", "overwrite=true", "resume=false", *a.overrides]
        wall, rss = stage(ppo_args, work / "ppo.log")
        eval_args = ["eval", "--config", str(a.run_dir / "eval" / "config.yaml"), f"out_dir={work / 'eval'}"]
        eval_args += [f"models=[base=SmolLM2-135M-Instruct,{algo}={work / 'ppo' / 'final'}]"]
        stage(eval_args, work / "eval.log")
        m = json.loads((work / "eval" / "metrics.json").read_text())
        base, tuned = m["models"]["base"], m["models"][algo]
        recs = [json.loads(line) for line in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "score" in r]
        batch = yaml.safe_load((work / "ppo" / "config.yaml").read_text())["train"]["batch_size"]
        print(
            json.dumps(
                {
                    "algo": algo,
                    "rollouts": len(steps) * batch,
                    "gold_before": base["judge_score"],
                    "gold_after": tuned["judge_score"],
                    "rm_before": base["rm_score"],
                    "rm_after": tuned["rm_score"],
                    "win_rate_judge": m["win_rate"][f"{algo}_vs_base"]["judge"],
                    "win_rate_rm": m["win_rate"][f"{algo}_vs_base"]["rm"],
                    "kl": tuned["kl"],
                    "response_length": tuned["response_length"],
                    "rl_wall_min": wall / 60,
                    "rl_peak_rss_gib": rss,
                    "s_per_step": sum(v for r in steps for k, v in r.items() if k.startswith("time/"))
                    / max(len(steps), 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
