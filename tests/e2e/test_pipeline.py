"""`rlhfkit run`: end to end on recipes/tiny.yaml, kill during PPO, resume, skip finished stages."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.apps.runner import load_recipe
from rlhfkit.runtime.errors import ConfigError
from tests.conftest import REPO
from tests.e2e.conftest import run_tiny

RECIPE = REPO / "recipes" / "tiny.yaml"


def test_recipe_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[sft\] unknown config key 'train.lrr'"):
        from rlhfkit.apps.runner import _stage_config

        recipe = load_recipe(RECIPE, ["sft.train.lrr=1"])
        _stage_config("sft", recipe["sft"], tmp_path)
    with pytest.raises(ConfigError, match="unknown recipe key 'sftt'"):
        load_recipe(RECIPE, ["sftt.x=1"])
    r = load_recipe(RECIPE, ["run_dir=/tmp/x"])
    assert r["ppo"]["reward"] == "/tmp/x/rm/final" and r["sft"]["model"]["name"] == "SmolLM2-135M-Instruct"


def test_run_kill_during_ppo_resumes_and_matches_uninterrupted(tiny_run, tiny_model_dir, pairs_file, tmp_path):
    from safetensors.torch import load_file

    straight = tiny_run
    for stage in ("data", "sft", "rm", "ppo", "eval"):
        assert json.loads((straight / ".stages" / f"{stage}.json").read_text())["status"] == "done"
    assert (straight / "report.html").exists() and (straight / "eval" / "metrics.json").exists()

    killed = tmp_path / "killed"
    p = run_tiny(killed, tiny_model_dir, pairs_file, env={"RLHFKIT_FAULT_KILL_AFTER_STEP": "2"})
    assert p.returncode == -9, p.stderr[-3000:]
    assert json.loads((killed / ".stages" / "ppo.json").read_text())["status"] == "running"
    sft_mtime = (killed / "sft" / "final" / "model.safetensors").stat().st_mtime
    p = run_tiny(killed, tiny_model_dir, pairs_file)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "[run] data: done earlier" in out and "[run] sft: done earlier" in out and "[run] rm: done earlier" in out
    assert "[run] ppo: interrupted earlier — resuming" in out and "resumed from" in out
    assert (killed / "sft" / "final" / "model.safetensors").stat().st_mtime == sft_mtime  # not redone

    a = load_file(straight / "ppo" / "final" / "adapter_model.safetensors")
    b = load_file(killed / "ppo" / "final" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((straight / "eval" / "metrics.json").read_text())
    mb = json.loads((killed / "eval" / "metrics.json").read_text())
    assert ma["models"] == mb["models"]

    # a changed config invalidates that stage and everything after it, and says so
    p = run_tiny(killed, tiny_model_dir, pairs_file, extra=["ppo.train.max_steps=3"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[run] rm: done earlier" in p.stdout
    assert "[run] ppo: its config changed since it ran" in p.stdout
    assert "[run] eval: running" in p.stdout


@pytest.mark.parametrize(
    "recipe", [None, "recipes/tiny.yaml", "recipes/stackllama.yaml"], ids=["embedded-default", "tiny", "stackllama"]
)
def test_shipped_recipes_validate_against_stage_configs(recipe, tmp_path):
    """Every stage section of a shipped recipe loads into its typed config: a renamed field in a
    stage must break this test, not a user's first `rlhfkit run` ten minutes in."""
    from rlhfkit.apps.runner import _stage_config

    r = load_recipe(REPO / recipe if recipe else None, [f"run_dir={tmp_path}"])
    loaded = {}
    for stage in r["stages"]:
        _, cfg = _stage_config(stage, r.get(stage) or {}, tmp_path / stage)
        loaded[stage] = cfg
    if recipe is None:  # the embedded default: feedback → rm → ppo → eval → report on the rater's task
        assert r["stages"] == ["feedback", "rm", "ppo", "eval", "report"]
        assert loaded["ppo"].reward == f"{tmp_path}/rm/final"
        assert loaded["feedback"].samples_per_prompt * loaded["feedback"].n_label_prompts > 1000


def test_grpo_recipe_end_to_end_report_and_card_name_it(tiny_model_dir, pairs_file, tmp_path):
    """The tiny recipe with `ppo.algo=grpo`: critic-free final/ (no value head), and the report and model
    card say GRPO."""
    run = tmp_path / "grpo"
    p = run_tiny(run, tiny_model_dir, pairs_file, extra=["ppo.algo=grpo", "ppo.samples_per_prompt=4"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (run / "ppo" / "final" / "value_head.safetensors").exists()
    assert (run / "ppo" / "final" / "adapter_model.safetensors").exists()
    assert "algo: grpo" in (run / "ppo" / "config.yaml").read_text()
    assert "GRPO" in (run / "report.html").read_text()
    card = (run / "ppo" / "final" / "README.md").read_text()
    assert "grpo" in card.split("---")[1]  # a tag in the card's YAML header
