"""DPO stage: equivalence with TRL's DPOTrainer, learning, resume, reference variants.

The loss formulas themselves have worked-number tests in test_losses.py; these test the stage.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch

from rlhfkit.runtime.config import load_config
from rlhfkit.runtime.errors import ConfigError
from rlhfkit.runtime.io import read_jsonl
from rlhfkit.stages import dpo
from tests.conftest import WORDS, cli_env

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LOG2 = math.log(2.0)


def preference_rows(n: int, seed: int = 0, word: str = "coffee") -> list[dict]:
    """Chosen = a random answer with `word` inserted; rejected = the same answer with another word there."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w != word]
    rows = []
    for i in range(n):
        resp = [rng.choice(words) for _ in range(4)]
        k = rng.randrange(len(resp) + 1)
        chosen = resp[:k] + [word] + resp[k:]
        rejected = resp[:k] + [rng.choice(words)] + resp[k:]
        rows.append(
            {
                "prompt": f"how {rng.choice(words)} {rng.choice(words)} {i}?",
                "chosen": " ".join(chosen) + ".",
                "rejected": " ".join(rejected) + ".",
            }
        )
    return rows


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """transformers.Trainer leaves a process-wide AcceleratorState behind (TRL's configs default to bf16
    mixed precision); a later `Accelerator()` in this process would silently inherit it (bf16 autocast),
    which broke the bitwise resume check. Every test here starts and ends with a fresh state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(240, seed=1)))
    return path


def dpo_cfg(model_dir, data_path, out, **over):
    base = {
        "out_dir": str(out),
        "model": {"name": str(model_dir)},
        "data": {"path": str(data_path), "eval_fraction": 0.2, "max_length": 64},
        "train": {"lr": 1e-2, "max_steps": 4, "batch_size": 8, "seed": 1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "beta": 0.1,
    }
    return load_config(dpo.DPOConfig, overrides=_deep(base, over))


def _deep(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _losses(out_dir):
    return [r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl") if "loss" in r]


# --------------------------------------------------------------------------- config
def test_config_rejects_bad_combinations_and_documents_fields():
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(dpo.DPOConfig, overrides=["loss_type=ipo", "label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="beta"):
        load_config(dpo.DPOConfig, overrides=["beta=0"])
    with pytest.raises(ConfigError):
        load_config(dpo.DPOConfig, overrides=["loss_type=kto"])
    from rlhfkit.runtime.config import field_docs

    docs = field_docs(dpo.DPOConfig)
    import dataclasses

    assert all(docs.get(f.name) for f in dataclasses.fields(dpo.DPOConfig)), "every field documented"
    assert dpo.CONFIG is dpo.DPOConfig


# --------------------------------------------------------------------------- TRL equivalence
@pytest.mark.parametrize(
    "loss_type,label_smoothing,beta", [("sigmoid", 0.0, 0.2), ("ipo", 0.0, 0.5), ("cdpo", 0.2, 0.3)]
)
def test_loss_equals_trl_dpo_trainer(tiny_model_dir, tmp_path, loss_type, label_smoothing, beta):
    """Same tiny weights (base + identical non-zero LoRA), same token ids, same β: our stage's micro-batch
    loss == trl.DPOTrainer.compute_loss on its own collator's batch, reference = adapter disabled in both.

    TRL 1.16's `sigmoid` loss ignores `label_smoothing` (it only feeds robust / exo_pair / aot), so
    conservative DPO is checked against TRL's `aot` loss on one-pair batches: its sort over a single
    pair is the identity and it then computes exactly -(1-ε) log σ(βh) - ε log σ(-βh).
    """
    trl = pytest.importorskip("trl")
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.inputs.pairs import encode_pairs
    from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
    from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = preference_rows(5, seed=7)
    rows[1]["rejected"] = "no."  # very different lengths: padding on both sides of the batch
    rows[3]["chosen"] = rows[3]["chosen"] + " and then the sweet dark roast is good, fresh and hot."
    pairs = encode_pairs(rows, PromptFormat(TemplateConfig(), tok), 512)
    assert len(pairs) == len(rows)

    # ours: the stage's policy (fresh LoRA), then the same random non-zero LoRA weights in both
    ours_type = "sigmoid" if loss_type == "cdpo" else loss_type
    model, _ = load_model(
        ModelConfig(name=str(tiny_model_dir)),
        LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=TARGETS),
        verbose=False,
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    micro = dpo.make_micro(pairs, list(range(len(pairs))), tok.pad_token_id)
    ref = dpo.Reference("adapter", average=ours_type == "ipo")
    loss_sum, stats = dpo.micro_loss(model, micro, ref, beta, ours_type, label_smoothing)
    ours = loss_sum.item() / len(pairs)

    # TRL: its own trainer, collator and loss on the same token ids (prompt ids are shared by both rows)
    examples = []
    for p in pairs:
        k = p["chosen_mask"].index(1)
        assert p["rejected_mask"].index(1) == k and p["chosen_ids"][:k] == p["rejected_ids"][:k]
        examples.append(
            {
                "prompt_ids": p["chosen_ids"][:k],
                "chosen_ids": p["chosen_ids"][k:],
                "rejected_ids": p["rejected_ids"][k:],
            }
        )
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=["aot" if loss_type == "cdpo" else loss_type],
        label_smoothing=label_smoothing,
        per_device_train_batch_size=len(pairs),
        max_length=None,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        bf16=False,
        fp16=False,
    )
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        processing_class=tok,
        train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
        peft_config=peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
    )
    src = {n: p for n, p in model.named_parameters() if "lora_" in n}
    dst = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert src.keys() == dst.keys() and len(src) == 2 * 4 * 2
    with torch.no_grad():
        for n in src:
            dst[n].copy_(src[n])
    with torch.no_grad():
        if loss_type == "cdpo":
            theirs = sum(
                trainer.compute_loss(trainer.model, trainer.data_collator([e])).item() for e in examples
            ) / len(examples)
        else:
            theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()
    assert abs(ours - LOG2) > 1e-2, "policy must differ from the reference for the check to mean anything"
    assert ours == pytest.approx(theirs, abs=1e-5)
    if loss_type != "ipo":  # TRL logs summed-log-ratio rewards; ours too except for IPO (per-token mean)
        m = trainer._metrics["train"]
        n = len(pairs)
        assert stats["rewards/chosen"].item() / n == pytest.approx(
            sum(m["rewards/chosen"]) / len(m["rewards/chosen"]), abs=1e-5
        )
        assert stats["rewards/margin"].item() / n == pytest.approx(
            sum(m["rewards/margins"]) / len(m["rewards/margins"]), abs=1e-5
        )
        assert stats["rewards/accuracy"].item() / n == pytest.approx(
            sum(m["rewards/accuracies"]) / len(m["rewards/accuracies"])
        )


# --------------------------------------------------------------------------- learning
def test_learns_synthetic_preference(tiny_model_dir, pair_file, tmp_path):
    out = tmp_path / "run"
    summary = dpo.run(dpo_cfg(tiny_model_dir, pair_file, out, train={"max_steps": 12}))
    assert summary["reference"] == "adapter"
    assert summary["eval_pairs"] >= 30
    assert summary["eval_rewards/accuracy"] >= 0.9, summary
    assert summary["eval_loss"] < LOG2 and summary["eval_rewards/margin"] > 0
    records = read_jsonl(out / "metrics.jsonl")
    first = records[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(LOG2, abs=1e-6)  # policy == reference at start
    assert first["rewards/accuracy"] == 0.0  # all ties at step 1: a tie counts wrong
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "pairs_per_s"):
        assert key in first
    assert any("eval/loss" in r and "eval/rewards/accuracy" in r for r in records)
    final = out / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "tokenizer_config.json").exists()
    assert (final / "config.yaml").exists()


# --------------------------------------------------------------------------- resume
def test_resume_after_kill_is_bitwise_identical(tiny_model_dir, pair_file, tmp_path, capsys):
    """8 straight steps == `rlhfkit dpo` SIGKILLed after the step-4 checkpoint, then resumed to 8 (weights
    bitwise, losses equal); LoRA dropout on (disable_dropout=false) so the restored RNG state matters too.
    The resume runs in this process (one interpreter start less: imports dominate this test)."""
    from safetensors.torch import load_file

    args = [
        f"model.name={tiny_model_dir}",
        f"data.path={pair_file}",
        "data.max_length=64",
        "data.eval_fraction=0.2",
        "train.max_steps=8",
        "train.batch_size=4",
        "train.lr=5e-3",
        "train.save_every=4",
        "train.seed=3",
        "lora.r=8",
        "lora.dropout=0.1",
        "disable_dropout=false",
    ]
    straight = tmp_path / "straight"
    dpo.run(load_config(dpo.DPOConfig, overrides=args + [f"out_dir={straight}"]))

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rlhfkit.cli", "dpo", *args, f"out_dir={killed}"]
    proc = subprocess.run(cmd, env={**cli_env(), "RLHFKIT_FAULT_KILL_AFTER_STEP": "4"}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "final").exists()
    capsys.readouterr()
    dpo.run(load_config(dpo.DPOConfig, overrides=args + [f"out_dir={killed}", "resume=true"]))
    assert "resumed from" in capsys.readouterr().out

    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = _losses(straight), _losses(killed)
    assert la == lb and len(la) == 8
    ea = [r for r in read_jsonl(straight / "metrics.jsonl") if "eval/loss" in r]
    eb = [r for r in read_jsonl(killed / "metrics.jsonl") if "eval/loss" in r]
    assert ea == eb and len(ea) == 1


# --------------------------------------------------------------------------- reference variants
def test_precomputed_and_separate_reference_match_adapter_reference(
    tiny_model_dir, pair_file, tmp_path, monkeypatch, capsys
):
    """Same first step whether the reference is the disabled adapter, precomputed log-probs, or the base loaded
    as a separate frozen model; the cache is reused on --resume, never recomputed."""
    adapter = tmp_path / "adapter"
    dpo.run(dpo_cfg(tiny_model_dir, pair_file, adapter, train={"max_steps": 2}))
    pre = tmp_path / "pre"
    s_pre = dpo.run(
        dpo_cfg(tiny_model_dir, pair_file, pre, train={"max_steps": 2, "save_every": 1}, precompute_ref=True)
    )
    sep = tmp_path / "sep"
    s_sep = dpo.run(dpo_cfg(tiny_model_dir, pair_file, sep, train={"max_steps": 2}, ref_model=str(tiny_model_dir)))
    assert s_pre["reference"] == "adapter (precomputed)" and s_sep["reference"] == "model"

    la, lp, ls = _losses(adapter), _losses(pre), _losses(sep)
    assert abs(lp[0] - la[0]) <= 1e-6 and abs(ls[0] - la[0]) <= 1e-6
    assert lp[1] == pytest.approx(la[1], abs=1e-5) and ls[1] == pytest.approx(la[1], abs=1e-5)

    cache, _ = dpo.load_ref_cache(pre / dpo.REF_CACHE)
    assert cache["train"].shape[1] == 2 and cache["eval"].shape == (s_pre["eval_pairs"], 2)
    assert cache["train"].shape[0] + cache["eval"].shape[0] == 240
    assert torch.isfinite(cache["train"]).all() and (cache["train"] < 0).all()

    def boom(*a, **k):
        raise AssertionError("reference log-probs recomputed on resume")

    monkeypatch.setattr(dpo, "compute_reference_logps", boom)
    capsys.readouterr()
    dpo.run(
        dpo_cfg(
            tiny_model_dir, pair_file, pre, train={"max_steps": 3, "save_every": 1}, precompute_ref=True, resume=True
        )
    )
    assert "reusing reference log-probs" in capsys.readouterr().out
    assert len(_losses(pre)) == 3 and _losses(pre)[:2] == lp


def test_continue_adapter_and_full_finetune_reference_is_starting_policy(tiny_model_dir, pair_file, tmp_path):
    """Continuing a trained adapter: the reference is that adapter (precomputed), not the bare base; full
    fine-tuning: the starting weights (precomputed)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = tmp_path / "start_adapter"
    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        PeftLoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    peft_model.save_pretrained(start)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(start)

    out = tmp_path / "cont"
    summary = dpo.run(dpo_cfg(start, pair_file, out, train={"max_steps": 1}, lora={"continue_adapter": True}))
    assert summary["reference"] == "policy (precomputed)"
    first = read_jsonl(out / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6) and abs(first["rewards/margin"]) < 1e-6

    # full fine-tuning: the starting weights are the reference, also precomputed
    full = tmp_path / "full"
    s_full = dpo.run(
        dpo_cfg(tiny_model_dir, pair_file, full, train={"max_steps": 1, "lr": 1e-3}, lora={"enabled": False})
    )
    assert s_full["reference"] == "policy (precomputed)"
    assert read_jsonl(full / "metrics.jsonl")[0]["loss"] == pytest.approx(LOG2, abs=1e-6)

    # the bare base (adapter disabled) would have been a different reference
    from rlhfkit.inputs.pairs import encode_pairs, load_pairs
    from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
    from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model

    cfg = dpo_cfg(start, pair_file, tmp_path / "unused")
    policy, tok = load_model(ModelConfig(name=str(start)), LoraConfig(continue_adapter=True), verbose=False)
    pairs = encode_pairs(load_pairs(cfg.data)[0][:8], PromptFormat(TemplateConfig(), tok), 64)
    loss, _ = dpo.micro_loss(
        policy, dpo.make_micro(pairs, list(range(8)), tok.pad_token_id), dpo.Reference("adapter", False), 0.1
    )
    assert abs(loss.item() / 8 - LOG2) > 1e-3
