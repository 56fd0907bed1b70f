"""What a run directory says, read tolerantly: metrics files, saved configs, the chain of stages
and inputs that made a model, and the headline figures (before → after) with a plain-language
verdict by fixed rules. The report (apps/report.py) and the model card (runtime/card.py) both read
it, so the page and the card state the same numbers. Pure file reading: no plotting, no models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.runtime.io import OWNER_FILE, atomic_write_text, read_jsonl

STAGE_DIRS = ("data", "feedback", "sft", "rm", "ppo", "dpo", "eval")
ALGO_NAMES = {"ppo": "PPO", "rloo": "RLOO", "grpo": "GRPO", "reinforce_pp": "REINFORCE++"}

# Human names of the metric keys the stages write (the report's tables and the card use them).
LABELS = {
    "loss": "loss",
    "eval/loss": "held-out loss",
    "eval/perplexity": "held-out perplexity",
    "eval/tokens": "held-out tokens",
    "eval/accuracy": "held-out accuracy",
    "eval/ties": "held-out ties",
    "eval/margin": "mean margin r(chosen) − r(rejected)",
    "eval/reward_mean": "mean reward (held-out answers)",
    "eval/reward_std": "reward spread (std, held-out answers)",
    "eval/pairs": "held-out pairs",
    "eval/longer_wins": "“the longer answer wins” baseline",
    "eval/longer_wins_tokens": "“the longer answer wins” baseline (tokens)",
    "eval/matched_pairs": "length-matched pairs (longer ≤ 1.25 × shorter)",
    "eval/matched_accuracy": "accuracy on length-matched pairs",
    "eval/matched_longer_wins": "“longer wins” on length-matched pairs",
    "eval/length_agreement": "how often the RM prefers the longer answer",
    "eval/length_controlled_accuracy": "length-controlled accuracy",
    "eval/length_slope": "margin per log length ratio",
    "eval/margin_length_corr": "margin–length correlation",
    "eval/reward": "held-out reward",
    "eval/kl": "held-out KL to the reference",
    "eval/response_length": "held-out response length (tokens)",
    "eval/rewards/chosen": "implicit reward, chosen",
    "eval/rewards/rejected": "implicit reward, rejected",
    "eval/rewards/margins": "implicit reward margin",
    "eval/rewards/accuracies": "implicit reward accuracy",
    "score": "training score (batch mean)",
    "kl_coef": "β (KL coefficient)",
    "rm_score": "RM score",
    "judge_score": "gold-judge score",
    "kl": "KL to the reference",
    "response_length": "response length (tokens)",
    "repetition_rate": "repetition rate",
    "fence_rate": "code-fence rate",
    "length_drift": "length drift",
    "perplexity": "perplexity",
    "prompts_cut": "prompts cut",
    "prompts_dropped": "prompts dropped",
    "repetition": "repetition",
    "fence_spam": "code-fence spam",
}


def label(key: str) -> str:
    return LABELS.get(key, key)


# --------------------------------------------------------------------------- reading
def num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        v = float(v)
        return v if math.isfinite(v) else None
    return None


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the records that have it; a re-logged step keeps its last value."""
    by_step: dict[float, float] = {}
    for i, r in enumerate(records):
        y = num(r.get(key))
        if y is None:
            continue
        x = num(r.get("step"))
        by_step[x if x is not None else float(i)] = y
    xs = sorted(by_step)
    return xs, [by_step[x] for x in xs]


def _rel(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def read_json(path: Path, notes: list[str] | None = None) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if notes is not None:
            notes.append(f"{_rel(path)}: unreadable ({exc.__class__.__name__}: {exc})")
        return None


def read_records(path: Path, notes: list[str] | None = None) -> list[dict]:
    """JSONL records; bad lines (e.g. the torn last line of a running stage) are skipped and counted."""
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        if notes is not None:
            notes.append(f"{_rel(path)}: unreadable ({exc})")
        return []
    out, bad = [], 0
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
    if bad and notes is not None:
        notes.append(f"{_rel(path)}: skipped {bad} malformed line(s)")
    return out


def split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, eval) records: a record with both kinds of keys is in both."""
    evals = [r for r in records if any(str(k).startswith("eval/") for k in r)]
    train = [r for r in records if any(not str(k).startswith("eval/") and k not in ("step", "epoch") for k in r)]
    return train, evals


def read_config(path: Path) -> dict:
    """A saved config.yaml as a dict ({} when absent or unreadable: a card or report never fails on it)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def stage_of(stage_dir: Path, cfg: dict) -> str:
    """Which stage wrote `stage_dir`: its owner file, else the shape of its config."""
    owner = read_json(Path(stage_dir) / OWNER_FILE)
    if isinstance(owner, dict) and isinstance(owner.get("owner"), str):
        return owner["owner"]
    if "reward" in cfg:
        return "ppo"
    if "beta" in cfg or "loss_type" in cfg:
        return "dpo"
    if "center_coef" in cfg or "margin" in cfg:
        return "rm"
    if "adapter" in cfg:
        return "merge"
    return "sft" if "data" in cfg else "model"


def algo_name(cfg: dict) -> str:
    """The RL estimator of a PPO-stage config (`algo`; absent = ppo), as the literature spells it."""
    algo = cfg.get("algo") or "ppo"
    return ALGO_NAMES.get(str(algo), str(algo))


# --------------------------------------------------------------------------- lineage
@dataclass
class Step:
    stage: str
    """Stage that wrote this model (sft, rm, ppo, dpo, merge)."""
    folder: Path
    """Its final/ (or merged) folder."""
    start: str
    """The model it started from (model.name, or the merged adapter)."""
    inputs: list[str] = field(default_factory=list)
    """What it trained on: data/prompt paths with their split, the reward it maximised."""
    config: dict = field(default_factory=dict)


def _inputs(stage: str, cfg: dict) -> list[str]:
    def at(path_key: str, split_key: str, default_split: str) -> str | None:
        path = get(cfg, path_key)
        if not path:
            return None
        return f"{path} (split {get(cfg, split_key) or default_split})"

    if stage == "ppo":
        got = [
            at("prompts.path", "prompts.split", "rl_prompts"),
            f"reward: {cfg['reward']}" if cfg.get("reward") else None,
        ]
    elif stage in ("sft", "rm", "dpo"):
        got = [at("data.path", "data.split", {"sft": "sft", "rm": "rm_train", "dpo": "rm_train"}[stage])]
    else:
        got = []
    return [g for g in got if g]


def folder_config(folder: Path) -> dict:
    folder = Path(folder)
    for name in ("config.yaml", "merge_config.yaml"):
        if (folder / name).exists():
            return read_config(folder / name)
    return {}


def lineage(folder: Path, limit: int = 12) -> tuple[list[Step], str]:
    """(steps newest first, base) of an rlhfkit model folder, following each saved config's
    model.name (or a merge's adapter) back to a model rlhfkit did not write."""
    steps: list[Step] = []
    here = Path(folder)
    for _ in range(limit):
        cfg = folder_config(here)
        if not cfg:
            break
        stage = stage_of(here.parent, cfg) if here.name == "final" else stage_of(here, cfg)
        start = cfg.get("adapter") if stage == "merge" else get(cfg, "model.name")
        if not isinstance(start, str) or not start:
            break
        steps.append(Step(stage, here, start, _inputs(stage, cfg), cfg))
        nxt = Path(start)
        if not (nxt.is_dir() and folder_config(nxt)):
            return steps, start
        here = nxt
    return steps, (steps[-1].start if steps else "")


# --------------------------------------------------------------------------- figures
@dataclass
class Figure:
    key: str
    """Stable id (tests and the card read it)."""
    label: str
    before: float | None
    after: float | None
    anchor: str
    """Report section it links to."""
    source: str
    """The file it was read from, relative to the run directory."""
    percent: bool = False
    baseline: float | None = None
    baseline_label: str = ""
    note: str = ""


def _fig(key, label_, before, after, anchor, source, **kw) -> Figure | None:
    before, after = num(before), num(after)
    if before is None and after is None:
        return None
    return Figure(key, label_, before, after, anchor, source, **kw)


def length_baseline(last: dict) -> tuple[float | None, str]:
    """The "longer answer wins" figure and why it is (not) shown. It means something only when pairs
    differ in length: with the length-aware keys, when ≥ 10% of pairs are not length-matched; with the
    old key alone, when the chosen answer is strictly longer in ≥ 25% of pairs (else most pairs tie on
    length, as with fixed-length samples, and the rule scores near 0 by construction)."""
    lw = num(last.get("eval/longer_wins"))
    if lw is None:
        return None, ""
    pairs, matched = num(last.get("eval/pairs")), num(last.get("eval/matched_pairs"))
    if pairs and matched is not None:
        if matched / pairs > 0.9:
            return None, f"{matched / pairs:.0%} of pairs have about the same length: no length baseline applies"
        return lw, ""
    if lw < 0.25:
        return None, f"the chosen answer is strictly longer in only {lw:.0%} of pairs, so the rule is no baseline here"
    return lw, ""


def sft_figures(stage_dir: Path) -> list[Figure]:
    _, evals = split(read_records(Path(stage_dir) / "metrics.jsonl"))
    xs, ppl = series(evals, "eval/perplexity")
    if not ppl:
        return []
    before = ppl[0] if xs[0] == 0 and len(ppl) > 1 else None
    f = _fig("sft_perplexity", "SFT held-out perplexity", before, ppl[-1], "sft", "sft/metrics.jsonl")
    return [f] if f else []


def rm_figures(stage_dir: Path) -> list[Figure]:
    _, evals = split(read_records(Path(stage_dir) / "metrics.jsonl"))
    if not evals:
        return []
    last = evals[-1]
    out = []
    base, why = length_baseline(last)
    f = _fig(
        "rm_accuracy",
        "RM held-out accuracy",
        None,
        last.get("eval/accuracy"),
        "rm",
        "rm/metrics.jsonl",
        percent=True,
        baseline=base,
        baseline_label="“the longer answer wins”" if base is not None else "",
        note=why,
    )
    out.append(f)
    for key, name in (
        ("eval/matched_accuracy", "RM accuracy on length-matched pairs"),
        ("eval/length_controlled_accuracy", "RM length-controlled accuracy"),
    ):
        out.append(_fig(key.removeprefix("eval/"), name, None, last.get(key), "rm", "rm/metrics.jsonl", percent=True))
    return [f for f in out if f]


def rl_figures(stage_dir: Path) -> list[Figure]:
    records = read_records(Path(stage_dir) / "metrics.jsonl")
    train, evals = split(records)
    src, out = f"{Path(stage_dir).name}/metrics.jsonl", []
    for key, name in (("eval/reward", "RL held-out reward"), ("eval/response_length", "RL held-out response length")):
        _, ys = series(evals, key)
        if ys:
            out.append(_fig(key.replace("eval/", "rl_"), name, ys[0] if len(ys) > 1 else None, ys[-1], "ppo", src))
    _, kl = series(evals, "eval/kl")
    if kl:
        out.append(_fig("rl_kl", "RL held-out KL to the reference", kl[0] if len(kl) > 1 else None, kl[-1], "ppo", src))
    _, score = series(train, "score")
    if score:
        out.append(_fig("rl_score", "RL training score (first → last step)", score[0], score[-1], "ppo", src))
    return [f for f in out if f]


def dpo_figures(stage_dir: Path) -> list[Figure]:
    _, evals = split(read_records(Path(stage_dir) / "metrics.jsonl"))
    out = []
    for key, name, pct in (
        ("eval/rewards/accuracies", "DPO held-out reward accuracy", True),
        ("eval/rewards/margins", "DPO held-out reward margin", False),
        ("eval/loss", "DPO held-out loss", False),
    ):
        xs, ys = series(evals, key)
        if ys:
            first = ys[0] if len(ys) > 1 and xs[0] == 0 else None
            out.append(
                _fig(
                    key.replace("eval/", "dpo_").replace("/", "_"),
                    name,
                    first,
                    ys[-1],
                    "dpo",
                    "dpo/metrics.jsonl",
                    percent=pct,
                )
            )
    return [f for f in out if f]


@dataclass
class Comparison:
    """The eval stage's before → after: its first model (`base`) against `model` (default: its last)."""

    base: str
    model: str
    n: int
    before: dict
    after: dict
    win: dict
    detectors: dict
    over: dict | None


def comparison(run: Path, model: str | None = None) -> Comparison | None:
    metrics = read_json(Path(run) / "eval" / "metrics.json")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("models"), dict) or len(metrics["models"]) < 2:
        return None
    names = list(metrics["models"])
    base, name = names[0], model or names[-1]
    if name not in metrics["models"] or name == base:
        return None
    m = metrics["models"]
    win = (metrics.get("win_rate") or {}).get(f"{name}_vs_{base}") or {}
    det = (metrics.get("detectors") or {}).get(name) or {}
    over = metrics.get("over_optimisation") if name == names[-1] else None
    n = int(num(metrics.get("prompts")) or 0)
    return Comparison(base, name, n, m[base] or {}, m[name] or {}, win, det, over if isinstance(over, dict) else None)


def eval_figures(c: Comparison) -> list[Figure]:
    src, out = "eval/metrics.json", []
    for key, name in (("judge_score", "Gold-judge score"), ("rm_score", "RM score")):
        out.append(_fig(key, name, c.before.get(key), c.after.get(key), "eval", src))
    for key, name in (("judge", "Judge win-rate"), ("rm", "RM win-rate")):
        win = c.win.get(key)
        out.append(_fig(f"{key}_win_rate", f"{name} over {c.base}", None, win, "eval-win-rates", src, percent=True))
    out.append(_fig("kl", "KL to the reference", c.before.get("kl"), c.after.get("kl"), "eval", src))
    lb, la = num(c.before.get("response_length")), num(c.after.get("response_length"))
    note = "every sample has this length (fixed-length sampling)" if lb is not None and lb == la else ""
    out.append(_fig("response_length", "Response length (tokens)", lb, la, "eval", src, note=note))
    return [f for f in out if f]


# --------------------------------------------------------------------------- verdict
def direction(win: float | None, n: int) -> str | None:
    """'up' / 'down' / 'flat' from a win-rate over n prompts: outside 0.5 ± 1/√n (two standard errors of
    a fair coin's win-rate) it moved, inside it is flat; None without a win-rate."""
    if win is None or n <= 0:
        return None
    band = 1.0 / math.sqrt(n)
    return "up" if win > 0.5 + band else "down" if win < 0.5 - band else "flat"


def paired_win_rate(samples: list[dict]) -> tuple[float | None, int]:
    """Win-rate of the 'after' samples over the 'before' ones on the same prompts (ties half)."""
    before = {s.get("prompt"): num(s.get("reward")) for s in samples if s.get("tag") == "before"}
    pairs = [(num(s.get("reward")), before.get(s.get("prompt"))) for s in samples if s.get("tag") == "after"]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None, 0
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs), len(pairs)


def before_after_table(samples_path: Path, out: Path) -> dict:
    """Seed-003-style table (RL stage): the same eval prompts before and after training, with rewards,
    written to `out` (markdown); returns the two mean rewards ({} without paired samples)."""
    rows = read_jsonl(samples_path)
    before = {r["prompt"]: r for r in rows if r["tag"] == "before"}
    after = {r["prompt"]: r for r in rows if r["tag"] == "after" and r["prompt"] in before}
    if not after:
        return {}
    lines = ["| prompt | before | reward | after | reward |", "|---|---|---|---|---|"]
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:200]  # noqa: E731
    for q, a in after.items():
        b = before[q]
        lines.append(
            f"| {cell(q)} | {cell(b['response'])} | {b['reward']:.3f} | {cell(a['response'])} | {a['reward']:.3f} |"
        )
    mb = sum(before[q]["reward"] for q in after) / len(after)
    ma = sum(a["reward"] for a in after.values()) / len(after)
    lines += ["", f"mean reward: before {mb:.4f} → after {ma:.4f} on {len(after)} held-out prompts"]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return {"eval_reward_before": mb, "eval_reward_after": ma}


@dataclass
class Verdict:
    label: str
    """improved | flat | worse | over-optimisation | improved by the RM only | not evaluated (+ ', but flagged')."""
    reason: str


def verdict(
    judge: str | None,
    rm: str | None,
    over_flag: bool | None = None,
    flagged: list[str] | None = None,
    ppl: str | None = None,
) -> Verdict:
    """The plain-language verdict, by these rules in order (directions from `direction`):
    1. eval's over-optimisation flag, or RM up while the judge is flat or down → over-optimisation;
    2. judge up → improved; judge down → worse; judge flat → flat;
    3. no judge: RM up → improved by the RM only (unconfirmed); RM flat → flat; RM down → worse;
    4. no RL/DPO comparison: SFT perplexity down → improved, up → worse; else not evaluated.
    A detector flag on the trained model adds ', but flagged' to a verdict that would be good."""
    flagged = flagged or []
    if over_flag or (rm == "up" and judge in ("flat", "down")):
        v = Verdict(
            "over-optimisation",
            f"RM up but judge {judge or 'not up'}: over-optimisation — the policy games the reward model",
        )
    elif judge is not None:
        v = Verdict(
            {"up": "improved", "down": "worse", "flat": "flat"}[judge],
            {
                "up": "the gold judge prefers the trained model",
                "down": "the gold judge prefers the starting model",
                "flat": "the gold judge sees no difference",
            }[judge]
            + (f"; RM {rm}" if rm else ""),
        )
    elif rm is not None:
        v = Verdict(
            {"up": "improved by the RM only", "down": "worse", "flat": "flat"}[rm],
            {
                "up": "the RM prefers the trained model; no gold judge to confirm it",
                "down": "the RM prefers the starting model",
                "flat": "the RM sees no difference",
            }[rm],
        )
    elif ppl is not None:
        v = Verdict({"down": "improved", "up": "worse", "flat": "flat"}[ppl], f"held-out perplexity went {ppl}")
    else:
        v = Verdict("not evaluated", "no before/after comparison in this run")
    if flagged and v.label in ("improved", "improved by the RM only"):
        v = Verdict(v.label + ", but flagged", v.reason + "; detectors flagged " + ", ".join(flagged))
    elif flagged:
        v = Verdict(v.label, v.reason + "; detectors flagged " + ", ".join(flagged))
    return v


# --------------------------------------------------------------------------- headline
@dataclass
class Headline:
    trained: str
    """What was trained from what, in one sentence."""
    figures: list[Figure]
    flagged: list[str]
    """Detector flags on the trained model ('repetition', ...)."""
    detectors_checked: bool
    verdict: Verdict
    algo: str | None = None


def _short(path: str, run: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(run).resolve()))
    except (ValueError, OSError):
        return path


def describe(steps: list[Step], base: str, run: Path | None = None) -> str:
    """'base → SFT on data (split sft) → PPO trained with GRPO on … (reward: rm/final)'."""
    short = (lambda p: _short(p, run)) if run is not None else (lambda p: p)
    parts = [short(base) or "?"]
    for s in reversed(steps):
        name = s.stage.upper() if s.stage != "merge" else "merged"
        if s.stage == "ppo":
            name = f"RL trained with {algo_name(s.config)}"
        ins = [short(i.removeprefix("reward: ")) if i.startswith("reward: ") else i for i in s.inputs]
        detail = "; ".join(
            ("reward: " + i if k == 1 and s.stage == "ppo" else _shorten_input(i, short)) for k, i in enumerate(ins)
        )
        parts.append(name + (f" on {detail}" if detail else ""))
    return " → ".join(parts)


def _shorten_input(text: str, short) -> str:
    path, _, rest = text.partition(" (")
    return short(path) + (f" ({rest}" if rest else "")


def policy_folder(run: Path) -> Path | None:
    """The run's final model: the last model its eval compared when it is a folder, else the newest of
    ppo/, dpo/, sft/ with a final/."""
    cfg = read_config(Path(run) / "eval" / "config.yaml")
    models = cfg.get("models") or []
    if models and isinstance(models[-1], str):
        path = Path(models[-1].split("=", 1)[-1])
        if path.is_dir():
            return path
    for stage in ("ppo", "dpo", "sft"):
        if (Path(run) / stage / "final").is_dir():
            return Path(run) / stage / "final"
    return None


def headline(run: Path) -> Headline:
    run = Path(run)
    figures: list[Figure] = []
    c = comparison(run)
    judge = rm = None
    flagged: list[str] = []
    if c is not None:
        figures += eval_figures(c)
        judge, rm = direction(num(c.win.get("judge")), c.n), direction(num(c.win.get("rm")), c.n)
        flagged = [label(k) for k, v in c.detectors.items() if v is True]
    rl = [s for s in ("ppo",) if (run / s / "metrics.jsonl").exists()]
    for s in rl:
        figures += rl_figures(run / s)
        if c is None:
            rm = direction(*paired_win_rate(read_records(run / s / "samples.jsonl")))
    if (run / "dpo").is_dir():
        figures += dpo_figures(run / "dpo")
    figures += rm_figures(run / "rm") + sft_figures(run / "sft")
    ppl = None
    sft = next((f for f in figures if f.key == "sft_perplexity"), None)
    if sft and sft.before and sft.after is not None:
        ratio = sft.after / sft.before
        ppl = "down" if ratio < 0.98 else "up" if ratio > 1.02 else "flat"
    over = c.over.get("flag") if c is not None and c.over else None
    v = verdict(
        judge, rm, over if isinstance(over, bool) else None, flagged, ppl if (judge, rm) == (None, None) else None
    )
    if c is not None and (judge or rm):
        wins = [
            f"{k} win-rate {num(c.win.get(k.lower())):.1%}"
            for k in ("judge", "RM")
            if num(c.win.get(k.lower())) is not None
        ]
        v.reason += f" ({', '.join(wins)} over {c.base} on {c.n} prompts)"
    folder = policy_folder(run)
    algo = None
    if folder is not None:
        steps, base = lineage(folder)
        trained = describe(steps, base, run) if steps else f"{_short(str(folder), run)} (no saved config)"
        algo = next((algo_name(s.config) for s in steps if s.stage == "ppo"), None)
    else:
        trained = "no trained model in this run directory"
    return Headline(trained, figures, flagged, c is not None and bool(c.detectors), v, algo)
