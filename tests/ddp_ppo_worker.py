"""Run PPO with rollouts fed in (deterministic per prompt), for the 1- vs 2-process equality test.

torchrun --nproc_per_node 2 tests/ddp_ppo_worker.py MODEL_DIR OUT_DIR LOCAL_BATCH [ALGO[,ALGO…]] [KEY=VALUE…]

Each algo runs into OUT_DIR/ALGO, one after the other in the same processes (one launch for all).
KEY=VALUE: dotted config overrides on top of the test config (train.save_every=1, resume=true).
--real-rollouts: sample with the policy (HF generate) instead, and evaluate on 5 prompts (uneven shards).
"""

import sys

import torch

import rlhfkit.stages.ppo as ppo
from rlhfkit.runtime.config import merge_dicts, parse_overrides


def fed_generate(policy, tok, queries, lengths, g, device, cache_len=0):
    """Responses that depend only on the query and which of its k samples this is (groups are whole on
    every rank): the same rollouts whatever the process count."""
    seen: dict[tuple, int] = {}
    rows = []
    for q in queries:
        n = seen[tuple(q)] = seen.get(tuple(q), -1) + 1
        rows.append([(sum(q) * (j + 7) + 31 * n * (j + 1)) % 300 + 3 for j in range(6)])
    resp = torch.tensor(rows)
    mask = torch.ones_like(resp)
    return resp, mask


def score(prompts, responses):
    return [len(r) % 7 / 7.0 for r in responses]


if __name__ == "__main__":
    model_dir, out, local_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    algos = (sys.argv[4] if len(sys.argv) > 4 else "ppo").split(",")
    real = "--real-rollouts" in sys.argv[5:]
    extra = parse_overrides([a for a in sys.argv[5:] if a != "--real-rollouts"])
    if not real:
        ppo.generate = fed_generate
    prompts = [f"how {a} {b}?" for a in ("tea", "beer", "bread", "milk") for b in ("hot", "cold", "good", "bad")]
    for algo in algos:
        ppo.train(
            reward_fn=score,
            prompts=prompts,
            eval_prompts=prompts[:5] if real else [],
            config=merge_dicts(
                {
                    "out_dir": f"{out}/{algo}",
                    "algo": algo,
                    "overwrite": True,
                    "model": {"name": model_dir},
                    "lora": {"r": 4, "target_modules": ["all-linear"]},
                    "train": {"max_steps": 3, "batch_size": local_batch, "lr": 1e-3},
                    "ppo": {
                        "mini_batch_size": local_batch,
                        "ppo_epochs": 2,
                        "score_norm": "normalize",
                        "adaptive_kl": True,
                    },
                },
                extra,
            ),
        )
