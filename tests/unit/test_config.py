"""Config system: strict keys and types, dotted overrides, YAML round-trip, CLI exit codes, --help."""

from __future__ import annotations

import pytest
import yaml

from rlhfkit.cli import main
from rlhfkit.runtime.config import config_help, field_docs, load_config, parse_overrides, save_config
from rlhfkit.runtime.errors import ConfigError
from rlhfkit.stages.sft import SFTConfig


def test_dotted_overrides_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-4\n  batch_size: 4\nlora:\n  target_modules: [q_proj]\n")
    cfg = load_config(
        SFTConfig,
        f,
        [
            "train.batch_size=2",
            "--data.seq_len",
            "128",
            "--lora.enabled=false",
            "--overwrite",
            "lora.target_modules=q_proj,v_proj",
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 2 and cfg.data.seq_len == 128
    assert cfg.lora.enabled is False and cfg.overwrite is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert parse_overrides(["a.b=1", "--c", "x"]) == {"a": {"b": 1}, "c": "x"}


def test_unknown_key_names_it_and_close_matches():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*train.lr"):
        load_config(SFTConfig, overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"train.batch_size: expected an int, got 'big'"):
        load_config(SFTConfig, overrides=["train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"train.lr_scheduler: expected one of .*cosin"):
        load_config(SFTConfig, overrides=["train.lr_scheduler=cosin"])
    with pytest.raises(ConfigError, match="template"):
        load_config(SFTConfig, overrides=["template.template=no placeholders"])


def test_cli_exit_code_2_for_config_errors(capsys):
    assert main(["sft", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr'" in err and "train.lr" in err
    assert main(["sft", "--config", "/nonexistent.yaml"]) == 2
    assert main(["nosuchstage"]) == 2


def test_config_yaml_round_trips(tmp_path):
    cfg = load_config(SFTConfig, overrides=["train.lr=3e-4", "data.path=x.jsonl", "lora.target_modules=[q_proj]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(SFTConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 3e-4


def test_help_lists_every_field_with_doc(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("--train.lr", "--data.packing", "--lora.r", "--model.name", "--out_dir", "--template.chat_template"):
        assert key in out, key
    assert "Peak learning rate" in out and "default: 'SmolLM2-135M-Instruct'" in out
    docs = field_docs(SFTConfig)
    assert set(docs) >= {"model", "lora", "data", "train", "out_dir", "overwrite", "resume"}
    assert config_help(SFTConfig).count("--") > 40


def test_nested_override_keeps_the_stage_specific_defaults():
    from rlhfkit.stages.reward import RewardConfig

    cfg = load_config(SFTConfig, overrides=["train.max_steps=5"])
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 5  # SFT's default lr, not TrainConfig's 1e-4
    rm = load_config(RewardConfig, overrides=["lora.r=4"])
    assert rm.lora.r == 4 and rm.lora.dropout == 0.1  # RM's own LoRA default survives


def test_help_shows_the_stage_defaults_of_nested_fields():
    from rlhfkit.stages.reward import RewardConfig

    text = config_help(RewardConfig)  # RewardConfig's lora is LoraConfig(r=8, dropout=0.1); the class says 16 / 0.05
    assert "--lora.r (int, default: 8)" in text and "--lora.dropout (float, default: 0.1)" in text
    assert "--train.lr (float, default: 0.0001)" in text


def test_help_piped_into_head_exits_quietly():
    import subprocess
    import sys

    p = subprocess.run(
        f"'{sys.executable}' -m rlhfkit.cli ppo --help | head -1", shell=True, capture_output=True, text=True
    )
    assert p.stdout.startswith("usage: rlhfkit ppo") and "BrokenPipe" not in p.stderr and "Traceback" not in p.stderr, (
        p.stderr
    )


def test_a_moved_ppo_key_names_its_new_place():
    """PPO's run-length and optimiser keys joined `train` (the vocabulary of every trained stage):
    the old key is refused with the new one named, never silently ignored."""
    from rlhfkit.runtime.config import load_config
    from rlhfkit.runtime.errors import ConfigError
    from rlhfkit.stages import ppo

    for old, new in (("lr=1e-4", "train.lr"), ("steps=3", "train.max_steps"), ("ppo.grad_accum=2", "train.grad_accum")):
        with pytest.raises(ConfigError, match=f"'{old.split('=')[0]}' is now '{new}'"):
            load_config(ppo.PPOConfig, overrides=[old])
    cfg = load_config(ppo.PPOConfig, overrides=["train.lr=1e-4", "train.max_steps=3", "train.grad_accum=2"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.grad_accum) == (1e-4, 3, 2)
    with pytest.raises(ConfigError, match="train.epochs does not apply to RL"):
        load_config(ppo.PPOConfig, overrides=["train.epochs=2"])
