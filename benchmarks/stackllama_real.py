"""The StackLLaMA real result, reported as the guide reports it, from a finished `rlhfkit run` of
recipes/stackllama.yaml plus a Stack Exchange site the run never saw.

    S=../shared/data/stackexchange
    rlhfkit run recipes/stackllama.yaml run_dir=runs/stackllama \
        "data.paths=[$S/ai.stackexchange.com,$S/beer.stackexchange.com,$S/coffee.stackexchange.com,$S/matheducators.stackexchange.com]"
    python benchmarks/stackllama_real.py --run-dir runs/stackllama --left-out $S/cardano.stackexchange.com

Prints one JSON object (and writes it to RUN_DIR/stackllama_real.json): SFT held-out perplexity
before/after; RM accuracy on the run's held-out questions and on the left-out site, each with "the
longer answer wins" on the full texts (characters) beside it, scored with the RM's own template and
truncation; PPO score, KL and response length over steps; the eval stage's SFT vs PPO table; stage
wall times; before/after samples. docs/stackllama.md holds the recorded run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import machine, versions


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def rm_on(rm_dir: Path, rows: list[dict]) -> dict:
    """Accuracy of the RM at `rm_dir` on prompt/chosen/rejected rows, as its stage scores held-out pairs."""
    from rlhfkit.inputs.pairs import encode_pairs
    from rlhfkit.inputs.templates import PromptFormat
    from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import reward

    cfg = load_config(reward.CONFIG, rm_dir / "config.yaml")
    model, tok = load_model(
        ModelConfig(name=str(rm_dir)), LoraConfig(enabled=False), kind="seq_cls", trainable=False, verbose=False
    )
    pairs = encode_pairs(rows, PromptFormat(cfg.template, tok), cfg.data.max_length, "rm-eval", cfg.data.truncate)
    result = reward.evaluate_pairs(model, pairs, tok.pad_token_id, cfg.eval_batch_size)
    result["longer_wins_full_text_chars"] = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / len(rows)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--left-out", required=True, help="a Stack Exchange dump (folder or Posts.xml) the run never saw")
    ap.add_argument("--max-left-out", type=int, default=-1, help="score at most this many left-out pairs (-1: all)")
    args = ap.parse_args()

    from rlhfkit.inputs.pairs import load_table, normalise_pairs
    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import data as data_stage
    from rlhfkit.stages import reward

    run = Path(args.run_dir)
    left = run / "left_out_data"
    if not (left / "stats.json").exists():
        data_stage.run(
            load_config(
                data_stage.CONFIG,
                overrides={
                    "source": "stackexchange",
                    "paths": [args.left_out],
                    "out_dir": str(left),
                    "format": "parquet",
                    "fractions": {"sft": 0.0, "rm_train": 0.0, "rm_eval": 1.0, "rl_prompts": 0.0},
                },
            )
        )
    left_rows = normalise_pairs(load_table(str(left), "rm_eval"))
    if args.max_left_out > 0:
        left_rows = left_rows[: args.max_left_out]
    held_rows = normalise_pairs(load_table(str(run / "data"), "rm_eval"))
    rm_cfg = load_config(reward.CONFIG, run / "rm" / "config.yaml")
    if rm_cfg.data.max_eval_samples > 0:
        held_rows = held_rows[: rm_cfg.data.max_eval_samples]

    sft = _jsonl(run / "sft" / "metrics.jsonl")
    ppl = [r["eval/perplexity"] for r in sft if "eval/perplexity" in r]
    ppo = [r for r in _jsonl(run / "ppo" / "metrics.jsonl") if "score" in r]
    ppo_eval = [r for r in _jsonl(run / "ppo" / "metrics.jsonl") if "eval/reward" in r]
    stages = {
        p.stem: round(json.loads(p.read_text()).get("seconds", 0) / 60, 1) for p in (run / ".stages").glob("*.json")
    }
    samples = _jsonl(run / "eval" / "samples.jsonl")
    by_model: dict[str, list[dict]] = {}
    for s in samples:
        by_model.setdefault(s["model"], []).append(s)
    result = {
        "machine": machine(),
        "versions": versions(),
        "run_dir": str(run),
        "stage_minutes": stages,
        "total_minutes": round(sum(stages.values()), 1),
        "data": json.loads((run / "data" / "stats.json").read_text())["rows"],
        "sft": {
            "perplexity_before": ppl[0] if ppl else None,
            "perplexity_after": ppl[-1] if ppl else None,
            "steps": max((r.get("step", 0) for r in sft), default=0),
        },
        "rm_held_out_questions": rm_on(run / "rm" / "final", held_rows),
        "rm_left_out_site": {"site": Path(args.left_out).name, **rm_on(run / "rm" / "final", left_rows)},
        "ppo_curve": [
            {k: r.get(k) for k in ("step", "score", "kl", "kl_coef", "response_length", "clipfrac")} for r in ppo
        ],
        "ppo_eval": ppo_eval,
        "eval": json.loads((run / "eval" / "metrics.json").read_text()),
        "samples": [
            {
                "prompt": a["prompt"][:300],
                "sft": a["response"],
                "sft_rm": a["rm_score"],
                "ppo": b["response"],
                "ppo_rm": b["rm_score"],
            }
            for a, b in zip(by_model.get("sft", [])[:4], by_model.get("ppo", [])[:4])
        ],
    }
    (run / "stackllama_real.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
