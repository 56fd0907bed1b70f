"""`rlhfkit data hf`: the Hugging Face schemas (local files; no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.cli import main
from rlhfkit.data import build_hf, detect_schema, split_hh
from rlhfkit.data.options import SPLITS
from rlhfkit.inputs.tables import load_table
from rlhfkit.runtime.errors import RlhfkitError

ONLY = {s: {t: float(t == s) for t in SPLITS} for s in SPLITS}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


H4_ROWS = [
    {
        "qid": 101,
        "question": "<p>How to &lt;b&gt;bold&lt;/b&gt; in <code>md</code>?</p>",
        "date": "2020",
        "answers": [
            {"answer_id": 1, "text": "<p>Use <code>**x**</code>.</p>", "pm_score": 3, "selected": True},
            {"answer_id": 2, "text": "<p>Use <b>HTML</b>.</p>", "pm_score": 1, "selected": False},
            {"answer_id": 3, "text": "<p>Same score.</p>", "pm_score": 1, "selected": False},
            {"answer_id": 4, "text": "<p>Bad.</p>", "pm_score": -1, "selected": False},
        ],
    },
    {
        "qid": 102,
        "question": "<p>Only equal answers</p>",
        "date": "2020",
        "answers": [
            {"answer_id": 5, "text": "<p>a</p>", "pm_score": 2, "selected": False},
            {"answer_id": 6, "text": "<p>b</p>", "pm_score": 2, "selected": False},
        ],
    },
]


def test_detect_schema():
    assert detect_schema(["qid", "question", "answers", "date"]) == "h4"
    assert detect_schema(["qid", "question", "date", "metadata", "response_j", "response_k"]) == "paired"
    assert detect_schema(["chosen", "rejected"]) == "hh"
    assert detect_schema(["prompt", "chosen", "rejected", "extra"]) == "generic"
    with pytest.raises(RlhfkitError, match=r"columns \['a', 'prompt'\] match no known preference schema"):
        detect_schema(["prompt", "a"])


def test_split_hh():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: no"
    prompt, c, r = split_hh(chosen, rejected)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert (c, r) == (" like this", " no") and prompt + c == chosen
    assert split_hh(chosen, "\n\nHuman: other\n\nAssistant: no") is None
    assert split_hh("\n\nHuman: no assistant", rejected) is None


def test_h4_schema_pairs_from_pm_score_and_markdown(tmp_path):
    src = write_jsonl(tmp_path / "h4.jsonl", H4_ROWS)
    stats = build_hf(src, tmp_path / "rm", fractions=ONLY["rm_train"])
    rows = list(load_table(tmp_path / "rm", split="rm_train"))
    assert [(r["qid"], r["chosen_id"], r["rejected_id"], r["chosen_score"], r["rejected_score"]) for r in rows] == [
        (101, 1, 2, 3, 1),
        (101, 1, 3, 3, 1),
        (101, 1, 4, 3, -1),
        (101, 2, 4, 1, -1),
        (101, 3, 4, 1, -1),
    ]
    assert rows[0]["prompt"] == "How to <b>bold</b> in `md`?"
    assert rows[0]["chosen"] == "Use `**x**`." and rows[0]["rejected"] == "Use **HTML**."
    assert stats["skipped"] == {"rm_train:question_without_pairs": 1}
    assert stats["inputs"][0]["schema"] == "h4" and stats["pairs"]["candidates"] == 5
    build_hf(src, tmp_path / "sft", fractions=ONLY["sft"])
    sft = list(load_table(tmp_path / "sft", split="sft"))
    assert [(r["qid"], r["answer_id"], r["response"]) for r in sft] == [(101, 1, "Use `**x**`."), (102, 5, "a")]


def test_paired_schema_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "qid": q,
            "question": f"Question {q}?",
            "response_j": f"good {q}.{k}",
            "response_k": f"bad {q}.{k}",
            "date": "2021",
            "metadata": ["x"],
        }
        for q in range(30)
        for k in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "paired.parquet")
    stats = build_hf(tmp_path / "paired.parquet", tmp_path / "out", seed=5)
    out = {s: list(load_table(tmp_path / "out", split=s)) for s in SPLITS if stats["rows"][s]}
    assert stats["inputs"][0]["schema"] == "paired"
    pairs = out.get("rm_train", []) + out.get("rm_eval", [])
    assert all(r["chosen"].startswith("good") and r["rejected"].startswith("bad") for r in pairs)
    assert all(r["chosen_id"] is None and r["chosen_score"] is None for r in pairs)
    # one SFT / RL row per question, every question in one split only
    for split in ("sft", "rl_prompts"):
        qids = [r["qid"] for r in out.get(split, [])]
        assert len(qids) == len(set(qids))
    seen = {}
    for split, rs in out.items():
        for r in rs:
            assert seen.setdefault(r["qid"], split) == split
    assert len(seen) == 30 and stats["questions"] == 30
    assert (
        stats["rows"]["rm_train"] + stats["rows"]["rm_eval"]
        == 3 * stats["questions_by_split"]["rm_train"] + 3 * stats["questions_by_split"]["rm_eval"]
    )


def test_generic_schema_keeps_text_verbatim(tmp_path):
    rows = [{"prompt": "  Say hi\n", "chosen": " hi ", "rejected": "no"}]
    build_hf(write_jsonl(tmp_path / "g.jsonl", rows), tmp_path / "out", fractions=ONLY["rm_eval"])
    (r,) = load_table(tmp_path / "out", split="rm_eval")
    assert (r["prompt"], r["chosen"], r["rejected"], r["qid"]) == ("  Say hi\n", " hi ", "no", 0)


def test_wrong_schema_and_missing_inputs_are_clear_errors(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}])
    out = tmp_path / "out"
    assert main(["data", "hf", str(bad), f"out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl: columns ['prompt', 'response'] match no known preference schema" in err
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert main(["data", "hf", str(good), f"out_dir={out}", "schema=h4"]) == 1
    assert "schema 'h4' needs columns question, answers; missing question, answers" in capsys.readouterr().err
    assert main(["data", "hf", str(tmp_path / "missing.jsonl"), f"out_dir={out}"]) == 1
    assert "input not found" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["data", "hf", str(tmp_path / "empty.jsonl"), f"out_dir={out}"]) == 1
    assert "file is empty" in capsys.readouterr().err
    assert main(["data", "hf", f"out_dir={out}"]) == 1
    assert "no input paths" in capsys.readouterr().err
    assert not out.exists()
