"""generation.backend=vllm: without vLLM installed, one clear line (benchmarks/vllm_rollouts.py runs
the real checks where vLLM is installed; results in docs/distributed.md)."""

from __future__ import annotations

import sys

import pytest

from rlhfkit.models.generation import SamplingConfig, generate
from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
from rlhfkit.runtime.errors import RlhfkitError


def test_vllm_backend_without_vllm_names_the_extra(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails as if not installed
    policy, tok = load_model(ModelConfig(name=str(tiny_model_dir)), LoraConfig(r=4), verbose=False)
    q = tok("how tea hot?")["input_ids"]
    with pytest.raises(RlhfkitError, match=r"rlhfkit\[vllm\]"):
        generate(policy, tok, [q], [4], SamplingConfig(backend="vllm"), "cpu")
