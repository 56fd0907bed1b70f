"""The report's RL section: score/KL/β, reward vs KL, diagnostics, timings, before/after samples."""

from __future__ import annotations

from pathlib import Path

from rlhfkit.apps import report_render as render
from rlhfkit.apps.report_stages import notes
from rlhfkit.runtime import rundir


def samples_table(doc: render.Doc, samples: list[dict], max_rows: int) -> None:
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
    algo = rundir.algo_name(rundir.read_config(run / "ppo" / "config.yaml"))
    doc.h2("PPO" if algo == "PPO" else f"RL ({algo})", "ppo")
    if algo != "PPO":
        doc.p(f"Trained with {algo} (ppo/config.yaml: algo).")
    found: list[str] = []
    records = rundir.read_records(run / "ppo" / "metrics.jsonl", found)
    samples = rundir.read_records(run / "ppo" / "samples.jsonl", found)
    notes(doc, found)
    if not records and not samples and not (run / "ppo" / "before_after.md").exists():
        doc.note("No PPO outputs: ppo/metrics.jsonl not found, ppo/samples.jsonl not found.")
        return
    train, evals = rundir.split(records)
    if records:
        _summary(doc, train, evals)
        _score_kl(doc, train, evals)
        _reward_vs_kl(doc, train, evals)
        _diagnostics(doc, train, evals)
        _timings(doc, train, evals)
    else:
        doc.note("ppo/metrics.jsonl not found: no training curves.")
    doc.h3("Before / after samples")
    if samples:
        samples_table(doc, samples, max_samples)
    elif (run / "ppo" / "before_after.md").exists():
        doc.note("ppo/samples.jsonl not found; ppo/before_after.md follows.")
        doc.details(
            "ppo/before_after.md", (run / "ppo" / "before_after.md").read_text(encoding="utf-8", errors="replace")
        )
    else:
        doc.note("No samples (ppo/samples.jsonl not found).")


def _summary(doc: render.Doc, train: list[dict], evals: list[dict]) -> None:
    """Steps and the first → last value of the main series."""
    summary = [["steps", len(render.series(train, "score")[0]) or len(train)]]
    for k in ("score", "kl", "kl_coef", "response_length"):
        xs, ys = render.series(train, k)
        if ys:
            summary.append([f"{rundir.label(k)}, first → last", f"{render.fmt(ys[0])} → {render.fmt(ys[-1])}"])
    for k in ("eval/reward", "eval/kl", "eval/response_length"):
        xs, ys = render.series(evals, k)
        if ys:
            summary.append([f"{rundir.label(k)}, first → last", f"{render.fmt(ys[0])} → {render.fmt(ys[-1])}"])
    doc.table(["metric", "value"], summary, cls="kv")


def _score_kl(doc: render.Doc, train: list[dict], evals: list[dict]) -> None:
    """Score with its ± std band, eval reward, KL, β."""
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


def _reward_vs_kl(doc: render.Doc, train: list[dict], evals: list[dict]) -> None:
    """Score against KL, coloured by step: the frontier RL trades along."""
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


def _diagnostics(doc: render.Doc, train: list[dict], evals: list[dict]) -> None:
    """Entropy, approx. KL, clip fraction, losses, explained variance, length, −β·KL."""
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
                [(train, k, "train")] + ([(evals, "eval/response_length", "eval")] if k == "response_length" else []),
            )
            for k, title in diag
        ],
        ncols=4,
        h=2.3,
    )
    if png:
        doc.h3("Diagnostics")
    doc.img("ppo_diagnostics.png", png, "PPO diagnostics over steps")


def _timings(doc: render.Doc, train: list[dict], evals: list[dict]) -> None:
    """Seconds per step by phase (stacked) and their means."""
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
