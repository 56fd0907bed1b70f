"""Merge a LoRA adapter into its base and save a plain HF model (loads with AutoModel… alone)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from rlhfkit.models.loading import ADAPTER_FILE, LoraConfig, ModelConfig, load_model
from rlhfkit.runtime.card import write_card
from rlhfkit.runtime.config import save_config
from rlhfkit.runtime.errors import RlhfkitError
from rlhfkit.runtime.io import atomic_dir


@dataclass
class MergeConfig:
    adapter: str = ""
    """Adapter folder to merge (e.g. runs/x/sft/final)."""
    out_dir: str = ""
    """Where to write the merged model; default: <adapter>-merged."""
    overwrite: bool = False
    """Replace an existing out_dir."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the saved weights."""
    push_to_hub: str | None = None
    """Hub repo id to upload the merged model to (as `rlhfkit push`)."""


CONFIG = MergeConfig
POSITIONAL = ["adapter", "out_dir"]


def run(cfg: MergeConfig) -> dict:
    adapter = Path(cfg.adapter)
    if not cfg.adapter or not (adapter / ADAPTER_FILE).exists():
        raise RlhfkitError(f"'{cfg.adapter}' is not an adapter folder (no {ADAPTER_FILE})")
    task = json.loads((adapter / ADAPTER_FILE).read_text()).get("task_type")
    kind = "seq_cls" if task == "SEQ_CLS" else "causal_lm"
    out = Path(cfg.out_dir or f"{adapter}-merged")
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:  # refuses early if out exists
        model, tok = load_model(
            ModelConfig(name=str(adapter), dtype=cfg.dtype),
            LoraConfig(enabled=False),
            kind=kind,
            trainable=False,
            verbose=False,
        )
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_config(replace(cfg, adapter=str(adapter.resolve()), out_dir=str(out)), tmp / "merge_config.yaml")
        write_card(tmp, stage="merge", force=True, final=out)  # replaces any card copied from the adapter
    return {"merged": str(out), "kind": kind, "out_dir": str(out)}
