"""What a finished tiny run says and shares: the report's headline parsed back from the HTML, the
model cards parsed back from README.md, the upload list of a stage output (and a reload from exactly
those files), a push through an injected HfApi, and a push without network."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from rlhfkit.apps import push as push_app
from rlhfkit.apps.report_render import fig_value
from rlhfkit.runtime import card, hub, rundir
from rlhfkit.runtime.errors import RlhfkitError
from tests.conftest import REPO, cli_env


class _Headline(HTMLParser):
    """Rows of table#headline-figures: {data-key: {source, before, after, texts}}, and the verdict."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: dict[str, dict] = {}
        self.verdict = ""
        self._row: dict | None = None
        self._cell: list | None = None
        self._in_verdict = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-key" in a:
            self._row = {"source": a["data-source"], "values": [], "texts": [], "href": None}
        elif tag == "td" and self._row is not None:
            self._row["values"].append(float(a["data-value"]) if "data-value" in a else None)
            self._cell = []
        elif tag == "a" and self._row is not None and self._row["href"] is None:
            self._row["href"] = a.get("href")
        elif tag == "div" and a.get("id") == "verdict":
            self._in_verdict = True
        if tag == "tr" and "data-key" in a:
            self._key = a["data-key"]

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row["texts"].append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows[self._key] = self._row
            self._row = None
        elif tag == "div":
            self._in_verdict = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_verdict:
            self.verdict += data


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_headline_states_the_metrics_files(tiny_run):
    page = _Headline()
    page.feed((tiny_run / "report.html").read_text(encoding="utf-8"))
    rows = page.rows
    ev = json.loads((tiny_run / "eval" / "metrics.json").read_text())
    sft, ppo = ev["models"]["sft"], ev["models"]["ppo"]
    expect = {  # key: (source file, before, after) read straight from the metrics files
        "rm_score": ("eval/metrics.json", sft["rm_score"], ppo["rm_score"]),
        "rm_win_rate": ("eval/metrics.json", None, ev["win_rate"]["ppo_vs_sft"]["rm"]),
        "kl": ("eval/metrics.json", sft["kl"], ppo["kl"]),
        "response_length": ("eval/metrics.json", sft["response_length"], ppo["response_length"]),
    }
    ppo_evals = [r for r in _records(tiny_run / "ppo" / "metrics.jsonl") if "eval/reward" in r]
    expect["rl_reward"] = ("ppo/metrics.jsonl", ppo_evals[0]["eval/reward"], ppo_evals[-1]["eval/reward"])
    expect["rl_kl"] = ("ppo/metrics.jsonl", ppo_evals[0]["eval/kl"], ppo_evals[-1]["eval/kl"])
    rm_last = [r for r in _records(tiny_run / "rm" / "metrics.jsonl") if "eval/accuracy" in r][-1]
    expect["rm_accuracy"] = ("rm/metrics.jsonl", None, rm_last["eval/accuracy"])
    sft_ppl = [r["eval/perplexity"] for r in _records(tiny_run / "sft" / "metrics.jsonl") if "eval/perplexity" in r]
    expect["sft_perplexity"] = ("sft/metrics.jsonl", sft_ppl[0], sft_ppl[-1])
    for key, (source, before, after) in expect.items():
        row = rows[key]
        assert row["source"] == source, key
        assert row["values"][1:3] == [before, after], key  # exact: the page holds the files' numbers
        percent = key in ("rm_win_rate", "rm_accuracy")
        assert row["texts"][2] == fig_value(after, percent), key  # and shows them formatted
    assert rows["rm_score"]["href"] == "#eval" and rows["rm_win_rate"]["href"] == "#eval-win-rates"
    assert rows["sft_perplexity"]["href"] == "#sft" and rows["rm_accuracy"]["href"] == "#rm"
    assert "judge_score" not in rows  # the tiny recipe has no gold judge: no row, rather than a blank one
    # no judge: the verdict follows the RM's win-rate over 8 prompts (flat inside 50% ± 1/√8)
    expected = rundir.verdict(None, rundir.direction(ev["win_rate"]["ppo_vs_sft"]["rm"], ev["prompts"]))
    assert f"Verdict: {expected.label}" in " ".join(page.verdict.split())
    html = (tiny_run / "report.html").read_text(encoding="utf-8")
    for anchor in ("eval", "eval-win-rates", "sft", "rm", "ppo"):
        assert f'id="{anchor}"' in html, anchor


def _table(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"## {heading}\n", 1)[1].strip().split("\n\n", 1)[0]  # the table: up to a blank line
    rows = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def test_cards_hold_base_chain_and_metrics(tiny_run, tiny_model_dir):
    ppo_card = (tiny_run / "ppo" / "final" / "README.md").read_text()
    meta = card.front_matter(ppo_card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"rlhf", "rlhfkit", "ppo", "sft", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # the tiny base is a local folder, not a Hub id: said in the body
    assert f"The base model `{tiny_model_dir}` is not a Hub id" in ppo_card
    chain = _table(ppo_card, "How it was made")
    assert [r[1] for r in chain] == ["sft", "RL (PPO)"]
    assert chain[0][2] == f"`{tiny_model_dir}`" and chain[1][2] == f"`{tiny_run / 'sft' / 'final'}`"
    assert chain[1][3].startswith(f"{tiny_run / 'data'} (split rl_prompts); reward: {tiny_run / 'rm' / 'final'}")
    results = {r[0]: r for r in _table(ppo_card, "Results")}
    ev = json.loads((tiny_run / "eval" / "metrics.json").read_text())
    ppo_evals = [r for r in _records(tiny_run / "ppo" / "metrics.jsonl") if "eval/reward" in r]
    rm_last = [r for r in _records(tiny_run / "rm" / "metrics.jsonl") if "eval/accuracy" in r][-1]
    assert results["RL held-out reward"][1:3] == [
        f"{ppo_evals[0]['eval/reward']:.4g}",
        f"{ppo_evals[-1]['eval/reward']:.4g}",
    ]
    assert results["RM score"][1:3] == [
        f"{ev['models']['sft']['rm_score']:.4g}",
        f"{ev['models']['ppo']['rm_score']:.4g}",
    ]
    assert results["RM win-rate over sft"][2] == f"{ev['win_rate']['ppo_vs_sft']['rm']:.1%}"
    assert results["RM held-out accuracy"][2] == f"{rm_last['eval/accuracy']:.1%}"
    assert "Question: {prompt}" in ppo_card and "AutoPeftModelForCausalLM" in ppo_card
    rm_card = (tiny_run / "rm" / "final" / "README.md").read_text()
    rm_meta = card.front_matter(rm_card)
    assert rm_meta["library_name"] == "transformers" and "reward-model" in rm_meta["tags"]
    assert rm_meta["pipeline_tag"] == "text-classification" and "num_labels=1" in rm_card
    assert [r[1] for r in _table(rm_card, "How it was made")] == ["sft", "rm"]


def test_card_names_the_hub_id_of_the_offline_encoder_an_rm_started_from(tmp_path):
    final = tmp_path / "rm" / "final"
    final.mkdir(parents=True)
    (final / "config.yaml").write_text("model:\n  name: all-MiniLM-L6-v2\n")
    (final / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    meta = card.front_matter(card.card_text(final, stage="rm"))
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["license"] == "apache-2.0"
    cache_folder = tmp_path / "all-MiniLM-L6-v2"
    assert hub.hub_id(str(cache_folder)) == "sentence-transformers/all-MiniLM-L6-v2"


def test_card_base_model_and_license_from_the_default(tmp_path):
    """A stage that started from the offline default names its Hub id and license in the header."""
    final = tmp_path / "sft" / "final"
    final.mkdir(parents=True)
    (final / "config.yaml").write_text("model:\n  name: SmolLM2-135M-Instruct\ndata:\n  path: trl-lib/tldr\n")
    (final / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    meta = card.front_matter(card.card_text(final, stage="sft"))
    assert meta["base_model"] == hub.DEFAULT_HUB_ID and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["trl-lib/tldr"] and meta["library_name"] == "transformers"
    (final / "README.md").write_text("# my own notes\n")  # a user's card is never replaced
    assert card.write_card(final) is None and (final / "README.md").read_text() == "# my own notes\n"
    (final / "README.md").write_text(f"# Model Card for Model ID\n\n{card.PEFT_TEMPLATE}\n[More Information Needed]\n")
    assert card.write_card(final) == final / "README.md" and card.CARD_MARK in (final / "README.md").read_text()


def _logprobs(folder: Path, kind: str = "causal") -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(["how coffee brew? coffee coffee is good."], return_tensors="pt")
    if kind == "rm":
        return AutoModelForSequenceClassification.from_pretrained(folder).eval()(**ids).logits
    return torch.log_softmax(AutoModelForCausalLM.from_pretrained(folder).eval()(**ids).logits, -1)


@pytest.mark.parametrize("stage,kind", [("sft", "causal"), ("rm", "rm")])
def test_upload_list_is_what_reloads(tiny_run, tmp_path, stage, kind):
    src = tmp_path / "out"
    shutil.copytree(tiny_run / stage / "final", src)
    for junk in ("checkpoints/step-000002/optimizer.safetensors", ".lock", "training_args.bin", "notes.txt"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_text("x")
    files, problems = hub.upload_files(src)
    assert problems == []
    weights = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    extra = ["generation_config.json"] if kind == "causal" else []
    assert files == sorted(weights + extra + ["README.md", "config.yaml"])
    assert set(hub.left_out(src, files)) == {
        "checkpoints/step-000002/optimizer.safetensors",
        ".lock",
        "training_args.bin",
        "notes.txt",
    }
    fresh = tmp_path / "fresh"
    for f in files:
        (fresh / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, fresh / f)
    assert torch.equal(_logprobs(fresh, kind), _logprobs(tiny_run / stage / "final", kind))


def test_adapter_on_a_local_base_is_refused_merged_one_pushes(tiny_run, tmp_path):
    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import merge

    files, problems = hub.upload_files(tiny_run / "ppo" / "final")
    assert "adapter_model.safetensors" in files
    assert len(problems) == 1 and problems[0].startswith(
        "adapter_config.json: base_model_name_or_path is the local path"
    )
    assert str(tiny_run / "sft" / "final") in problems[0]
    with pytest.raises(RlhfkitError, match="not pushed: adapter_config.json"):
        push_app.push_folder(tiny_run / "ppo", "me/tiny", api=object())  # refused before any Hub call
    merged = tmp_path / "merged"
    merge.run(
        load_config(merge.MergeConfig, overrides={"adapter": str(tiny_run / "ppo" / "final"), "out_dir": str(merged)})
    )
    meta = card.front_matter((merged / "README.md").read_text())
    assert {"merged", "ppo", "sft"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
    files, problems = hub.upload_files(merged)
    assert problems == [] and "merge_config.yaml" in files and "model.safetensors" in files


class FakeApi:
    """Records the calls `push` makes; upload_folder lists what its allow_patterns select on disk."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://hub.example/{repo_id}"

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, allow_patterns, revision, commit_message):
        from huggingface_hub.utils import filter_repo_objects

        on_disk = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        self.uploaded = sorted(filter_repo_objects(on_disk, allow_patterns=allow_patterns))
        self.calls.append(("upload_folder", repo_id, revision))
        return type("Info", (), {"oid": "abc123"})()


def test_push_uploads_exactly_the_list_and_names_the_repo(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_written")
    src = tmp_path / "sft"
    shutil.copytree(tiny_run / "sft", src, ignore=shutil.ignore_patterns(".lock"))
    (src / "final" / "optimizer.pt").write_text("pickle")
    api = FakeApi()
    result = push_app.push_folder(src, "me/tiny-sft", private=True, revision="v1", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0] == ("create_repo", "me/tiny-sft", True, True)
    assert api.uploaded == result["files"] == hub.upload_files(src / "final")[0]
    assert "optimizer.pt" in result["left_out"] and result["commit"] == "abc123"
    text = (src / "final" / "README.md").read_text()
    assert 'from_pretrained("me/tiny-sft")' in text and "hf download me/tiny-sft" in text
    assert "hf_secret_never_written" not in text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: a connect is refused at once


def test_push_without_network_fails_fast_in_one_line(tiny_run, monkeypatch):
    env = {k: v for k, v in cli_env().items() if k != "HF_HUB_OFFLINE"}
    env.update({"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_TOKEN": "hf_dummy_token"})
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", "push", str(tiny_run / "sft"), "me/tiny"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    took = time.monotonic() - t0
    assert p.returncode == 1 and took < 15, (p.returncode, took, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhfkit push: error: cannot reach the Hub at http://127.0.0.1:")
    assert "Traceback" not in p.stderr and "hf_dummy_token" not in p.stderr + p.stdout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RlhfkitError, match="HF_HUB_OFFLINE is set"):
        hub.check_reachable("http://127.0.0.1:1")


def test_recipe_push_to_hub_runs_after_the_stages_and_retries(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    """`push_to_hub` in a recipe: pushed after the last stage (card refreshed), a failed push leaves the
    stage done and is retried by the next run without training again; a recorded push is not redone."""
    import yaml

    from rlhfkit.apps import runner

    calls = []

    def fake_push(folder, repo_id, **kw):
        calls.append((Path(folder), repo_id))
        if len(calls) == 1:
            raise RlhfkitError("cannot reach the Hub at http://127.0.0.1:1 (Connection refused): nothing was pushed")
        return {"files": hub.upload_files(folder)[0], "url": f"https://hub.example/{repo_id}", "commit": "c1"}

    monkeypatch.setattr(push_app.hub, "push", fake_push)
    recipe = tmp_path / "r.yaml"
    sft = {
        "model": {"name": str(tiny_model_dir)},
        "lora": {"enabled": False},
        "data": {"path": str(tiny_corpus), "seq_len": 32},
        "train": {"max_steps": 1, "batch_size": 4},
        "push_to_hub": "me/tiny-sft",
    }
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": ["sft"], "sft": sft}))
    with pytest.raises(RlhfkitError, match=r"\[sft\] cannot reach the Hub .*\(the stage is done; run the same command"):
        runner.run_recipe(runner.load_recipe(recipe, []))
    marker = tmp_path / "run" / ".stages" / "sft.json"
    assert json.loads(marker.read_text())["status"] == "done" and "pushed" not in json.loads(marker.read_text())
    weights = (tmp_path / "run" / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    runner.run_recipe(runner.load_recipe(recipe, []))  # skipped stage, push retried
    assert calls == [(tmp_path / "run" / "sft" / "final", "me/tiny-sft")] * 2
    assert json.loads(marker.read_text())["pushed"] == {"repo": "me/tiny-sft", "commit": "c1"}
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == weights
    runner.run_recipe(runner.load_recipe(recipe, []))
    assert len(calls) == 2  # pushed already: not again


def test_stage_push_to_hub_from_the_cli(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch, capsys):
    """`rlhfkit sft … push_to_hub=REPO`: pushed once the stage has finished; a failed push says how to retry."""
    from rlhfkit.cli import main as cli

    calls = []

    def fake_push(folder, repo_id, **kw):
        calls.append((Path(folder), repo_id))
        raise RlhfkitError("cannot reach the Hub at http://127.0.0.1:1 (Connection refused): nothing was pushed")

    monkeypatch.setattr(push_app.hub, "push", fake_push)
    args = ["sft", f"model.name={tiny_model_dir}", "lora.enabled=false", f"data.path={tiny_corpus}", "data.seq_len=32"]
    args += ["train.max_steps=1", "train.batch_size=4", f"out_dir={tmp_path / 'sft'}"]
    assert cli([*args, "push_to_hub=me/offline"]) == 1
    assert calls == [(tmp_path / "sft" / "final", "me/offline")] and (tmp_path / "sft" / "final" / "README.md").exists()
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]  # (tqdm bars aside)
    assert errors == [
        "rlhfkit sft: error: cannot reach the Hub at http://127.0.0.1:1 (Connection refused): nothing was pushed "
        f"(the stage finished; retry with `rlhfkit push {tmp_path / 'sft' / 'final'} me/offline`)"
    ]
