"""`rlhfkit report RUN_DIR`: one page that shows what a run did.

Reads whatever the stages left in RUN_DIR (every file is optional; a missing one is named, a torn
last line of a metrics file that is still being written is skipped) and writes

    RUN_DIR/report.html   self-contained: inline render.CSS, every plot a base64 PNG, no external URL
    RUN_DIR/report.md     the same content; plots beside it in RUN_DIR/report_files/*.png

The page opens with a headline (runtime.rundir.headline: what was trained from what, the main
figures before → after, each linked to its section, the detectors and a verdict by fixed rules).
Sections follow (report_stages.py, report_ppo.py): data stats, SFT loss/perplexity, reward-model
accuracy/margins/length bins, RL score/KL/β, reward-vs-KL, timings, before/after samples, DPO,
evaluation (per-model table, win rates, detectors, over-optimisation), environment and configs.

Plots use matplotlib's Agg canvas on private Figure objects (no pyplot state). Every file is
written to a temp name and renamed, so a reader never sees a half-written report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Any

from rlhfkit.apps import report_render as render
from rlhfkit.apps.report_ppo import section_ppo
from rlhfkit.apps.report_stages import section_data, section_dpo, section_eval, section_rm, section_sft
from rlhfkit.runtime import rundir
from rlhfkit.runtime.errors import RlhfkitError
from rlhfkit.runtime.io import atomic_write_bytes

STAGE_DIRS = rundir.STAGE_DIRS
PROG = "rlhfkit report"


class ReportError(RlhfkitError):
    """A run directory that cannot be reported on (missing, not a directory, not a run)."""


def section_headline(doc: render.Doc, run: Path) -> rundir.Headline:
    """The first screen: what was trained from what, the main figures, detectors, verdict."""
    h = rundir.headline(run)
    doc.h2("At a glance", "headline")
    doc.p(f"Trained: {h.trained}.")
    doc.verdict(h.verdict.label, h.verdict.reason)
    if h.figures:
        doc.figures(h.figures)
    else:
        doc.note("No before → after figures: no stage metrics found.")
    if h.detectors_checked:
        if h.flagged:
            doc.warn("Detectors flagged the trained model: " + ", ".join(h.flagged) + " (see Detectors).")
        else:
            doc.ok("No reward-hacking detector flagged the trained model (repetition, code-fence spam, length drift).")
    return h


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
    section_headline(doc, run)
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
