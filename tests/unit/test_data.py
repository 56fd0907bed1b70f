"""Data stage on hand-made fixtures: scores, pairs, splits, Markdown, formats, CLI, errors.

The fixture tests/fixtures/stackexchange/tiny.stackexchange.com/Posts.xml holds: an accepted answer,
negative scores (one of them accepted), equal scores, an answer whose question is missing, an answer
placed before its question, tag-wiki rows (PostTypeId 4/5) and a wiki placeholder (7), HTML with code,
links and images, non-ASCII text, a question with no answers and one with 15 candidate pairs (> cap).
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import yaml

from rlhfkit.cli import main
from rlhfkit.data import (
    DataConfig,
    SplitFractions,
    answer_score,
    assign_split,
    build_stackexchange,
    candidate_pairs,
    count_pairs,
    html_to_markdown,
    pick_sft_answer,
    sample_pairs,
)
from rlhfkit.data.options import SPLITS
from rlhfkit.inputs.tables import load_table
from rlhfkit.runtime.config import load_config
from rlhfkit.runtime.errors import ConfigError, RlhfkitError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stackexchange"
TINY = FIXTURES / "tiny.stackexchange.com" / "Posts.xml"
SITE = "tiny.stackexchange.com"
ONLY = {s: {t: float(t == s) for t in SPLITS} for s in SPLITS}  # fractions sending every question to one split

Q1 = (
    "How do I grind coffee for espresso?\n\nMy grinder has a *fine* setting. I run:\n\n"
    "```\ngrind --fine && tamp\n```\n\nIs that right?"
)
Q6 = (
    "Café au lait ou latte — quelle différence ?\n\n"
    "Quelle est la différence entre un café au lait et un latte\xa0? 日本語でも説明してください。"
)
Q11 = "Is instant coffee real coffee?\n\nAsking for a friend."
Q21 = "How much coffee per shot?\n\nGrams per double shot?"
Q23 = "Does anyone drink cold brew in winter?\n\nJust curious."
Q30 = "Best brewing method?\n\n## Options\n\n- pour-over\n- French press"
A2 = "Use a burr grinder. See [this guide](https://example.com/burr)."
A3 = "Set it to `espresso` and check the dial:\n\nthe grinder dial"
A4 = "Use a blender & hope."
A5 = "Grind **finer** than for drip."


def build(tmp_path: Path, source=TINY, name: str = "out", **options) -> tuple[dict, dict[str, list[dict]]]:
    out = tmp_path / name
    stats = build_stackexchange(source, out, **options)
    rows = {s: list(load_table(out, split=s)) for s in SPLITS}
    return stats, rows


def key(r: dict) -> tuple:
    return (r["qid"], r["chosen_id"], r["rejected_id"], r["chosen_score"], r["rejected_score"])


# --------------------------------------------------------------------------- scoring
@pytest.mark.parametrize(
    "upvotes, accepted, expected",
    [
        (0, False, 0),
        (1, False, 1),
        (2, False, 2),
        (3, False, 2),
        (4, False, 2),
        (5, False, 3),
        (10, False, 3),
        (11, False, 4),
        (22, False, 5),
        (23, False, 5),
        (0, True, 1),
        (10, True, 4),
        (-1, False, -1),
        (-5, False, -1),
        (-1, True, -1),
        (-2, True, -1),
    ],
)
def test_answer_score_table(upvotes, accepted, expected):
    assert answer_score(upvotes, accepted) == expected


def test_answer_score_matches_round_log2_and_has_no_ties():
    """round(log2(1+u)) never meets a .5 tie for integer u, so banker's and half-up rounding agree."""
    for u in range(0, 200_000):
        x = math.log2(1 + u)
        assert abs((x % 1) - 0.5) > 1e-6
        assert answer_score(u) == round(x) == math.floor(x + 0.5)
    # exact integer boundaries: 1 + u crosses 2^(k + 1/2)
    assert [answer_score(u) for u in (1, 2)] == [1, 2]  # 2 < 2^1.5 = 2.83 < 3
    assert [answer_score(u) for u in (4, 5)] == [2, 3]  # 5 < 2^2.5 = 5.66 < 6
    assert [answer_score(u) for u in (10, 11)] == [3, 4]  # 11 < 2^3.5 = 11.31 < 12
    assert answer_score(10**12) == round(math.log2(1 + 10**12))


def test_pairs_only_between_different_scores():
    assert candidate_pairs([3, 2, -1, 2]) == [(0, 1), (0, 2), (0, 3), (1, 2), (3, 2)]
    assert count_pairs([3, 2, -1, 2]) == 5
    assert candidate_pairs([0, 0, 0]) == [] and count_pairs([0, 0]) == 0
    assert all(s[c] > s[r] for s in ([1, 5, 3, 3, 0],) for c, r in candidate_pairs(s))


def test_pair_cap_is_a_seeded_deterministic_sample():
    scores, ids = [0, 1, 2, 3, 4, 5], [31, 32, 33, 34, 35, 36]  # 15 candidate pairs
    a = sample_pairs(scores, 10, (0, "s", 30), ids)
    assert a == sample_pairs(scores, 10, (0, "s", 30), ids) and len(a) == 10 and len(set(a)) == 10
    assert set(a) <= set(candidate_pairs(scores))
    assert a == sorted(a, key=candidate_pairs(scores).index)  # kept in candidate order
    others = {tuple(sample_pairs(scores, 10, (seed, "s", 30), ids)) for seed in range(1, 8)}
    assert len(others | {tuple(a)}) > 1  # the seed matters
    # the choice follows the answers, not their order: reversing the answers picks the same id pairs
    chosen = {(ids[c], ids[r]) for c, r in a}
    rev = sample_pairs(scores[::-1], 10, (0, "s", 30), ids[::-1])
    assert {(ids[::-1][c], ids[::-1][r]) for c, r in rev} == chosen
    assert sample_pairs(scores, 0) == candidate_pairs(scores)  # 0: no cap


def test_sft_answer_is_accepted_else_top():
    assert pick_sft_answer([3, 2, -1], [False, True, False]) == 1
    assert pick_sft_answer([3, 5, 5], [False] * 3, upvotes=[1, 20, 30]) == 2
    assert pick_sft_answer([0, 0], [False, False]) == 0
    assert pick_sft_answer([], []) is None


def test_split_assignment_is_stable_and_follows_fractions():
    fr = (0.25, 0.45, 0.05, 0.25)
    first = [assign_split(q, fr, seed=0, site="s") for q in range(20_000)]
    assert first == [assign_split(q, fr, seed=0, site="s") for q in range(20_000)]
    counts = Counter(first)
    for name, f in zip(SPLITS, fr):
        assert abs(counts[name] / 20_000 - f) < 0.015
    assert first != [assign_split(q, fr, seed=1, site="s") for q in range(20_000)]
    assert {assign_split(q, (0, 1, 0, 0)) for q in range(100)} == {"rm_train"}


def test_split_fractions_are_validated():
    with pytest.raises(ConfigError, match="add up to 1"):
        load_config(DataConfig, overrides=["fractions.sft=0.9"])
    with pytest.raises(ConfigError, match="max_tokens needs a tokenizer"):
        load_config(DataConfig, overrides=["max_tokens=100"])
    cfg = load_config(DataConfig, overrides={"fractions": {"sft": 0.5, "rm_train": 0.5, "rm_eval": 0, "rl_prompts": 0}})
    assert cfg.fractions == SplitFractions(0.5, 0.5, 0.0, 0.0)


# --------------------------------------------------------------------------- HTML → Markdown
def test_html_to_markdown_rules():
    html = (
        '<h2>Setup &amp; use</h2><p>Run <code>pip install x</code>, see <a href="https://ex.com/a?b=1&amp;c=2">'
        'the docs</a> and <img src="p.png" alt="a diagram"> &lt;here&gt; &#8212; snake_case and 2*3.</p>'
        '<pre class="lang-py s-code-block"><code>if a &lt; b:\n    print("&amp;")\n</code></pre>'
        "<pre><code>plain\n</code></pre><blockquote><p>quoted</p></blockquote><ul><li>one</li><li>two</li></ul>"
    )
    assert html_to_markdown(html) == (
        "## Setup & use\n\n"
        "Run `pip install x`, see [the docs](https://ex.com/a?b=1&c=2) and a diagram <here> — snake_case and 2\\*3.\n\n"
        '```py\nif a < b:\n    print("&")\n```\n\n'
        "```\nplain\n```\n\n"
        "> quoted\n\n"
        "- one\n- two"
    )
    assert html_to_markdown("") == "" and html_to_markdown(None) == ""
    assert html_to_markdown("<p>日本語 ☕ caf&eacute;</p>") == "日本語 ☕ café"


# --------------------------------------------------------------------------- fixture, exact rows
def test_fixture_pairs_exact(tmp_path):
    stats, rows = build(tmp_path, fractions=ONLY["rm_train"])
    got = [key(r) for r in rows["rm_train"]]
    q1 = [(1, 2, 3, 3, 2), (1, 2, 4, 3, -1), (1, 2, 5, 3, 2), (1, 3, 4, 2, -1), (1, 5, 4, 2, -1)]
    q11 = [(11, 13, 12, 0, -1)]  # accepted at -2 votes scores -1 (not 0), so the pair exists
    q21 = [(21, 20, 22, 2, 0)]  # answer 20 comes before its question in the file
    assert got[:7] == q1 + q11 + q21
    q30 = got[7:]
    assert len(q30) == 10 and all(r[0] == 30 and r[3] > r[4] for r in q30)  # 15 candidates, capped
    scores30 = {31: 0, 32: 1, 33: 2, 34: 3, 35: 4, 36: 5}
    assert all(scores30[c] == cs and scores30[r] == rs for _, c, r, cs, rs in q30)
    by_pair = {(r["chosen_id"], r["rejected_id"]): r for r in rows["rm_train"]}
    assert by_pair[(2, 3)]["prompt"] == Q1
    assert (by_pair[(2, 3)]["chosen"], by_pair[(2, 3)]["rejected"]) == (A2, A3)
    assert (by_pair[(2, 4)]["rejected"], by_pair[(5, 4)]["chosen"]) == (A4, A5)
    assert by_pair[(20, 22)]["chosen"] == "Moved here from a merged question: use 18 g."
    assert {r["site"] for r in rows["rm_train"]} == {SITE}
    assert not rows["sft"] and not rows["rm_eval"] and not rows["rl_prompts"]
    # stats
    assert stats["rows_by_post_type"] == {
        "question": 6,
        "answer": 17,
        "tag_wiki_excerpt": 1,
        "tag_wiki": 1,
        "wiki_placeholder": 1,
    }
    assert stats["questions"] == 6 and stats["answers"] == 16
    assert stats["skipped"] == {
        "answer_without_question": 1,
        "post_type:tag_wiki": 1,
        "post_type:tag_wiki_excerpt": 1,
        "post_type:wiki_placeholder": 1,
        "rm_train:question_without_pairs": 2,
    }
    assert stats["pairs"] == {"rm_train": 17, "rm_eval": 0, "candidates": 22, "candidates_capped": 17}
    assert stats["score_histogram"] == {"-1": 2, "0": 5, "1": 1, "2": 4, "3": 2, "4": 1, "5": 1}
    lengths = stats["lengths_chars"]["rm_train"]
    assert lengths["prompt"]["max"] == max(len(r["prompt"]) for r in rows["rm_train"]) == len(Q1)
    assert lengths["chosen"]["p50"] > 0 and stats["lengths_chars"]["sft"]["response"] is None
    assert stats["partial"] == []


def test_fixture_sft_and_rl_exact(tmp_path):
    stats, rows = build(tmp_path, fractions=ONLY["sft"])
    got = [(r["qid"], r["answer_id"], r["score"]) for r in rows["sft"]]
    # accepted (even at -2 votes) else top score; ties → the earlier answer; no answers → no row
    assert got == [(1, 3, 2), (6, 7, 0), (11, 12, -1), (21, 20, 2), (30, 36, 5)]
    assert [r["prompt"] for r in rows["sft"]] == [Q1, Q6, Q11, Q21, Q30]
    assert rows["sft"][0]["response"] == A3 and rows["sft"][1]["response"] == "Le latte utilise de l’espresso ☕."
    assert stats["skipped"]["sft:question_without_answers"] == 1

    stats, rows = build(tmp_path, name="rl", fractions=ONLY["rl_prompts"])
    assert [(r["qid"], r["prompt"]) for r in rows["rl_prompts"]] == [
        (1, Q1),
        (6, Q6),
        (11, Q11),
        (21, Q21),
        (23, Q23),
        (30, Q30),
    ]
    assert set(rows["rl_prompts"][0]) == {"prompt", "qid", "site"}


def test_prompt_style_body(tmp_path):
    _, rows = build(tmp_path, fractions=ONLY["rl_prompts"], prompt_style="body")
    assert rows["rl_prompts"][2]["prompt"] == "Asking for a friend."


def test_default_splits_are_disjoint_and_columns_canonical(tmp_path):
    stats, rows = build(tmp_path, seed=3)
    seen: dict[int, str] = {}
    for split, rs in rows.items():
        for r in rs:
            assert seen.setdefault(r["qid"], split) == split
    assert sum(stats["questions_by_split"].values()) == 6
    cols = {s: list(load_table(tmp_path / "out", split=s).column_names) for s in SPLITS}
    assert cols["sft"][:2] == ["prompt", "response"] and cols["rl_prompts"][0] == "prompt"
    assert cols["rm_train"][:3] == ["prompt", "chosen", "rejected"] == cols["rm_eval"][:3]
    assert {"qid", "chosen_id", "rejected_id", "chosen_score", "rejected_score", "site"} <= set(cols["rm_train"])


def _variants(tmp_path: Path) -> dict[str, Path]:
    raw = TINY.read_bytes()
    out = {}
    d = tmp_path / "bomcrlf.stackexchange.com"
    d.mkdir()
    (d / "Posts.xml").write_bytes(b"\xef\xbb\xbf" + raw.replace(b"\n", b"\r\n"))
    out["bom_crlf"] = d / "Posts.xml"
    d = tmp_path / "gz.stackexchange.com"
    d.mkdir()
    (d / "Posts.xml.gz").write_bytes(gzip.compress(raw))
    out["gz"] = d / "Posts.xml.gz"
    import py7zr

    with py7zr.SevenZipFile(tmp_path / "sevenz.stackexchange.com.7z", "w") as z:
        z.writestr(raw, "Posts.xml")
    out["7z"] = tmp_path / "sevenz.stackexchange.com.7z"
    return out


def test_bom_crlf_gzip_and_7z_inputs_give_the_same_rows(tmp_path):
    # no pair cap: the capped sample is seeded by (seed, site, qid) and the site names differ here
    _, ref = build(tmp_path, name="ref", fractions=ONLY["rm_train"], max_pairs_per_question=0)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "site"} for r in rs]  # noqa: E731
    assert len(ref["rm_train"]) == 22
    for name, path in _variants(tmp_path).items():
        stats, rows = build(tmp_path, source=path, name=name, fractions=ONLY["rm_train"], max_pairs_per_question=0)
        assert strip(rows["rm_train"]) == strip(ref["rm_train"]), name
        assert (
            stats["inputs"][0]["site"]
            == {"bom_crlf": "bomcrlf", "gz": "gz", "7z": "sevenz"}[name] + ".stackexchange.com"
        )


def test_several_sites_at_once_from_a_folder(tmp_path):
    _variants(tmp_path)
    stats, rows = build(tmp_path, source=tmp_path, name="all", fractions=ONLY["rm_train"])
    assert [i["site"] for i in stats["inputs"]] == [
        "bomcrlf.stackexchange.com",
        "gz.stackexchange.com",
        "sevenz.stackexchange.com",
    ]
    assert Counter(r["site"] for r in rows["rm_train"]) == {
        "bomcrlf.stackexchange.com": 17,
        "gz.stackexchange.com": 17,
        "sevenz.stackexchange.com": 17,
    }
    assert stats["inputs"][2]["rows_written"]["rm_train"] == 17


def test_parquet_format_and_load_table(tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    build_stackexchange(TINY, out, format="parquet", fractions=ONLY["rm_train"])
    assert sorted(p.name for p in out.iterdir()) == [
        ".rlhfkit",
        "config.yaml",
        "rl_prompts.parquet",
        "rm_eval.parquet",
        "rm_train.parquet",
        "sft.parquet",
        "stats.json",
    ]
    rows = list(load_table(out, split="rm_train"))
    assert len(rows) == 17 and rows[0]["chosen"] == A2 and rows[0]["prompt"] == Q1
    empty = pq.read_table(out / "sft.parquet")  # empty splits keep their schema
    assert empty.num_rows == 0 and empty.column_names == ["prompt", "response", "qid", "answer_id", "score", "site"]


def test_arrow_folder_is_a_datasets_dict(tmp_path):
    import datasets

    build(tmp_path, fractions=ONLY["rm_train"])
    dd = datasets.load_from_disk(str(tmp_path / "out"))
    assert isinstance(dd, datasets.DatasetDict) and list(dd) == list(SPLITS)
    assert dd["rm_train"].num_rows == 17 and dd["sft"].num_rows == 0
    assert dd["rm_train"].features["chosen_score"].dtype == "int64"
    assert dd["rm_train"].map(lambda r: {"n": len(r["chosen"])})["n"][0] == len(A2)


def test_length_filters_count_dropped_rows(tmp_path):
    stats, rows = build(tmp_path, fractions=ONLY["rm_train"], max_chars=len(Q1) + len(A2) - 1)
    # Q1 + A2 is one char too long: the 3 pairs holding A2 go, Q1's other pairs and the rest stay
    assert stats["filtered"] == {"rm_train:max_chars": 3}
    assert len(rows["rm_train"]) == 14
    assert [(r["chosen_id"], r["rejected_id"]) for r in rows["rm_train"] if r["qid"] == 1] == [(3, 4), (5, 4)]


def test_max_tokens_with_a_local_tokenizer(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    n = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    limit = n(Q11) + n("No, never.")
    stats, rows = build(tmp_path, fractions=ONLY["sft"], max_tokens=limit, tokenizer=str(tiny_tokenizer_dir))
    kept = [r["qid"] for r in rows["sft"]]
    assert 11 in kept
    assert all(n(r["prompt"]) + n(r["response"]) <= limit for r in rows["sft"])
    assert stats["filtered"]["sft:max_tokens"] == 5 - len(kept)


def test_parallel_conversion_gives_identical_output(tmp_path):
    _, one = build(tmp_path, name="one", workers=1)
    _, two = build(tmp_path, name="two", workers=2)
    assert one == two


# --------------------------------------------------------------------------- CLI and errors
def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "stackexchange", str(TINY), f"out_dir={out}", "seed=7", "--max_pairs_per_question", "3"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["rows"] == {s: load_table(out, split=s).num_rows for s in SPLITS}
    assert "rlhfkit data:" in captured.err and "questions 6" in captured.err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == summary["rows"] and stats["pairs"]["candidates"] == 22
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["paths"] == [str(TINY)] and saved["seed"] == 7 and saved["max_pairs_per_question"] == 3
    cfg = load_config(DataConfig, out / "config.yaml")
    assert cfg.fractions == SplitFractions() and cfg.source == "stackexchange"
    # existing out_dir: refused, then replaced with --overwrite
    assert main(["data", "stackexchange", str(TINY), f"out_dir={out}"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "stackexchange", str(TINY), f"out_dir={out}", "--overwrite", "--format", "parquet"]) == 0
    assert (out / "rm_train.parquet").exists() and not (out / "dataset_dict.json").exists()


def test_cli_help_lists_fields(capsys):
    assert main(["data", "--help"]) == 0
    text = capsys.readouterr().out
    for name in ("--paths", "--fractions.rm_eval", "--max_pairs_per_question", "--allow_partial", "--schema"):
        assert name in text


@pytest.mark.parametrize("case", ["missing", "empty", "not_posts", "empty_folder", "bad_7z", "bad_source"])
def test_cli_input_errors(tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "missing":
        args, msg, code = [str(tmp_path / "nope.xml")], "input not found", 1
    elif case == "empty":
        (tmp_path / "Posts.xml").write_bytes(b"")
        args, msg, code = [str(tmp_path / "Posts.xml")], "file is empty", 1
    elif case == "not_posts":
        (tmp_path / "Posts.xml").write_text('<?xml version="1.0"?>\n<users>\n<row Id="1"/>\n</users>\n')
        args, msg, code = [str(tmp_path / "Posts.xml")], "root element is <users>", 1
    elif case == "empty_folder":
        (tmp_path / "dumps").mkdir()
        args, msg, code = [str(tmp_path / "dumps")], "no Posts.xml", 1
    elif case == "bad_7z":
        (tmp_path / "x.stackexchange.com.7z").write_bytes(b"not a 7z archive at all")
        args, msg, code = (
            [str(tmp_path / "x.stackexchange.com.7z")],
            "x.stackexchange.com.7z: cannot read the 7z archive",
            1,
        )
    else:
        args, msg, code = [], None, 2
        assert main(["data", "posts", str(TINY), f"out_dir={out}"]) == 2
        assert "source: expected one of" in capsys.readouterr().err
    if msg:
        assert main(["data", "stackexchange", *args, f"out_dir={out}"]) == code
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith("rlhfkit data: error:") and msg in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _truncate(tmp_path: Path, src: Path, at: float) -> Path:
    data = src.read_bytes()
    d = tmp_path / "cut.stackexchange.com"
    d.mkdir(exist_ok=True)
    (d / "Posts.xml").write_bytes(data[: int(len(data) * at)])
    return d / "Posts.xml"


def test_truncated_fixture_fails_whole_or_keeps_partial(tmp_path, capsys):
    cut = _truncate(tmp_path, TINY, 0.5)
    out = tmp_path / "out"
    assert main(["data", "stackexchange", str(cut), f"out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert "Posts.xml: malformed XML at line" in err and str(cut) in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    stats = build_stackexchange(cut, out, allow_partial=True, fractions=ONLY["rl_prompts"])
    (partial,) = stats["partial"]
    assert partial["file"] == str(cut) and partial["line"] > 3 and "line" in partial["reason"]
    assert 0 < stats["rows"]["rl_prompts"] < 6
    assert json.loads((out / "stats.json").read_text())["partial"] == stats["partial"]


def test_malformed_row_reports_its_line(tmp_path):
    bad = tmp_path / "bad.stackexchange.com"
    bad.mkdir()
    lines = TINY.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[4] = lines[4].replace('Score="1"', 'Score="1" Score="2"')  # duplicate attribute on line 5
    (bad / "Posts.xml").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(RlhfkitError, match=r"Posts.xml: malformed XML at line 5, column \d+: duplicate attribute"):
        build_stackexchange(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_and_stackexchange_share_the_api(tmp_path):
    from rlhfkit.data import build_hf

    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "chosen": "good", "rejected": "bad"}) + "\n" for i in range(40))
    )
    stats = build_hf(path, tmp_path / "out", fractions=ONLY["rm_eval"])
    assert stats["rows"]["rm_eval"] == 40 and stats["inputs"][0]["schema"] == "generic"


def test_find_dumps_and_iter_posts(tmp_path):
    from rlhfkit.data import find_dumps, iter_posts

    (tmp_path / "stackoverflow.com-Posts.7z").write_bytes(b"x")
    (tmp_path / "beer.stackexchange.com.7z").write_bytes(b"x")
    (tmp_path / "coffee.stackexchange.com").mkdir()
    (tmp_path / "coffee.stackexchange.com" / "Posts.xml.gz").write_bytes(gzip.compress(TINY.read_bytes()))
    assert [(d.site, d.path.name) for d in find_dumps([tmp_path])] == [
        ("beer.stackexchange.com", "beer.stackexchange.com.7z"),
        ("coffee.stackexchange.com", "Posts.xml.gz"),
        ("stackoverflow.com", "stackoverflow.com-Posts.7z"),
    ]
    with pytest.raises(RlhfkitError, match="given twice"):
        find_dumps([TINY, TINY])
    rows = list(iter_posts(tmp_path / "coffee.stackexchange.com" / "Posts.xml.gz"))
    assert len(rows) == 26 and rows[0]["Id"] == "1" and rows[0]["Title"] == "How do I grind coffee for espresso?"
    assert rows[0]["Body"].startswith("<p>My grinder has a <em>fine</em> setting.")


def test_truncated_gzip_and_wrong_file_with_allow_partial(tmp_path):
    d = tmp_path / "gzcut.stackexchange.com"
    d.mkdir()
    data = gzip.compress(TINY.read_bytes())
    (d / "Posts.xml.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(RlhfkitError, match=r"Posts.xml.gz: cannot read the file after line \d+: EOFError"):
        build_stackexchange(d, tmp_path / "out")
    stats = build_stackexchange(d, tmp_path / "out", allow_partial=True)
    assert "EOFError" in stats["partial"][0]["reason"] and stats["inputs"][0]["rows"] > 0
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "Posts.xml").write_text('<?xml version="1.0"?>\n<users>\n<row Id="1"/>\n</users>\n')
    with pytest.raises(RlhfkitError, match="root element is <users>"):  # allow_partial does not hide this
        build_stackexchange(tmp_path / "users", tmp_path / "out2", allow_partial=True)
