"""Leave-one-site-out reward-model result over the five shared Stack Exchange sites (issue 15).

    python benchmarks/rm_real.py --loso --train-per-site 30 --eval-per-site 40 --layers 4 --out /tmp/rm_loso

Each site's questions are split 50/50 by `rlhfkit data` into a training pool and an evaluation pool
(no question in both); a fold trains on the training pools of four sites and is scored on the
evaluation pool of the fifth, for every recipe. Recipes run the real `rlhfkit rm` stage; all of them
use lora.num_layers_unfrozen=--layers, so the frozen lower blocks' output of a pair is the same in
every fold and recipe: it is computed once (rlhfkit.models.trunk, exact) and shared through a wrapper
around reward.build_trunk — the reason 5 folds × 2 recipes fit this CPU. Prints and writes JSON.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from _common import machine, versions

RECIPES = {
    "bt": {"odin": {"enabled": False}},  # today's objective: one reward head, Bradley–Terry
    "odin": {"odin": {"enabled": True}},  # ODIN; its quality head (what PPO reads) is scored
}
KEYS = (
    "accuracy",
    "longer_wins",
    "matched_accuracy",
    "matched_pairs",
    "length_controlled_accuracy",
    "length_agreement",
    "length_corr",
    "sum/accuracy",
    "sum/matched_accuracy",
    "pairs",
)


def shared_trunk(reward):
    """Wrap reward.build_trunk so that the trunk states of a pair (by its token ids) are computed once
    per process and reused by every later run; the self-check still runs on each run's model."""
    from rlhfkit.models import trunk as T

    cache: dict = {}
    stats = {"computed": 0, "reused": 0, "seconds": 0.0}

    def build(model, cfg, pairs, pad_id):
        trunk = T.FrozenTrunk(model, cfg.lora.num_layers_unfrozen)
        if trunk.why_not_exact():
            raise SystemExit(f"cache not exact: {trunk.why_not_exact()}")
        key = lambda p: (tuple(p["chosen_ids"]), tuple(p["rejected_ids"]))  # noqa: E731
        todo = [p for p in pairs if key(p) not in cache]
        t0 = time.perf_counter()
        T.attach_pair_states(trunk, todo, pad_id, cfg.eval_batch_size)
        stats["seconds"] += time.perf_counter() - t0
        for p in todo:
            cache[key(p)] = p[T.STATES]
        for p in pairs:
            p[T.STATES] = cache[key(p)]
        stats["computed"] += len(todo)
        stats["reused"] += len(pairs) - len(todo)
        gap = T.self_check(trunk, model, pairs, pad_id)
        assert gap <= T.SELF_CHECK_TOL, gap
        print(f"[loso] trunk: {len(todo)} pairs computed, {len(pairs) - len(todo)} reused (check {gap:.1e})")
        return trunk

    reward.build_trunk = build
    return stats


def site_pools(args, sites, out: Path) -> dict:
    """{site: (training pool rows, evaluation pool rows)}, each a seeded sample of the site's halves."""
    from rlhfkit.inputs.pairs import read_pairs
    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import data as data_stage

    pools = {}
    for s in sites:
        data_stage.run(
            load_config(
                data_stage.CONFIG,
                overrides={
                    "source": "stackexchange",
                    "paths": [str(Path(args.shared) / f"{s}.stackexchange.com")],
                    "out_dir": str(out / "data" / s),
                    "format": "parquet",
                    "overwrite": True,
                    "fractions": {"sft": 0.0, "rm_train": 0.5, "rm_eval": 0.5, "rl_prompts": 0.0},
                },
            )
        )
        tr, ev = (read_pairs(str(out / "data" / s), split) for split in ("rm_train", "rm_eval"))
        rng = random.Random(0)
        rng.shuffle(tr)
        rng.shuffle(ev)
        pools[s] = (tr[: args.train_per_site], ev[: args.eval_per_site])
    return pools


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def fold_cfg(args, reward, recipe: str, train: str, held: str, out: Path):
    from rlhfkit.runtime.config import load_config, merge_dicts

    base = {
        "out_dir": str(out),
        "overwrite": True,
        "model": {"name": args.model},
        # --layers 0: no block is trained, only the score head(s) over the cached final states (lora off)
        "lora": {
            "enabled": args.layers > 0 and not args.full,
            "r": 16,
            "alpha": 32,
            "dropout": 0.05,
            "target_modules": ["all-linear"],
            "num_layers_unfrozen": -1 if args.full else args.layers,
        },
        "data": {"path": train, "eval_path": held, "max_length": args.max_length, "truncate": True},
        "train": {"lr": args.lr, "warmup_steps": 5, "batch_size": args.batch, "epochs": args.epochs},
        "eval_batch_size": 8,
    }
    return load_config(reward.CONFIG, overrides=merge_dicts(base, RECIPES[recipe]))


def run_loso(args) -> dict:
    from rlhfkit.stages import reward

    sites = ("ai", "beer", "cardano", "coffee", "matheducators")
    out = Path(args.out)
    t0 = time.time()
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown}; choose from {sorted(RECIPES)}")
    recipes = [r for r in RECIPES if r in args.recipes]
    pools = site_pools(args, sites, out)
    trunk_stats = shared_trunk(reward)
    folds: dict = {r: {} for r in recipes}
    for left in args.folds:
        rng = random.Random(1)
        train_rows = [r for s in sites if s != left for r in pools[s][0]]
        rng.shuffle(train_rows)
        train = write_jsonl(out / "folds" / left / "train.jsonl", train_rows)
        held = write_jsonl(out / "folds" / left / "held.jsonl", pools[left][1])
        for recipe in recipes:
            t1 = time.time()
            summary = reward.run(fold_cfg(args, reward, recipe, train, held, out / "runs" / f"{recipe}-{left}"))
            folds[recipe][left] = {k: summary.get(f"eval_{k}") for k in KEYS} | {
                "train_pairs": len(train_rows),
                "seconds": round(time.time() - t1, 1),
            }
            print(f"[loso] {recipe} left out {left}: {json.dumps(folds[recipe][left])}", flush=True)
            if not args.keep_models:  # a full model per run (lora off) would fill /tmp
                shutil.rmtree(out / "runs" / f"{recipe}-{left}" / "final", ignore_errors=True)
        done = [s for s in sites if s in folds[recipes[0]]]
        partial = {"folds_done": done, "folds": folds, "trunk_cache": trunk_stats}
        (out / "loso.partial.json").write_text(json.dumps(partial, indent=2))
    mean = {
        r: {
            k: _mean([f[k] for f in folds[r].values()])
            for k in ("accuracy", "longer_wins", "matched_accuracy", "length_controlled_accuracy", "length_corr")
        }
        for r in recipes
    }
    for r, m in mean.items():
        m["acc_minus_longer_wins"] = None if m["accuracy"] is None else m["accuracy"] - m["longer_wins"]
        m["target_acc_ge_length_plus_5"] = m["acc_minus_longer_wins"] is not None and m["acc_minus_longer_wins"] >= 0.05
        m["target_matched_ge_60"] = m["matched_accuracy"] is not None and m["matched_accuracy"] >= 0.60
    pooled = {r: _pooled(folds[r]) for r in recipes}  # every left-out pair counts once (folds differ in size)
    result = {
        "machine": machine(),
        "versions": versions(),
        "args": vars(args),
        "recipes": {r: RECIPES[r] for r in recipes},
        "trunk_cache": trunk_stats,
        "folds": folds,
        "mean_over_folds": mean,
        "pooled_over_folds": pooled,
        "wall_s": round(time.time() - t0, 1),
    }
    (out / "loso.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pooled(folds: dict) -> dict:
    """Accuracy, length rule and matched accuracy over the left-out pairs of all folds together."""
    n = sum(f["pairs"] for f in folds.values())
    m = sum(f["matched_pairs"] for f in folds.values())
    acc = sum(f["accuracy"] * f["pairs"] for f in folds.values()) / n
    longer = sum(f["longer_wins"] * f["pairs"] for f in folds.values()) / n
    matched = sum((f["matched_accuracy"] or 0) * f["matched_pairs"] for f in folds.values()) / m if m else None
    return {
        "pairs": n,
        "accuracy": acc,
        "longer_wins": longer,
        "matched_pairs": m,
        "matched_accuracy": matched,
        "target_acc_ge_length_plus_5": acc - longer >= 0.05,
        "target_matched_ge_60": (matched or 0) >= 0.60,
    }
