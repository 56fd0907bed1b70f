"""Report rendering: the document model, number formatting, plot helpers (matplotlib Agg on
private Figure objects), environment facts, and the HTML / Markdown writers used by report.py."""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.runtime.rundir import Figure, num, series  # shared with the model card; sections use render.num

MAX_CELL_CHARS = 1500
FILES_DIR = "report_files"


def has(records: list[dict], key: str) -> bool:
    return any(num(r.get(key)) is not None for r in records)


def last(records: list[dict], key: str) -> float | None:
    _, ys = series(records, key)
    return ys[-1] if ys else None


def mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


# --------------------------------------------------------------------------- formatting
def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == int(v) and abs(v) < 1e6:
            return str(int(v)) if abs(v) >= 1 or v == 0 else f"{v:.4g}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        s = ", ".join(fmt(x) for x in v)
        return s if len(s) <= 120 else s[:117] + "…"
    if isinstance(v, dict):
        s = json.dumps(v, default=str)
        return s if len(s) <= 120 else s[:117] + "…"
    return str(v)


def fig_value(v: float | None, percent: bool) -> str:
    if v is None:
        return "—"
    return f"{v:.1%}" if percent else fmt(v)


def fig_change(f: Figure) -> str:
    if f.before is None or f.after is None:
        return ""
    d = f.after - f.before
    return f"{d * 100:+.1f} pts" if f.percent else f"{d:+.4g}"


def fig_note(f: Figure) -> str:
    parts = []
    if f.baseline is not None:
        parts.append(f"baseline {f.baseline_label}: {fig_value(f.baseline, f.percent)}")
    if f.note:
        parts.append(f.note)
    return "; ".join(parts)


def clip(s: Any, n: int = MAX_CELL_CHARS) -> str:
    s = "" if s is None else str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


# --------------------------------------------------------------------------- document model
@dataclass
class Block:
    kind: str  # h2 h3 p table img warn ok note details
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    cls: str = ""
    anchor: str = ""
    name: str = ""  # image file name
    png: bytes = b""
    figures: list[Figure] = field(default_factory=list)


class Doc:
    def __init__(self) -> None:
        self.blocks: list[Block] = []

    def h2(self, text: str, anchor: str) -> None:
        self.blocks.append(Block("h2", text, anchor=anchor))

    def h3(self, text: str, anchor: str = "") -> None:
        self.blocks.append(Block("h3", text, anchor=anchor))

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def note(self, text: str) -> None:
        """Something missing or skipped: shown muted."""
        self.blocks.append(Block("note", text))

    def warn(self, text: str) -> None:
        self.blocks.append(Block("warn", text))

    def ok(self, text: str) -> None:
        self.blocks.append(Block("ok", text))

    def table(self, headers: list[str], rows: list[list[Any]], cls: str = "", anchor: str = "") -> None:
        self.blocks.append(
            Block(
                "table",
                headers=list(headers),
                rows=[[c if isinstance(c, str) else fmt(c) for c in r] for r in rows],
                cls=cls,
                anchor=anchor,
            )
        )

    def img(self, name: str, png: bytes | None, alt: str) -> None:
        if png:
            self.blocks.append(Block("img", alt, name=name, png=png))

    def figures(self, figures: list[Figure]) -> None:
        """The headline table: label (linked to its section), before, after, change, baseline / note."""
        self.blocks.append(Block("figures", figures=list(figures), anchor="headline-figures"))

    def verdict(self, label: str, reason: str) -> None:
        self.blocks.append(Block("verdict", reason, name=label, anchor="verdict"))

    def details(self, summary: str, text: str) -> None:
        self.blocks.append(Block("details", text, name=summary))

    @property
    def images(self) -> list[Block]:
        return [b for b in self.blocks if b.kind == "img"]


# --------------------------------------------------------------------------- plots
def figure(
    nrows: int = 1,
    ncols: int = 1,
    w: float = 7.5,
    h: float = 3.2,
    wspace: float = 0.3,
    left: float = 0.7,
    right: float = 0.2,
):
    """A Figure on an Agg canvas. Margins are fixed (in inches) rather than computed by a layout
    engine: constrained layout doubles the cost of a report, and these plots have short labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    gap = 0.8  # inches between rows: the x label of one and the title of the next
    axes_h = max(0.5, (h - 0.85 - gap * (nrows - 1)) / nrows)
    fig.subplots_adjust(
        left=left / w, right=1 - right / w, bottom=0.5 / h, top=1 - 0.35 / h, wspace=wspace, hspace=gap / axes_h
    )
    return fig, axes


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def style(ax, title: str, xlabel: str = "step", ylabel: str | None = None) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(fontsize=8)


def line(ax, records: list[dict], key: str, label: str | None = None, **kw) -> bool:
    xs, ys = series(records, key)
    if not xs:
        return False
    ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label or key, **kw)
    return True


def multi_plot(
    panels: list[tuple[str, list[tuple[list[dict], str, str]]]], ncols: int = 2, h: float = 2.8
) -> bytes | None:
    """One subplot per (title, [(records, key, label)...]) panel that has data."""
    panels = [(t, [s for s in curves if has(s[0], s[1])]) for t, curves in panels]
    panels = [(t, s) for t, s in panels if s]
    if not panels:
        return None
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = figure(nrows, ncols, w=3.9 * ncols if ncols > 1 else 7.5, h=h * nrows)
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_visible(False)
            continue
        title, curves = panels[i]
        values = []
        for records, key, label in curves:
            line(ax, records, key, label=label)
            values += series(records, key)[1]
        if values and min(values) > 0 and max(values) / min(values) > 50:  # e.g. perplexity from 400 to 5
            ax.set_yscale("log")
        style(ax, title)
    return png(fig)


def plot_panels(
    doc: Doc, name: str, alt: str, panels: list[tuple[str, list[tuple[list[dict], str, str]]]], **kw
) -> bool:
    """multi_plot of the panels that have a curve of ≥ 2 points; a panel whose curves have one point
    each (e.g. a single final eval) becomes numbers in a table instead of a lone dot. Returns whether
    a plot was drawn."""
    curves_of = [(t, [c for c in curves if has(c[0], c[1])]) for t, curves in panels]
    plotted = [(t, c) for t, c in curves_of if any(len(series(r, k)[0]) >= 2 for r, k, _ in c)]
    singles = [
        [f"{t}: {lab}", series(r, k)[1][-1]] for t, c in curves_of if c and (t, c) not in plotted for r, k, lab in c
    ]
    png = multi_plot(plotted, **kw) if plotted else None
    doc.img(name, png, alt)
    if singles:
        doc.table(["value (one point: no plot)", "value"], singles, cls="kv")
    return png is not None


def version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def gpu_name() -> str:
    """GPU(s) of this machine, without importing torch when a cheaper probe answers (torch's import
    is most of a report's time): torch if already imported, the NVIDIA driver's /proc entries,
    nvidia-smi, then torch."""

    def from_torch() -> str | None:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "Apple MPS"
        return None

    with contextlib.suppress(Exception):
        if "torch" in sys.modules:
            return from_torch() or "none"
    with contextlib.suppress(OSError):
        infos = sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))
        names = [m.group(1).strip() for f in infos for m in [re.search(r"^Model:\s*(.+)$", f.read_text(), re.M)] if m]
        if names:
            return ", ".join(names)
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(Exception):
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            names = [line.strip() for line in out.splitlines() if line.strip()]
            if names:
                return ", ".join(names)
    if platform.system() == "Linux" and not Path("/dev/kfd").exists():
        return "none"  # no NVIDIA driver, no ROCm device: nothing torch could find
    with contextlib.suppress(Exception):
        return from_torch() or "none"
    return "none"


def environment() -> list[list[str]]:
    gpu = gpu_name()
    from rlhfkit import __version__

    return [
        ["python", platform.python_version()],
        ["rlhfkit", __version__],
        ["torch", version("torch")],
        ["transformers", version("transformers")],
        ["peft", version("peft")],
        ["accelerate", version("accelerate")],
        ["matplotlib", version("matplotlib")],
        ["platform", platform.platform()],
        ["CPU count", str(os.cpu_count())],
        ["GPU", gpu],
    ]


# --------------------------------------------------------------------------- rendering
CSS = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2329;
 background:#f6f7f9;margin:0}
main{max-width:1100px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;border-bottom:2px solid #e3e6ea;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:20px 0 6px}
nav{font-size:13px;margin:6px 0 12px}nav a{margin-right:12px;color:#2a5db0;text-decoration:none}
.meta{color:#5c6670;font-size:12px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px;max-width:100%}
th,td{border:1px solid #d9dde2;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4}td{white-space:pre-wrap;word-break:break-word}
table.samples td{max-width:320px}table.kv td:first-child{color:#3b4550}
img{max-width:100%;height:auto;display:block;margin:8px 0;border:1px solid #eceff2}
.note{color:#6a737d;font-style:italic;margin:6px 0}
.warn{background:#fff4e5;border:1px solid #f0a030;border-left:6px solid #e8590c;padding:8px 12px;margin:10px 0;
 font-weight:600;color:#7a2e00}
.note-box{background:#f3f4f6;border:1px solid #d9dde2;border-left:6px solid #8a939c;padding:8px 12px;margin:10px 0}
table.headline td:nth-child(2),table.headline td:nth-child(3),table.headline td:nth-child(4){text-align:right}
.ok{background:#ebf7ee;border:1px solid #9fd5ac;border-left:6px solid #2f9e44;padding:8px 12px;margin:10px 0}
details{margin:6px 0}summary{cursor:pointer;font-family:monospace}
pre{background:#f3f4f6;padding:8px 10px;overflow-x:auto;font-size:12px;border:1px solid #e3e6ea}
"""


def esc(s: str) -> str:
    return html.escape(s, quote=True)


def render_html(doc: Doc, title: str, run: Path, generated: str, warn_top: list[str]) -> str:
    toc = [b for b in doc.blocks if b.kind == "h2"]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">Run directory: <code>{esc(str(run))}</code> · generated {esc(generated)}</p>',
        "<nav>" + "".join(f'<a href="#{esc(b.anchor)}">{esc(b.text)}</a>' for b in toc) + "</nav>",
    ]
    for w in warn_top:
        out.append(f'<div class="warn" role="alert">{esc(w)}</div>')
    for b in doc.blocks:
        if b.kind == "h2":
            out.append(f'<h2 id="{esc(b.anchor)}">{esc(b.text)}</h2>')
        elif b.kind == "h3":
            out.append(f'<h3 id="{esc(b.anchor)}">{esc(b.text)}</h3>' if b.anchor else f"<h3>{esc(b.text)}</h3>")
        elif b.kind == "p":
            out.append(f"<p>{esc(b.text)}</p>")
        elif b.kind == "figures":
            out.append(figures_html(b))
        elif b.kind == "verdict":
            cls = "ok" if b.name == "improved" else "warn" if b.name in ("worse", "over-optimisation") else "note-box"
            verdict = f"Verdict: <strong>{esc(b.name)}</strong> — {esc(b.text)}"
            out.append(f'<div class="verdict {cls}" id="verdict">{verdict}</div>')
        elif b.kind == "note":
            out.append(f'<p class="note">{esc(b.text)}</p>')
        elif b.kind == "warn":
            out.append(f'<div class="warn" role="alert">⚠ {esc(b.text)}</div>')
        elif b.kind == "ok":
            out.append(f'<div class="ok">✓ {esc(b.text)}</div>')
        elif b.kind == "table":
            attrs = (f' class="{esc(b.cls)}"' if b.cls else "") + (f' id="{esc(b.anchor)}"' if b.anchor else "")
            head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            out.append(f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "img":
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f'<img src="data:image/png;base64,{data}" alt="{esc(b.text)}" title="{esc(b.text)}">')
        elif b.kind == "details":
            out.append(f"<details><summary>{esc(b.name)}</summary><pre>{esc(b.text)}</pre></details>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def figures_html(b: Block) -> str:
    """Each row carries data-key and each number its exact value (data-value), so the page can be
    checked against the metrics files it was read from."""
    head = "".join(f"<th>{h}</th>" for h in ("figure", "before", "after", "change", "baseline / note"))
    rows = []
    for f in b.figures:
        cells = [f'<td><a href="#{esc(f.anchor)}">{esc(f.label)}</a></td>']
        for v in (f.before, f.after):
            attr = f' data-value="{v!r}"' if v is not None else ""
            cells.append(f"<td{attr}>{esc(fig_value(v, f.percent))}</td>")
        cells.append(f"<td>{esc(fig_change(f))}</td>")
        base = f' data-baseline="{f.baseline!r}"' if f.baseline is not None else ""
        cells.append(f"<td{base}>{esc(fig_note(f))}</td>")
        rows.append(f'<tr data-key="{esc(f.key)}" data-source="{esc(f.source)}">' + "".join(cells) + "</tr>")
    body = "".join(rows)
    return f'<table class="headline" id="{esc(b.anchor)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def md_cell(s: str) -> str:
    """Table-cell text: HTML-escaped (markdown renders raw HTML), markdown punctuation and pipes
    backslash-escaped, newlines as <br>."""
    s = html.escape(s, quote=False)
    s = MD_SPECIAL.sub(r"\\\1", s)
    return s.replace("\r\n", "\n").replace("\n", "<br>")


def md_text(s: str) -> str:
    return MD_SPECIAL.sub(r"\\\1", html.escape(s, quote=False)).replace("\n", " ")


def md_slug(text: str) -> str:
    """The anchor GitHub-style renderers give a heading: lower case, punctuation dropped, spaces → '-'."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def render_md(doc: Doc, title: str, run: Path, generated: str, warn_top: list[str]) -> str:
    slugs = {b.anchor: md_slug(b.text) for b in doc.blocks if b.kind in ("h2", "h3") and b.anchor}
    out = [f"# {md_text(title)}", "", f"Run directory: `{run}` · generated {generated}", ""]
    for w in warn_top:
        out += [f"> **⚠ {md_text(w)}**", ""]
    for b in doc.blocks:
        if b.kind == "h2":
            out += [f"## {md_text(b.text)}", ""]
        elif b.kind == "h3":
            out += [f"### {md_text(b.text)}", ""]
        elif b.kind == "p":
            out += [md_text(b.text), ""]
        elif b.kind == "figures":
            out += ["| figure | before | after | change | baseline / note |", "|---|---|---|---|---|"]
            for f in b.figures:
                cells = [fig_value(f.before, f.percent), fig_value(f.after, f.percent), fig_change(f), fig_note(f)]
                link = f"[{md_cell(f.label)}](#{slugs.get(f.anchor, f.anchor)})"
                out.append(f"| {link} | " + " | ".join(md_cell(c) for c in cells) + " |")
            out.append("")
        elif b.kind == "verdict":
            out += [f"> **Verdict: {md_text(b.name)}** — {md_text(b.text)}", ""]
        elif b.kind == "note":
            out += [f"_{md_text(b.text)}_", ""]
        elif b.kind == "warn":
            out += [f"> **⚠ Warning:** {md_text(b.text)}", ""]
        elif b.kind == "ok":
            out += [f"> ✓ {md_text(b.text)}", ""]
        elif b.kind == "table":
            out.append("| " + " | ".join(md_cell(h) for h in b.headers) + " |")
            out.append("|" + "---|" * len(b.headers))
            out += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in b.rows]
            out.append("")
        elif b.kind == "img":
            out += [f"![{md_text(b.text)}]({FILES_DIR}/{b.name})", ""]
        elif b.kind == "details":
            ticks = "`" * max(3, max((len(m) for m in re.findall(r"`+", b.text)), default=0) + 1)
            out += [
                f"<details><summary>{html.escape(b.name)}</summary>",
                "",
                ticks,
                b.text.rstrip("\n"),
                ticks,
                "",
                "</details>",
                "",
            ]
    return "\n".join(out).rstrip("\n") + "\n"
