"""Padding-free forwards (models/packed.py): the rows' real tokens as one row, attention per row. The outputs
and LoRA gradients equal the padded forward's; no row sees another; where the model does not allow it the
padded forward runs, and the check on a toy batch catches attention that crosses rows."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models import forward, packed
from rlhfkit.models.forward import forward_logprobs
from tests.unit.test_shared_query import batch, token_batches


def lora(model, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets)))
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that changes the outputs, so its gradients are not trivially 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


@pytest.fixture()
def policy(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(forward, "_PACKING_REFUSALS", set())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)), tok


def run(model, ids, mask, pack: bool):
    """forward_logprobs(keep=R) with every output, and the LoRA gradients of a loss on log-probs and hidden."""
    model.zero_grad()
    out = forward_logprobs(
        model, ids, mask, keep=5, pack=pack, return_entropy=True, return_hidden=True, return_logits=True
    )
    kept = mask[:, -5:]  # the value head reads the hidden states of real targets only
    (out["logprobs"].sum() + (out["hidden"].pow(2).mean(-1) * kept).sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return {k: v.detach() for k, v in out.items()}, grads


def test_packed_forward_equals_the_padded_forward(policy):
    """Left-padded queries of 1-8 tokens, right-padded responses (one of a single token), GQA, train mode."""
    model, tok = policy
    model.train()
    ids, mask, _ = batch(tok)
    seen = token_batches(model)
    padded, g_padded = run(model, ids, mask, pack=False)
    assert seen == [tuple(ids.shape)]
    seen.clear()
    rows, g_rows = run(model, ids, mask, pack=True)
    assert seen[-1] == (1, int(mask.sum()))  # after the once-per-model check: the real tokens only
    kept = mask[:, -5:].bool()  # every response token here has a real predictor
    for k in ("logprobs", "entropy", "hidden", "logits"):
        assert rows[k].shape == padded[k].shape, k
        assert (rows[k][kept] - padded[k][kept]).abs().max() < 1e-5, k
        assert not rows[k][~kept].any(), k  # nothing is predicted for a pad target
    assert not padded["logprobs"][~kept].any()
    assert g_padded.abs().max() > 1e-3  # the adapter's gradient is real
    assert (g_rows - g_padded).abs().max() <= 1e-5 * g_padded.abs().max()


def test_no_row_attends_to_another(policy):
    model, tok = policy
    model.eval()
    ids, mask, _ = batch(tok)
    seen = token_batches(model)
    with torch.no_grad():
        before = forward_logprobs(model, ids, mask, keep=5, pack=True)["logprobs"]
        assert seen[-1] == (1, int(mask.sum()))
        changed = ids.clone()
        changed[0] = torch.where(mask[0].bool(), (ids[0] + 11) % len(tok), ids[0])
        after = forward_logprobs(model, changed, mask, keep=5, pack=True)["logprobs"]
    assert (after[0] - before[0]).abs().max() > 1e-2
    assert torch.equal(after[1:], before[1:])


def test_sliding_window_rows_longer_than_the_window(tiny_tokenizer_dir, monkeypatch):
    """A Mistral with a 4-token window: each row attends within its band, as transformers' own mask says."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    monkeypatch.setattr(forward, "_PACKING_REFUSALS", set())
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = lora(MistralForCausalLM(cfg)).eval()
    ids, mask, _ = batch(tok)
    seen = token_batches(model)
    with torch.no_grad():
        padded = forward_logprobs(model, ids, mask, keep=5)["logprobs"]
        rows = forward_logprobs(model, ids, mask, keep=5, pack=True)["logprobs"]
        assert seen[-1] == (1, int(mask.sum()))  # it ran packed (the once-per-model check passed)
        cfg.sliding_window = None  # the band matters here: without it the log-probs move
        wide = forward_logprobs(model, ids, mask, keep=5)["logprobs"]
    assert (rows - padded).abs().max() < 1e-5
    assert (wide - padded).abs().max() > 1e-3


def test_absolute_positions_restart_with_each_row(tiny_tokenizer_dir, monkeypatch):
    """GPT-2 adds a learned embedding of the absolute position: each row's positions must restart at 0."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    monkeypatch.setattr(forward, "_PACKING_REFUSALS", set())
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=64, pad_token_id=tok.pad_token_id)
    model = lora(GPT2LMHeadModel(cfg), targets=("c_attn",)).eval()  # GPT-2 has dropout
    ids, mask, _ = batch(tok)
    seen = token_batches(model)
    with torch.no_grad():
        padded = forward_logprobs(model, ids, mask, keep=5)["logprobs"]
        rows = forward_logprobs(model, ids, mask, keep=5, pack=True)["logprobs"]
    assert seen[-1] == (1, int(mask.sum()))
    assert (rows - padded).abs().max() < 1e-5


def test_checkpointing_runs_padded(policy, capsys):
    """Recomputed in the backward, the forward would not attend per row: gradient checkpointing runs padded."""
    model, tok = policy
    ids, mask, _ = batch(tok)
    full, g_full = run(model, ids, mask, pack=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seen = token_batches(model)
    checkpointed, g_checkpointed = run(model, ids, mask, pack=True)
    assert all(s == tuple(ids.shape) for s in seen)
    assert "gradient checkpointing is on" in capsys.readouterr().out
    assert (checkpointed["logprobs"] - full["logprobs"]).abs().max() < 1e-5
    assert (g_checkpointed - g_full).abs().max() <= 1e-5 * g_full.abs().max()


def test_attention_across_rows_is_caught_and_runs_padded(policy, monkeypatch, capsys):
    """A model whose attention ignores the per-row implementation and the packed position_ids (here: it is
    never switched on, and transformers' packed-sequence mask is off) attends across rows in the packed row:
    the check on a toy batch sees it once, and every forward runs padded."""
    import contextlib

    from transformers import masking_utils

    model, tok = policy
    model.eval()
    monkeypatch.setattr(packed, "packed_attention_on", lambda hf: contextlib.nullcontext())
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    ids, mask, _ = batch(tok)
    seen = token_batches(model)
    with torch.no_grad():
        first = forward_logprobs(model, ids, mask, keep=5, pack=True)["logprobs"]
        seen.clear()
        forward_logprobs(model, ids, mask, keep=5, pack=True)
        padded = forward_logprobs(model, ids, mask, keep=5)["logprobs"]
    assert seen == [tuple(ids.shape)] * 2  # the check is not run again
    assert torch.equal(first, padded)
    out = capsys.readouterr().out
    assert out.count("padding-free forwards are not used: packed and padded log-probs differ") == 1


def test_attention_implementations_other_than_sdpa_and_eager_are_refused(policy):
    from rlhfkit.models.forward import _forward_params, unwrap

    model, _ = policy
    hf = unwrap(model)
    assert packed.refusal(hf, _forward_params(type(hf))) is None
    hf.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in packed.refusal(hf, _forward_params(type(hf)))


def test_the_check_runs_at_the_first_call_even_without_padding(policy):
    """Under ZeRO-3 / FSDP every rank must make the same forward calls: the once-per-model check cannot wait
    for a batch with padding, which one rank may get and another not."""
    model, tok = policy
    ids, mask, _ = batch(tok)
    full = mask.bool().all(1)
    seen = token_batches(model)
    with torch.no_grad():
        forward_logprobs(model, ids[full], mask[full], keep=5, pack=True)
    assert seen == [(2, 9), (1, 14), (int(full.sum()), ids.shape[1])]  # toy batch padded, packed; then padded
