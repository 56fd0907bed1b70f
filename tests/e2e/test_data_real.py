"""Data stage on the real dumps in ../shared/data (skipped with the reason when that folder is absent).

Pair counts are checked against an independent re-computation: a regex parse of the rows (not expat),
math.log2 + round for the scores and itertools.combinations for the pairs, capped as min(n, 10).
"""

from __future__ import annotations

import gzip
import html
import itertools
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import pytest

from rlhfkit.cli import main
from rlhfkit.data import build_hf, build_stackexchange
from rlhfkit.data.options import SPLITS
from rlhfkit.inputs.tables import load_table

SHARED = Path(__file__).resolve().parents[2].parent / "shared"  # <repo>/../shared
ALL_RM = {"sft": 0.0, "rm_train": 1.0, "rm_eval": 0.0, "rl_prompts": 0.0}
_ROW = re.compile(r"<row\s(.*?)/>", re.S)
_ATTR = re.compile(r'(\w+)="([^"]*)"')


def shared_data(*parts: str) -> Path:
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (the ../shared folder beside the repository is absent)")
    return path


def stack_dumps() -> list[Path]:
    root = shared_data("stackexchange")
    dumps = sorted(root.glob("*/Posts.xml"))
    if not dumps:
        pytest.skip(f"no */Posts.xml under {root}")
    return dumps


def recompute(path: Path) -> dict:
    """Independent: regex over the text, float log2 + round, combinations."""
    rows = [dict(_ATTR.findall(m.group(1))) for m in _ROW.finditer(path.read_text(encoding="utf-8-sig"))]
    questions = {r["Id"]: r for r in rows if r["PostTypeId"] == "1"}
    accepted = {q.get("AcceptedAnswerId") for q in questions.values()}
    answers = defaultdict(list)
    for r in rows:
        if r["PostTypeId"] == "2" and r["ParentId"] in questions:
            up = int(r["Score"])
            score = -1 if up < 0 else round(math.log2(1 + up)) + (r["Id"] in accepted)
            answers[int(r["ParentId"])].append((int(r["Id"]), score, up))
    n_pairs = {q: sum(1 for a, b in itertools.combinations(al, 2) if a[1] != b[1]) for q, al in answers.items()}
    sft = {}
    for q, al in answers.items():
        acc = [a for a in al if str(a[0]) in accepted]
        sft[q] = acc[0][0] if acc else sorted(al, key=lambda a: (-a[1], -a[2], a[0]))[0][0]
    return {
        "questions": len(questions),
        "answers": sum(len(v) for v in answers.values()),
        "uncapped": sum(n_pairs.values()),
        "capped": sum(min(n, 10) for n in n_pairs.values()),
        "capped_by_q": {q: min(n, 10) for q, n in n_pairs.items() if n},
        "scores": {a[0]: a[1] for al in answers.values() for a in al},
        "sft": sft,
        "types": _count(r["PostTypeId"] for r in rows),
        "title": {int(q): html.unescape(r.get("Title", "")) for q, r in questions.items()},
    }


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def source_md_counts(dump: Path) -> dict | None:
    """The StackLLaMA pair counts written in the dump's SOURCE.md, where it has them."""
    src = dump.parent / "SOURCE.md"
    m = (
        re.search(r"pairs before and after the 10-per-question cap\): `(\{.*?\})`", src.read_text())
        if src.exists()
        else None
    )
    return json.loads(m.group(1)) if m else None


@pytest.fixture(scope="module")
def all_rm(tmp_path_factory):
    """Every question to rm_train, no Markdown (the counts do not depend on it; it keeps this fast)."""
    dumps = stack_dumps()
    out = tmp_path_factory.mktemp("real") / "all_rm"
    stats = build_stackexchange([d.parent.parent for d in dumps][:1], out, fractions=ALL_RM, markdown=False)
    return dumps, stats, load_table(out, split="rm_train")


def test_pair_counts_match_an_independent_recomputation(all_rm):
    dumps, stats, ds = all_rm
    by_site = {i["site"]: i for i in stats["inputs"]}
    assert sorted(by_site) == sorted(d.parent.name for d in dumps)
    rows_by_site_q: dict = defaultdict(lambda: defaultdict(int))
    for site, qid in zip(ds["site"], ds["qid"]):
        rows_by_site_q[site][qid] += 1
    for dump in dumps:
        site, ref = dump.parent.name, recompute(dump)
        info = by_site[site]
        assert info["questions"] == ref["questions"], site
        assert info["answers"] == ref["answers"], site
        assert info["candidate_pairs"] == ref["uncapped"], site
        assert info["candidate_pairs_capped"] == ref["capped"], site
        assert info["rows_written"]["rm_train"] == ref["capped"], site
        assert dict(rows_by_site_q[site]) == ref["capped_by_q"], site
        assert info["rows_by_post_type"]["question"] == int(ref["types"]["1"])
        skipped_types = sum(v for k, v in info["skipped"].items() if k.startswith("post_type:"))
        assert skipped_types == sum(n for t, n in ref["types"].items() if t not in ("1", "2")), site
        published = source_md_counts(dump)
        if published:
            assert (published["pairs_uncapped"], published["pairs_capped"]) == (ref["uncapped"], ref["capped"]), site


def test_scores_of_every_pair_match_and_chosen_wins(all_rm):
    dumps, _, ds = all_rm
    scores = {d.parent.name: recompute(d)["scores"] for d in dumps}
    for site, c, r, cs, rs in zip(
        ds["site"], ds["chosen_id"], ds["rejected_id"], ds["chosen_score"], ds["rejected_score"]
    ):
        assert cs > rs
        assert (scores[site][c], scores[site][r]) == (cs, rs)


def test_default_splits_on_all_sites(tmp_path):
    dumps = stack_dumps()
    out = tmp_path / "data"
    stats = build_stackexchange(dumps[0].parent.parent, out, seed=1)
    refs = {d.parent.name: recompute(d) for d in dumps}
    where: dict = {}
    for split in SPLITS:
        ds = load_table(out, split=split)
        for site, qid in zip(ds["site"], ds["qid"]):
            assert where.setdefault((site, qid), split) == split, f"question {site}/{qid} in two splits"
        if split in ("rm_train", "rm_eval"):
            assert all(c > r for c, r in zip(ds["chosen_score"], ds["rejected_score"]))
            per_q = defaultdict(int)
            for site, qid in zip(ds["site"], ds["qid"]):
                per_q[(site, qid)] += 1
            assert max(per_q.values()) <= 10
            assert all(per_q[k] == refs[k[0]]["capped_by_q"][k[1]] for k in per_q)
        if split == "sft":
            for site, qid, aid in zip(ds["site"], ds["qid"], ds["answer_id"]):
                assert aid == refs[site]["sft"][qid]
        if split != "rl_prompts":
            prompts = ds["prompt"]
            assert all(p.startswith(refs[s]["title"][q].strip()) for s, q, p in zip(ds["site"], ds["qid"], prompts))
            assert not any("&lt;" in p or "<p>" in p for p in prompts)  # decoded and converted
    assert sum(stats["questions_by_split"].values()) == sum(r["questions"] for r in refs.values())
    assert stats["rows"]["rm_train"] > 0 and stats["rows"]["rm_eval"] > 0 and stats["rows"]["sft"] > 0


def test_truncated_real_dump_fails_cleanly(tmp_path, capsys):
    dump = stack_dumps()[0]
    data = dump.read_bytes()
    cut_dir = tmp_path / dump.parent.name
    cut_dir.mkdir()
    cut = cut_dir / "Posts.xml"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    last_line = cut.read_bytes().count(b"\n") + 1
    out = tmp_path / "out"
    assert main(["data", "stackexchange", str(cut), f"out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert f"{cut}: malformed XML at line {last_line}," in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # allow_partial keeps the rows parsed before the cut and records why
    assert main(["data", "stackexchange", str(cut), f"out_dir={out}", "allow_partial=true", "markdown=false"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (
        stats["partial"][0]["line"] == last_line
        and stats["inputs"][0]["rows"] == stats["partial"][0]["rows_parsed"] > 0
    )


def test_hh_rlhf_split_at_last_assistant_turn(tmp_path):
    path = shared_data("hh-rlhf", "harmless-base", "test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        original = [json.loads(line) for line in fh]
    stats = build_hf(path, tmp_path / "hh", fractions={"sft": 0.2, "rm_train": 0.6, "rm_eval": 0.1, "rl_prompts": 0.1})
    assert stats["inputs"][0]["schema"] == "hh"
    assert stats["skipped"]["hh_prompt_mismatch"] == 5  # SOURCE.md: 2307 of 2312 rows share the prefix
    pairs = list(load_table(tmp_path / "hh", split="rm_train")) + list(load_table(tmp_path / "hh", split="rm_eval"))
    assert len(pairs) > 1000
    for row in pairs:
        src = original[row["qid"]]  # qid = the row's index in the file for sources without ids
        assert row["prompt"] + row["chosen"] == src["chosen"]
        assert row["prompt"] + row["rejected"] == src["rejected"]
        assert row["prompt"].endswith("\n\nAssistant:") and "\n\nAssistant:" not in row["chosen"]
        assert row["prompt"].startswith("\n\nHuman:")
    row = pairs[0]
    first = original[row["qid"]]["chosen"]
    assert row["prompt"] == first[: first.rindex("\n\nAssistant:") + len("\n\nAssistant:")]
    sft = list(load_table(tmp_path / "hh", split="sft"))
    assert all(original[r["qid"]]["chosen"] == r["prompt"] + r["response"] for r in sft)
    rl = load_table(tmp_path / "hh", split="rl_prompts")
    assert all(p.endswith("\n\nAssistant:") for p in rl["prompt"])
    splits_of = defaultdict(set)
    for split in SPLITS:
        for r in load_table(tmp_path / "hh", split=split):
            splits_of[r["prompt"]].add(split)
    assert all(len(s) == 1 for s in splits_of.values())
