"""bf16 end to end on a tiny model: bf16 weights, but log-probs, values, reward scores, the LoRA
weights and every loss in fp32 (a bf16 scalar keeps ~3 significant digits)."""

from __future__ import annotations

import torch

from rlhfkit.algorithms.losses import pairwise_reward_loss
from rlhfkit.algorithms.rl import value_loss
from rlhfkit.models.forward import forward_logprobs, sequence_scores
from rlhfkit.models.generation import pad_left
from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
from tests.conftest import make_corpus


def _batch(tok, n=4):
    rows = [tok(f"Question: {r['prompt']}\n\nAnswer: {r['response']}")["input_ids"] for r in make_corpus(n, seed=2)]
    return pad_left(rows, tok.pad_token_id)


def test_reward_model_in_bf16_scores_and_trains_its_head_in_fp32(tiny_model_dir):
    model, tok = load_model(
        ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"), LoraConfig(r=4, dropout=0.0), kind="seq_cls"
    )
    hf = model.get_base_model()
    assert hf.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # the body really is bf16
    heads = [p for n, p in model.named_parameters() if "score" in n]
    assert heads and all(p.dtype == torch.float32 for p in heads)  # both the frozen and the trained copy
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    ids, mask = _batch(tok)
    scores = sequence_scores(model, ids, mask)
    assert scores.dtype == torch.float32
    loss, _ = pairwise_reward_loss(scores[:2], scores[2:])
    assert loss.dtype == torch.float32
    loss.backward()
    trained = [p for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    assert trained and all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)


def test_policy_in_bf16_gives_fp32_logprobs_values_and_kl_zero_at_step_0(tiny_model_dir):
    from rlhfkit.models.policy import PolicyWithValue

    policy, tok = load_model(
        ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"),
        LoraConfig(r=4, dropout=0.0, target_modules=["all-linear"]),
    )
    model = PolicyWithValue(policy, "disable_adapter")
    assert policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.v_head.parameters())
    ids, mask = _batch(tok)
    out = model(ids, mask)
    assert out["logprobs"].dtype == torch.float32 and out["values"].dtype == torch.float32
    with torch.no_grad(), model.as_reference() as ref:
        ref_logprobs = forward_logprobs(ref, ids, mask)["logprobs"]
    assert torch.equal(out["logprobs"].detach(), ref_logprobs)  # KL(step 0) = 0 in bf16 too
    m = mask[:, 1:].float()
    vf, _ = value_loss(out["values"], out["values"].detach(), torch.zeros_like(m), m, 0.2)
    assert vf.dtype == torch.float32


def test_lm_head_reads_a_contiguous_input_when_only_the_response_is_scored(tiny_model_dir):
    # HF's logits_to_keep hands the head a strided slice; torch's CPU bf16 matmul then copies the whole
    # (V, H) weight once per row — 20× slower at SmolLM2's shapes (docs/benchmarks/ppo.md, fifth run).
    model, tok = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"), LoraConfig(r=4, dropout=0.0))
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    ids, mask = _batch(tok)
    keep = 5
    with torch.no_grad():
        part = forward_logprobs(model, ids, mask, keep=keep)["logprobs"]
        full = forward_logprobs(model, ids, mask)["logprobs"]
    assert seen == [True, True]
    torch.testing.assert_close(part, full[:, -keep:], atol=0.05, rtol=0)  # bf16 head over other shapes


def test_policy_entropy_comes_from_the_same_log_softmax_as_its_logprobs(tiny_model_dir):
    # PPO's update logs entropy from token_logprobs(entropy=True): it must be the categorical entropy of
    # every kept position, padded ones included (masked later), with the log-probs unchanged
    from torch.distributions import Categorical

    from rlhfkit.models.policy import PolicyWithValue

    policy, tok = load_model(ModelConfig(name=str(tiny_model_dir)), LoraConfig(r=4, dropout=0.0))
    model = PolicyWithValue(policy, "disable_adapter")
    ids, mask = _batch(tok)  # left-padded rows of different lengths
    keep = 6
    with torch.no_grad():
        out = model(ids, mask, return_logits=True, return_entropy=True, keep=keep)
        plain = model(ids, mask, keep=keep)
    assert out["entropy"].shape == out["logprobs"].shape == (ids.shape[0], keep)
    torch.testing.assert_close(out["entropy"], Categorical(logits=out["logits"].float()).entropy(), atol=1e-5, rtol=0)
    assert torch.equal(out["logprobs"], plain["logprobs"])
