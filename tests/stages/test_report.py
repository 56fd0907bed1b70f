"""`rlhfkit report`: a synthetic run directory → report.html / report.md, checked as files and in Chromium."""

from __future__ import annotations

import base64
import html
import json
import math
import random
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rlhfkit.apps import report
from rlhfkit.runtime import rundir
from tests.browser import PNG_SIGNATURE, chromium, screenshot

# Prompts/responses with characters that must be escaped (and one that would run script if not).
PROMPTS = [
    "How do I grind <coffee> for a French press?",
    "Is 'tea & milk' better \"hot\" or cold?",
    "Why does my <script>alert('x')</script> dough not rise?",
    "How long to brew | cold brew?",
    "What is a good beer for *bread* baking?",
]
N_PPO_STEPS = 12


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


ALL_STAGES = ("data", "sft", "rm", "ppo", "eval")


def make_run_dir(root: Path, over_optimised: bool = True, seed: int = 0, stages: tuple[str, ...] = ALL_STAGES) -> Path:
    """Fabricate a plausible RUN_DIR as the stages would write it (no training involved); `stages`
    picks which stage folders exist."""
    rng = random.Random(seed)
    run = root / "run"
    run.mkdir(parents=True)
    if "data" in stages:
        _data(run)
    if "sft" in stages:
        _sft(run, rng)
    if "rm" in stages:
        _rm(run, rng)
    if "ppo" in stages:
        _ppo(run, rng)
    if "eval" in stages:
        _eval(run, over_optimised)
    return run


def _data(run: Path) -> None:
    (run / "data").mkdir(parents=True)
    (run / "data" / "stats.json").write_text(
        json.dumps(
            {
                "source": "stackexchange",
                "out_dir": str(run / "data"),
                "format": "datasets",
                "inputs": [{"site": "coffee", "questions": 120, "answers": 410, "seconds": 0.8}],
                "rows_by_post_type": {"question": 120, "answer": 410},
                "questions": 120,
                "answers": 410,
                "questions_by_split": {"sft": 40, "rm_train": 50, "rm_eval": 10, "rl_prompts": 20},
                "rows": {"sft": 40, "rm_train": 310, "rm_eval": 52, "rl_prompts": 20},
                "pairs": {"rm_train": 310, "rm_eval": 52, "candidates": 500, "candidates_capped": 362},
                "score_histogram": {str(s): max(1, int(200 * math.exp(-abs(s - 1)))) for s in range(-3, 12)},
                "skipped": {"no_answers": 14, "closed": 3},
                "filtered": {"rm_train": 7},
                "lengths_chars": {
                    "sft": {
                        "prompt": {"p50": 310, "p90": 900, "p99": 2100, "max": 4000, "mean": 402.5},
                        "response": {"p50": 520, "p90": 1500, "p99": 3900, "max": 9000, "mean": 701.0},
                    }
                },
                "partial": [],
                "seconds": 1.25,
                "mb_per_second": 3.2,
            }
        ),
        encoding="utf-8",
    )
    (run / "data" / "config.yaml").write_text("source: stackexchange\nseed: 0\n", encoding="utf-8")


def _sft(run: Path, rng: random.Random) -> None:
    recs = [{"step": 0, "eval/loss": 6.0, "eval/perplexity": math.exp(6.0), "eval/tokens": 4096}]
    for s in range(1, 41):
        loss = 6.0 * math.exp(-s / 15) + 1.0 + rng.uniform(-0.05, 0.05)
        recs.append(
            {
                "step": s,
                "loss": loss,
                "lr": 1e-3 * min(1, s / 5),
                "tokens": 512 * s,
                "tokens_per_s": 900 + rng.uniform(-50, 50),
                "epoch": s / 40,
                "grad_norm": 2.0 * math.exp(-s / 20),
            }
        )
        if s % 10 == 0:
            el = 6.0 * math.exp(-s / 15) + 1.2
            recs.append({"step": s, "eval/loss": el, "eval/perplexity": math.exp(el), "eval/tokens": 4096})
    _jsonl(run / "sft" / "metrics.jsonl", recs)
    (run / "sft" / "config.yaml").write_text(
        "model:\n  name: tiny\ntemplate:\n  template: 'Question: {prompt}\n\n    Answer: {response}'\n  "
        "chat_template: false\n"
        "train:\n  lr: 0.001  # <not html>\n",
        encoding="utf-8",
    )


def _rm(run: Path, rng: random.Random) -> None:
    recs = []
    for s in range(1, 31):
        acc = 0.5 + 0.4 * (1 - math.exp(-s / 10))
        recs.append(
            {
                "step": s,
                "loss": 0.69 * (1 - acc / 2),
                "accuracy": acc,
                "margin": 2 * (acc - 0.5),
                "lr": 1e-4,
                "pairs": 8 * s,
            }
        )
        if s % 10 == 0:
            recs.append(
                {
                    "step": s,
                    "eval/loss": 0.6,
                    "eval/accuracy": acc - 0.05,
                    "eval/ties": 0,
                    "eval/margin": 1.5 * (acc - 0.5),
                    "eval/reward_mean": 0.1,
                    "eval/reward_std": 1.2,
                    "eval/pairs": 52,
                }
            )
    _jsonl(run / "rm" / "metrics.jsonl", recs)
    (run / "rm" / "eval_margins.json").write_text(
        json.dumps([rng.gauss(0.6, 1.0) for _ in range(52)]), encoding="utf-8"
    )
    (run / "rm" / "config.yaml").write_text("model:\n  name: tiny\nlr: 0.0001\n", encoding="utf-8")


def _ppo(run: Path, rng: random.Random) -> None:
    recs, beta = [], 0.2
    for s in range(1, N_PPO_STEPS + 1):
        kl = 0.02 * s + rng.uniform(0, 0.01)
        beta *= 1 + 0.1 * (kl - 0.1)
        score = 0.1 * s + rng.uniform(-0.05, 0.05)
        recs.append(
            {
                "step": s,
                "score": score,
                "score_std": 0.3,
                "reward": score - beta * kl,
                "non_score_reward": -beta * kl,
                "kl": kl,
                "kl_coef": beta,
                "entropy": 2.0 - 0.05 * s,
                "approxkl": 0.01,
                "clipfrac": 0.1,
                "pg_loss": -0.02,
                "vf_loss": 0.3 / s,
                "explained_variance": 1 - 1 / s,
                "response_length": 30 + s,
                "time/generate": 1.5,
                "time/score": 0.2,
                "time/forward": 0.4,
                "time/update": 0.9,
                "tokens_per_s": 120.0,
            }
        )
        if s % 4 == 0:
            recs.append({"step": s, "eval/reward": score - 0.05, "eval/kl": kl, "eval/response_length": 31 + s})
    _jsonl(run / "ppo" / "metrics.jsonl", recs)
    samples = []
    for tag, step, bonus in (("before", 0, 0.0), ("during", 6, 0.4), ("after", N_PPO_STEPS, 1.0)):
        for i, q in enumerate(PROMPTS):
            samples.append(
                {
                    "step": step,
                    "tag": tag,
                    "prompt": q,
                    "reward": round(i * 0.1 + bonus, 3),
                    "response": f"[{tag}] answer {i}: use <b>{i + 1}</b> cups & stir\nsecond line",
                }
            )
    _jsonl(run / "ppo" / "samples.jsonl", samples)
    (run / "ppo" / "before_after.md").write_text("| prompt | before | reward | after | reward |\n", encoding="utf-8")
    (run / "ppo" / "config.yaml").write_text("batch_size: 8\nppo:\n  target_kl: 6.0\n", encoding="utf-8")


def _eval(run: Path, over_optimised: bool) -> None:
    rm_after, judge_after = (1.4, 0.35) if over_optimised else (1.4, 0.7)
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(
        json.dumps(
            {
                "models": {
                    "sft": {
                        "rm_score": 0.2,
                        "judge_score": 0.5,
                        "kl": None,
                        "response_length": 40.0,
                        "repetition_rate": 0.05,
                        "fence_rate": 0.0,
                        "length_drift": None,
                        "perplexity": 12.5,
                    },
                    "ppo": {
                        "rm_score": rm_after,
                        "judge_score": judge_after,
                        "kl": 0.25,
                        "response_length": 75.0,
                        "repetition_rate": 0.4,
                        "fence_rate": 0.3,
                        "length_drift": 0.9,
                        "perplexity": 18.0,
                    },
                },
                "win_rate": {"ppo_vs_sft": {"rm": 0.8, "judge": 0.35 if over_optimised else 0.65}},
                "detectors": {
                    "sft": {"repetition": False, "fence_spam": False, "length_drift": False},
                    "ppo": {"repetition": over_optimised, "fence_spam": False, "length_drift": over_optimised},
                },
                "over_optimisation": {
                    "rm_delta": rm_after - 0.2,
                    "judge_delta": judge_after - 0.5,
                    "flag": over_optimised,
                    "note": "RM score rose while the judge score fell" if over_optimised else "judge agrees",
                },
            }
        ),
        encoding="utf-8",
    )
    _jsonl(
        run / "eval" / "samples.jsonl",
        [
            {"model": m, "prompt": q, "response": f"{m} says <i>hi</i>", "rm_score": 0.5, "judge_score": None}
            for m in ("sft", "ppo")
            for q in PROMPTS[:2]
        ],
    )


class _Page(HTMLParser):
    """Collects <img> srcs, the rows of table#ppo-samples, warning boxes and external references."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.imgs: list[str] = []
        self.sample_rows: list[list[str]] = []
        self.warnings: list[str] = []
        self.external: list[str] = []
        self.scripts = 0
        self._in_samples = self._in_tbody = False
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._warn_depth = 0
        self._warn_text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            v = a.get(key) or ""
            if v.startswith(("http:", "https:", "//")):
                self.external.append(v)
        if tag == "script":
            self.scripts += 1
        if tag == "link":
            self.external.append(str(a))
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table" and a.get("id") == "ppo-samples":
            self._in_samples = True
        if self._in_samples and tag == "tbody":
            self._in_tbody = True
        if self._in_tbody and tag == "tr":
            self._row = []
        if self._row is not None and tag == "td":
            self._cell = []
        if tag == "div" and "warn" in (a.get("class") or "").split():
            self._warn_depth, self._warn_text = 1, []
        elif self._warn_depth and tag == "div":
            self._warn_depth += 1

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.sample_rows.append(self._row)
            self._row = None
        elif tag == "table" and self._in_samples:
            self._in_samples = self._in_tbody = False
        elif tag == "div" and self._warn_depth:
            self._warn_depth -= 1
            if not self._warn_depth:
                self.warnings.append("".join(self._warn_text))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._warn_depth:
            self._warn_text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> Path:
    run = make_run_dir(tmp_path_factory.mktemp("report"), over_optimised=True)
    assert report.main([str(run)]) == 0
    return run


def test_html_is_self_contained_with_valid_pngs(reported):
    page = _parse(reported / "report.html")
    assert len(page.imgs) >= 8  # data hist, sft ×2, rm ×2, ppo ×4, eval
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_SIGNATURE) and len(png) > 2000
        assert png[12:16] == b"IHDR"
    assert page.external == [] and page.scripts == 0
    text = (reported / "report.html").read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    for needle in (
        "SFT",
        "Reward model",
        "PPO",
        "Reward vs KL",
        "Evaluation",
        "Win rates",
        "Detectors",
        "torch",
        "transformers",
        "CPU count",
        "<details><summary>sft/config.yaml</summary>",
        "# &lt;not html&gt;",
    ):
        assert needle in text, needle


def test_samples_table_escaped(reported):
    page = _parse(reported / "report.html")
    assert len(page.sample_rows) == len(PROMPTS)
    assert all(len(r) == 6 for r in page.sample_rows)
    by_prompt = {r[0]: r for r in page.sample_rows}
    assert set(by_prompt) == set(PROMPTS)  # the parser unescapes: the page showed exactly these texts
    row = by_prompt[PROMPTS[2]]
    assert row[1].startswith("[before] answer 2: use <b>3</b> cups & stir") and row[3].startswith("[after] answer 2")
    assert row[2] == "0.2" and row[4] == "1.2" and row[5] == "+1"
    raw = (reported / "report.html").read_text(encoding="utf-8")
    assert "<script>" not in raw and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in raw
    assert html.escape("use <b>1</b> cups & stir") in raw


def test_over_optimisation_warning(reported, tmp_path):
    page = _parse(reported / "report.html")
    assert any("Over-optimisation suspected" in w for w in page.warnings), page.warnings
    assert any("RM score rose while the judge score fell" in w for w in page.warnings)
    assert "Over-optimisation suspected" in (reported / "report.md").read_text(encoding="utf-8")
    healthy = make_run_dir(tmp_path, over_optimised=False, stages=("eval",))
    assert report.main([str(healthy)]) == 0
    page = _parse(healthy / "report.html")
    assert not any("Over-optimisation" in w for w in page.warnings)
    assert "No over-optimisation flagged" in (healthy / "report.html").read_text(encoding="utf-8")
    # no verdict in the file: RM up while the judge is down is still flagged
    metrics = json.loads((healthy / "eval" / "metrics.json").read_text())
    metrics["over_optimisation"] = {"rm_delta": 0.9, "judge_delta": -0.1}
    (healthy / "eval" / "metrics.json").write_text(json.dumps(metrics))
    assert report.main([str(healthy)]) == 0
    assert any("Over-optimisation suspected" in w for w in _parse(healthy / "report.html").warnings)


def test_markdown_references_existing_pngs(reported):
    md = (reported / "report.md").read_text(encoding="utf-8")
    import re

    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) >= 8
    for ref in refs:
        assert ref.startswith("report_files/") and ref.endswith(".png")
        data = (reported / ref).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 2000
    assert "\\<script\\>" not in md and "&lt;script&gt;" in md  # samples are escaped in the markdown too
    assert "| How long to brew \\| cold brew? |" in md
    assert not list((reported / "report_files").glob(".*"))  # no temp files left behind


def test_partial_and_bad_run_dirs(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 1
    assert "rlhfkit report: error: run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 1
    assert "is not a run directory" in capsys.readouterr().err
    assert report.main([]) == 2
    assert report.main(["--bogus", str(tmp_path)]) == 2
    # only SFT metrics, the last line torn mid-write: the report still renders and names what is missing
    run = tmp_path / "partial"
    _jsonl(run / "sft" / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    with open(run / "sft" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')
    assert report.main([str(run)]) == 0
    text = (run / "report.html").read_text(encoding="utf-8")
    assert "skipped 1 malformed line" in text and "ppo/metrics.jsonl not found" in text
    assert "eval/metrics.json not found" in text
    assert len(_parse(run / "report.html").imgs) == 1


def test_cli_dispatch(tmp_path, capsys):
    from rlhfkit.cli import main as cli

    run = make_run_dir(tmp_path, stages=())
    _jsonl(
        run / "ppo" / "samples.jsonl",
        [
            {"step": 0, "tag": t, "prompt": q, "response": "r", "reward": 0.0}
            for t in ("before", "after")
            for q in PROMPTS
        ],
    )
    out = tmp_path / "elsewhere"
    assert cli(["report", str(run), "--max-samples", "2", "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert len(_parse(out / "report.html").sample_rows) == 2
    assert "Showing 2 of 5 prompts" in (out / "report.md").read_text(encoding="utf-8")
    assert not (run / "report.html").exists()
    assert cli(["report", "--help"]) == 0 and "RUN_DIR" in capsys.readouterr().out


def test_report_in_chromium(reported):
    with chromium(width=1200, height=900) as driver:
        driver.get((reported / "report.html").as_uri())
        state = driver.execute_script(
            "const imgs = Array.from(document.images);"
            "return {n: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,"
            " rows: document.querySelectorAll('#ppo-samples tbody tr').length,"
            " warn: Array.from(document.querySelectorAll('.warn')).map(d => d.innerText),"
            " external: performance.getEntriesByType('resource').map(e => e.name).filter(u => !u.startsWith('data:'))};"
        )
        assert state["n"] >= 8 and state["loaded"] == state["n"], state
        assert state["rows"] == len(PROMPTS)
        assert any("Over-optimisation suspected" in w for w in state["warn"])
        assert state["external"] == []
        cell = driver.execute_script("return document.querySelector('#ppo-samples tbody tr td').innerText")
        assert cell in PROMPTS
        shot = screenshot(driver, "report.png", full_page=True)
    assert shot.stat().st_size > 10_000


def test_feedback_run_lists_only_its_stages(tmp_path):
    """The embedded default runs feedback → rm → ppo → eval: the overview lists those stages alone,
    the data section shows the feedback stats, and there is no empty SFT section."""
    run = make_run_dir(tmp_path, stages=("rm", "ppo", "eval"))
    (run / "feedback").mkdir()
    (run / "feedback" / "stats.json").write_text(json.dumps({"pairs": 965, "rm_train": 818, "rater": "vader_positive"}))
    (run / "feedback" / "config.yaml").write_text("rater: vader_positive\n")
    doc, _ = report.build(run)
    overview = next(b for b in doc.blocks if b.kind == "table" and b.cls == "overview")
    assert [r[0] for r in overview.rows] == ["feedback", "rm", "ppo", "eval"]
    assert overview.rows[0][1] == "complete"
    titles = [b.text for b in doc.blocks if b.kind == "h2"]
    assert "Data (simulated feedback)" in titles and "SFT" not in titles and "Data" not in titles
    kv = next(b for b in doc.blocks if b.kind == "table" and b.cls == "kv")
    assert ["pairs", "965"] in kv.rows and ["rater", "vader_positive"] in kv.rows


# --------------------------------------------------------------------------- headline, verdict, baselines
def test_direction_band_is_two_standard_errors():
    # n = 64: 0.5 ± 1/8 = [0.375, 0.625] is flat
    assert rundir.direction(0.63, 64) == "up" and rundir.direction(0.62, 64) == "flat"
    assert rundir.direction(0.37, 64) == "down" and rundir.direction(0.375, 64) == "flat"
    assert rundir.direction(0.8, 8) == "flat"  # n = 8: the band is ± 0.354
    assert rundir.direction(None, 64) is None and rundir.direction(0.9, 0) is None


@pytest.mark.parametrize(
    "judge,rm,over,flagged,label",
    [
        ("up", "up", False, [], "improved"),
        ("flat", "up", False, [], "over-optimisation"),
        ("down", "up", False, [], "over-optimisation"),
        ("up", "flat", True, [], "over-optimisation"),  # eval's own flag wins
        ("flat", "flat", False, [], "flat"),
        ("down", "down", False, [], "worse"),
        (None, "up", None, [], "improved by the RM only"),
        (None, "flat", None, [], "flat"),
        ("up", "up", False, ["repetition"], "improved, but flagged"),
        (None, None, None, [], "not evaluated"),
    ],
)
def test_verdict_rules(judge, rm, over, flagged, label):
    v = rundir.verdict(judge, rm, over, flagged)
    assert v.label == label
    if label == "over-optimisation" and not over:
        assert v.reason.startswith(f"RM up but judge {judge}: over-optimisation")
    if flagged:
        assert "detectors flagged repetition" in v.reason


def _eval_run(tmp_path: Path, n: int, rm_win: float, judge_win: float | None, flag: bool = False) -> Path:
    run = make_run_dir(tmp_path, stages=("eval",))
    m = json.loads((run / "eval" / "metrics.json").read_text())
    m["prompts"] = n
    m["win_rate"]["ppo_vs_sft"] = {"rm": rm_win, "judge": judge_win}
    m["detectors"]["ppo"] = {"repetition": False, "fence_spam": False, "length_drift": False}
    m["over_optimisation"]["flag"] = flag
    (run / "eval" / "metrics.json").write_text(json.dumps(m))
    return run


@pytest.mark.parametrize(
    "rm_win,judge_win,label",
    [
        (0.9, 0.8, "improved"),
        (0.9, 0.52, "over-optimisation"),
        (0.55, 0.5, "flat"),
        (0.9, None, "improved by the RM only"),
    ],
)
def test_headline_verdict_on_crafted_metrics(tmp_path, rm_win, judge_win, label):
    run = _eval_run(tmp_path, 64, rm_win, judge_win)
    h = rundir.headline(run)
    assert h.verdict.label == label
    doc, _ = report.build(run)
    block = next(b for b in doc.blocks if b.kind == "verdict")
    assert block.name == label and doc.blocks.index(block) < [b.kind for b in doc.blocks].index("table")
    figs = {f.key: f for f in h.figures}
    assert figs["rm_win_rate"].after == rm_win and figs["rm_score"].before == 0.2 and figs["rm_score"].after == 1.4
    assert ("judge_win_rate" in figs) == (judge_win is not None)


def _rm_run(tmp_path: Path, last_eval: dict, bins: list[dict] | None = None) -> Path:
    run = tmp_path / "run"
    _jsonl(
        run / "rm" / "metrics.jsonl",
        [{"step": s, "loss": 0.6, "accuracy": 0.6, "margin": 0.1} for s in range(1, 6)] + [{"step": 5, **last_eval}],
    )
    if bins is not None:
        (run / "rm" / "eval_length_bins.json").write_text(json.dumps({"bins": bins}))
    return run


BASE_EVAL = {"eval/accuracy": 0.7, "eval/pairs": 200, "eval/reward_mean": 0.1, "eval/reward_std": 1.3}


def test_length_baseline_only_where_lengths_differ(tmp_path):
    # the old key alone, 8% chosen-longer (fixed-length samples): no baseline, and the reason
    run = _rm_run(tmp_path / "a", {**BASE_EVAL, "eval/longer_wins": 0.08})
    f = next(f for f in rundir.headline(run).figures if f.key == "rm_accuracy")
    assert f.baseline is None and "strictly longer in only 8% of pairs" in f.note
    doc, _ = report.build(run)
    kv = [r for b in doc.blocks if b.kind == "table" and b.cls == "kv" for r in b.rows]
    assert not any("longer answer wins" in r[0] for r in kv) and ["held-out accuracy", "0.7"] in kv
    # length-aware keys: 95% of pairs length-matched → no baseline; 40% → the baseline is shown
    matched = {**BASE_EVAL, "eval/longer_wins": 0.55, "eval/matched_pairs": 190, "eval/matched_accuracy": 0.66}
    f = next(f for f in rundir.headline(_rm_run(tmp_path / "b", matched)).figures if f.key == "rm_accuracy")
    assert f.baseline is None and "95% of pairs" in f.note
    spread = {**matched, "eval/matched_pairs": 80, "eval/length_controlled_accuracy": 0.61}
    figs = {f.key: f for f in rundir.headline(_rm_run(tmp_path / "c", spread)).figures}
    assert figs["rm_accuracy"].baseline == 0.55 and figs["rm_accuracy"].after == 0.7
    assert figs["matched_accuracy"].after == 0.66 and figs["length_controlled_accuracy"].after == 0.61


def test_length_bins_plot_and_one_point_numbers(tmp_path):
    bins = [
        {"lo": 1.0, "hi": 1.25, "pairs": 80, "accuracy": 0.66, "longer_wins": 0.5},
        {"lo": 1.25, "hi": 2.0, "pairs": 70, "accuracy": 0.71, "longer_wins": 0.6},
        {"lo": 2.0, "hi": None, "pairs": 50, "accuracy": 0.8, "longer_wins": 0.74},
        {"lo": 3.0, "hi": None, "pairs": 0, "accuracy": None, "longer_wins": None},
    ]
    run = _rm_run(tmp_path, {**BASE_EVAL, "eval/longer_wins": 0.55}, bins)
    doc, _ = report.build(run)
    names = [b.name for b in doc.images]
    assert "rm_length_bins.png" in names
    table = next(b for b in doc.blocks if b.kind == "table" and b.cls == "length-bins")
    assert table.rows == [
        ["1–1.25×", "80", "0.66", "0.5"],
        ["1.25–2×", "70", "0.71", "0.6"],
        ["2–∞×", "50", "0.8", "0.74"],
    ]
    # one eval record: its reward mean/std are numbers, not a one-dot plot
    single = [
        r for b in doc.blocks if b.kind == "table" and b.headers[0].startswith("value (one point") for r in b.rows
    ]
    assert ["Held-out reward mean ± std: mean", "0.1"] in single and [
        "Held-out reward mean ± std: std",
        "1.3",
    ] in single
    assert "rm_curves.png" in names  # the train curves still plot


def test_rl_estimator_is_shown(tmp_path):
    run = make_run_dir(tmp_path, stages=("ppo",))
    (run / "ppo" / "config.yaml").write_text("algo: grpo\nmodel:\n  name: SmolLM2-135M-Instruct\n")
    (run / "ppo" / "final").mkdir()
    (run / "ppo" / "final" / "config.yaml").write_text("algo: grpo\nreward: r\nmodel:\n  name: SmolLM2-135M-Instruct\n")
    h = rundir.headline(run)
    assert h.algo == "GRPO" and h.trained.startswith("SmolLM2-135M-Instruct → RL trained with GRPO")
    doc, _ = report.build(run)
    assert "RL (GRPO)" in [b.text for b in doc.blocks if b.kind == "h2"]
    # no eval: the RM direction comes from the before/after samples on the same prompts (5 of 5 better)
    assert rundir.paired_win_rate(rundir.read_records(run / "ppo" / "samples.jsonl")) == (1.0, 5)
    assert h.verdict.label == "improved by the RM only"
