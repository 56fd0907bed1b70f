"""A query shared by several rows (GRPO/RLOO's k samples of a prompt) runs once: log-probs, hidden states,
logits and gradients equal the full forward's, and sampling draws the same tokens."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models.forward import forward_logprobs
from rlhfkit.models.generation import RolloutSampling, generate, pad_left


@pytest.fixture()
def policy(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that changes the outputs, so its gradients are not trivially 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model, tok


def token_batches(model) -> list[tuple[int, int]]:
    """(rows, columns) of every token batch the model's embedding sees."""
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    return seen


def batch(tok):
    """Four queries of different lengths — one a single token, whose shared columns are all padding — three
    of them sampled 2-3 times, rows shuffled; padded responses."""
    queries = [tok(p)["input_ids"] for p in ["how tea hot?", "why bread dough rise so slowly?", "tea?"]] + [[7]]
    order = [1, 0, 1, 2, 0, 3, 1, 0, 3]
    q_ids, q_mask = pad_left([queries[i] for i in order], tok.pad_token_id)
    g = torch.Generator().manual_seed(1)
    resp = torch.randint(3, len(tok), (len(order), 5), generator=g)
    rmask = torch.ones_like(resp)
    rmask[0, 3:], rmask[4, 1:], rmask[5, 2:] = 0, 0, 0
    return torch.cat([q_ids, resp], 1), torch.cat([q_mask, rmask], 1), rmask


def run(model, ids, mask, rmask, share: bool, **kw):
    """forward_logprobs(keep=R) with or without the shared query, and the LoRA gradients of Σ logprobs."""
    model.zero_grad()
    out = forward_logprobs(model, ids, mask, keep=rmask.shape[1], share_queries=share, **kw)
    (out["logprobs"] * rmask).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return {k: v.detach() for k, v in out.items()}, grads


def test_shared_query_forward_equals_the_full_forward(policy):
    """In training mode, as the update runs it (the no-grad reference and rollout forwards are eval mode)."""
    model, tok = policy
    model.train()
    ids, mask, rmask = batch(tok)
    seen = token_batches(model)
    full, g_full = run(model, ids, mask, rmask, False, return_hidden=True, return_logits=True)
    assert seen == [tuple(ids.shape)]
    seen.clear()
    shared, g_shared = run(model, ids, mask, rmask, True, return_hidden=True, return_logits=True)
    P = ids.shape[1] - 5 - 1
    assert seen == [(4, P), (9, 6)]  # the 4 distinct queries once, then every row's last query token + response
    for k in ("logprobs", "hidden", "logits"):
        assert shared[k].shape == full[k].shape
        assert (shared[k] - full[k]).abs().max() < 1e-5, k
    assert g_full.abs().max() > 1e-3  # the adapter's gradient is real
    assert (g_shared - g_full).abs().max() <= 1e-5 * g_full.abs().max()


def test_distinct_queries_and_checkpointing_take_the_plain_forward(policy):
    """PPO's one sample per prompt shares nothing; gradient checkpointing drops the cache in training, so
    the shared path stands aside there (its numbers still equal the plain forward's)."""
    model, tok = policy
    ids, mask, rmask = batch(tok)
    seen = token_batches(model)
    run(model, ids[[0, 1, 3, 5]], mask[[0, 1, 3, 5]], rmask[[0, 1, 3, 5]], True)
    assert seen == [(4, ids.shape[1])]
    seen.clear()
    full, _ = run(model, ids, mask, rmask, False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seen.clear()
    checkpointed, _ = run(model, ids, mask, rmask, True)
    assert seen == [tuple(ids.shape)]
    assert (checkpointed["logprobs"] - full["logprobs"]).abs().max() < 1e-5


@pytest.mark.parametrize("merge_lora", [True, False])
def test_sampling_prefills_each_prompt_once_and_draws_the_same_tokens(policy, merge_lora):
    model, tok = policy
    prompts = ["how tea hot?", "why bread dough rise so slowly?"]
    queries = [tok(p)["input_ids"] for p in prompts for _ in range(3)]
    Q = max(map(len, queries))
    seen = token_batches(model)
    runs = {}
    for share in (False, True):
        for chunk in (0, 4):  # one generate call; chunks of 4 rows, which split the second prompt's group
            seen.clear()
            torch.manual_seed(5)
            g = RolloutSampling(merge_lora=merge_lora, batch_size=chunk)
            runs[share, chunk] = generate(model, tok, queries, [7] * 6, g, "cpu", share_queries=share)
        # the last call (chunks [a a a b], [b b]): each chunk's distinct prompts are prefilled once, then
        # generate resumes from that cache with the last query token alone (b is the longer prompt)
        prefills = [i for i, s in enumerate(seen) if s[1] > 1]
        if share:
            assert [seen[i] for i in prefills] == [(2, Q - 1), (1, Q - 1)]
            assert [seen[i + 1] for i in prefills] == [(4, 1), (2, 1)]
        else:
            assert [seen[i] for i in prefills] == [(4, Q), (2, Q)]
    for chunk in (0, 4):  # the same draws with and without the shared prefill (chunking draws other ones)
        (r1, m1), (r0, m0) = runs[True, chunk], runs[False, chunk]
        assert torch.equal(r1, r0) and torch.equal(m1, m0)
    assert runs[True, 0][1].sum() > 6  # real responses, not only EOS


@pytest.mark.parametrize("keep", [0, 5])
def test_logprobs_entropy_and_gradients_equal_the_textbook_shifted_log_softmax(policy, keep):
    """forward_logprobs log-softmaxes the head's output whole and drops the last position after (no copy of the
    (B, K+1, V) logits): the log-probs, entropy and LoRA gradients equal log_softmax(logits[:, :-1]) gathered
    at the next tokens, computed by hand from the model's full logits."""
    import torch.nn.functional as F

    model, tok = policy
    model.train()
    ids, mask, rmask = batch(tok)
    model.zero_grad()
    out = forward_logprobs(model, ids, mask, keep=keep, return_entropy=True)
    (out["logprobs"] * mask[:, 1:][:, -out["logprobs"].shape[1] :]).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    model.zero_grad()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logp = F.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1], -1)
    ref = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]  # (B, T-1), 0 at padded targets
    entropy = -(logp.exp() * logp).sum(-1)
    if keep:
        ref, entropy = ref[:, -keep:], entropy[:, -keep:]
    (ref * mask[:, 1:][:, -ref.shape[1] :]).sum().backward()
    ref_grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(out["logprobs"], ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["entropy"], entropy.detach(), rtol=0, atol=1e-4)
    assert grads.abs().max() > 1e-3
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


def test_left_pad_columns_no_row_uses_are_dropped(policy):
    """A mini-batch cut from a batch padded to a longer query carries left-pad columns no row uses: with keep=K
    the forward drops them (the embedding sees the narrower batch) and returns the same outputs; a K reaching
    into those columns keeps its K outputs."""
    model, tok = policy
    model.eval()
    ids, mask, rmask = batch(tok)
    wide_ids = torch.cat([torch.full((len(ids), 6), tok.pad_token_id), ids], 1)
    wide_mask = torch.cat([torch.zeros((len(ids), 6), dtype=mask.dtype), mask], 1)
    seen = token_batches(model)
    with torch.no_grad():
        narrow = forward_logprobs(model, ids, mask, keep=5, return_hidden=True, return_entropy=True)
        wide = forward_logprobs(model, wide_ids, wide_mask, keep=5, return_hidden=True, return_entropy=True)
        deep = forward_logprobs(model, wide_ids, wide_mask, keep=ids.shape[1] + 2)
    assert seen == [tuple(ids.shape), tuple(ids.shape), (len(ids), ids.shape[1] + 3)]
    for key in ("logprobs", "entropy", "hidden"):
        torch.testing.assert_close(wide[key], narrow[key], rtol=0, atol=1e-5)
    assert deep["logprobs"].shape == (len(ids), ids.shape[1] + 2)
    torch.testing.assert_close(deep["logprobs"][:, -5:], narrow["logprobs"], rtol=0, atol=1e-5)
