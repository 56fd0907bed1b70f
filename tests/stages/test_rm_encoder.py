"""Encoder reward models (BERT family, e.g. the offline all-MiniLM-L6-v2): the RM stage trains them
with their pooled [CLS] classifier, the folder reloads to the same scores, and their 512-position limit
is a one-line config error at training and a counted cut at scoring."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhfkit.runtime.errors import ConfigError
from rlhfkit.stages import reward
from tests.stages.test_reward import rm_cfg

POSITIONS = 64


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A 2-layer BERT saved as a bare BertModel (as all-MiniLM-L6-v2 ships), dropout 0.1 as MiniLM."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=POSITIONS,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def cfg(model_dir, pairs, out, *extra):
    return rm_cfg(model_dir, pairs, out, "train.lr=2e-3", "train.max_steps=30", *extra)  # max_length 64 = POSITIONS


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_encoder_rm_learns_and_its_folder_reloads_to_the_in_memory_margins(tiny_bert_dir, pair_file, tmp_path, lora):
    from rlhfkit.inputs.pairs import load_pairs
    from rlhfkit.rewards.scoring import RewardModelScorer

    extra = ["lora.enabled=true", "lora.r=8", "train.lr=5e-3"] if lora else ["lora.enabled=false"]
    c = cfg(tiny_bert_dir, pair_file, tmp_path / "rm", *extra)
    summary = reward.run(c)
    assert summary["eval_accuracy"] >= 0.9, summary
    # the final held-out margins, computed in memory by the stage, vs the reloaded folder's
    margins = json.loads((tmp_path / "rm" / "eval_margins.json").read_text())
    _, held = load_pairs(c.data)
    scorer = RewardModelScorer(str(tmp_path / "rm" / "final"), batch_size=5)  # other batch mates, other padding
    chosen = scorer([r["prompt"] for r in held], [r["chosen"] for r in held])
    rejected = scorer([r["prompt"] for r in held], [r["rejected"] for r in held])
    assert type(scorer.model).__name__ == "BertForSequenceClassification" and not scorer.model.training
    assert [a - b for a, b in zip(chosen, rejected)] == pytest.approx(margins, abs=1e-4)
    adapter = tmp_path / "rm" / "final" / "adapter_config.json"
    assert adapter.exists() == lora
    # rm-eval on the same held-out pairs: the stage's accuracy and margin
    from rlhfkit.cli import main

    src = tmp_path / "held.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in held))
    assert main(["rm-eval", str(tmp_path / "rm"), str(src), f"out={tmp_path / 'res.json'}"]) == 0
    got = json.loads((tmp_path / "res.json").read_text())["sources"][0]
    assert got["pairs"] == summary["eval_pairs"] and got["accuracy"] == pytest.approx(summary["eval_accuracy"])
    assert got["margin"] == pytest.approx(summary["eval_margin"], abs=1e-4)


def test_encoder_rm_refuses_more_tokens_than_its_positions_and_the_scorer_cuts(tiny_bert_dir, pair_file, tmp_path):
    from rlhfkit.rewards.scoring import RewardModelScorer

    with pytest.raises(ConfigError, match=f"data.max_length=128 exceeds the {POSITIONS} positions of bert"):
        reward.run(cfg(tiny_bert_dir, pair_file, tmp_path / "too_long", "data.max_length=128", "lora.enabled=false"))
    assert not (tmp_path / "too_long" / "final").exists()
    reward.run(cfg(tiny_bert_dir, pair_file, tmp_path / "rm", "lora.enabled=false", "train.max_steps=2"))
    scorer = RewardModelScorer(str(tmp_path / "rm" / "final"))
    long_answer = " ".join(["tea water is good"] * 60)  # far over 64 tokens
    assert len(scorer.fmt.encode("how tea?", long_answer)[0]) > POSITIONS
    scores = scorer(["how tea?", "how tea?"], [long_answer, "tea is good."])
    assert scorer.n_cut == 1 and all(torch.isfinite(torch.tensor(scores)))


def test_encoder_rm_with_top_blocks_only_says_why_the_trunk_is_not_cached(tiny_bert_dir, pair_file, tmp_path, capsys):
    """num_layers_unfrozen on an encoder: the top block + classifier train, the rest stays as loaded;
    the cached trunk (a decoder split) is declined in one line instead of crashing."""
    from safetensors.torch import load_file

    reward.run(cfg(tiny_bert_dir, pair_file, tmp_path / "rm", "lora.enabled=false", "lora.num_layers_unfrozen=1"))
    assert "cache_trunk: off (an encoder backbone" in capsys.readouterr().out
    before = load_file(tiny_bert_dir / "model.safetensors")
    after = load_file(tmp_path / "rm" / "final" / "model.safetensors")
    after = {k.removeprefix("bert."): v for k, v in after.items()}
    assert torch.equal(before["encoder.layer.0.output.dense.weight"], after["encoder.layer.0.output.dense.weight"])
    assert not torch.equal(before["encoder.layer.1.output.dense.weight"], after["encoder.layer.1.output.dense.weight"])


def test_rl_stage_scores_its_rollouts_with_an_encoder_rm(tiny_bert_dir, tiny_sft_dir, pair_file, tmp_path):
    """PPO reads an encoder RM through text (so the policy's and the RM's tokenizers may differ, as
    SmolLM2 and MiniLM do): its rollouts' scores are the reloaded RM's scores of the decoded texts."""
    from rlhfkit.rewards.scoring import RewardModelScorer
    from rlhfkit.stages import ppo
    from tests.stages.test_ppo import PROMPTS, ppo_cfg

    reward.run(cfg(tiny_bert_dir, pair_file, tmp_path / "rm", "lora.enabled=false", "train.max_steps=10"))
    rm = tmp_path / "rm" / "final"
    trainer = ppo.RLTrainer(ppo_cfg(tiny_sft_dir, tmp_path / "ppo", steps=1, reward=str(rm)), prompts=PROMPTS[:8])
    gen = trainer._generator(0, 0)
    ro = trainer.rollout(list(range(8)), gen)
    trainer.score(ro, gen)
    want = RewardModelScorer(str(rm))(ro.prompts, ro.responses)
    assert ro.raw_scores.tolist() == pytest.approx(want, abs=1e-5) and torch.tensor(want).std() > 0
    rec = trainer.rl_step(list(range(8)), trainer._generator(0, 1))
    assert rec["kl"] == 0.0 and all(map(math.isfinite, (rec["score"], rec["pg_loss"], rec["vf_loss"])))
