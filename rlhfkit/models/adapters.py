"""Saving a stage's model so that it reloads as exactly the model that was trained.

A stage that starts from an adapter folder (e.g. the SFT LoRA) merges it into the base and trains a
fresh LoRA on top. Saved naively, that fresh adapter names the raw base and silently drops the
parent's weights. `save_model` instead folds the chain into one LoRA on the raw base: for every
adapted module, ΔW = s₁·B₁A₁ + s₂·B₂A₂ = [s₁B₁ | s₂B₂]·[A₁; A₂], i.e. a rank r₁+r₂ adapter with
scaling 1 (peft's `add_weighted_adapter(combination_type="cat")`, done on the saved tensors). The
result is a standard peft folder: `PeftModel.from_pretrained(base, final)`, `AutoPeftModel…`,
rlhfkit's loader and `rlhfkit merge` all give the trained model; nothing depends on the parent's path.
The chain is recorded in `rlhfkit_lineage.json` beside the adapter.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from rlhfkit.runtime import engines, hub
from rlhfkit.runtime.errors import RlhfkitError

ADAPTER_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LINEAGE_FILE = "rlhfkit_lineage.json"
PEFT_PREFIX = "base_model.model."
LORA_KEYS = (".lora_A.weight", ".lora_B.weight")


def is_adapter_dir(path) -> bool:
    return (Path(path) / ADAPTER_FILE).exists()


def read_adapter_config(path) -> dict:
    try:
        return json.loads((Path(path) / ADAPTER_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RlhfkitError(f"{Path(path) / ADAPTER_FILE}: not a readable adapter config ({exc})") from exc


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not (path / WEIGHTS_FILE).exists():  # a .bin adapter would need unpickling: never for a received file
        raise RlhfkitError(f"{path}: no {WEIGHTS_FILE} (pickled adapter_model.bin files are not loaded)")
    return load_file(str(path / WEIGHTS_FILE))


def _scaling(cfg: dict, r: int) -> float:
    alpha = cfg.get("lora_alpha", r)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _check_foldable(cfg: dict, where: Path) -> None:
    problems = [
        k
        for k, bad in (
            ("peft_type", cfg.get("peft_type", "LORA") != "LORA"),
            ("use_dora", cfg.get("use_dora")),
            ("bias", cfg.get("bias", "none") != "none"),
            ("rank_pattern", cfg.get("rank_pattern")),
            ("alpha_pattern", cfg.get("alpha_pattern")),
        )
        if bad
    ]
    if problems:
        raise RlhfkitError(
            f"{where}: cannot fold this adapter into its child ({', '.join(problems)} set); "
            f"merge it first with `rlhfkit merge {where}` and start from the merged folder"
        )


def _modules(state: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path relative to the HF model: (A (r, in), B (out, r))} of a saved LoRA state dict."""
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            mod = key[: -len(".lora_A.weight")]
            out[mod.removeprefix(PEFT_PREFIX)] = (a, state[mod + ".lora_B.weight"])
    return out


def fold_adapters(parent: Path, child: Path) -> None:
    """Rewrite the adapter at `child` (trained on `parent` merged into its base) as one adapter on the
    parent's base. Exact: the concatenated low-rank factors sum to the same weight update."""
    from safetensors.torch import save_file

    pcfg, ccfg = read_adapter_config(parent), read_adapter_config(child)
    _check_foldable(pcfg, parent)
    _check_foldable(ccfg, child)
    if bool(pcfg.get("fan_in_fan_out")) != bool(ccfg.get("fan_in_fan_out")):
        raise RlhfkitError(f"{parent} and {child}: adapters disagree on fan_in_fan_out; cannot fold them")
    pstate, cstate = _weights(parent), _weights(child)
    if any(".lora_embedding_" in k or ".lora_magnitude" in k for k in (*pstate, *cstate)):
        raise RlhfkitError(
            f"{parent}: embedding/DoRA adapters cannot be folded; merge the parent first (rlhfkit merge)"
        )
    pmods, cmods = _modules(pstate), _modules(cstate)
    r1 = next(iter(pmods.values()))[0].shape[0] if pmods else 0
    r2 = next(iter(cmods.values()))[0].shape[0] if cmods else 0
    s1, s2 = (_scaling(pcfg, r1) if r1 else 0.0), (_scaling(ccfg, r2) if r2 else 0.0)
    folded = _concat_factors(pmods, cmods, r1, s1, r2, s2)
    # Non-LoRA tensors (modules_to_save such as an RM score head): the child's win, the parent's carry over.
    extra = {k: v for k, v in pstate.items() if not k.endswith(LORA_KEYS)}
    extra.update({k: v for k, v in cstate.items() if not k.endswith(LORA_KEYS)})
    folded.update(extra)
    cfg = _folded_config(pcfg, ccfg, sorted(set(pmods) | set(cmods)), r1 + r2)
    save_file(folded, str(child / WEIGHTS_FILE), metadata={"format": "pt"})
    (child / ADAPTER_FILE).write_text(json.dumps(cfg, indent=2))
    lineage = _lineage(parent) + [{"adapter": str(parent), "rank": r1, "scaling": s1}]
    (child / LINEAGE_FILE).write_text(
        json.dumps(
            {
                "base": pcfg["base_model_name_or_path"],
                "folded": lineage + [{"adapter": "this stage", "rank": r2, "scaling": s2}],
                "note": "one LoRA of rank r1+r2 on the base, equal to the chain of adapters merged in order",
            },
            indent=2,
        )
    )


def _concat_factors(pmods: dict, cmods: dict, r1: int, s1: float, r2: int, s2: float) -> dict:
    """Per module, the [A₁; A₂] and [s₁B₁ | s₂B₂] factors of the folded adapter, in the adapters' dtype."""
    folded: dict[str, torch.Tensor] = {}
    for mod in sorted(set(pmods) | set(cmods)):
        parts_a, parts_b = [], []
        for mods, r, s in ((pmods, r1, s1), (cmods, r2, s2)):
            if mod in mods:
                a, b = mods[mod]
                parts_a.append(a.float())
                parts_b.append(b.float() * s)
            else:  # this adapter does not touch the module: a zero block keeps the rank uniform
                other_a, other_b = (pmods if mods is cmods else cmods)[mod]
                parts_a.append(other_a.new_zeros((r, other_a.shape[1]), dtype=torch.float32))
                parts_b.append(other_b.new_zeros((other_b.shape[0], r), dtype=torch.float32))
        dtype = (cmods.get(mod) or pmods[mod])[0].dtype
        folded[PEFT_PREFIX + mod + ".lora_A.weight"] = torch.cat(parts_a, 0).to(dtype).contiguous()
        folded[PEFT_PREFIX + mod + ".lora_B.weight"] = torch.cat(parts_b, 1).to(dtype).contiguous()
    return folded


def _folded_config(pcfg: dict, ccfg: dict, targets: list[str], rank: int) -> dict:
    """The child's adapter config rewritten for the folded adapter: rank r₁+r₂, scaling 1, on the parent's base."""
    return {
        **ccfg,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "target_modules": targets,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": pcfg["base_model_name_or_path"],
        "modules_to_save": sorted(set(pcfg.get("modules_to_save") or []) | set(ccfg.get("modules_to_save") or []))
        or None,
    }


def _lineage(parent: Path) -> list[dict]:
    try:
        return json.loads((parent / LINEAGE_FILE).read_text())["folded"][:-1]
    except (OSError, json.JSONDecodeError, KeyError):
        return []


def save_model(model, tokenizer, out: Path, model_cfg, lora_cfg, selected_adapters: list[str] | None = None) -> None:
    """Save a stage's trained model (full, or adapter + tokenizer) so it reloads on its own.

    When training started from an adapter folder that was merged (not continued), the parent is
    folded into the saved adapter (see the module docstring)."""
    from rlhfkit.models.loading import resolve_model_path

    kwargs = {"selected_adapters": selected_adapters} if selected_adapters else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    if not is_adapter_dir(out):
        return
    start = resolve_model_path(model_cfg.name)
    if is_adapter_dir(start) and not lora_cfg.continue_adapter:
        fold_adapters(Path(start), Path(out))
    cfg = read_adapter_config(out)
    offline = hub.offline_name(model_cfg.name) or (
        is_adapter_dir(start) and hub.offline_name(read_adapter_config(start)["base_model_name_or_path"])
    )
    if offline:
        cfg["base_model_name_or_path"] = hub.OFFLINE_MODELS[offline][0]  # portable, not this machine's cache path
    elif Path(str(cfg["base_model_name_or_path"])).is_dir():
        cfg["base_model_name_or_path"] = str(Path(cfg["base_model_name_or_path"]).resolve())
    (Path(out) / ADAPTER_FILE).write_text(json.dumps(cfg, indent=2))


# --------------------------------------------------------------------------- dropout
def disable_dropout(model) -> int:
    """Every dropout of `model` off: nn.Dropout modules (LoRA's too) and HF attention's float
    `attention_dropout` attributes, which train mode would otherwise apply (Huang et al. 2023, "The N
    Implementation Details of RLHF with PPO"; TRL's disable_dropout_in_model). Returns how many were > 0."""
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            changed += m.p > 0
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                changed += value > 0
                setattr(m, name, 0.0)
    return int(changed)


def set_lora_dropout(model, p: float) -> None:
    """Make a loaded (continued) adapter use dropout `p`, as a fresh one configured with it would."""
    for module in model.modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict):
            for name in list(drop.keys()):
                drop[name] = nn.Dropout(p) if p > 0 else nn.Identity()
    for cfg in getattr(model, "peft_config", {}).values():
        cfg.lora_dropout = p


# --------------------------------------------------------------------------- sampling with the adapter folded in
def peft_model(model):
    """The PeftModel beneath DDP / DeepSpeed / accelerate wrappers, or None when the model has no adapter."""
    while hasattr(model, "module"):
        model = model.module
    is_peft = all(hasattr(model, a) for a in ("peft_config", "get_base_model", "disable_adapter"))
    return model if is_peft else None


@contextlib.contextmanager
def lora_merged(model):
    """The active LoRA adapter folded into the base weights inside the block (peft merge_adapter): a
    decode step then runs plain linears, not base + A·B per layer (≈ 10% faster HF sampling measured
    here, docs/benchmarks/ppo.md). The base weights are restored bit for bit from a copy afterwards:
    peft's unmerge subtracts A·B back and leaves ~1e-7 drift, which would move the reference model."""
    peft = peft_model(model)
    if peft is None:
        yield model
        return
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft.modules() if isinstance(m, LoraLayer) and not m.merged]
    bases = [m.get_base_layer() for m in layers]
    # 8/4-bit bases would be re-quantized (lossy); ZeRO-3 holds only shards (ds_id); FSDP2 (even
    # unsharded) holds all-gathered copies whose writes FSDP does not track: sample unmerged
    sharded = bool(engines.fsdp_modules(peft))
    if sharded or any("bitsandbytes" in type(b).__module__ or hasattr(b.weight, "ds_id") for b in bases):
        yield model
        return
    saved = [(b.weight, b.weight.detach().clone()) for b in bases]
    peft.merge_adapter()
    try:
        yield model
    finally:
        peft.unmerge_adapter()
        with torch.no_grad():
            for weight, copy in saved:
                weight.copy_(copy)
