"""The rollout sampler (models/generation.sampler): one token per row drawn by inverse CDF from
softmax(scores), after HF's temperature / top-k / top-p warpers when a run asks for them."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.models.generation import SamplingConfig, inverse_cdf_sample, sampler
from rlhfkit.runtime.errors import RlhfkitError

PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])


def _draw(processors, n=32_000, rows=500):
    scores = PROBS.log().expand(rows, -1)
    ids = torch.zeros(rows, 1, dtype=torch.long)
    counts = torch.zeros(len(PROBS))
    for _ in range(n // rows):
        out = processors(ids, scores.clone())
        assert ((out == 0).sum(-1) == 1).all() and ((out == 0) | (out == -math.inf)).all()  # one token per row
        counts += torch.bincount(out.argmax(-1), minlength=len(PROBS))
    return counts / counts.sum()


def test_draws_follow_the_softmax_and_never_a_zero_probability_token():
    torch.manual_seed(0)
    freq = _draw(sampler(SamplingConfig()))
    # binomial sd at n = 32k is ≤ 0.0028; 0.012 is > 4 sd
    torch.testing.assert_close(freq, PROBS, atol=0.012, rtol=0)
    assert freq[-1] == 0


def test_top_k_and_temperature_reshape_before_the_draw():
    torch.manual_seed(0)
    freq = _draw(sampler(SamplingConfig(top_k=2, temperature=0.5)))
    # top-2 keeps 0.3 and 0.4; temperature 0.5 squares them: 0.09 : 0.16 → 0.36 / 0.64
    torch.testing.assert_close(freq, torch.tensor([0, 0, 0.36, 0.64, 0]), atol=0.012, rtol=0)


def test_non_finite_logits_stop_the_draw():
    with pytest.raises(RlhfkitError, match="not finite"):
        inverse_cdf_sample(torch.tensor([[0.0, float("nan"), 1.0]]))


def test_min_new_tokens_is_applied_before_the_draw(tiny_sft_dir):
    # transformers appends custom processors after its own (MinNewTokensLength among them): were the draw first,
    # a drawn EOS would be masked to -inf afterwards and the greedy pick would return token 0 instead
    from rlhfkit.models.generation import generate
    from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model

    model, tok = load_model(ModelConfig(name=str(tiny_sft_dir)), LoraConfig(enabled=False), trainable=False)
    torch.manual_seed(0)
    q = [tok("how good tea?")["input_ids"]] * 64
    free, _ = generate(model, tok, q, [24] * 64, SamplingConfig(), "cpu")
    assert (free == tok.eos_token_id).any(-1).float().mean() > 0.5  # this model ends most answers early
    resp, rmask = generate(model, tok, q, [24] * 64, SamplingConfig(min_new_tokens=24), "cpu")
    assert rmask.all() and not (resp == tok.eos_token_id).any()
    assert (resp == 0).float().mean() < 0.05  # token 0 no likelier than any other


def test_top_p_keeps_the_smallest_set_reaching_p():
    torch.manual_seed(0)
    freq = _draw(sampler(SamplingConfig(top_p=0.65)))
    # sorted 0.4, 0.3 reach 0.7 ≥ 0.65: those two, renormalised 4 : 3
    torch.testing.assert_close(freq, torch.tensor([0, 0, 3 / 7, 4 / 7, 0]), atol=0.012, rtol=0)


def test_decode_head_by_vocab_rows_equals_the_linear_head_and_is_restored(tiny_sft_dir, monkeypatch):
    """The decode-step head (W · hᵀ)ᵀ gives the Linear head's logits (float rounding only) and the same
    sampled tokens for a seed; training-sized inputs keep Linear; the head's own forward comes back after."""
    import contextlib

    from rlhfkit.models import generation
    from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model

    policy, tok = load_model(ModelConfig(name=str(tiny_sft_dir)), LoraConfig(enabled=True), kind="causal_lm")
    head = policy.get_base_model().get_output_embeddings()
    h = torch.randn(8, 1, head.in_features)
    big = torch.randn(2, generation.DECODE_ROWS, head.in_features)
    plain, plain_big = head(h), head(big)
    with generation.head_by_vocab_rows(policy):
        assert "forward" in vars(head)
        torch.testing.assert_close(head(h), plain, rtol=1e-5, atol=1e-5)
        assert torch.equal(head(big), plain_big)  # Linear itself above DECODE_ROWS rows
    assert "forward" not in vars(head)

    g = generation.FixedLengthSampling(max_new_tokens=12)
    queries = [tok("a movie about")["input_ids"], tok("the")["input_ids"]] * 4
    torch.manual_seed(3)
    with_it = generation.generate(policy, tok, queries, [12] * 8, g, "cpu")  # generate enters the context itself
    monkeypatch.setattr(generation, "head_by_vocab_rows", lambda *a, **k: contextlib.nullcontext())
    torch.manual_seed(3)
    without = generation.generate(policy, tok, queries, [12] * 8, g, "cpu")
    assert torch.equal(with_it[0], without[0]) and torch.equal(with_it[1], without[1])

    hooked = lambda x: torch.nn.functional.linear(x, head.weight, head.bias)  # noqa: E731  (as accelerate's hooks set)
    head.forward = hooked
    monkeypatch.undo()
    with generation.head_by_vocab_rows(policy):
        assert vars(head)["forward"] is hooked
    assert vars(head)["forward"] is hooked  # someone else's forward is neither replaced nor removed


def test_decode_head_leaves_a_lora_wrapped_head_alone(tiny_sft_dir):
    """A head that LoRA targets is peft's layer, not a plain Linear: its forward (with the adapter) is kept."""
    from rlhfkit.models.generation import head_by_vocab_rows
    from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model

    lora = LoraConfig(enabled=True, target_modules=["lm_head"])
    policy, _ = load_model(ModelConfig(name=str(tiny_sft_dir)), lora, kind="causal_lm")
    head = policy.get_base_model().get_output_embeddings()
    with head_by_vocab_rows(policy):
        assert "forward" not in vars(head)
