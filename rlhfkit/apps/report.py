"""`rlhfkit report RUN_DIR`: one page that shows what a run did.

Reads whatever the stages left in RUN_DIR (every file is optional; a missing one is named, a torn
last line of a metrics file that is still being written is skipped) and writes

    RUN_DIR/report.html   self-contained: inline render.CSS, every plot a base64 PNG, no external URL
    RUN_DIR/report.md     the same content; plots beside it in RUN_DIR/report_files/*.png

Sections: data stats, SFT loss/perplexity, reward-model accuracy/margins, PPO score/KL/β,
reward-vs-KL, timings, before/after samples, DPO, evaluation (per-model table, win rates,
detectors, over-optimisation verdict), render.environment and each stage's config.yaml.

Plots use matplotlib's Agg canvas on private Figure objects (no pyplot state). Every file is
written to a temp name and renamed, so a reader never sees a half-written report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from rlhfkit.apps import report_render as render
from rlhfkit.runtime.errors import RlhfkitError
from rlhfkit.runtime.io import atomic_write_bytes

STAGE_DIRS = ("data", "sft", "rm", "ppo", "dpo", "eval")
PROG = "rlhfkit report"


class ReportError(RlhfkitError):
    """A run directory that cannot be reported on (missing, not a directory, not a run)."""


# --------------------------------------------------------------------------- reading
def _rel(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"{_rel(path)}: unreadable ({exc.__class__.__name__}: {exc})")
        return None


def _read_records(path: Path, notes: list[str]) -> list[dict]:
    """JSONL records; bad lines (e.g. the torn last line of a running stage) are skipped and counted."""
    if not path.exists():
        return []
    out, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        notes.append(f"{_rel(path)}: unreadable ({exc})")
        return []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad += 1
    if bad:
        notes.append(f"{_rel(path)}: skipped {bad} malformed line(s)")
    return out


def _split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, eval) records: a record with both kinds of keys is in both."""
    evals = [r for r in records if any(str(k).startswith("eval/") for k in r)]
    train = [r for r in records if any(not str(k).startswith("eval/") and k not in ("step", "epoch") for k in r)]
    return train, evals


def _notes(doc: render.Doc, notes: list[str]) -> None:
    for n in notes:
        doc.note(n)


def section_overview(doc: render.Doc, run: Path) -> None:
    doc.h2("Overview", "overview")
    rows = []
    expected = {
        "data": ["stats.json"],
        "feedback": ["stats.json", "config.yaml"],
        "sft": ["config.yaml", "metrics.jsonl"],
        "rm": ["config.yaml", "metrics.jsonl", "eval_margins.json"],
        "ppo": ["config.yaml", "metrics.jsonl", "samples.jsonl", "before_after.md"],
        "dpo": ["config.yaml", "metrics.jsonl"],
        "eval": ["metrics.json", "samples.jsonl"],
    }
    ran = [s for s in expected if (run / s).is_dir()]
    for stage, files in expected.items():
        if ran and stage not in ran:
            continue  # a recipe without this stage (e.g. the default has feedback, not data/sft)
        have = [f for f in files if (run / stage / f).exists()]
        lack = [f for f in files if f not in have]
        if not (run / stage).is_dir():
            status = "not run"
        else:
            status = "complete" if have and not lack else ("partial" if have else "empty")
        final = "yes" if (run / stage / "final").is_dir() else "no"
        rows.append([stage, status, ", ".join(have) or "—", ", ".join(lack) or "—", final])
    doc.table(["stage", "status", "found", "missing", "final/ model"], rows, cls="overview")


def _flat_numbers(stats: dict) -> list[list[Any]]:
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
    notes: list[str] = []
    stats = _read_json(run / source / "stats.json", notes)
    _notes(doc, notes)
    if not isinstance(stats, dict):
        doc.note("No data statistics (data/stats.json not found): the data stage was not run into this folder.")
        return
    doc.table(["statistic", "value"], _flat_numbers(stats), cls="kv")
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
        pts = sorted(((float(k), float(v)) for k, v in hist.items() if render.num(v) is not None and _is_number(k)))
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


def _is_number(s: Any) -> bool:
    try:
        return math.isfinite(float(s))
    except (TypeError, ValueError):
        return False


def section_sft(doc: render.Doc, run: Path) -> None:
    if not (run / "sft").is_dir() and (run / "ppo").is_dir():
        return  # PPO straight from the base model (the default recipe): the overview lists what ran
    doc.h2("SFT", "sft")
    notes: list[str] = []
    records = _read_records(run / "sft" / "metrics.jsonl", notes)
    _notes(doc, notes)
    if not records:
        doc.note("No SFT metrics (sft/metrics.jsonl not found or empty).")
        return
    train, evals = _split(records)
    png = render.multi_plot(
        [
            ("Training loss", [(train, "loss", "train loss"), (evals, "eval/loss", "eval loss")]),
            ("Eval perplexity", [(evals, "eval/perplexity", "eval perplexity")]),
        ]
    )
    doc.img("sft_loss.png", png, "SFT loss and eval perplexity over steps")
    png = render.multi_plot(
        [
            ("Learning rate", [(train, "lr", "lr")]),
            ("Throughput (tokens/s)", [(train, "tokens_per_s", "tokens/s")]),
            ("Gradient norm", [(train, "grad_norm", "grad norm")]),
        ],
        ncols=3,
        h=2.4,
    )
    doc.img("sft_train.png", png, "SFT learning rate, throughput and gradient norm")
    ppl_x, ppl = render.series(evals, "eval/perplexity")
    rows = [
        ["train steps", int(max(render.series(train, "loss")[0], default=0))],
        ["final train loss", render.last(train, "loss")],
        ["eval perplexity before training (step 0)", ppl[0] if ppl and ppl_x[0] == 0 else None],
        ["eval perplexity at the end", ppl[-1] if ppl else None],
        ["eval loss at the end", render.last(evals, "eval/loss")],
        ["mean tokens/s", render.mean(render.series(train, "tokens_per_s")[1])],
        ["tokens seen", render.last(train, "tokens")],
    ]
    doc.table(["metric", "value"], [r for r in rows if r[1] is not None], cls="kv")


def section_rm(doc: render.Doc, run: Path) -> None:
    doc.h2("Reward model", "rm")
    notes: list[str] = []
    records = _read_records(run / "rm" / "metrics.jsonl", notes)
    margins = _read_json(run / "rm" / "eval_margins.json", notes)
    _notes(doc, notes)
    if not records and margins is None:
        doc.note("No reward-model metrics (rm/metrics.jsonl and rm/eval_margins.json not found).")
        return
    train, evals = _split(records)
    png = render.multi_plot(
        [
            (
                "Accuracy",
                [
                    (train, "accuracy", "train"),
                    (evals, "eval/accuracy", "eval"),
                    (evals, "eval/longer_wins", "eval: longer answer wins"),
                ],
            ),
            ("Margin r(chosen) − r(rejected)", [(train, "margin", "train"), (evals, "eval/margin", "eval")]),
            ("Loss", [(train, "loss", "train"), (evals, "eval/loss", "eval")]),
            ("Eval reward mean ± std", [(evals, "eval/reward_mean", "mean"), (evals, "eval/reward_std", "std")]),
        ]
    )
    doc.img("rm_curves.png", png, "Reward model accuracy, margin and loss over steps")
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
        keys = [k for k in last if k.startswith("eval/")]
        doc.table(["final eval metric", "value"], [[k, last[k]] for k in keys], cls="kv")


def _samples_table(doc: render.Doc, samples: list[dict], max_rows: int) -> None:
    before: dict[str, dict] = {}
    after: dict[str, dict] = {}
    for s in samples:
        q = str(s.get("prompt", ""))
        if s.get("tag") == "before":
            before.setdefault(q, s)
        elif s.get("tag") == "after":
            after[q] = s
    paired = [q for q in after if q in before]
    if paired:
        rows, deltas = [], []
        for q in paired[:max_rows]:
            b, a = before[q], after[q]
            rb, ra = render.num(b.get("reward")), render.num(a.get("reward"))
            d = ra - rb if ra is not None and rb is not None else None
            deltas.append(d)
            rows.append(
                [
                    render.clip(q),
                    render.clip(b.get("response")),
                    render.fmt(rb),
                    render.clip(a.get("response")),
                    render.fmt(ra),
                    (f"{d:+.4g}" if d is not None else "—"),
                ]
            )
        doc.table(["prompt", "before", "reward", "after", "reward", "Δ"], rows, cls="samples", anchor="ppo-samples")
        rb = [render.num(before[q].get("reward")) for q in paired]
        ra = [render.num(after[q].get("reward")) for q in paired]
        rb, ra = [x for x in rb if x is not None], [x for x in ra if x is not None]
        if rb and ra:
            better = sum(1 for d in deltas if d is not None and d > 0)
            doc.p(
                f"Mean reward on {len(paired)} held-out prompts: before {render.mean(rb):.4g} → after "
                f"{render.mean(ra):.4g}; "
                f"improved on {better} of {len(deltas)} shown."
            )
        if len(paired) > max_rows:
            doc.note(f"Showing {max_rows} of {len(paired)} prompts (--max-samples).")
        return
    if samples:
        doc.note("No prompt has both a 'before' and an 'after' sample; the latest samples follow.")
        latest = sorted(samples, key=lambda s: render.num(s.get("step")) or 0)[-max_rows:]
        doc.table(
            ["step", "tag", "prompt", "response", "reward"],
            [
                [
                    render.fmt(s.get("step")),
                    str(s.get("tag", "")),
                    render.clip(s.get("prompt")),
                    render.clip(s.get("response")),
                    render.fmt(render.num(s.get("reward"))),
                ]
                for s in latest
            ],
            cls="samples",
            anchor="ppo-samples",
        )


def section_ppo(doc: render.Doc, run: Path, max_samples: int) -> None:
    doc.h2("PPO", "ppo")
    notes: list[str] = []
    records = _read_records(run / "ppo" / "metrics.jsonl", notes)
    samples = _read_records(run / "ppo" / "samples.jsonl", notes)
    _notes(doc, notes)
    if not records and not samples and not (run / "ppo" / "before_after.md").exists():
        doc.note("No PPO outputs: ppo/metrics.jsonl not found, ppo/samples.jsonl not found.")
        return
    train, evals = _split(records)
    if records:
        summary = [["steps", len(render.series(train, "score")[0]) or len(train)]]
        for k in ("score", "kl", "kl_coef", "response_length"):
            xs, ys = render.series(train, k)
            if ys:
                summary.append([f"{k} first → last", f"{render.fmt(ys[0])} → {render.fmt(ys[-1])}"])
        for k in ("eval/reward", "eval/kl", "eval/response_length"):
            xs, ys = render.series(evals, k)
            if ys:
                summary.append([f"{k} first → last", f"{render.fmt(ys[0])} → {render.fmt(ys[-1])}"])
        doc.table(["metric", "value"], summary, cls="kv")
        # score with its ± std band, eval reward, KL, β
        panels = [
            p
            for p in ("score", "kl", "kl_coef")
            if render.has(train, p) or render.has(evals, {"score": "eval/reward", "kl": "eval/kl"}.get(p, p))
        ]
        if panels:
            fig, axes = render.figure(1, len(panels), w=3.0 * len(panels) + 0.5, h=3.0)
            for ax, key in zip(axes[0], panels):
                if key == "score":
                    xs, ys = render.series(train, "score")
                    if xs:
                        ax.plot(xs, ys, label="score (train)", color="#4c72b0")
                        sx, sd = render.series(train, "score_std")
                        if sx == xs:
                            ax.fill_between(
                                xs,
                                [y - s for y, s in zip(ys, sd)],
                                [y + s for y, s in zip(ys, sd)],
                                alpha=0.2,
                                color="#4c72b0",
                                label="± std",
                            )
                    render.line(ax, train, "reward", label="reward (score − β·KL)", linestyle=":")
                    render.line(ax, evals, "eval/reward", label="eval reward", color="#dd8452")
                    render.style(ax, "Score / reward")
                elif key == "kl":
                    render.line(ax, train, "kl", label="KL (train)")
                    render.line(ax, evals, "eval/kl", label="eval KL", color="#dd8452")
                    render.style(ax, "KL(π ‖ π_ref)")
                else:
                    render.line(ax, train, "kl_coef", label="β", color="#8172b2")
                    render.style(ax, "β (kl_coef)")
            doc.h3("Score, KL and β")
            doc.img("ppo_score_kl.png", render.png(fig), "PPO score, KL and β over steps")
        # reward vs KL
        pts = [
            (render.num(r.get("kl")), render.num(r.get("score")), render.num(r.get("step")) or i)
            for i, r in enumerate(train)
        ]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        ev = [(render.num(r.get("eval/kl")), render.num(r.get("eval/reward"))) for r in evals]
        ev = [p for p in ev if p[0] is not None and p[1] is not None]
        if pts or ev:
            fig, axes = render.figure(w=6.0, h=3.6)
            ax = axes[0][0]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#999999", linewidth=0.8, zorder=1)
                sc = ax.scatter(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    c=[p[2] for p in pts],
                    cmap="viridis",
                    s=18,
                    zorder=2,
                    label="train steps",
                )
                cb = fig.colorbar(sc, ax=ax)
                cb.set_label("step", fontsize=8)
                cb.ax.tick_params(labelsize=7)
            if ev:
                ax.plot([p[0] for p in ev], [p[1] for p in ev], marker="s", color="#dd8452", label="eval")
            render.style(ax, "Reward vs KL", xlabel="KL(π ‖ π_ref)", ylabel="score")
            doc.h3("Reward vs KL")
            doc.img("ppo_reward_vs_kl.png", render.png(fig), "PPO reward versus KL over training")
        # diagnostics
        diag = [
            ("entropy", "Entropy"),
            ("approxkl", "Approx. KL (policy update)"),
            ("clipfrac", "Clip fraction"),
            ("pg_loss", "Policy loss"),
            ("vf_loss", "Value loss"),
            ("explained_variance", "Explained variance"),
            ("response_length", "Response length"),
            ("non_score_reward", "Non-score reward (−β·KL)"),
        ]
        png = render.multi_plot(
            [
                (
                    title,
                    [(train, k, "train")]
                    + ([(evals, "eval/response_length", "eval")] if k == "response_length" else []),
                )
                for k, title in diag
            ],
            ncols=4,
            h=2.3,
        )
        if png:
            doc.h3("Diagnostics")
        doc.img("ppo_diagnostics.png", png, "PPO diagnostics over steps")
        # timings
        order = ["time/generate", "time/score", "time/forward", "time/update"]
        tkeys = sorted(
            {k for r in train for k in r if str(k).startswith("time/") and render.num(r.get(k)) is not None},
            key=lambda k: (order.index(k) if k in order else len(order), k),
        )
        if tkeys:
            steps = sorted(
                {
                    render.num(r.get("step"))
                    for r in train
                    if render.num(r.get("step")) is not None and any(render.num(r.get(k)) is not None for k in tkeys)
                }
            )
            fig, axes = render.figure(1, 2, w=9.0, h=3.0, wspace=0.45)
            ax = axes[0][0]
            series = []
            for k in tkeys:
                xs, ys = render.series(train, k)
                d = dict(zip(xs, ys))
                series.append([d.get(s, 0.0) for s in steps])
            if steps:
                ax.stackplot(steps, *series, labels=[k.removeprefix("time/") for k in tkeys], alpha=0.85)
                top = max((sum(col) for col in zip(*series)), default=0.0)
                if top > 0:
                    ax.set_ylim(0, top * 1.4)
            render.style(ax, "Seconds per step by phase", ylabel="s")
            ax.legend(fontsize=8, ncol=min(4, len(tkeys)), loc="upper center")
            ax2 = axes[0][1]
            means = [render.mean(render.series(train, k)[1]) or 0.0 for k in tkeys]
            ax2.barh([k.removeprefix("time/") for k in tkeys][::-1], means[::-1], color="#4c72b0")
            render.style(ax2, "Mean seconds per step", xlabel="s")
            doc.h3("Timings per phase")
            doc.img("ppo_timings.png", render.png(fig), "PPO time per phase")
            total = sum(means)
            rows = [
                [
                    k.removeprefix("time/"),
                    m,
                    sum(render.series(train, k)[1]),
                    (f"{m / total:.1%}" if total > 0 else "—"),
                ]
                for k, m in zip(tkeys, means)
            ]
            tps = render.mean(render.series(train, "tokens_per_s")[1])
            doc.table(["phase", "mean s/step", "total s", "share"], rows)
            if tps is not None:
                doc.p(f"Mean generation throughput: {tps:.4g} tokens/s.")
    else:
        doc.note("ppo/metrics.jsonl not found: no training curves.")
    doc.h3("Before / after samples")
    if samples:
        _samples_table(doc, samples, max_samples)
    elif (run / "ppo" / "before_after.md").exists():
        doc.note("ppo/samples.jsonl not found; ppo/before_after.md follows.")
        doc.details(
            "ppo/before_after.md", (run / "ppo" / "before_after.md").read_text(encoding="utf-8", errors="replace")
        )
    else:
        doc.note("No samples (ppo/samples.jsonl not found).")


def section_dpo(doc: render.Doc, run: Path) -> None:
    path = run / "dpo" / "metrics.jsonl"
    if not path.exists():
        return  # DPO is an alternative to RM+PPO: no section, the overview says it is missing
    doc.h2("DPO", "dpo")
    notes: list[str] = []
    records = _read_records(path, notes)
    _notes(doc, notes)
    train, evals = _split(records)
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
        panels.append(("Eval accuracy", [(evals, "eval/accuracy", "eval")]))
    png = render.multi_plot(panels)
    doc.img("dpo_curves.png", png, "DPO loss and implicit rewards over steps")
    if not png:
        doc.note("dpo/metrics.jsonl has no plottable records.")
    if evals:
        last = evals[-1]
        doc.table(["final eval metric", "value"], [[k, last[k]] for k in last if k.startswith("eval/")], cls="kv")


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
    notes: list[str] = []
    metrics = _read_json(run / "eval" / "metrics.json", notes)
    samples = _read_records(run / "eval" / "samples.jsonl", notes)
    _notes(doc, notes)
    flagged = False
    if not isinstance(metrics, dict):
        doc.note("No evaluation (eval/metrics.json not found).")
    else:
        models = metrics.get("models") or {}
        if isinstance(models, dict) and models:
            cols = EVAL_COLUMNS + sorted(
                {k for m in models.values() if isinstance(m, dict) for k in m} - set(EVAL_COLUMNS)
            )
            cols = [c for c in cols if any(isinstance(m, dict) and c in m for m in models.values())]
            doc.table(
                ["model"] + cols,
                [[name] + [m.get(c) if isinstance(m, dict) else None for c in cols] for name, m in models.items()],
                cls="eval-models",
            )
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
        wins = metrics.get("win_rate") or {}
        if isinstance(wins, dict) and wins:
            doc.h3("Win rates")
            doc.table(
                ["comparison", "RM win rate", "judge win rate"],
                [
                    [k.replace("_vs_", " vs "), (v or {}).get("rm"), (v or {}).get("judge")]
                    for k, v in wins.items()
                    if isinstance(v, dict) or v is None
                ],
            )
        det = metrics.get("detectors") or {}
        if isinstance(det, dict) and det:
            doc.h3("Detectors")
            dcols = sorted(
                {k for d in det.values() if isinstance(d, dict) for k in d},
                key=lambda k: ((["repetition", "fence_spam", "length_drift"] + [k]).index(k), k),
            )
            rows = [
                [name] + [("⚠ flagged" if d.get(c) else ("ok" if c in d else "—")) for c in dcols]
                for name, d in det.items()
                if isinstance(d, dict)
            ]
            doc.table(["model"] + dcols, rows, cls="detectors")
            hits = [f"{name}: {c}" for name, d in det.items() if isinstance(d, dict) for c in dcols if d.get(c)]
            if hits:
                doc.warn("Detector flags: " + "; ".join(hits))
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
    return flagged


def section_environment(doc: render.Doc, run: Path) -> None:
    doc.h2("Environment and configs", "env")
    doc.p("Software of the machine that wrote this report (the run may have trained elsewhere).")
    doc.table(["component", "version"], render.environment(), cls="kv")
    doc.h3("Stage configs")
    found = False
    for stage in STAGE_DIRS:
        path = run / stage / "config.yaml"
        if path.exists():
            found = True
            doc.details(f"{stage}/config.yaml", path.read_text(encoding="utf-8", errors="replace"))
    if not found:
        doc.note("No config.yaml found in any stage folder.")


# --------------------------------------------------------------------------- entry points
def check_run_dir(run_dir: str | os.PathLike) -> Path:
    run = Path(run_dir).expanduser()
    if not run.exists():
        raise ReportError(f"run directory {run} does not exist")
    if not run.is_dir():
        raise ReportError(f"{run} is not a directory")
    if not any((run / s).is_dir() for s in STAGE_DIRS):
        raise ReportError(f"{run} is not a run directory: none of {', '.join(s + '/' for s in STAGE_DIRS)} is in it")
    return run


def build(run_dir: str | os.PathLike, *, max_samples: int = 50) -> tuple[render.Doc, list[str]]:
    """The report's content (no files written). Returns (doc, top-of-page warnings)."""
    run = check_run_dir(run_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ReportError(
            "matplotlib is needed for the plots: pip install 'rlhfkit[report]' (or pip install matplotlib)"
        ) from exc
    doc = render.Doc()
    section_overview(doc, run)
    section_data(doc, run)
    section_sft(doc, run)
    section_rm(doc, run)
    section_ppo(doc, run, max_samples)
    section_dpo(doc, run)
    flagged = section_eval(doc, run, max_samples)
    section_environment(doc, run)
    top = ["Over-optimisation suspected: see the Evaluation section."] if flagged else []
    return doc, top


def write_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    max_samples: int = 50,
    title: str | None = None,
) -> dict[str, Any]:
    """Write report.html, report.md and report_files/*.png; returns their paths and the image count."""
    run = check_run_dir(run_dir)
    out = Path(out_dir).expanduser() if out_dir else run
    doc, top = build(run, max_samples=max_samples)
    title = title or f"rlhfkit report — {run.resolve().name}"
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    files = out / render.FILES_DIR
    names = set()
    for b in doc.images:  # PNGs first, so report.md never points at a file not yet there
        atomic_write_bytes(files / b.name, b.png)
        names.add(b.name)
    if files.is_dir():  # drop plots of an earlier report that this one no longer has
        for stale in files.glob("*.png"):
            if stale.name not in names:
                with contextlib.suppress(OSError):
                    stale.unlink()
    shown_run = run.resolve()
    atomic_write_bytes(out / "report.md", render.render_md(doc, title, shown_run, generated, top).encode("utf-8"))
    atomic_write_bytes(out / "report.html", render.render_html(doc, title, shown_run, generated, top).encode("utf-8"))
    return {
        "html": str(out / "report.html"),
        "md": str(out / "report.md"),
        "images": len(names),
        "over_optimisation": bool(top),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write RUN_DIR/report.html (self-contained) and RUN_DIR/report.md (+ report_files/) "
        "from whatever the stages left in RUN_DIR.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (with data/, sft/, rm/, ppo/, dpo/, eval/)")
    parser.add_argument("--out", metavar="DIR", default=None, help="write the report here instead of RUN_DIR")
    parser.add_argument("--max-samples", type=int, default=50, metavar="N", help="rows per samples table (default 50)")
    parser.add_argument("--title", default=None, help="page title")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # usage errors exit 2, --help 0
        return exc.code if isinstance(exc.code, int) else 2
    if args.max_samples < 1:
        print(f"{PROG}: error: --max-samples must be ≥ 1", file=sys.stderr)
        return 2
    try:
        result = write_report(args.run_dir, args.out, max_samples=args.max_samples, title=args.title)
    except ReportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result['html']} and {result['md']} ({result['images']} plots)")
    if result["over_optimisation"]:
        print("warning: over-optimisation suspected (see the Evaluation section)", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
