"""The StackLLaMA path: adapter chains reload as the model that was trained, PPO runs without dropout,
pairs and prompts are bounded honestly, rollouts sample the raw policy, and the recipe's shape runs
end to end on a Stack Exchange dump."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from html import escape
from pathlib import Path

import pytest
import torch

from rlhfkit.models.forward import eval_mode, forward_logprobs, sequence_scores, unwrap
from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
from rlhfkit.runtime.config import load_config
from rlhfkit.runtime.io import read_jsonl
from rlhfkit.runtime.training import StageRun
from tests.conftest import REPO, WORDS, cli_env
from tests.stages.conftest import preference_pairs
from tests.stages.test_ppo import PROMPTS, good_count, ppo_cfg

TEXTS = ["Question: how tea hot?\n\nAnswer: tea tea is good.", "Question: why bread?\n\nAnswer: bread is bad bad."]


def _batch(tok):
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _outputs(model, tok, kind: str) -> torch.Tensor:
    """What the model computes on a fixed batch: token log-probs (causal LM) or scores (RM)."""
    ids, mask = _batch(tok)
    with torch.no_grad(), eval_mode(model):
        if kind == "seq_cls":
            return sequence_scores(model, ids, mask)
        return forward_logprobs(model, ids, mask)["logprobs"]


@pytest.fixture
def in_memory(monkeypatch):
    """Record each stage's outputs from the in-memory model just before it writes final/."""
    seen = {}
    original = StageRun.save_final

    def save_final(self, save_fn):
        model = self.accelerator.unwrap_model(self.model)
        model = model.policy if hasattr(model, "as_reference") else model  # PPO: the policy of PolicyWithValue
        kind = "seq_cls" if hasattr(unwrap(model), "score") else "causal_lm"
        seen["kind"], seen["out"] = kind, _outputs(model, seen["tok"], kind)
        return original(self, save_fn)

    monkeypatch.setattr(StageRun, "save_final", save_final)
    return seen


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tiny_corpus, tmp_path_factory) -> Path:
    """An SFT LoRA adapter (dropout 0.05, as the recipe) that changes the model noticeably."""
    from rlhfkit.stages import sft

    out = tmp_path_factory.mktemp("sft_lora") / "run"
    sft.run(
        load_config(
            sft.SFTConfig,
            overrides={
                "out_dir": str(out),
                "model": {"name": str(tiny_model_dir)},
                "data": {"path": str(tiny_corpus), "seq_len": 64},
                "lora": {"r": 8, "dropout": 0.05, "target_modules": ["all-linear"]},
                "train": {"max_steps": 8, "lr": 3e-2, "batch_size": 8},
            },
        )
    )
    return out / "final"


@pytest.fixture(scope="module")
def pair_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chain_pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(96, seed=3)))
    return path


def _run_chain(chain: str, start: Path, pairs: Path, out: Path) -> Path:
    """Run one stage on `start` (an adapter folder, unless chain is the plain SFT) and return its final/."""
    from rlhfkit.stages import dpo, ppo, reward, sft

    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}  # other modules than the parent
    if chain.startswith("sft>ppo"):
        cont = chain.endswith("continued")
        over = {**lora, "continue_adapter": cont, "r": 8 if cont else 4}
        cfg = ppo_cfg(start, out, steps=3, batch_size=8, lora=over, ppo={"mini_batch_size": 4, "ppo_epochs": 1})
        ppo.RLTrainer(cfg, reward_fn=good_count, prompts=PROMPTS[:24], eval_prompts=[]).fit()
        return out / "final"
    pair_data = {"path": str(pairs), "max_length": 64}
    sft_data = {"path": str(pairs), "prompt_field": "prompt", "response_field": "chosen", "seq_len": 64}
    stage, data = {
        "sft": (sft, sft_data),
        "sft>sft": (sft, sft_data),
        "sft>rm": (reward, pair_data),
        "sft>dpo": (dpo, pair_data),
    }[chain]
    stage.run(
        load_config(
            stage.CONFIG,
            overrides={
                "out_dir": str(out),
                "model": {"name": str(start)},
                "lora": lora,
                "data": data,
                "train": {"max_steps": 4, "lr": 3e-2, "batch_size": 8},
            },
        )
    )
    return out / "final"


def _reloads(final: Path, kind: str, tmp: Path) -> dict[str, torch.Tensor]:
    """final/ loaded three ways: rlhfkit's loader, plain transformers + peft, and after `rlhfkit merge`."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhfkit.stages import merge

    auto = AutoModelForSequenceClassification if kind == "seq_cls" else AutoModelForCausalLM
    extra = {"num_labels": 1} if kind == "seq_cls" else {}
    tok = AutoTokenizer.from_pretrained(final)
    ours, _ = load_model(
        ModelConfig(name=str(final)), LoraConfig(enabled=False), kind=kind, trainable=False, verbose=False
    )
    # exactly as the README says: peft's Auto classes read the base from adapter_config.json
    plain = (AutoPeftModelForSequenceClassification if kind == "seq_cls" else AutoPeftModelForCausalLM).from_pretrained(
        final, **extra
    )
    merged_dir = tmp / "merged"
    merge.run(merge.MergeConfig(adapter=str(final), out_dir=str(merged_dir)))
    merged = auto.from_pretrained(merged_dir, **extra)
    return {name: _outputs(m, tok, kind) for name, m in (("rlhfkit", ours), ("peft", plain), ("merged", merged))}


@pytest.mark.parametrize("chain", ["sft", "sft>sft", "sft>rm", "sft>dpo", "sft>ppo", "sft>ppo-continued"])
def test_stage_output_reloads_as_the_trained_model(chain, tiny_model_dir, sft_adapter, pair_path, tmp_path, in_memory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    in_memory["tok"] = AutoTokenizer.from_pretrained(sft_adapter)
    start = tiny_model_dir if chain == "sft" else sft_adapter
    final = _run_chain(chain, start, pair_path, tmp_path / "run")
    kind, trained = in_memory["kind"], in_memory["out"]
    assert kind == ("seq_cls" if chain == "sft>rm" else "causal_lm")
    for how, got in _reloads(final, kind, tmp_path).items():
        assert (got - trained).abs().max().item() <= 1e-5, (chain, how)
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())  # the raw base, not the SFT folder
    if chain not in ("sft", "sft>ppo-continued"):  # a fresh LoRA on the merged SFT adapter: folded, rank 8 + 4
        assert cfg["r"] == 12 and json.loads((final / "rlhfkit_lineage.json").read_text())["folded"][0]["rank"] == 8
        # the SFT weights are part of what was trained: base + this stage's own LoRA alone would differ
        if kind == "causal_lm":
            bare = _outputs(AutoModelForCausalLM.from_pretrained(tiny_model_dir), in_memory["tok"], kind)
            assert (bare - trained).abs().max().item() > 1e-3


def test_rm_cannot_continue_a_causal_lm_adapter(sft_adapter, pair_path, tmp_path):
    from rlhfkit.runtime.errors import ConfigError
    from rlhfkit.stages import reward

    with pytest.raises(ConfigError, match="causal-LM adapter"):
        reward.run(
            load_config(
                reward.RewardConfig,
                overrides={
                    "out_dir": str(tmp_path / "rm"),
                    "model": {"name": str(sft_adapter)},
                    "lora": {"continue_adapter": True},
                    "data": {"path": str(pair_path), "max_length": 64},
                    "train": {"max_steps": 1},
                },
            )
        )


# --------------------------------------------------------------------------- dropout
def _dropout_base(tiny_sft_dir: Path, tmp: Path) -> Path:
    """The SFT model with attention dropout 0.3 in its config (as GPT-2/OPT-style bases ship)."""
    out = tmp / "dropout_base"
    shutil.copytree(tiny_sft_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["attention_dropout"] = 0.3
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("where", ["lora", "continued-adapter", "base"])
def test_ppo_runs_without_dropout(where, tiny_sft_dir, sft_adapter, tmp_path, monkeypatch):
    """With dropout > 0 anywhere, the first mini-batch of every step sees ratio exactly 1 (clipfrac 0)
    and KL at step 0 is exactly 0 (Huang et al. 2023: disable dropout)."""
    from rlhfkit.algorithms import rl
    from rlhfkit.stages import ppo

    if where == "lora":
        cfg = ppo_cfg(tiny_sft_dir, tmp_path / "p", steps=3, lora={"dropout": 0.3})
    elif where == "continued-adapter":  # saved with dropout 0.05, and the config asks for 0.3
        cfg = ppo_cfg(sft_adapter, tmp_path / "p", steps=3, lora={"continue_adapter": True, "r": 8, "dropout": 0.3})
    else:
        cfg = ppo_cfg(_dropout_base(tiny_sft_dir, tmp_path), tmp_path / "p", steps=3)
    per_step: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
    surrogate, rl_step = rl.clipped_surrogate, ppo.RLTrainer.rl_step

    def spy_loss(new, old, adv, mask, *clip):
        per_step[-1].append((new.detach().clone(), old.clone(), mask.clone()))
        return surrogate(new, old, adv, mask, *clip)

    def spy_step(self, *a, **k):
        per_step.append([])
        return rl_step(self, *a, **k)

    monkeypatch.setattr(rl, "clipped_surrogate", spy_loss)
    monkeypatch.setattr(ppo.RLTrainer, "rl_step", spy_step)
    trainer = ppo.RLTrainer(cfg, reward_fn=good_count, prompts=PROMPTS[:32], eval_prompts=[])
    if where == "base":  # the base really had attention dropout (0.3 in its config) before PPO turned it off
        policy = trainer.accelerator.unwrap_model(trainer.model).policy
        attn = [m for m in policy.modules() if hasattr(m, "attention_dropout")]
        assert policy.config.attention_dropout == 0.3 and attn and all(m.attention_dropout == 0.0 for m in attn)
    trainer.fit()
    assert len(per_step) == 3
    for step, calls in enumerate(per_step):
        new, old, mask = calls[0]
        ratio = torch.exp(new - old)[mask.bool()]
        assert torch.equal(ratio, torch.ones_like(ratio)), (where, step, (ratio - 1).abs().max().item())
        assert ((ratio - 1).abs() > cfg.ppo.cliprange).sum() == 0
        assert any(not torch.equal(n, o) for n, o, _ in calls[1:])  # later mini-batches did move
    recs = [r for r in read_jsonl(cfg.out_dir + "/metrics.jsonl") if "kl" in r and "score" in r]
    assert recs[0]["kl"] == 0.0 and recs[0]["non_score_reward"] == 0.0


def test_disable_dropout_finds_lora_module_and_attention_rates(tiny_sft_dir, tmp_path):
    from rlhfkit.models.adapters import disable_dropout

    model, _ = load_model(ModelConfig(name=str(_dropout_base(tiny_sft_dir, tmp_path))), LoraConfig(dropout=0.2))
    attn = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert attn and all(m.attention_dropout == 0.3 for m in attn)
    lora_drops = sum(isinstance(m, torch.nn.Dropout) and m.p == 0.2 for m in model.modules())
    assert lora_drops == 2 * 2  # q_proj and v_proj of 2 blocks
    assert disable_dropout(model) == len(attn) + lora_drops
    assert all(m.attention_dropout == 0.0 for m in attn)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_continued_adapter_uses_the_configured_dropout(sft_adapter):
    model, _ = load_model(
        ModelConfig(name=str(sft_adapter)), LoraConfig(continue_adapter=True, dropout=0.25), verbose=False
    )
    drops = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]
    assert drops and all(isinstance(d, torch.nn.Dropout) and d.p == 0.25 for d in drops)
    assert model.peft_config["default"].lora_dropout == 0.25


# --------------------------------------------------------------------------- bounds
class _IdFormat:
    """A PromptFormat stand-in with known token ids: prompt = 0..P-1, responses from 1000 / 2000."""

    def __init__(self, n_prompt: int, n_chosen: int, n_rejected: int):
        self.n = (n_prompt, n_chosen, n_rejected)

    def encode(self, prompt, response):
        p, c, r = self.n
        resp = list(range(1000, 1000 + c)) if response == "c" else list(range(2000, 2000 + r))
        return list(range(p)) + resp, [0] * p + [1] * len(resp)


def test_truncated_pair_shares_identical_prompt_tokens():
    """Worked numbers: prompt 300, chosen 50, rejected 200 tokens, max_length 256. The prompt gets the
    budget the longer answer leaves, max(256 − 200, 128) = 128: its first 112 tokens + last 16. Chosen
    keeps all 50; rejected is cut to 256 − 128 = 128. Per-side cutting gave chosen a 206-token prompt."""
    from rlhfkit.inputs.pairs import encode_pairs

    (pair,) = encode_pairs(
        [{"prompt": "p", "chosen": "c", "rejected": "r"}], _IdFormat(300, 50, 200), 256, truncate=True
    )
    n_c, n_r = pair["chosen_mask"].index(1), pair["rejected_mask"].index(1)
    assert n_c == n_r == 128 and pair["chosen_ids"][:128] == pair["rejected_ids"][:128]
    assert pair["chosen_ids"][:128] == list(range(112)) + list(range(284, 300))
    assert pair["chosen_ids"][128:] == list(range(1000, 1050)) and len(pair["chosen_ids"]) == 178
    assert pair["rejected_ids"][128:] == list(range(2000, 2128)) and len(pair["rejected_ids"]) == 256


def test_over_long_prompts_are_cut_or_dropped_and_counted(tiny_sft_dir, tmp_path):
    from rlhfkit.inputs.templates import PROMPT_TAIL
    from rlhfkit.stages import ppo

    long = "how " + " ".join(WORDS * 3) + "?"
    cfg = ppo_cfg(tiny_sft_dir, tmp_path / "cut", steps=1, prompts={"max_length": 48})
    trainer = ppo.RLTrainer(cfg, reward_fn=good_count, prompts=PROMPTS[:8] + [long], eval_prompts=[long, PROMPTS[9]])
    full = trainer.fmt.encode_prompt(long)
    assert len(full) > 48
    assert trainer.prompt_stats == {"prompts_cut": 1, "prompts_dropped": 0}
    assert max(len(q) for q in trainer.queries + trainer.eval_queries) <= 48
    assert trainer.queries[-1] == full[: 48 - PROMPT_TAIL] + full[-PROMPT_TAIL:]
    assert trainer.eval_queries[0] == trainer.queries[-1]

    cfg = ppo_cfg(tiny_sft_dir, tmp_path / "drop", steps=1, prompts={"max_length": 48, "truncate": False})
    trainer = ppo.RLTrainer(cfg, reward_fn=good_count, prompts=PROMPTS[:8] + [long], eval_prompts=[])
    assert trainer.prompt_stats == {"prompts_cut": 0, "prompts_dropped": 1} and long not in trainer.prompts
    assert len(trainer.queries) == 8


def test_reward_model_scorer_cuts_inputs_longer_than_it_was_trained_on(sft_adapter, pair_path, tmp_path):
    from rlhfkit.inputs.pairs import truncate_sequence
    from rlhfkit.rewards.scoring import RewardModelScorer
    from rlhfkit.stages import reward

    reward.run(
        load_config(
            reward.RewardConfig,
            overrides={
                "out_dir": str(tmp_path / "rm"),
                "model": {"name": str(sft_adapter)},
                "data": {"path": str(pair_path), "max_length": 40},
                "train": {"max_steps": 2, "batch_size": 8},
            },
        )
    )
    scorer = RewardModelScorer(str(tmp_path / "rm" / "final"))
    long_answer = " ".join(WORDS * 2)
    score = scorer(["how tea hot?", "why?"], [long_answer, "good."])
    assert scorer.max_length == 40 and scorer.n_cut == 1
    ids, mask = scorer.fmt.encode("how tea hot?", long_answer)
    cut, _ = truncate_sequence(ids, mask, 40)
    with torch.no_grad():
        expected = sequence_scores(scorer.model, torch.tensor([cut]), torch.ones(1, len(cut), dtype=torch.long))
    assert abs(score[0] - expected.item()) <= 1e-5


# --------------------------------------------------------------------------- raw sampling
def test_rollouts_sample_the_raw_policy_whatever_the_generation_config(tiny_sft_dir, monkeypatch):
    """A model shipping repetition_penalty=1.3: rollout tokens must be drawn from the policy itself,
    i.e. the sampler's per-token log-probs equal forward_logprobs; the model's own config does not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.models import generation
    from rlhfkit.models.generation import FixedLengthSampling, generate, pad_left, response_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_sft_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_sft_dir)
    model.generation_config.repetition_penalty = 1.3
    queries = [tok(f"Question: how {w} tea?\n\nAnswer:")["input_ids"] for w in WORDS[:6]]
    original, steps, drawn_from = model.generate, [], []

    def spy(**kw):
        out = original(**kw, output_scores=True, return_dict_in_generate=True)
        steps.append(torch.stack(out.scores, 1).log_softmax(-1))  # (B, R, V) what HF's sampler drew from
        return out.sequences

    def sampler_vs_policy(resp, rmask, logp_sampler):
        ours = response_logprobs(model, queries, resp, rmask, tok.pad_token_id)
        drawn = logp_sampler[:, : resp.shape[1]].gather(2, resp.unsqueeze(-1)).squeeze(-1)
        return ((drawn - ours) * rmask).abs().max().item()

    real_draw = generation.inverse_cdf_sample  # rlhfkit's draw: record the scores it draws from
    monkeypatch.setattr(
        generation, "inverse_cdf_sample", lambda s: drawn_from.append(s.log_softmax(-1)) or real_draw(s)
    )
    torch.manual_seed(0)
    resp, rmask = generate(model, tok, queries, [12] * len(queries), FixedLengthSampling(max_new_tokens=12), "cpu")
    assert sampler_vs_policy(resp, rmask, torch.stack(drawn_from, 1)) <= 1e-4
    assert model.generation_config.repetition_penalty == 1.3  # restored after sampling

    # control: generate() left to the model's own generation_config samples something else
    q_ids, q_mask = pad_left(queries, tok.pad_token_id)
    seqs = spy(
        input_ids=q_ids,
        attention_mask=q_mask,
        do_sample=True,
        max_new_tokens=12,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    resp = seqs[:, q_ids.shape[1] :]
    eos = (resp == tok.eos_token_id).long().cumsum(1)
    rmask = ((eos == 0) | ((eos == 1) & (resp == tok.eos_token_id))).long()
    assert sampler_vs_policy(resp * rmask, rmask, steps[-1]) > 1e-2


# --------------------------------------------------------------------------- the recipe, end to end
def write_dump(folder: Path, n_questions: int = 72, seed: int = 0) -> Path:
    """A Stack Exchange Posts.xml whose better-voted answers say 'good' (HTML bodies, an accepted one)."""
    rng = random.Random(seed)
    rows, pid = [], 1
    for q in range(n_questions):
        w, x = rng.choice(WORDS), rng.choice(WORDS)
        qid, pid = pid, pid + 1
        answers = [(9, f"<p>{w} {x} is <b>good</b>.</p>"), (3, f"<p>{w} is ok.</p>"), (0, f"<p>{x} {w} is bad.</p>")]
        accepted = pid
        rows.append(
            f'<row Id="{qid}" PostTypeId="1" AcceptedAnswerId="{accepted}" Score="5" '
            f'Title="{escape(f"how {w} {x}?")}" Body="{escape(f"<p>how {w} {x} q{q}?</p>")}" />'
        )
        for score, body in answers:
            rows.append(f'<row Id="{pid}" PostTypeId="2" ParentId="{qid}" Score="{score}" Body="{escape(body)}" />')
            pid += 1
    folder.mkdir(parents=True)
    (folder / "Posts.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<posts>\n' + "\n".join(rows) + "\n</posts>\n"
    )
    return folder


def test_stackllama_recipe_shape_end_to_end(tiny_model_dir, tmp_path):
    """recipes/stackllama.yaml as shipped, sized down: data → SFT LoRA → RM LoRA on the SFT adapter →
    PPO LoRA on the SFT adapter → eval → report, and every output reloads on the raw base."""
    dump = write_dump(tmp_path / "tiny.stackexchange.com")
    run_dir = tmp_path / "run"
    small = [
        "vars.seq_len=96",
        "vars.layers=-1",
        "sft.train.max_steps=4",
        "sft.train.lr=1e-2",
        "rm.train.max_steps=4",
        "rm.train.lr=1e-2",
        "ppo.train.max_steps=2",
        "ppo.train.batch_size=4",
        "ppo.prompts.n_eval=4",
        "eval.prompts.n_eval=4",
        "ppo.generation.response_min=4",
        "ppo.generation.response_max=8",
        "ppo.ppo.mini_batch_size=2",
        "eval.generation.max_new_tokens=8",
    ]
    cmd = [
        sys.executable,
        "-m",
        "rlhfkit.cli",
        "run",
        str(REPO / "recipes" / "stackllama.yaml"),
        f"run_dir={run_dir}",
        f"vars.model={tiny_model_dir}",
        f"vars.dump={dump}",
        *small,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for stage in ("data", "sft", "rm", "ppo", "eval", "report"):
        assert json.loads((run_dir / ".stages" / f"{stage}.json").read_text())["status"] == "done", stage
    adapters = {
        s: json.loads((run_dir / s / "final" / "adapter_config.json").read_text()) for s in ("sft", "rm", "ppo")
    }
    assert adapters["rm"]["task_type"] == "SEQ_CLS" and adapters["ppo"]["task_type"] == "CAUSAL_LM"
    for stage in ("rm", "ppo"):  # started from the SFT adapter, saved folded with it on the raw base
        assert adapters[stage]["base_model_name_or_path"] == str(tiny_model_dir.resolve())
        lineage = json.loads((run_dir / stage / "final" / "rlhfkit_lineage.json").read_text())
        assert Path(lineage["folded"][0]["adapter"]) == run_dir / "sft" / "final"
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"sft", "ppo"} and metrics["prompts"] == 4
    assert metrics["models"]["sft"]["kl"] == 0.0  # the SFT model against itself (the reference)
    assert (run_dir / "report.html").exists()
