"""Padding-free vs padded forwards (ppo.padding_free) on the PPO benchmark's shapes, in one process.

    python benchmarks/bench_packed.py --threads 2 --reps 6
    python benchmarks/bench_packed.py --threads 2 --ppo-steps 4   # whole PPO steps, padding_free off / on

SmolLM2-135M with the PPO benchmark's LoRA (q/k/v/o, r 16); batches like its mini-batches: queries of 32-64
tokens (seeded draw), left-padded to the batch's longest, responses of --response tokens. Timed, alternating
padded and packed: a training forward + backward (forward_logprobs(keep=R) with entropy and hidden states, as
the update runs it; batch --mini-batch) and a no-grad forward (phase 3's; batch --batch). Prints JSON: medians,
the ratio, tokens through the model, and the largest log-prob difference.
--ppo-steps N: the PPO benchmark's rlhfkit trainer (4 PPO epochs, bench_ppo's workload), in one process, each
step after the first run twice with ppo.padding_free off then on, twice over: phase-3 and update seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def batch(rows: int, response: int, g: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(32, 65, (rows,), generator=g)
    T = int(q.max()) + response
    ids = torch.randint(100, vocab, (rows, T), generator=g)
    mask = torch.zeros(rows, T, dtype=torch.long)
    for b, n in enumerate(q.tolist()):
        mask[b, T - response - n :] = 1
    return ids, mask


def ppo_steps(n: int) -> dict:
    """The A/B over whole PPO steps (--ppo-steps): same process, same shapes, alternating."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import tempfile

    import bench_ppo as bench
    from transformers import AutoTokenizer

    from rlhfkit.algorithms import rl
    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import ppo

    tok = AutoTokenizer.from_pretrained(bench.model_dir())
    work = bench.make_workload(tok, n, 8, 32, 64, 32, 64, 0)
    over = {
        "out_dir": str(Path(tempfile.mkdtemp(prefix="bench_packed_")) / "run"),
        "train": {"seed": 0, "batch_size": 8, "lr": bench.LR, "max_steps": 1000},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": bench.TARGETS},
        "template": {"template": "{prompt}{response}"},
        "generation": {"top_k": 0, "top_p": 1.0, "accept_kl_bias": True},
        "ppo": {"init_kl_coef": bench.KL0, "ppo_epochs": 4, "mini_batch_size": 4, "vf_coef": 0.1, "lam": 0.95},
    }
    cfg = load_config(ppo.PPOConfig, overrides=over)
    trainer = ppo.RLTrainer(cfg, reward_fn=bench.vader_scores, prompts=["x"], eval_prompts=[])
    runs = []
    for s, (queries, L) in enumerate(zip(work["queries"], work["lengths"])):
        for padding_free in [True] if s == 0 else [False, True, False, True]:  # step 0: warm-up
            cfg.ppo.padding_free, cfg.generation.min_new_tokens = padding_free, L
            trainer.prompts, trainer.queries = [tok.decode(q) for q in queries], queries
            trainer.length_sampler = rl.LengthSampler(L, L)
            rec = trainer.rl_step(list(range(8)), trainer._generator(s, 0))
            trainer.step += 1
            if s:
                times = {k: rec[f"time/{k}"] for k in ("forward", "update")}
                runs.append({"step": s, "padding_free": padding_free, **times})
    out = {}
    for padding_free in (False, True):
        rs = [r for r in runs if r["padding_free"] == padding_free]
        totals = {k: round(sum(r[k] for r in rs), 2) for k in ("forward", "update")}
        out["packed" if padding_free else "padded"] = totals
    out["update_padded_over_packed"] = round(out["padded"]["update"] / out["packed"]["update"], 3)
    out["forward_padded_over_packed"] = round(out["padded"]["forward"] / out["packed"]["forward"], 3)
    return {"runs": runs, **out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--mini-batch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--response", type=int, default=48)
    ap.add_argument("--ppo-steps", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ppo_steps:
        import contextlib
        import sys

        with contextlib.redirect_stdout(sys.stderr):  # the trainer's own lines: stdout is the JSON only
            result = ppo_steps(args.ppo_steps)
        print(json.dumps(result, indent=1))
        return

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.forward import forward_logprobs
    from rlhfkit.models.loading import resolve_default_model
    from rlhfkit.runtime.training import reuse_freed_memory

    reuse_freed_memory()
    model = AutoModelForCausalLM.from_pretrained(resolve_default_model(verbose=False), dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    R = args.response

    def train(ids, mask, pack):
        out = forward_logprobs(model, ids, mask, keep=R, pack=pack, return_entropy=True, return_hidden=True)
        (out["logprobs"].sum() + out["hidden"].pow(2).mean()).backward()
        model.zero_grad(set_to_none=True)
        return out["logprobs"].detach()

    def nograd(ids, mask, pack):
        with torch.no_grad():
            return forward_logprobs(model, ids, mask, keep=R, pack=pack)["logprobs"]

    machine = platform.processor() or platform.machine()
    result = {"machine": machine, "threads": args.threads, "torch": torch.__version__}
    for name, fn, rows in (("train", train, args.mini_batch), ("nograd", nograd, args.batch)):
        times = {False: [], True: []}
        tokens = {False: 0, True: 0}
        diff = 0.0
        model.train(name == "train")
        fn(*batch(rows, R, g, vocab), True)  # warm-up (and the once-per-model check)
        for _ in range(args.reps):
            ids, mask = batch(rows, R, g, vocab)
            outs = {}
            for pack in (False, True):
                t = time.perf_counter()
                outs[pack] = fn(ids, mask, pack)
                times[pack].append(time.perf_counter() - t)
                tokens[pack] += int(mask.sum()) if pack else mask.numel()
            diff = max(diff, (outs[True] - outs[False]).abs().max().item())
        padded, packed = statistics.median(times[False]), statistics.median(times[True])
        result[name] = {
            "rows": rows,
            "padded_s": round(padded, 4),
            "packed_s": round(packed, 4),
            "padded_over_packed": round(padded / packed, 3),
            "tokens_padded": tokens[False],
            "tokens_packed": tokens[True],
            "max_logprob_diff": diff,
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
