"""Real reward-model result: SmolLM2-135M + LoRA trained on four shared Stack Exchange sites,
accuracy on a fifth site never trained on (and on held-out questions of the four).

    python benchmarks/rm_real.py --leave-out cardano --max-steps 250 --out /tmp/rm_real
    python benchmarks/rm_real.py --loso --layers 4 --out /tmp/rm_loso    # leave-one-site-out, 5 folds × 2 recipes

Data: `rlhfkit data` (score = round(log2(1+upvotes)), +1 accepted, −1 negative; ≤ 10 pairs per
question), the four sites split 90/10 by question; the left-out site is all held out. Pairs are
cut to --max-length tokens (data.truncate) rather than dropped, since most answers are longer.
Baselines printed beside the RM: the untrained head (step 0) and "the longer answer wins".
Prints one JSON object; see docs/benchmarks/rm.md for the recorded run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import machine, shared_data, versions

SITES = ("ai", "beer", "cardano", "coffee", "matheducators")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(shared_data("stackexchange")))
    ap.add_argument("--leave-out", default="cardano", choices=SITES)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--max-steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--layers", type=int, default=10, help="lora.num_layers_unfrozen (top blocks with LoRA)")
    ap.add_argument("--max-eval", type=int, default=-1, help="held-out pairs per eval set (-1: all; for a smoke run)")
    ap.add_argument("--out", default="/tmp/rm_real")
    ap.add_argument("--loso", action="store_true", help="leave-one-site-out over all five sites (rm_loso.py)")
    ap.add_argument("--train-per-site", type=int, default=30, help="--loso: training pairs per site")
    ap.add_argument("--eval-per-site", type=int, default=40, help="--loso: evaluation pairs per left-out site")
    ap.add_argument("--epochs", type=float, default=1.0, help="--loso: passes over each fold's training pairs")
    ap.add_argument("--keep-models", action="store_true", help="--loso: keep every run's final/ model")
    ap.add_argument("--folds", nargs="+", choices=SITES, default=list(SITES), help="--loso: the left-out sites to run")
    ap.add_argument("--recipes", nargs="+", default=["bt", "odin"], help="--loso: recipes (rm_loso.RECIPES)")
    ap.add_argument("--full", action="store_true", help="--loso: train every weight (no LoRA; --layers ignored)")
    args = ap.parse_args()
    if args.loso:
        from rm_loso import run_loso

        run_loso(args)
        return

    from rlhfkit.inputs.pairs import encode_pairs, load_table, normalise_pairs
    from rlhfkit.inputs.templates import PromptFormat
    from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import data as data_stage
    from rlhfkit.stages import reward

    out = Path(args.out)
    train_sites = [s for s in SITES if s != args.leave_out]
    site_dir = lambda s: str(Path(args.shared) / f"{s}.stackexchange.com")  # noqa: E731
    frac = lambda tr, ev: {"sft": 0.0, "rm_train": tr, "rm_eval": ev, "rl_prompts": 0.0}  # noqa: E731
    for name, sites, f in (
        ("train_sites", train_sites, frac(0.9, 0.1)),
        ("left_out", [args.leave_out], frac(0.0, 1.0)),
    ):
        data_stage.run(
            load_config(
                data_stage.CONFIG,
                overrides={
                    "source": "stackexchange",
                    "paths": [site_dir(s) for s in sites],
                    "out_dir": str(out / name),
                    "format": "parquet",
                    "overwrite": True,
                    "fractions": f,
                },
            )
        )

    cfg = load_config(
        reward.CONFIG,
        overrides={
            "out_dir": str(out / "rm"),
            "overwrite": True,
            "model": {"name": args.model},
            "lora": {
                "r": 16,
                "alpha": 32,
                "dropout": 0.05,
                "target_modules": ["all-linear"],
                "num_layers_unfrozen": args.layers,
            },
            "data": {
                "path": str(out / "train_sites"),
                "eval_path": str(out / "left_out" / "rm_eval.parquet"),
                "max_length": args.max_length,
                "truncate": True,
                "max_eval_samples": args.max_eval,
            },
            "train": {
                "lr": args.lr,
                "warmup_steps": 10,
                "batch_size": args.batch,
                "max_steps": args.max_steps,
                "save_every": 50,
            },
            "eval_batch_size": 8,
        },
    )
    t0 = time.time()
    summary = reward.run(cfg)
    train_eval_s = time.time() - t0
    log = [json.loads(line) for line in open(out / "rm" / "metrics.jsonl")]
    train_s = sum(1 / r["pairs_per_s"] * r["pairs"] for r in log if "pairs_per_s" in r)

    # Held-out questions of the training sites; the length baseline on the left-out site.
    model, tok = load_model(ModelConfig(name=summary["out_dir"]), LoraConfig(enabled=False), kind="seq_cls")
    fmt = PromptFormat(cfg.template, tok)
    in_dist_rows = normalise_pairs(load_table(str(out / "train_sites" / "rm_eval.parquet"), None))
    in_dist = encode_pairs(
        in_dist_rows[: args.max_eval if args.max_eval > 0 else None], fmt, args.max_length, "in-dist", truncate=True
    )
    in_dist_eval = reward.evaluate_pairs(model, in_dist, tok.pad_token_id, 8)
    left_rows = normalise_pairs(load_table(str(out / "left_out" / "rm_eval.parquet"), None))
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in left_rows) / len(left_rows)
    result = {
        "machine": machine(),
        "versions": versions(),
        "args": vars(args),
        "train_sites": train_sites,
        "left_out_site": args.leave_out,
        "train_pairs_seen": sum(r.get("pairs", 0) for r in log if "pairs_per_s" in r),
        "train_seconds": round(train_s, 1),
        "train_plus_eval_seconds": round(train_eval_s, 1),
        "left_out": {k.removeprefix("eval_"): v for k, v in summary.items() if k.startswith("eval_")},
        "in_distribution": in_dist_eval,
        "baseline_longer_answer_wins_left_out": longer,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(
        f"\nleft-out site {args.leave_out}: accuracy {result['left_out'].get('accuracy', float('nan')):.3f} on "
        f"{result['left_out'].get('pairs')} pairs; in-distribution {in_dist_eval['accuracy']:.3f} on "
        f"{in_dist_eval['pairs']} pairs; 'longer wins' {longer:.3f}; trained {train_s / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
