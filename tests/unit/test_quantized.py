"""8-bit / 4-bit bases (bitsandbytes' CPU backend, ≥ 0.48): a LoRA step learns, the adapter-off
reference is the quantized base (KL 0 at step 0), and a 4-bit-trained adapter merges into the
full-precision base."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

import pytest
import torch

from rlhfkit.models.forward import forward_logprobs
from rlhfkit.models.generation import pad_left
from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
from rlhfkit.runtime.errors import RlhfkitError
from tests.conftest import make_corpus


def _bnb_version() -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in version("bitsandbytes").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return ()


needs_bnb = pytest.mark.skipif(
    _bnb_version() < (0, 48), reason="bitsandbytes ≥ 0.48 (CPU backend) not installed: pip install 'rlhfkit[quant]'"
)


def _batch(tok, n=8):
    rows = [tok(f"Question: {r['prompt']}\n\nAnswer: {r['response']}")["input_ids"] for r in make_corpus(n, seed=5)]
    return pad_left(rows, tok.pad_token_id)


def _nll(model, ids, mask):
    lp = forward_logprobs(model, ids, mask)["logprobs"]
    return -(lp * mask[:, 1:]).sum() / mask[:, 1:].sum()


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_quantized_base_learns_and_adapter_off_is_the_base(bits, tiny_model_dir):
    import bitsandbytes as bnb

    cfg = ModelConfig(name=str(tiny_model_dir), **{f"load_in_{bits}bit": True})
    policy, tok = load_model(cfg, LoraConfig(r=4, dropout=0.0, target_modules=["all-linear"]), verbose=False)
    layer = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert sum(isinstance(m, layer) for m in policy.modules()) == 14  # 2 blocks × 7 projections
    ids, mask = _batch(tok)
    with torch.no_grad():
        lp0 = forward_logprobs(policy, ids, mask)["logprobs"]
        with policy.disable_adapter():
            ref0 = forward_logprobs(policy, ids, mask)["logprobs"]
    assert torch.equal(lp0, ref0)  # the reference (adapter off) is the policy at step 0: KL exactly 0
    full, _ = load_model(ModelConfig(name=str(tiny_model_dir)), trainable=False, verbose=False)
    with torch.no_grad():
        assert (forward_logprobs(full, ids, mask)["logprobs"] - ref0).abs().max() > 1e-4  # really quantized

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(6):
        loss = _nll(policy, ids, mask)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    with torch.no_grad():
        with policy.disable_adapter():
            assert torch.equal(forward_logprobs(policy, ids, mask)["logprobs"], ref0)  # frozen quantized base
        assert (forward_logprobs(policy, ids, mask)["logprobs"] - ref0).abs().max() > 1e-2


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_lora_below_a_quantized_layer_learns_after_an_eval_forward(bits, tiny_model_dir):
    """A stage's step-0 eval or a rollout runs the 4-bit base in eval mode without grad; on CPUs with AVX-512
    BF16, bitsandbytes then switches the layer to an inference kernel without backward for good. A LoRA on
    q/v (below the 4-bit o_proj and MLP) must still get gradients. Fails on such a CPU (AMD EPYC Zen 4) without
    loading.keep_4bit_differentiable; the flag check holds on every CPU."""
    cfg = ModelConfig(name=str(tiny_model_dir), **{f"load_in_{bits}bit": True})
    policy, tok = load_model(cfg, LoraConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]), verbose=False)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in policy.modules())
    ids, mask = _batch(tok)
    policy.eval()
    with torch.no_grad():
        forward_logprobs(policy, ids, mask)
    policy.train()
    _nll(policy, ids, mask).backward()
    b_grads = {n: p.grad for n, p in policy.named_parameters() if "lora_B" in n}
    assert len(b_grads) == 4  # q_proj, v_proj of 2 blocks
    assert all(g is not None and g.abs().max() > 0 for g in b_grads.values()), b_grads.keys()


@needs_bnb
def test_4bit_trained_adapter_merges_into_full_precision_base(tiny_model_dir, tiny_corpus, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import merge, sft

    sft.run(
        load_config(
            sft.SFTConfig,
            overrides={
                "out_dir": str(tmp_path / "sft"),
                "model": {"name": str(tiny_model_dir), "load_in_4bit": True},
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "data": {"path": str(tiny_corpus), "seq_len": 64},
                "train": {"max_steps": 3, "lr": 1e-2, "batch_size": 8},
            },
        )
    )
    adapter = tmp_path / "sft" / "final"
    merge.run(merge.MergeConfig(adapter=str(adapter), out_dir=str(tmp_path / "merged")))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith(("q_proj", "v_proj")))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    lora = load_file(adapter / "adapter_model.safetensors")
    a_keys = [k for k in lora if ".lora_A." in k]
    assert len(a_keys) == 4  # q_proj, v_proj of 2 blocks
    for k in a_keys:
        name = k.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
        delta = lora[k.replace("lora_A", "lora_B")] @ lora[k] * (8 / 4)
        assert delta.abs().max() > 1e-4  # the adapter learned something
        # merged = full-precision base + B·A·alpha/r (not the dequantized 4-bit base)
        assert (merged.state_dict()[name] - (base[name] + delta)).abs().max() <= 1e-6


def test_quantized_load_without_bitsandbytes_is_one_line(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(RlhfkitError, match=r"rlhfkit\[quant\]"):
        load_model(ModelConfig(name=str(tiny_model_dir), load_in_4bit=True), LoraConfig(), verbose=False)


@needs_bnb
def test_ppo_policy_on_4bit_base_equals_its_reference_at_step_0(tiny_sft_dir, tmp_path):
    from rlhfkit.stages import ppo
    from tests.stages.test_ppo import ppo_cfg

    model, tok = ppo.build_policy(ppo_cfg(tiny_sft_dir, tmp_path / "p", steps=1, model={"load_in_4bit": True}))
    ids, mask = _batch(tok, 4)
    with torch.no_grad():
        logprobs = forward_logprobs(model.policy, ids, mask)["logprobs"]
        with model.as_reference() as ref:
            ref_logprobs = forward_logprobs(ref, ids, mask)["logprobs"]
    assert torch.equal(logprobs, ref_logprobs)  # KL(step 0) = 0 with the adapter-off reference
