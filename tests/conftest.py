"""Shared fixtures: a tokenizer trained in-process and a 2-layer Llama built from a config.

Nothing here touches the network. The tiny model mirrors SmolLM2's awkward detail on purpose:
pad == eos, tied embeddings.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread everywhere, in-process and in CLI subprocesses (which inherit this). Two reasons: the
# bitwise resume tests compare an in-process run with a subprocess, and at 2 threads CPU backward
# kernels differed across processes in ~1e-7 of grads (CI flake, Nov 2026); and tiny-model ops are
# so small that a second OpenMP thread mostly waits (a forward was ~25x slower on a busy machine).
os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

WORDS = (
    "the a coffee tea beer bread grind water brew bean roast hot cold good bad slow fast yes no "
    "question answer why how what when make use add cup pot milk sugar salt flour yeast dough oven "
    "minutes degrees fresh stale bitter sweet sour strong weak light dark"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    import torch

    torch.set_num_threads(1)
    yield


def cli_env() -> dict:
    """Environment for `python -m rlhfkit.cli` subprocesses: this interpreter's sys.path (the repo
    importable without installing it); OMP_NUM_THREADS=1 is inherited from the line above."""
    import sys

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(os.getcwd())] + sys.path)}


def make_corpus(n: int, seed: int = 0) -> list[dict]:
    """Q/A rows whose answer repeats the question's key word: learnable by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append(
            {"prompt": f"how {w} {rng.choice(WORDS)}?", "response": f"{w} {w} is {rng.choice(['good', 'bad'])}."}
        )
    return rows


def build_tiny_tokenizer(out: Path) -> Path:
    """A byte-level BPE (vocab 400) trained on make_corpus, pad == eos, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = [f"Question: {r['prompt']}\n\nAnswer: {r['response']}" for r in make_corpus(400)] + [" ".join(WORDS)] * 5
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def build_tiny_model(out: Path, tokenizer_dir: Path, heads: int = 4, kv_heads: int = 2) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64, head_dim 64 / heads) saved like any HF model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_corpus(240, seed=1)))
    return path


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path} (the ../shared folder beside the repo is absent)")
    return path


def sft_tiny(base: Path, model_dir: Path) -> Path:
    """`model_dir` after a short full SFT on make_corpus: answers end in 'is good.' / 'is bad.'."""
    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import sft

    corpus = base / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in make_corpus(240, seed=1)))
    sft.run(
        load_config(
            sft.SFTConfig,
            overrides={
                "out_dir": str(base / "run"),
                "model": {"name": str(model_dir)},
                "lora": {"enabled": False},
                "data": {"path": str(corpus), "seq_len": 64},
                "train": {"max_steps": 60, "lr": 1e-2, "batch_size": 8},
            },
        )
    )
    return base / "run" / "final"


@pytest.fixture(scope="session")
def tiny_sft_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model after a short full SFT on make_corpus: answers end in 'is good.' / 'is bad.'."""
    return sft_tiny(tmp_path_factory.mktemp("tiny_sft"), tiny_model_dir)
