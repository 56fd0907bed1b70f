"""Workload of benchmarks/bench_rm.py: Stack Exchange pairs encoded once for both frameworks, step
orders, padding counts, the tiny-model variant and the shared score-head initialisation."""

from __future__ import annotations

import glob
import json
import random
import re
import sys
from pathlib import Path


# --------------------------------------------------------------------------- data
def se_pairs(pattern: str, out: Path, seed: int) -> tuple[list[dict], dict]:
    """Every answer pair of the Stack Exchange dumps matched by `pattern`, through rlhfkit's data stage."""
    from rlhfkit.data import build_stackexchange
    from rlhfkit.inputs.tables import load_table

    files = sorted(glob.glob(pattern))
    if not files:
        sys.exit(f"no Posts.xml matches {pattern}")
    stats = build_stackexchange(
        files,
        str(out),
        format="parquet",
        seed=seed,
        overwrite=True,
        fractions={"sft": 0.0, "rm_train": 1.0, "rm_eval": 0.0, "rl_prompts": 0.0},
    )
    rows = [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in load_table(str(out), "rm_train")
    ]
    return rows, {
        "files": [Path(f).parent.name for f in files],
        "pairs_total": len(rows),
        "converter": [i.get("markdown_converter") for i in stats.get("inputs", [])][:1],
    }


def prepare(args, work: Path, model_path: str) -> dict:
    """Write ours.jsonl (text pairs for rlhfkit, fitting max_length) and trl.jsonl (the same pairs as
    rlhfkit's token ids, in the order rlhfkit's StepPlan draws them)."""
    from transformers import AutoTokenizer

    from rlhfkit.inputs.templates import STACKLLAMA_TEMPLATE, PromptFormat, TemplateConfig
    from rlhfkit.models.loading import ModelConfig, load_tokenizer

    rows, info = se_pairs(args.posts, work / "se", args.data_seed)
    tok = load_tokenizer(ModelConfig(name=model_path))
    fmt = PromptFormat(TemplateConfig(template=STACKLLAMA_TEMPLATE), tok)
    alt_pad = alt_pad_token(AutoTokenizer.from_pretrained(model_path))
    alt_id = tok.convert_tokens_to_ids(alt_pad) if alt_pad else None
    total_steps = args.warmup + args.steps
    if (args.batch * total_steps) % args.epochs:
        sys.exit(f"--epochs {args.epochs} must divide batch × steps = {args.batch * total_steps}")
    need = args.batch * total_steps // args.epochs  # distinct pairs; each is seen --epochs times
    random.Random(args.data_seed).shuffle(rows)
    kept, enc, skipped = [], [], {"too_long": 0, "empty": 0, "holds_alt_pad": 0}
    for r in rows:
        if not (r["chosen"] and r["rejected"] and isinstance(r["prompt"], str)):
            skipped["empty"] += 1
            continue
        c_ids, _ = fmt.encode(r["prompt"], r["chosen"])
        r_ids, _ = fmt.encode(r["prompt"], r["rejected"])
        if max(len(c_ids), len(r_ids)) > args.max_length:
            skipped["too_long"] += 1
            continue
        if alt_id is not None and (alt_id in c_ids or alt_id in r_ids):
            skipped["holds_alt_pad"] += 1
            continue
        kept.append(r)
        enc.append((c_ids, r_ids))
        if len(kept) == need:
            break
    if len(kept) < need:
        sys.exit(
            f"only {len(kept)} of {len(rows)} pairs fit {args.max_length} tokens; {need} needed "
            f"(batch {args.batch} × {total_steps} steps): raise --max-length or add dumps to --posts"
        )
    (work / "ours.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    orders = step_orders(args, enc, total_steps)
    (work / "trl.jsonl").write_text(
        "".join(json.dumps({"chosen_ids": enc[i][0], "rejected_ids": enc[i][1]}) + "\n" for i in orders["trl"])
    )
    per_step = {k: batches_cells(enc, o, args.batch) for k, o in orders.items()}
    # What TRL's own text path would have produced (prompt+response+eos_token as one string) — diagnostic only.
    diff = [
        len(tok(fmt.prompt_text(r["prompt"]) + r[k] + tok.eos_token)["input_ids"]) - len(e)
        for r, (c, j) in zip(kept, enc)
        for k, e in (("chosen", c), ("rejected", j))
    ]
    lengths = [len(x) for c, j in enc for x in (c, j)]
    info.update(
        {
            "pairs_fitting_scanned": len(kept),
            "skipped_while_scanning": skipped,
            "pairs_used": need,
            "template": STACKLLAMA_TEMPLATE,
            "max_length": args.max_length,
            "trl_pad_token": alt_pad if args.trl_pad == "distinct" else tok.eos_token,
            "rlhfkit_pad_token": tok.pad_token,
            "eos_token": tok.eos_token,
            "seq_tokens_mean": round(sum(lengths) / len(lengths), 1),
            "seq_tokens_max": max(lengths),
            "tokens_per_step": {k: v[0] for k, v in per_step.items()},
            "cells_per_step": {k: v[1] for k, v in per_step.items()},
            # the padding of the steps before issue 15's grouping: plain shuffle, one forward per batch
            "pad_fraction_expected": {k: 1 - sum(v[0]) / sum(v[1]) for k, v in per_step.items()},
            "rlhfkit_group_by_length": not args.no_group,
            "trl_order": args.trl_order,
            "trl_text_path_diff": {
                "sequences_differing": sum(d != 0 for d in diff),
                "sequences": len(diff),
                "mean_token_diff": round(sum(diff) / len(diff), 3),
            },
        }
    )
    return info


def step_orders(args, enc: list, total_steps: int) -> dict[str, list[int]]:
    """Pair index per position of the run: rlhfkit's own plan (length-grouped unless --no-group), the
    plain StepPlan shuffle (TRL's default sampler has no grouping), and what TRL is fed (--trl-order)."""
    from rlhfkit.inputs.pairs import LengthGroupedPlan
    from rlhfkit.runtime.training import StepPlan

    plain = StepPlan(len(enc), batch_size=args.batch, grad_accum=1, world=1, rank=0, seed=args.seed)
    lengths = [max(len(c), len(r)) for c, r in enc]  # rlhfkit.inputs.pairs.pair_length
    ours = plain if args.no_group else LengthGroupedPlan.like(plain, lengths, args.group_batches)
    orders = {
        k: [i for s in range(total_steps) for i in p.step_items(s)] for k, p in (("rlhfkit", ours), ("plain", plain))
    }
    for order in orders.values():
        assert sorted(order) == sorted(list(range(len(enc))) * args.epochs), "every pair once per epoch"
    orders["trl"] = orders["rlhfkit" if args.trl_order == "rlhfkit" else "plain"]
    return orders


def batches_cells(enc: list, order: list[int], batch: int) -> tuple[list[int], list[int]]:
    """Non-pad tokens and padded cells (chosen and rejected rows padded to the batch's longest) per step."""
    toks, cells = [], []
    for s in range(0, len(order), batch):
        rows = [len(enc[i][0]) for i in order[s : s + batch]] + [len(enc[i][1]) for i in order[s : s + batch]]
        toks.append(sum(rows))
        cells.append(len(rows) * max(rows))
    return toks, cells


def alt_pad_token(tok) -> str | None:
    """A pad token distinct from EOS for TRL (HF pooling reads the last token != pad), else None."""
    for cand in (tok.unk_token, "<|endoftext|>"):
        if cand and cand != tok.eos_token and cand in tok.get_vocab():
            return cand
    return None


def build_tiny_model(src: str, out: Path) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer, random weights (smoke tests only)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# --------------------------------------------------------------------------- shared pieces
def score_head_init(hidden: int, seed: int, std: float):
    import torch

    g = torch.Generator().manual_seed(seed + 17)
    return torch.randn((1, hidden), generator=g) * std


_SCORE = re.compile(r"(^|\.)score(\.original_module|\.modules_to_save\.[^.]+)?\.(weight|bias)$")


def set_score_head(model, seed: int) -> int:
    """Copy the benchmark's seeded head into every copy of the score head (peft keeps the original
    module and a trainable modules_to_save copy). Returns how many tensors were set."""
    import torch

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    w = score_head_init(cfg.hidden_size, seed, getattr(cfg, "initializer_range", 0.02))
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            m = _SCORE.search(name)
            if m:
                p.copy_(w if m.group(3) == "weight" else torch.zeros_like(p))
                n += 1
    if n == 0:
        raise SystemExit("no score head found to initialise")
    return n


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
