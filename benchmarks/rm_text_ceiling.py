"""How much of Stack Exchange's vote order can a reward model read from the text? A leave-one-site-out
probe over every pair of the five shared sites (issue 15), cheap enough to run whole on 2 CPU cores.

    python benchmarks/rm_text_ceiling.py --out /tmp/rm_ceiling      # ≈ 4 min: data, MiniLM embeddings, 5 folds

For each feature set, a Bradley–Terry model that is linear in the features, P(chosen ≻ rejected) =
σ(w · (f(chosen) − f(rejected))), is fitted on all pairs of four sites (L-BFGS, L2 penalty) and scored on
every pair of the fifth with rlhfkit's own length-aware metrics (algorithms/preference_eval: accuracy,
"longer wins" on the full text, length-matched pairs ≤ 1.25×). Features: log characters; structure
(links, list items, paragraphs); the question–answer cosine of all-MiniLM-L6-v2 mean-pooled
embeddings (a model trained on Stack Exchange title/answer pairs); the answer embedding itself. A
reference row that no text model can use: "the earlier-posted answer wins" (smaller post id). Also
reported: accuracy by score gap (|score_chosen − score_rejected| = 1 or ≥ 2) of the best text set.
Prints one JSON object; docs/benchmarks/rm.md records the run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

from _common import machine, shared_data, versions

SITES = ("ai", "beer", "cardano", "coffee", "matheducators")
FEATURE_SETS = {
    "length": ("len",),
    "structure": ("len", "struct"),
    "relevance": ("len", "cos"),
    "structure+relevance": ("len", "struct", "cos"),
    "embedding": ("len", "emb"),
    "all": ("len", "struct", "cos", "emb"),
}
LINK = re.compile(r"\]\(|<https?://")
LIST_ITEM = re.compile(r"(?m)^\s*(?:[-*+]|\d+\.)\s")


def site_rows(shared: Path, out: Path) -> list[dict]:
    """Every pair of every site (`rlhfkit data`, all questions in one split), with ids and scores."""
    import pyarrow.parquet as pq

    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import data as data_stage

    rows = []
    for s in SITES:
        overrides = {
            "source": "stackexchange",
            "paths": [str(shared / f"{s}.stackexchange.com")],
            "out_dir": str(out / "data" / s),
            "format": "parquet",
            "overwrite": True,
            "fractions": {"sft": 0.0, "rm_train": 1.0, "rm_eval": 0.0, "rl_prompts": 0.0},
        }
        data_stage.run(load_config(data_stage.CONFIG, overrides=overrides))
        rows += [r | {"fold": s} for r in pq.read_table(out / "data" / s / "rm_train.parquet").to_pylist()]
    return rows


def embed(texts: list[str], batch: int = 32):
    """all-MiniLM-L6-v2 mean-pooled, L2-normalised embeddings (N, 384), 256 tokens, shortest first."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from rlhfkit.models.loading import resolve_offline_model

    path = resolve_offline_model("all-MiniLM-L6-v2")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    with torch.no_grad():
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            enc = tok([texts[j] for j in idx], truncation=True, max_length=256, padding=True, return_tensors="pt")
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (model(**enc).last_hidden_state * mask).sum(1) / mask.sum(1)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1)
    return out


def answer_features(text: str, q_emb, a_emb, kinds: tuple[str, ...]):
    """One answer's feature vector for the feature kinds named."""
    import torch

    parts = []
    if "len" in kinds:
        parts.append(torch.tensor([math.log1p(len(text))]))
    if "struct" in kinds:
        counts = (len(LINK.findall(text)), len(LIST_ITEM.findall(text)), text.count("\n\n"))
        parts.append(torch.tensor([math.log1p(c) for c in counts]))
    if "cos" in kinds:
        parts.append((q_emb @ a_emb).reshape(1))
    if "emb" in kinds:
        parts.append(a_emb)
    return torch.cat(parts).float()


def fit_bt(x, l2: float):
    """Weights w of a linear Bradley–Terry model: minimise mean softplus(−x·w) + l2·|w|² (x standardised)."""
    import torch

    scale = x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(x / scale) @ w).mean() + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w / scale).detach()


def loso(rows: list[dict], diffs, l2: float) -> tuple[dict, list[float]]:
    """Length-aware metrics per left-out site and pooled, and every pair's out-of-fold margin."""
    margins = [0.0] * len(rows)
    folds = {}
    for site in SITES:
        train = [i for i, r in enumerate(rows) if r["fold"] != site]
        held = [i for i, r in enumerate(rows) if r["fold"] == site]
        w = fit_bt(diffs[train], l2)
        for i, m in zip(held, (diffs[held] @ w).tolist()):
            margins[i] = m
        folds[site] = metrics([rows[i] for i in held], [margins[i] for i in held])
    return {"folds": folds, "pooled": metrics(rows, margins)}, margins


def metrics(rows: list[dict], margins: list[float]) -> dict:
    """rlhfkit's length-aware metrics of out-of-fold margins (lengths in characters of the full text)."""
    from rlhfkit.algorithms.preference_eval import length_aware_metrics

    m = length_aware_metrics(margins, [len(r["chosen"]) for r in rows], [len(r["rejected"]) for r in rows])
    keep = ("pairs", "accuracy", "longer_wins", "matched_pairs", "matched_accuracy", "length_controlled_accuracy")
    return {k: round(m[k], 4) if isinstance(m[k], float) else m[k] for k in keep}


def by_gap(rows: list[dict], margins: list[float]) -> dict:
    """Accuracy and "longer wins" on pairs whose scores differ by 1 and by ≥ 2."""
    out = {}
    for name, keep in (("gap_1", lambda g: g == 1), ("gap_ge_2", lambda g: g >= 2)):
        idx = [i for i, r in enumerate(rows) if keep(abs(r["chosen_score"] - r["rejected_score"]))]
        n = max(len(idx), 1)
        out[name] = {
            "pairs": len(idx),
            "accuracy": round(sum(margins[i] > 0 for i in idx) / n, 4),
            "longer_wins": round(sum(len(rows[i]["chosen"]) > len(rows[i]["rejected"]) for i in idx) / n, 4),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(shared_data("stackexchange")))
    ap.add_argument("--out", default="/tmp/rm_ceiling")
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-1], help="L2 penalties tried per feature set")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = site_rows(Path(args.shared), Path(args.out))
    texts = {("q", r["fold"], r["qid"]): r["prompt"] for r in rows}
    for r in rows:
        texts[("a", r["fold"], r["chosen_id"])], texts[("a", r["fold"], r["rejected_id"])] = r["chosen"], r["rejected"]
    keys = list(texts)
    t1 = time.time()
    emb = dict(zip(keys, embed([texts[k] for k in keys])))
    embed_s = time.time() - t1
    result = {"machine": machine(), "versions": versions(), "args": vars(args), "pairs": len(rows), "sets": {}}
    best = None
    for name, kinds in FEATURE_SETS.items():
        feats = {}
        for r in rows:
            q = emb[("q", r["fold"], r["qid"])]
            for side in ("chosen", "rejected"):
                key = ("a", r["fold"], r[f"{side}_id"])
                feats[side, r["fold"], r[f"{side}_id"]] = answer_features(texts[key], q, emb[key], kinds)
        diffs = torch.stack(
            [feats["chosen", r["fold"], r["chosen_id"]] - feats["rejected", r["fold"], r["rejected_id"]] for r in rows]
        )
        for l2 in args.l2:
            res, margins = loso(rows, diffs, l2)
            result["sets"][f"{name} (l2={l2:g})"] = res
            print(f"[ceiling] {name:20s} l2={l2:g} pooled {json.dumps(res['pooled'])}", flush=True)
            if name != "length" and (best is None or res["pooled"]["matched_accuracy"] > best[0]):
                best = (res["pooled"]["matched_accuracy"], f"{name} (l2={l2:g})", margins)
    earlier = [float(r["rejected_id"] - r["chosen_id"]) for r in rows]  # not text: the post order
    result["earlier_answer_wins"] = metrics(rows, earlier)
    result["best_text_set"] = {"name": best[1], "by_score_gap": by_gap(rows, best[2])}
    result["timing_s"] = {"embed": round(embed_s, 1), "total": round(time.time() - t0, 1), "texts": len(keys)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ceiling.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
