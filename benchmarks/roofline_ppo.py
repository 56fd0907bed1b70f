#!/usr/bin/env python
"""How fast could any implementation run bench_ppo.py's PPO step on this machine? A roofline bound.

    python benchmarks/bench_ppo.py --threads 2 --json-out /tmp/bench/ppo.json
    python benchmarks/roofline_ppo.py --bench /tmp/bench/ppo.json --threads 2

Measures three kernel rates here (fp32, `--threads` threads), then prices the benchmark's own timed
steps (query lengths, response length L, batch, mini-batch, ppo_epochs, read from its JSON) at them:
  * GEMM peak: GFLOP/s of one (mini_batch*T, hidden) x (hidden, intermediate) matmul, the update's shape;
  * stream read: GB/s of summing a 1 GiB tensor (upper bound on weight streaming);
  * decode GEMM: GB/s of (B, hidden) x (hidden, intermediate) matmuls over weights that do not fit in
    cache, which is what each decoded token does 210 times (30 layers x 7 projections).
FLOPs per token: 2 x (linear parameters of the 30 blocks) + attention 4*T*hidden per block + the LM
head 2*hidden*vocab on the response positions only; the update's backward counted as 1x the forward
(input gradients only: the base is frozen; LoRA's own FLOPs are < 2% and left out). Generation:
prefill at GEMM peak, then each new token reads all weights once. Every bound assumes zero overhead
besides those GEMMs, and drops the policy forward after generation (a sampler could return its
log-probs and values), so it is the most favourable case for the challenger.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import machine

UPDATE_T = 110  # padded width of bench_ppo's mini-batches: longest query of the batch (≈ 60) + response (≈ 48)


def rate(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_rates(hidden: int, inter: int, tokens: int, batch: int) -> dict:
    import torch

    a, w = torch.randn(tokens, hidden), torch.randn(inter, hidden)
    gemm = 2 * tokens * hidden * inter / rate(lambda: torch.nn.functional.linear(a, w), 20) / 1e9
    x = torch.randn(2**28)
    stream = x.numel() * 4 / rate(lambda: x.sum(), 5) / 1e9
    ws = [torch.randn(inter, hidden) for _ in range(60)]  # 212 MB: larger than any cache here
    d = torch.randn(batch, hidden)
    decode = len(ws) * inter * hidden * 4 / rate(lambda: [torch.nn.functional.linear(d, w) for w in ws], 5) / 1e9
    return {"gemm_gflops": gemm, "stream_read_gbs": stream, "decode_gemm_gbs": decode}


def step_bound(c: dict, qlens: list[float], L: int, epochs: int, r: dict, decode_gbs: float) -> dict:
    """Seconds per phase at the kernel rates `r`, for one PPO step of len(qlens) rollouts of L tokens."""
    h, i, nl, kv, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["kv_dim"], c["vocab_size"]
    lin = nl * (2 * h * h + 2 * h * kv + 3 * h * i)  # q,o + k,v + gate,up,down
    params = lin + V * h  # tied embedding = LM head, read once per decoded token
    fwd = sum((q + L) * (2 * lin + 4 * (q + L) * h * nl) + L * 2 * h * V for q in qlens)  # FLOPs, one full forward
    prefill = sum(q * (2 * lin + 4 * q * h * nl) for q in qlens) + len(qlens) * 2 * h * V
    peak = r["gemm_gflops"] * 1e9
    return {
        "generate": prefill / peak + L * params * 4 / (decode_gbs * 1e9),
        "reference_forward": fwd / peak,
        "update": epochs * 2 * fwd / peak,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True, help="bench_ppo.py --json-out file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--model-config", default=str(Path.home() / ".cache/rlhfkit/models/SmolLM2-135M-Instruct/config.json")
    )
    ap.add_argument("--json-out")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    bench = json.loads(Path(args.bench).read_text())
    mc = json.loads(Path(args.model_config).read_text())
    c = {k: mc[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}
    c["kv_dim"] = mc["num_key_value_heads"] * mc["hidden_size"] // mc["num_attention_heads"]
    s = bench["settings"]
    r = kernel_rates(c["hidden_size"], c["intermediate_size"], s["mini_batch"] * UPDATE_T, s["batch"])
    out = {"machine": machine(), "threads": args.threads, "rates": r, "by_epochs": {}}
    for e in s["epochs"]:
        rows = [x for x in bench["results"] if x["ppo_epochs"] == e and "error" not in x]
        measured = {x["framework"]: x["step_s_mean"] for x in rows}
        if "trl" not in measured:
            continue
        timed = [st for st in rows[0]["steps"] if st["timed"]]
        bounds = {"stream": [], "decode_gemm": []}
        for st in timed:
            qtok = st["tokens"] - st["response_tokens"]  # the step's query tokens; per-query lengths averaged
            qlens = [qtok / s["batch"]] * s["batch"]
            for name, gbs in (("stream", r["stream_read_gbs"]), ("decode_gemm", r["decode_gemm_gbs"])):
                bounds[name].append(step_bound(c, qlens, st["L"], e, r, gbs))
        res = {}
        for name, bs in bounds.items():
            phases = {k: statistics.mean(b[k] for b in bs) for k in bs[0]}
            total = sum(phases.values())
            res[name] = {
                "phases_s": phases,
                "step_s": total,
                "max_ratio_vs_trl": measured["trl"] / total,
                "efficiency_needed_for_2x": total / (measured["trl"] / 2),
            }
        out["by_epochs"][e] = {"measured_step_s": measured, "bound": res}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(
        f"SUMMARY rates: GEMM {r['gemm_gflops']:.0f} GFLOP/s, stream {r['stream_read_gbs']:.1f} GB/s, "
        f"decode GEMM (M={s['batch']}) {r['decode_gemm_gbs']:.1f} GB/s"
    )
    for e, v in out["by_epochs"].items():
        for name, b in v["bound"].items():
            print(
                f"  ppo_epochs={e}, decode at {name}: bound {b['step_s']:.2f} s/step vs TRL "
                f"{v['measured_step_s']['trl']:.2f} s "
                f"-> at most {b['max_ratio_vs_trl']:.2f}x; a 2x needs "
                f"{100 * b['efficiency_needed_for_2x']:.0f}% of these rates end to end"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
