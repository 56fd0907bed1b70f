"""generation.freeze_base: a decode step compiled with the base weights as constants (inductor freezing) must
read the adapter as it trains, on the cache it was compiled on, and sample as the eager model does."""

from __future__ import annotations

import contextlib

import torch

from rlhfkit.models import generation
from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model


def _policy(model_dir, **lora):
    policy, tok = load_model(ModelConfig(name=str(model_dir)), LoraConfig(enabled=True, dropout=0.0, **lora))
    with torch.no_grad():  # a trained-looking adapter: B = 0 would hide a stale one
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    return policy.eval(), tok


def _decode_logits(policy, tok, ids, mask, frozen: bool) -> torch.Tensor:
    """Greedy decode of 6 tokens; the logits of every step (B, 6, V)."""
    kw = {}
    if frozen:
        kw = {
            **generation.compile_kwargs(policy, ids.shape[1] + 6, frozen=True),
            **generation.frozen_step_cache(policy, 4),
        }
    ctx = generation.inductor_freezing(policy) if frozen else contextlib.nullcontext()
    with torch.no_grad(), ctx, generation.raw_sampling(policy, tok):
        out = policy.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=6,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            **kw,
        )
    return torch.stack(out.logits, 1)


def test_frozen_decode_step_follows_the_adapter_as_it_trains_and_compiles_once(tiny_model_dir):
    """Three rounds, the adapter moved in place between them (as the optimizer does): the frozen step's
    logits equal the eager model's each round, and dynamo traced the step once. Failing versions, measured:
    the adapter held as a module tensor (folded in: round 2 gives the first round's numbers) and
    transformers' fresh cache per call (the graph keeps the first one's tensors: garbage from round 2)."""
    from torch._dynamo.utils import counters

    policy, tok = _policy(tiny_model_dir)
    torch.manual_seed(0)
    ids = torch.randint(3, len(tok), (4, 9))
    mask = torch.ones_like(ids)
    mask[:2, :3] = 0  # left padding
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(3):
        eager = _decode_logits(policy, tok, ids, mask, frozen=False)
        frozen = _decode_logits(policy, tok, ids, mask, frozen=True)
        torch.testing.assert_close(frozen, eager, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p), alpha=0.2)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert not [n for n, m in policy.named_modules() if "forward" in vars(m)]  # every Linear's own forward is back
    assert all(isinstance(p, torch.nn.Parameter) for p in policy.parameters())


def test_freeze_base_says_why_it_cannot_apply(tiny_model_dir):
    """Off CPU, or with trainable weights outside plain Linear layers (LoRA on the embedding), freeze_base
    names the reason (generate then samples as generation.compile says)."""
    policy, _ = _policy(tiny_model_dir)
    assert generation.freeze_refusal(policy, "cpu") is None
    assert "not on CPU" in generation.freeze_refusal(policy, "cuda")
    emb, _ = _policy(tiny_model_dir, target_modules=["q_proj", "embed_tokens"])
    assert "embed_tokens" in generation.freeze_refusal(emb, "cpu")
