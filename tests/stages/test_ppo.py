"""PPO stage: KL at step 0, reference == base, learning a toy reward, resume, generation guard, RM critic."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from rlhfkit.models.forward import forward_logprobs
from rlhfkit.models.generation import RolloutSampling, check_unbiased, pad_left
from rlhfkit.runtime.config import load_config
from rlhfkit.runtime.errors import ConfigError
from rlhfkit.runtime.io import read_jsonl
from rlhfkit.stages import ppo
from tests.conftest import WORDS, cli_env

PROMPTS = [f"how {w} {x}?" for w in WORDS for x in WORDS[:3]]


def good_count(prompts, responses):
    """Toy reward: how often the response says 'good'."""
    return [float(r.count("good")) for r in responses]


def ppo_cfg(model_dir, out, steps=16, batch_size=16, **over):
    base = {
        "out_dir": str(out),
        "model": {"name": str(model_dir)},
        "lora": {"r": 16, "alpha": 32, "target_modules": ["all-linear"]},
        "train": {"max_steps": steps, "batch_size": batch_size, "lr": 1e-2, "seed": 0},
        "generation": {"response_min": 6, "response_max": 10},
        "ppo": {"mini_batch_size": 8, "ppo_epochs": 4, "init_kl_coef": 0.05, "adaptive_kl": False},
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return load_config(ppo.PPOConfig, overrides=base)


@pytest.fixture(scope="module")
def toy_run(tiny_sft_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "run"
    # 24 steps: with 16, 39 of 48 seeds met the 2x bound below (HF's multinomial sampler: 43); with 24, 30 of 32
    # (the two misses never took off) — the toy's take-off step varies from seed to seed. Seed 0 took off late
    # with padded rows (mean score 0.29 -> 0.83) and not within 24 steps padding-free (float rounding differs
    # from step 2 on); seeds 1-8 took off in both (last five 4.8-6.3 padded, 1.6-6.3 padding-free)
    cfg = ppo_cfg(tiny_sft_dir, out, steps=24, train={"seed": 1})
    summary = ppo.train(reward_fn=good_count, prompts=PROMPTS[:-16], eval_prompts=PROMPTS[-16:], config=cfg)
    return out, summary


def test_ppo_learns_toy_reward(toy_run):
    out, summary = toy_run
    recs = [r for r in read_jsonl(out / "metrics.jsonl") if "score" in r]
    assert len(recs) == 24
    first, last = [r["score"] for r in recs[:5]], [r["score"] for r in recs[-5:]]
    assert sum(last) / 5 >= 2 * sum(first) / 5, [r["score"] for r in recs]
    for r in recs:
        for k in ("kl", "pg_loss", "vf_loss", "approxkl", "clipfrac", "entropy", "non_score_reward"):
            assert torch.isfinite(torch.tensor(r[k])), (k, r)
    expected = {
        "score",
        "non_score_reward",
        "kl",
        "kl_coef",
        "entropy",
        "approxkl",
        "clipfrac",
        "pg_loss",
        "vf_loss",
        "explained_variance",
        "response_length",
        "time/generate",
        "time/score",
        "time/forward",
        "time/update",
        "tokens_per_s",
    }
    assert expected <= set(recs[0])
    assert summary["eval_reward_after"] > summary["eval_reward_before"]
    table = (out / "before_after.md").read_text()
    assert table.count("\n| ") >= 16 and "mean reward: before" in table
    tags = {r["tag"] for r in read_jsonl(out / "samples.jsonl")}
    assert tags == {"before", "after"}
    assert (out / "final" / "value_head.safetensors").exists() and (out / "final" / "adapter_config.json").exists()


def _first_step_kl(cfg):
    trainer = ppo.RLTrainer(cfg, reward_fn=good_count, prompts=PROMPTS[:32], eval_prompts=[])
    rec = trainer.rl_step(trainer.step_prompts(0), trainer._generator(0, 0))
    return rec, trainer


def test_kl_is_exactly_zero_at_step_0_fresh_adapter(tiny_sft_dir, tmp_path):
    rec, _ = _first_step_kl(ppo_cfg(tiny_sft_dir, tmp_path / "a", steps=1))
    assert rec["kl"] == 0.0 and rec["non_score_reward"] == 0.0


def test_kl_is_exactly_zero_at_step_0_existing_adapter(tiny_model_dir, tiny_corpus, tmp_path):
    """Continuing an SFT adapter: the reference is a frozen copy of it, not the bare base (trl#1340)."""
    from rlhfkit.stages import sft

    sft.run(
        load_config(
            sft.SFTConfig,
            overrides={
                "out_dir": str(tmp_path / "sft"),
                "model": {"name": str(tiny_model_dir)},
                "data": {"path": str(tiny_corpus), "seq_len": 64},
                "lora": {"r": 8, "dropout": 0.0},
                "train": {"max_steps": 8, "lr": 3e-2, "batch_size": 8},
            },
        )
    )
    adapter = tmp_path / "sft" / "final"
    rec, trainer = _first_step_kl(ppo_cfg(adapter, tmp_path / "p", steps=1, lora={"continue_adapter": True, "r": 8}))
    assert rec["kl"] == 0.0
    # ...and that reference really includes the adapter (differs from the base model)
    model = trainer.accelerator.unwrap_model(trainer.model)
    ids = torch.tensor([trainer.queries[0] + trainer.queries[1]])
    mask = torch.ones_like(ids)
    with torch.no_grad(), model.as_reference() as ref:
        ref_lp = forward_logprobs(ref, ids, mask)["logprobs"]
        with model.policy.disable_adapter():
            base_lp = forward_logprobs(model.policy, ids, mask)["logprobs"]
    assert (ref_lp - base_lp).abs().max() > 1e-3
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".reference." in n)


@pytest.mark.parametrize("grad_accum,batch_size", [(1, 16), (2, 16), (1, 8)])
def test_first_minibatch_forward_serves_logprobs_and_update(
    tiny_sft_dir, tmp_path, monkeypatch, grad_accum, batch_size
):
    """Phase 3 runs the first mini-batch's training forward and update() backpropagates it: a step then
    sends 8 rows fewer through the policy, its first mini-batch's ratio is exactly 1, and the weights after
    the step equal those of a step that runs that forward twice (also where that mini-batch is the whole
    batch, its rows shuffled)."""
    rows, weights, stats = {}, {}, {}
    for reuse in (False, True):
        train = {"grad_accum": grad_accum}
        cfg = ppo_cfg(tiny_sft_dir, tmp_path / str(reuse), steps=1, batch_size=batch_size, train=train)
        trainer = ppo.RLTrainer(cfg, reward_fn=good_count, prompts=PROMPTS[:32], eval_prompts=[])
        if not reuse:
            monkeypatch.setattr(trainer, "_first_forward_serves_update", lambda: False)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        seen = []
        policy.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
        out = trainer.update

        def update(ro, gen, out=out, reuse=reuse):
            stats[reuse] = out(ro, gen)
            assert ro.first_out is None  # the shared forward's graph was consumed, not kept
            return stats[reuse]

        trainer.update = update
        rec = trainer.rl_step(trainer.step_prompts(0), trainer._generator(0, 0))
        rows[reuse] = sum(seen)
        weights[reuse] = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        assert rec["kl"] == 0.0  # KL at step 0 stays exactly 0
        assert any(not torch.equal(before[n], w) for n, w in weights[reuse].items())  # the step moved the weights
    policy_rows = batch_size + 4 * batch_size  # phase 3, then 4 epochs of the batch in mini-batches of 8
    assert rows == {False: policy_rows, True: policy_rows - 8}
    assert stats[True]["approxkl"][0] == 0.0 and stats[True]["clipfrac"][0] == 0.0
    for n, w in weights[False].items():
        assert torch.allclose(weights[True][n], w, rtol=1e-4, atol=1e-6), n


def test_reference_with_adapter_disabled_equals_base_model(tiny_sft_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ppo_cfg(tiny_sft_dir, tmp_path / "r", steps=1)
    model, tok = ppo.build_policy(cfg)
    with torch.no_grad():  # make the adapter non-trivial, as after some PPO steps
        for n, p in model.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    ids, mask = pad_left([tok("how tea hot?")["input_ids"], tok("why bread?")["input_ids"]], tok.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_sft_dir).eval()
    with torch.no_grad():
        with model.as_reference() as ref:
            ref_lp = forward_logprobs(ref, ids, mask)["logprobs"]
        pol_lp = model(ids, mask)["logprobs"]
        base_lp = forward_logprobs(base, ids, mask)["logprobs"]
    assert (ref_lp - base_lp).abs().max().item() <= 1e-5
    assert (pol_lp - base_lp).abs().max().item() > 1e-2  # the adapter was really on for the policy


def test_response_only_forward_equals_slice_of_full_forward(tiny_sft_dir, tmp_path):
    """keep=R runs the LM head on the R response positions only; log-probs, logits and values
    must be the last R of the full forward (left-padded queries put the responses at the end)."""
    model, tok = ppo.build_policy(ppo_cfg(tiny_sft_dir, tmp_path / "k", steps=1))
    with torch.no_grad():
        model.v_head.summary.weight.normal_()
    q_ids, q_mask = pad_left([tok("how tea hot?")["input_ids"], tok("why bread dough?")["input_ids"]], tok.pad_token_id)
    resp = torch.tensor([[5, 6, 7, tok.pad_token_id], [8, 9, 10, 11]])
    ids, mask = torch.cat([q_ids, resp], 1), torch.cat([q_mask, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])], 1)
    with torch.no_grad():
        full = model(ids, mask, return_logits=True)
        cut = model(ids, mask, return_logits=True, keep=4)
    assert cut["logits"].shape == (2, 4, full["logits"].shape[-1])
    for k in ("logprobs", "values", "logits"):
        assert cut[k].shape[:2] == (2, 4)
        assert torch.allclose(cut[k], full[k][:, -4:], atol=1e-5), k
    assert cut["logprobs"][0, 3] == 0  # the padded response slot is still masked


def test_tokens_after_eos_are_masked(tiny_sft_dir, tmp_path):
    model, tok = ppo.build_policy(ppo_cfg(tiny_sft_dir, tmp_path / "g", steps=1))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    q = [tok("how tea?")["input_ids"]] * 2
    fake = torch.tensor([[7, eos, 9, 9], [5, 6, 7, 8]])

    def fake_generate(input_ids, **kw):
        assert kw["max_new_tokens"] == 4 and not kw["do_sample"]  # the logits processors sample
        assert [type(x).__name__ for x in kw["logits_processor"]] == ["InverseCdfSampler"]  # no warper
        return torch.cat([input_ids, fake], 1)

    model.policy.generate = fake_generate
    from rlhfkit.models.generation import generate

    resp, rmask = generate(model.policy, tok, q, [4, 3], RolloutSampling(), "cpu")
    assert rmask.tolist() == [[1, 1, 0], [1, 1, 1]]  # up to and including EOS; row 2 cut to its length 3
    assert resp.tolist() == [[7, eos, pad], [5, 6, 7]]


def test_compiled_generation_samples_what_eager_samples(tiny_sft_dir, tmp_path):
    """generation.compile (static cache + torch.compile) draws the same tokens as the eager dynamic-cache path
    under one seed, across left-padded prompts of different lengths and a second call of another shape."""
    from rlhfkit.models.generation import generate

    model, tok = ppo.build_policy(ppo_cfg(tiny_sft_dir, tmp_path / "c", steps=1))
    q = [
        tok("how tea hot?")["input_ids"],
        tok("why bread dough rise so slowly?")["input_ids"],
        tok("tea?")["input_ids"],
    ]
    runs = {}
    for compiled in (False, True):
        g = RolloutSampling(compile=compiled)
        torch.manual_seed(3)
        runs[compiled] = [
            generate(model.policy, tok, q, [9, 12, 5], g, "cpu"),
            generate(model.policy, tok, q[:2], [6, 6], g, "cpu"),
        ]
    for (r0, m0), (r1, m1) in zip(runs[False], runs[True]):
        assert torch.equal(r0, r1) and torch.equal(m0, m1)
    base = model.policy.get_base_model()
    assert base._previous_max_cache_length >= len(q[1]) + 12 and hasattr(
        base, "_compiled_call"
    )  # static cache, compiled decode


def test_frozen_base_sampling_takes_the_same_ppo_steps(tiny_sft_dir, tmp_path):
    """generation.freeze_base: the decode step compiled with the base as constants samples what eager sampling
    samples at every step, so the run's steps match: after each optimizer step (Adam's in-place updates of
    the adapter) the frozen step must read the new adapter, or step 2 would sample other tokens (the same
    generate() path as eager sampling: same tokens, so same scores)."""
    from safetensors.torch import load_file

    logs, weights = {}, {}
    for frozen in (False, True):
        out = tmp_path / f"frozen{frozen}"
        cfg = ppo_cfg(tiny_sft_dir, out, steps=2, generation={"freeze_base": frozen, "merge_lora": False})
        ppo.train(reward_fn=good_count, prompts=PROMPTS, eval_prompts=[], config=cfg)
        logs[frozen] = [r for r in read_jsonl(out / "metrics.jsonl") if "kl" in r]
        weights[frozen] = load_file(out / "final" / "adapter_model.safetensors")
    assert len(logs[True]) == 2
    for a, b in zip(logs[False], logs[True]):
        assert a["response_length"] == b["response_length"] and a["score"] == b["score"]  # the same tokens
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    for name, w in weights[False].items():
        torch.testing.assert_close(weights[True][name], w, rtol=1e-4, atol=1e-5)


def test_sampling_with_the_lora_folded_in_draws_the_same_tokens_and_restores_the_base(tiny_sft_dir, tmp_path):
    """generation.merge_lora: the adapter is merged during generate (plain linears), the tokens equal the
    unmerged sampler's under one seed, and afterwards every weight is bit for bit what it was."""
    from peft.tuners.lora import LoraLayer

    from rlhfkit.models.generation import generate

    model, tok = ppo.build_policy(ppo_cfg(tiny_sft_dir, tmp_path / "m", steps=1))
    policy = model.policy
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that changes the distribution
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    lora = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    seen, real_generate = [], policy.generate
    policy.generate = lambda **kw: seen.append(all(m.merged for m in lora)) or real_generate(**kw)
    q = [tok("how tea hot?")["input_ids"], tok("why bread dough rise so slowly?")["input_ids"]]
    runs = {}
    for merge in (False, True):
        torch.manual_seed(3)
        runs[merge] = generate(policy, tok, q, [12, 9], RolloutSampling(merge_lora=merge), "cpu")
    assert seen == [False, True] and not any(m.merged for m in lora)
    assert torch.equal(runs[False][0], runs[True][0]) and torch.equal(runs[False][1], runs[True][1])
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_generation_guard_refuses_kl_biasing_settings(tiny_sft_dir, tmp_path, capsys):
    for bad in ({"top_k": 50}, {"top_p": 0.9}, {"temperature": 0.7}, {"min_new_tokens": 8}):
        with pytest.raises(ConfigError, match="bias the KL penalty.*accept_kl_bias"):
            check_unbiased(RolloutSampling(**bad))
    check_unbiased(RolloutSampling(top_k=50, accept_kl_bias=True))  # explicit opt-in is allowed
    from rlhfkit.cli import main

    assert (
        main(
            [
                "ppo",
                f"model.name={tiny_sft_dir}",
                "reward=tests.stages.test_ppo:good_count",
                f"out_dir={tmp_path / 'x'}",
                "generation.top_k=50",
                "prompts.path=builtin:review_openers",
            ]
        )
        == 2
    )
    assert "unbiased when y is drawn from" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_resume_is_bitwise(tiny_sft_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = [
        f"model.name={tiny_sft_dir}",
        "reward=tests.stages.test_ppo:good_count",
        f"prompts.path={prompts}",
        "prompts.n_eval=4",
        "train.max_steps=6",
        "train.save_every=3",
        "train.batch_size=8",
        "train.lr=1e-2",
        "lora.target_modules=[all-linear]",
        "generation.response_min=4",
        "generation.response_max=8",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=2",
        "ppo.score_norm=normalize",
    ]
    assert_kill_and_resume_is_bitwise(
        tmp_path,
        args,
        kill_after=3,
        steps=6,
        files=("adapter_model.safetensors", "value_head.safetensors"),
        keys=("score", "kl", "kl_coef", "pg_loss", "vf_loss"),
    )


def assert_kill_and_resume_is_bitwise(tmp_path, args, kill_after, steps, files, keys):
    """`rlhfkit ppo` killed (SIGKILL) after step `kill_after` and resumed ends with the same final
    files and logged metrics, bit for bit, as an uninterrupted run."""
    from safetensors.torch import load_file

    run = lambda out, extra=(), env=None: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "rlhfkit.cli", "ppo", *args, f"out_dir={out}", *extra],
        capture_output=True,
        text=True,
        env={**cli_env(), **(env or {})},
    )
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p = run(straight)
    assert p.returncode == 0, p.stderr[-3000:]
    assert run(killed, env={"RLHFKIT_FAULT_KILL_AFTER_STEP": str(kill_after)}).returncode == -9
    p = run(killed, ["--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    for f in files:
        a, b = load_file(straight / "final" / f), load_file(killed / "final" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    ra = [[r[k] for k in keys] for r in read_jsonl(straight / "metrics.jsonl") if "score" in r]
    rb = [[r[k] for k in keys] for r in read_jsonl(killed / "metrics.jsonl") if "score" in r]
    assert ra == rb and len(ra) == steps


# --------------------------------------------------------------------------- critic initialised from the RM
@pytest.fixture(scope="module")
def rm_dirs(tiny_sft_dir, tmp_path_factory):
    """Two tiny RMs ('good' preferred to 'bad'): a LoRA adapter folder (dropout 0.1) and a full model."""
    import json

    from rlhfkit.stages import reward

    base = tmp_path_factory.mktemp("rm")
    pairs = base / "pairs.jsonl"
    rows = [{"prompt": p, "chosen": f"{p.split()[1]} is good.", "rejected": f"{p.split()[1]} is bad."} for p in PROMPTS]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    for kind, lora in (
        ("adapter", ["lora.enabled=true", "lora.r=4", "lora.target_modules=[all-linear]"]),
        ("full", ["lora.enabled=false"]),
    ):
        reward.run(
            load_config(
                reward.RewardConfig,
                overrides=[
                    f"out_dir={base / kind}",
                    f"model.name={tiny_sft_dir}",
                    f"data.path={pairs}",
                    "data.eval_fraction=0.1",
                    "data.max_length=64",
                    "train.batch_size=8",
                    "train.lr=3e-3",
                    "train.max_steps=6",
                    "train.seed=0",
                    *lora,
                ],
            )
        )
        out[kind] = base / kind / "final"
    return out


def _critic_values(model, fmt, prompts, responses, pad_id):
    """Values from the PPO forward at each text's last token (one pad column on the right keeps it in
    the (B, T-1) value slice)."""
    seqs = [fmt.encode(p, r)[0] for p, r in zip(prompts, responses)]
    T = max(map(len, seqs)) + 1
    ids, mask = torch.full((len(seqs), T), pad_id), torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        values = model(ids, mask)["values"]
    return values[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])]


def test_critic_option_needs_an_rm_folder(tmp_path):
    from rlhfkit.models.critic import critic_source

    assert critic_source("value_head", "") is None
    assert critic_source("rm", str(tmp_path)) == critic_source(str(tmp_path), "") == str(tmp_path)
    with pytest.raises(ConfigError, match="critic='rm' needs reward to be an RM folder"):
        critic_source("rm", "tests.stages.test_ppo:good_count")
    with pytest.raises(ConfigError, match="is not a reward-model folder"):
        critic_source(str(tmp_path / "missing"), "")


TEXTS = (PROMPTS[:4], ["tea is good.", "bad", "the coffee is hot and good.", ""])


@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_rm_critic_starts_as_the_reward_model(tiny_sft_dir, rm_dirs, tmp_path, kind):
    """Ouyang et al. 2022: the value function starts as the RM, so V(text) at step 0 is its score."""
    from rlhfkit.models.forward import sequence_scores

    cfg = ppo_cfg(tiny_sft_dir, tmp_path / "c", steps=1, reward=str(rm_dirs[kind]), critic="rm")
    trainer = ppo.RLTrainer(cfg, prompts=PROMPTS[:8], eval_prompts=[])
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.v_head is None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("critic.")]
    assert any(".score." in n for n in trainable) and any("lora_" in n for n in trainable)
    got = _critic_values(model, trainer.fmt, *TEXTS, trainer.tok.pad_token_id)
    want = torch.tensor(trainer.scorer(*TEXTS))
    assert want.std() > 1e-3 and (got - want).abs().max().item() <= 1e-5, (got, want)
    # Rollout layout (left-padded queries): the first response token's value is the RM's score of the query.
    q_ids, q_mask = pad_left(trainer.queries[:3], trainer.tok.pad_token_id)
    ids, mask = torch.cat([q_ids, q_ids[:, -2:]], 1), torch.cat([q_mask, torch.ones(3, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        first = model(ids, mask)["values"][:, q_ids.shape[1] - 1]
        rm_q = sequence_scores(trainer.scorer.model, q_ids, q_mask)
    assert (first - rm_q).abs().max().item() <= 1e-5
    rec = trainer.rl_step(list(range(8)), trainer._generator(0, 0))
    assert rec["kl"] == 0.0 and rec["non_score_reward"] == 0.0 and math.isfinite(rec["vf_loss"])


def test_rm_critic_trains_and_is_saved_in_final(tiny_sft_dir, rm_dirs, tmp_path):
    from safetensors.torch import load_file

    from rlhfkit.rewards.scoring import load_scorer

    out = tmp_path / "run"
    cfg = ppo_cfg(
        tiny_sft_dir,
        out,
        steps=3,
        batch_size=8,
        reward=str(rm_dirs["adapter"]),
        critic="rm",
        ppo={"mini_batch_size": 4, "ppo_epochs": 2},
    )
    trainer = ppo.RLTrainer(cfg, prompts=PROMPTS[:16], eval_prompts=PROMPTS[-4:])
    model = trainer.accelerator.unwrap_model(trainer.model)
    pad = trainer.tok.pad_token_id
    before = _critic_values(model, trainer.fmt, *TEXTS, pad)
    trainer.fit()
    after = _critic_values(model, trainer.fmt, *TEXTS, pad)
    assert (after - before).abs().max().item() > 1e-4
    recs = [r for r in read_jsonl(out / "metrics.jsonl") if "score" in r]
    assert len(recs) == 3 and recs[0]["kl"] == 0.0
    assert all(math.isfinite(r["vf_loss"]) and math.isfinite(r["explained_variance"]) for r in recs)
    final = out / "final"
    assert (final / "adapter_config.json").exists() and not (final / "value_head.safetensors").exists()
    saved = load_file(final / "critic" / "adapter_model.safetensors")
    rm = load_file(rm_dirs["adapter"] / "adapter_model.safetensors")
    assert saved.keys() == rm.keys() and any(not torch.equal(saved[k], rm[k]) for k in rm if "score" in k)
    # final/critic is an RM folder: scored as a reward model, it gives the trained critic's values.
    reloaded = torch.tensor(load_scorer(str(final / "critic"), device="cpu")(*TEXTS))
    assert (reloaded - after).abs().max().item() <= 1e-4


def test_resume_with_rm_critic_is_bitwise(tiny_sft_dir, rm_dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = [
        f"model.name={tiny_sft_dir}",
        "reward=tests.stages.test_ppo:good_count",
        f"critic={rm_dirs['adapter']}",
        f"prompts.path={prompts}",
        "prompts.n_eval=2",
        "train.max_steps=4",
        "train.save_every=2",
        "train.batch_size=4",
        "train.lr=1e-2",
        "lora.target_modules=[all-linear]",
        "generation.response_min=4",
        "generation.response_max=6",
        "ppo.mini_batch_size=2",
        "ppo.ppo_epochs=2",
    ]
    assert_kill_and_resume_is_bitwise(
        tmp_path,
        args,
        kill_after=2,
        steps=4,
        files=("adapter_model.safetensors", "critic/adapter_model.safetensors"),
        keys=("score", "kl", "pg_loss", "vf_loss", "explained_variance"),
    )
