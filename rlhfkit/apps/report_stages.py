"""The report's stage sections (data, SFT, reward model, DPO, evaluation); PPO's is report_ppo.py.
Each `section_*(doc, run)` reads that stage's files through runtime.rundir and adds blocks to doc."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rlhfkit.apps import report_render as render
from rlhfkit.runtime import rundir


def notes(doc: render.Doc, found: list[str]) -> None:
    for n in found:
        doc.note(n)


def flat_numbers(stats: dict) -> list[list[Any]]:
    """Top-level scalars and one level of nested scalars (rows.sft, pairs.candidates, ...)."""
    rows: list[list[Any]] = []
    skip = {"inputs", "score_histogram", "skipped", "filtered", "lengths_chars", "partial", "out_dir"}
    for k, v in stats.items():
        if k in skip:
            continue
        if isinstance(v, (int, float, str, bool)) or v is None:
            rows.append([k, v])
        elif isinstance(v, dict) and v and all(isinstance(x, (int, float, str, bool)) or x is None for x in v.values()):
            rows.append([k, " · ".join(f"{kk} {render.fmt(vv)}" for kk, vv in v.items())])
    return rows


def section_data(doc: render.Doc, run: Path) -> None:
    # The default recipe makes its pairs with the feedback stage (simulated rater) instead of `data`.
    source = "feedback" if (run / "feedback").is_dir() and not (run / "data").is_dir() else "data"
    doc.h2("Data" if source == "data" else "Data (simulated feedback)", "data")
    found: list[str] = []
    stats = rundir.read_json(run / source / "stats.json", found)
    notes(doc, found)
    if not isinstance(stats, dict):
        doc.note("No data statistics (data/stats.json not found): the data stage was not run into this folder.")
        return
    doc.table(["statistic", "value"], flat_numbers(stats), cls="kv")
    inputs = stats.get("inputs")
    if isinstance(inputs, list) and inputs:
        rows = [
            [i.get("site", i.get("path", "?")), i.get("questions"), i.get("answers"), i.get("seconds")]
            for i in inputs
            if isinstance(i, dict)
        ]
        doc.h3("Inputs")
        doc.table(["input", "questions", "answers", "seconds"], rows)
    reasons = [["skipped", k, v] for k, v in (stats.get("skipped") or {}).items()]
    reasons += [["filtered (too long)", k, v] for k, v in (stats.get("filtered") or {}).items()]
    if reasons:
        doc.h3("Skipped rows")
        doc.table(["kind", "reason", "rows"], reasons)
    for p in stats.get("partial") or []:
        doc.warn(f"Partial input kept up to an error: {p.get('reason', p) if isinstance(p, dict) else p}")
    hist = stats.get("score_histogram")
    if isinstance(hist, dict) and hist:
        pts = sorted(((float(k), float(v)) for k, v in hist.items() if render.num(v) is not None and is_number(k)))
        if pts:
            fig, axes = render.figure(h=2.8)
            ax = axes[0][0]
            ax.bar([p[0] for p in pts], [p[1] for p in pts], width=0.8, color="#4c72b0")
            ax.set_yscale("log" if max(p[1] for p in pts) > 50 * max(1.0, min(p[1] for p in pts)) else "linear")
            render.style(ax, "Answer score histogram", xlabel="score", ylabel="answers")
            doc.img("data_score_hist.png", render.png(fig), "Histogram of answer scores")
    lengths = stats.get("lengths_chars")
    if isinstance(lengths, dict) and lengths:
        rows = []
        for split, fields in lengths.items():
            if not isinstance(fields, dict):
                continue
            for name, pct in fields.items():
                if isinstance(pct, dict):
                    rows.append(
                        [split, name, pct.get("p50"), pct.get("p90"), pct.get("p99"), pct.get("max"), pct.get("mean")]
                    )
        if rows:
            doc.h3("Lengths (characters)")
            doc.table(["split", "field", "p50", "p90", "p99", "max", "mean"], rows)


def is_number(s: Any) -> bool:
    try:
        return math.isfinite(float(s))
    except (TypeError, ValueError):
        return False


def section_sft(doc: render.Doc, run: Path) -> None:
    if not (run / "sft").is_dir() and (run / "ppo").is_dir():
        return  # PPO straight from the base model (the default recipe): the overview lists what ran
    doc.h2("SFT", "sft")
    found: list[str] = []
    records = rundir.read_records(run / "sft" / "metrics.jsonl", found)
    notes(doc, found)
    if not records:
        doc.note("No SFT metrics (sft/metrics.jsonl not found or empty).")
        return
    train, evals = rundir.split(records)
    render.plot_panels(
        doc,
        "sft_loss.png",
        "SFT loss and eval perplexity over steps",
        [
            ("Training loss", [(train, "loss", "train loss"), (evals, "eval/loss", "eval loss")]),
            ("Held-out perplexity", [(evals, "eval/perplexity", "held-out perplexity")]),
        ],
    )
    render.plot_panels(
        doc,
        "sft_train.png",
        "SFT learning rate, throughput and gradient norm",
        [
            ("Learning rate", [(train, "lr", "lr")]),
            ("Throughput (tokens/s)", [(train, "tokens_per_s", "tokens/s")]),
            ("Gradient norm", [(train, "grad_norm", "grad norm")]),
        ],
        ncols=3,
        h=2.4,
    )
    ppl_x, ppl = render.series(evals, "eval/perplexity")
    rows = [
        ["train steps", int(max(render.series(train, "loss")[0], default=0))],
        ["final train loss", render.last(train, "loss")],
        ["held-out perplexity before training (step 0)", ppl[0] if ppl and ppl_x[0] == 0 else None],
        ["held-out perplexity at the end", ppl[-1] if ppl else None],
        ["held-out loss at the end", render.last(evals, "eval/loss")],
        ["mean tokens/s", render.mean(render.series(train, "tokens_per_s")[1])],
        ["tokens seen", render.last(train, "tokens")],
    ]
    doc.table(["metric", "value"], [r for r in rows if r[1] is not None], cls="kv")


def section_rm(doc: render.Doc, run: Path) -> None:
    doc.h2("Reward model", "rm")
    found: list[str] = []
    records = rundir.read_records(run / "rm" / "metrics.jsonl", found)
    margins = rundir.read_json(run / "rm" / "eval_margins.json", found)
    notes(doc, found)
    if not records and margins is None:
        doc.note("No reward-model metrics (rm/metrics.jsonl and rm/eval_margins.json not found).")
        return
    train, evals = rundir.split(records)
    render.plot_panels(
        doc,
        "rm_curves.png",
        "Reward model accuracy, margin and loss over steps",
        [
            ("Accuracy", [(train, "accuracy", "train"), (evals, "eval/accuracy", "held-out")]),
            ("Margin r(chosen) − r(rejected)", [(train, "margin", "train"), (evals, "eval/margin", "held-out")]),
            ("Loss", [(train, "loss", "train"), (evals, "eval/loss", "held-out")]),
            (
                "Held-out reward mean ± std",
                [(evals, "eval/reward_mean", "mean"), (evals, "eval/reward_std", "std")],
            ),
        ],
    )
    if not records:
        doc.note("rm/metrics.jsonl not found.")
    if isinstance(margins, list):
        vals = [v for v in (render.num(m) for m in margins) if v is not None]
        if vals:
            fig, axes = render.figure(h=2.8)
            ax = axes[0][0]
            ax.hist(vals, bins=min(40, max(5, len(vals) // 3)), color="#55a868", edgecolor="white")
            ax.axvline(0.0, color="#c44e52", linestyle="--", linewidth=1, label="0 (tie)")
            render.style(ax, "Held-out margins r(chosen) − r(rejected)", xlabel="margin", ylabel="pairs")
            doc.img("rm_margin_hist.png", render.png(fig), "Histogram of held-out reward margins")
            pos = sum(v > 0 for v in vals)
            ties = sum(v == 0 for v in vals)
            doc.p(
                f"{len(vals)} held-out pairs: {pos / len(vals):.1%} ranked correctly (margin > 0), "
                f"{ties} ties, median margin {sorted(vals)[len(vals) // 2]:.4g}."
            )
    else:
        doc.note("rm/eval_margins.json not found: no margin histogram.")
    if evals:
        last = evals[-1]
        baseline, why = rundir.length_baseline(last)
        keys = [k for k in last if k.startswith("eval/") and not (k == "eval/longer_wins" and baseline is None)]
        doc.table(["final held-out figure", "value"], [[rundir.label(k), last[k]] for k in keys], cls="kv")
        if why:
            doc.note(f"“The longer answer wins” is not shown: {why}.")
    length_bins(doc, rundir.read_json(run / "rm" / "eval_length_bins.json", found))


def length_bins(doc: render.Doc, data: Any) -> None:
    """Accuracy by bin of longer/shorter length ratio (rm/eval_length_bins.json), beside the score of
    "the longer answer wins" in the same bin: an RM that only reads length tracks that line."""
    bins = data.get("bins") if isinstance(data, dict) else None
    rows = [b for b in bins or [] if isinstance(b, dict) and (render.num(b.get("pairs")) or 0) > 0]
    if not rows:
        return

    def name(b: dict) -> str:
        hi = render.num(b.get("hi"))
        return f"{render.fmt(render.num(b.get('lo')))}–{render.fmt(hi) if hi is not None else '∞'}×"

    doc.h3("Accuracy by length ratio", "rm-length-bins")
    fig, axes = render.figure(h=3.0)
    ax = axes[0][0]
    xs = list(range(len(rows)))
    acc = [render.num(b.get("accuracy")) or 0.0 for b in rows]
    ax.bar(xs, acc, color="#4c72b0", label="RM accuracy")
    lw = [(x, render.num(b.get("longer_wins"))) for x, b in zip(xs, rows)]
    lw = [(x, y) for x, y in lw if y is not None]
    if lw:
        ax.plot([p[0] for p in lw], [p[1] for p in lw], "D", color="#dd8452", label="“longer wins”")
    ax.axhline(0.5, color="#333333", linewidth=0.6, linestyle=":")
    ax.set_xticks(xs, [f"{name(b)}\n{int(render.num(b['pairs']))} pairs" for b in rows], fontsize=7)
    ax.set_ylim(0, 1.05)
    render.style(ax, "Held-out accuracy by length ratio (longer / shorter)", xlabel="", ylabel="accuracy")
    doc.img("rm_length_bins.png", render.png(fig), "Reward-model accuracy by length-ratio bin")
    doc.table(
        ["length ratio", "pairs", "RM accuracy", "“longer wins”"],
        [[name(b), b.get("pairs"), b.get("accuracy"), b.get("longer_wins")] for b in rows],
        cls="length-bins",
    )


def section_dpo(doc: render.Doc, run: Path) -> None:
    path = run / "dpo" / "metrics.jsonl"
    if not path.exists():
        return  # DPO is an alternative to RM+PPO: no section, the overview says it is missing
    doc.h2("DPO", "dpo")
    found: list[str] = []
    records = rundir.read_records(path, found)
    notes(doc, found)
    train, evals = rundir.split(records)
    reward_keys = sorted({k for r in train for k in r if str(k).startswith("rewards/")})
    eval_reward_keys = sorted({k for r in evals for k in r if str(k).startswith("eval/rewards/")})
    panels = [("Loss", [(train, "loss", "train"), (evals, "eval/loss", "eval")])]
    for k in reward_keys:
        ek = "eval/" + k
        panels.append((k, [(train, k, "train")] + ([(evals, ek, "eval")] if ek in eval_reward_keys else [])))
    for ek in eval_reward_keys:
        if ek.removeprefix("eval/") not in reward_keys:
            panels.append((ek, [(evals, ek, "eval")]))
    if render.has(evals, "eval/accuracy"):
        panels.append(("Held-out accuracy", [(evals, "eval/accuracy", "eval")]))
    if not render.plot_panels(doc, "dpo_curves.png", "DPO loss and implicit rewards over steps", panels):
        doc.note("dpo/metrics.jsonl has no curve of two or more points to plot.")
    if evals:
        last = evals[-1]
        rows = [[rundir.label(k), last[k]] for k in last if k.startswith("eval/")]
        doc.table(["final held-out figure", "value"], rows, cls="kv")


EVAL_COLUMNS = [
    "rm_score",
    "judge_score",
    "kl",
    "response_length",
    "repetition_rate",
    "fence_rate",
    "length_drift",
    "perplexity",
]


def section_eval(doc: render.Doc, run: Path, max_samples: int) -> bool:
    """Returns whether over-optimisation was flagged."""
    doc.h2("Evaluation", "eval")
    found: list[str] = []
    metrics = rundir.read_json(run / "eval" / "metrics.json", found)
    samples = rundir.read_records(run / "eval" / "samples.jsonl", found)
    notes(doc, found)
    flagged = False
    if not isinstance(metrics, dict):
        doc.note("No evaluation (eval/metrics.json not found).")
    else:
        _eval_models(doc, metrics)
        _eval_wins(doc, metrics)
        _eval_detectors(doc, metrics)
        flagged = _eval_over(doc, metrics)
    _eval_samples(doc, metrics, samples, max_samples)
    return flagged


def _eval_models(doc: render.Doc, metrics: dict) -> None:
    """Per-model table and the RM / judge score bars."""
    models = metrics.get("models") or {}
    if isinstance(models, dict) and models:
        cols = EVAL_COLUMNS + sorted({k for m in models.values() if isinstance(m, dict) for k in m} - set(EVAL_COLUMNS))
        cols = [c for c in cols if any(isinstance(m, dict) and c in m for m in models.values())]
        doc.table(
            ["model"] + [rundir.label(c) for c in cols],
            [[name] + [m.get(c) if isinstance(m, dict) else None for c in cols] for name, m in models.items()],
            cls="eval-models",
        )
        lengths = {render.num(m.get("response_length")) for m in models.values() if isinstance(m, dict)}
        if len(lengths) == 1 and None not in lengths:
            doc.note("Every model answered with the same length (fixed-length sampling): length figures do not apply.")
        names = list(models)
        fig, axes = render.figure(1, 2, w=8.5, h=2.9)
        drew = False
        for ax, key, title in (
            (axes[0][0], "rm_score", "Reward-model score"),
            (axes[0][1], "judge_score", "Judge score"),
        ):
            vals = [render.num(models[n].get(key)) if isinstance(models[n], dict) else None for n in names]
            have = [i for i, v in enumerate(vals) if v is not None]
            if have:  # a model without this score gets no bar (not a zero one)
                ax.bar(have, [vals[i] for i in have], color="#4c72b0")
                ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
                ax.axhline(0.0, color="#333333", linewidth=0.6)
                drew = True
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            render.style(ax, title, xlabel="")
        if drew:
            doc.img("eval_scores.png", render.png(fig), "Per-model reward-model and judge scores")


def _eval_wins(doc: render.Doc, metrics: dict) -> None:
    """Win-rates against the first model, with the band the verdict uses."""
    wins = metrics.get("win_rate") or {}
    if isinstance(wins, dict) and wins:
        doc.h3("Win rates", "eval-win-rates")
        pct = lambda v: f"{v:.1%}" if render.num(v) is not None else "—"  # noqa: E731
        doc.table(
            ["comparison", "RM win rate", "judge win rate"],
            [
                [k.replace("_vs_", " vs "), pct((v or {}).get("rm")), pct((v or {}).get("judge"))]
                for k, v in wins.items()
                if isinstance(v, dict) or v is None
            ],
        )
        n = render.num(metrics.get("prompts"))
        if n:
            doc.note(
                f"On {int(n)} prompts (ties count half); a win-rate within 50% ± {1 / n**0.5:.1%} "
                "(two standard errors of a coin flip) counts as flat in the verdict."
            )


def _eval_detectors(doc: render.Doc, metrics: dict) -> None:
    """Reward-hacking detector flags per model."""
    det = metrics.get("detectors") or {}
    if isinstance(det, dict) and det:
        doc.h3("Detectors", "eval-detectors")
        dcols = sorted(
            {k for d in det.values() if isinstance(d, dict) for k in d},
            key=lambda k: ((["repetition", "fence_spam", "length_drift"] + [k]).index(k), k),
        )
        rows = [
            [name] + [("⚠ flagged" if d.get(c) else ("ok" if c in d else "—")) for c in dcols]
            for name, d in det.items()
            if isinstance(d, dict)
        ]
        doc.table(["model"] + [rundir.label(c) for c in dcols], rows, cls="detectors")
        hits = [
            f"{name}: {rundir.label(c)}" for name, d in det.items() if isinstance(d, dict) for c in dcols if d.get(c)
        ]
        if hits:
            doc.warn("Detector flags: " + "; ".join(hits))


def _eval_over(doc: render.Doc, metrics: dict) -> bool:
    """The over-optimisation check; returns whether it flagged."""
    flagged = False
    over = metrics.get("over_optimisation")
    doc.h3("Over-optimisation")
    if isinstance(over, dict):
        rm_d, judge_d = render.num(over.get("rm_delta")), render.num(over.get("judge_delta"))
        flag = over.get("flag")
        if flag is None:  # no verdict written: RM up while the judge is flat or down
            flag = rm_d is not None and rm_d > 0 and judge_d is not None and judge_d <= 0
        detail = f"RM score Δ {render.fmt(rm_d)}, judge score Δ {render.fmt(judge_d)}" + (
            f". {over['note']}" if over.get("note") else ""
        )
        if flag:
            flagged = True
            doc.warn(
                "Over-optimisation suspected: the reward-model score went up while the gold judge stayed "
                f"flat or went down. {detail}"
            )
        elif over.get("flag") is None and judge_d is None:
            doc.note(f"No gold-judge scores, so over-optimisation could not be checked. {detail}")
        else:
            doc.ok(f"No over-optimisation flagged. {detail}")
    else:
        doc.note("eval/metrics.json has no over_optimisation verdict.")
    return flagged


def _eval_samples(doc: render.Doc, metrics, samples: list[dict], max_samples: int) -> None:
    """The first evaluation samples."""
    if samples:
        doc.h3("Evaluation samples")
        shown = samples[:max_samples]
        doc.table(
            ["model", "prompt", "response", "RM score", "judge score"],
            [
                [
                    str(s.get("model", "")),
                    render.clip(s.get("prompt")),
                    render.clip(s.get("response")),
                    render.fmt(render.num(s.get("rm_score"))),
                    render.fmt(render.num(s.get("judge_score"))),
                ]
                for s in shown
            ],
            cls="samples eval-samples",
            anchor="eval-samples",
        )
        if len(samples) > max_samples:
            doc.note(f"Showing {max_samples} of {len(samples)} samples (--max-samples).")
    elif isinstance(metrics, dict):
        doc.note("eval/samples.jsonl not found.")
