"""SFT stage: packing correctness, learning, merge, resume, grad-accum invariance."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from rlhfkit.algorithms.losses import IGNORE_INDEX, shift_labels
from rlhfkit.inputs.packing import Sample, collate_packed, pack
from rlhfkit.models.forward import causal_lm_nll_sum
from rlhfkit.runtime.config import load_config
from rlhfkit.runtime.io import read_jsonl
from rlhfkit.stages import sft
from tests.conftest import cli_env


def sft_cfg(model_dir, data_path, out, **over):
    base = {
        "out_dir": str(out),
        "model": {"name": str(model_dir)},
        "data": {"path": str(data_path), "seq_len": 64, "eval_fraction": 0.1},
        "train": {"lr": 3e-3, "max_steps": 10, "batch_size": 4, "seed": 1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    }
    return load_config(sft.SFTConfig, overrides=_deep(base, over))


def _deep(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _random_samples(n, seed=0, lo=3, hi=40, vocab=300):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        out.append(Sample(ids, [1] * L))
    return out


# --------------------------------------------------------------------------- packing
def test_packing_keeps_every_token_once_and_adds_no_padding():
    samples = _random_samples(50)
    blocks = pack(samples, seq_len=32)
    flat = [t for b in blocks for t in b["input_ids"]]
    assert flat == [t for s in samples for t in s.input_ids]  # each token once, in order
    assert all(len(b["input_ids"]) == 32 for b in blocks[:-1])  # full blocks: zero pad tokens
    assert 0 < len(blocks[-1]["input_ids"]) <= 32
    # position ids restart at every sample start and at every block start
    starts = sum(p == 0 for b in blocks for p in b["position_ids"])
    continued = sum(1 for b in blocks[1:] if b["position_ids"][0] == 0) - 0
    assert starts >= len(samples) and starts <= len(samples) + continued


def test_packed_loss_equals_token_weighted_per_sample_loss(tiny_model_dir):
    """No attention across samples: the packed loss equals each sample computed alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    samples = _random_samples(12, seed=3, lo=4, hi=15)
    blocks = pack(samples, seq_len=48)
    # keep it to whole samples: choose a seq_len large enough that none is split
    flat_blocks = [b for b in blocks]
    with torch.no_grad():
        packed_sum, packed_n = torch.zeros(()), torch.zeros(())
        for sub in collate_packed(flat_blocks):
            s, n = causal_lm_nll_sum(model, sub)
            packed_sum, packed_n = packed_sum + s, packed_n + n
        # independent reference: each *segment* alone, plain HF labels=... loss (mean) × count
        ref_sum, ref_n = 0.0, 0
        for b in flat_blocks:
            pos = b["position_ids"]
            cuts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, z in zip(cuts, cuts[1:]):
                ids = torch.tensor([b["input_ids"][a:z]])
                if ids.shape[1] < 2:
                    continue
                out = model(input_ids=ids, labels=ids)
                ref_sum += out.loss.item() * (ids.shape[1] - 1)
                ref_n += ids.shape[1] - 1
    assert int(packed_n) == ref_n
    assert abs(packed_sum.item() / packed_n.item() - ref_sum / ref_n) < 1e-5


def test_shift_labels_never_targets_a_new_segment():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    labels = shift_labels(ids, pos != 0)
    assert labels.tolist() == [[6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]


# --------------------------------------------------------------------------- training
def test_loss_falls_and_perplexity_is_exp_eval_loss(tiny_model_dir, tiny_corpus, tmp_path):
    cfg = sft_cfg(
        tiny_model_dir, tiny_corpus, tmp_path / "run", train={"max_steps": 50, "lr": 1e-2}, lora={"enabled": False}
    )
    summary = sft.run(cfg)
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 50
    assert sum(losses[-5:]) / 5 <= 0.7 * sum(losses[:5]) / 5, losses
    assert summary["eval_perplexity"] == pytest.approx(math.exp(summary["eval_loss"]), rel=1e-12)
    assert summary["eval_perplexity"] < summary["eval_perplexity_before"]
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "final" / "config.yaml").exists()


def test_grad_accum_1x8_equals_8x1(tiny_model_dir, tiny_corpus, tmp_path):
    runs = {}
    for name, (bs, ga) in {"8x1": (8, 1), "1x8": (1, 8)}.items():
        cfg = sft_cfg(
            tiny_model_dir,
            tiny_corpus,
            tmp_path / name,
            train={"batch_size": bs, "grad_accum": ga, "max_steps": 3},
            data={"packing": False},
        )
        sft.run(cfg)
        from safetensors.torch import load_file

        runs[name] = (
            [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r],
            load_file(tmp_path / name / "final" / "adapter_model.safetensors"),
        )
    (l8, w8), (l1, w1) = runs["8x1"], runs["1x8"]
    assert l8 == pytest.approx(l1, abs=1e-5)
    assert w8.keys() == w1.keys()
    for k in w8:
        assert torch.allclose(w8[k], w1[k], atol=1e-5), k


def test_merge_gives_plain_model_with_same_logits(tiny_model_dir, tiny_corpus, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhfkit.cli import main

    cfg = sft_cfg(tiny_model_dir, tiny_corpus, tmp_path / "run", train={"max_steps": 5, "lr": 3e-2})
    sft.run(cfg)
    adapter = tmp_path / "run" / "final"
    assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    assert (a - plain).abs().max().item() > 1e-3  # the adapter really changed something
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    # refusing to clobber
    assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 1


def test_resume_after_kill_is_bitwise_identical(tiny_model_dir, tiny_corpus, tmp_path):
    """20 straight steps == 10 steps, SIGKILL, --resume to 20 (weights bitwise, losses equal)."""
    from safetensors.torch import load_file

    args = [
        f"model.name={tiny_model_dir}",
        f"data.path={tiny_corpus}",
        "data.seq_len=64",
        "train.max_steps=20",
        "train.batch_size=4",
        "train.lr=3e-3",
        "train.save_every=10",
        "lora.dropout=0.1",
        "train.seed=3",
    ]
    straight = tmp_path / "straight"
    cfg = load_config(sft.SFTConfig, overrides=args + [f"out_dir={straight}"])
    sft.run(cfg)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rlhfkit.cli", "sft", *args, f"out_dir={killed}"]
    env = {**cli_env(), "RLHFKIT_FAULT_KILL_AFTER_STEP": "10"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "final").exists()
    proc = subprocess.run(cmd + ["--resume"], env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout

    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(killed / "metrics.jsonl") if "loss" in r]
    assert la == lb and len(la) == 20


def test_unpacked_completion_only_masks_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    from rlhfkit.inputs.packing import collate_padded
    from rlhfkit.inputs.templates import PromptFormat, TemplateConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    fmt = PromptFormat(TemplateConfig(), tok)
    ids, rmask = fmt.encode("how brew coffee?", "grind the bean.")
    assert tok.decode([i for i, m in zip(ids, rmask) if m]).startswith("grind the bean.")
    assert ids[-1] == tok.eos_token_id and rmask[-1] == 1
    (batch,) = collate_padded([Sample(ids, rmask), Sample(ids[:5], [0] * 5)], tok.pad_token_id, 64)
    targets = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert targets == [i for i, m in zip(ids, rmask) if m]  # exactly the response tokens
    assert (batch["labels"][1] == IGNORE_INDEX).all()  # prompt-only row: no targets, pads ignored


def test_topping_up_a_short_block_changes_no_real_token_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    blocks = pack(_random_samples(9, seed=4, lo=5, hi=20), seq_len=40)
    assert len(blocks[-1]["input_ids"]) < 40
    with torch.no_grad():
        together = [causal_lm_nll_sum(model, b) for b in collate_packed([blocks[0], blocks[-1]], pad_id=2)]
        alone = [causal_lm_nll_sum(model, b) for b in collate_packed([blocks[0]]) + collate_packed([blocks[-1]])]
    ((s_t, n_t),) = together
    assert int(n_t) == sum(int(n) for _, n in alone)
    assert abs(s_t.item() - sum(s.item() for s, _ in alone)) < 1e-4
