"""Run PPO with rollouts fed in (deterministic per prompt), for the 1- vs 2-process equality test.

torchrun --nproc_per_node 2 tests/ddp_ppo_worker.py MODEL_DIR OUT_DIR LOCAL_BATCH [ALGO[,ALGO…]] [KEY=VALUE…]

Each algo runs into OUT_DIR/ALGO, one after the other in the same processes (one launch for all).
KEY=VALUE: dotted config overrides on top of the test config (train.save_every=1, resume=true).
--real-rollouts: sample with the policy (HF generate) instead, and evaluate on 5 prompts (uneven shards).
--resume-copy: then copy each finished OUT_DIR/ALGO to OUT_DIR/ALGO-resumed without its final/ and resume
that copy from its newest checkpoint (resume == uninterrupted, without a second launch).
`main(argv)` runs the same in-process (the one-process references; the caller restores ppo.generate).
"""

import shutil
import sys
from pathlib import Path

import torch

import rlhfkit.stages.ppo as ppo
from rlhfkit.runtime.config import merge_dicts, parse_overrides

FLAGS = ("--real-rollouts", "--resume-copy")


def fed_generate(policy, tok, queries, lengths, g, device, cache_len=0, share_queries=False):
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


def config(model_dir: str, out: str, algo: str, local_batch: int, extra: dict) -> dict:
    return merge_dicts(
        {
            "out_dir": out,
            "algo": algo,
            "overwrite": True,
            "model": {"name": model_dir},
            "lora": {"r": 4, "target_modules": ["all-linear"]},
            "train": {"max_steps": 3, "batch_size": local_batch, "lr": 1e-3},
            "ppo": {"mini_batch_size": local_batch, "ppo_epochs": 2, "score_norm": "normalize", "adaptive_kl": True},
        },
        extra,
    )


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def main(argv: list[str]) -> None:
    model_dir, out, local_batch = argv[0], argv[1], int(argv[2])
    algos = (argv[3] if len(argv) > 3 else "ppo").split(",")
    real, resume_copy = "--real-rollouts" in argv[4:], "--resume-copy" in argv[4:]
    extra = parse_overrides([a for a in argv[4:] if a not in FLAGS])
    if not real:
        ppo.generate = fed_generate
    prompts = [f"how {a} {b}?" for a in ("tea", "beer", "bread", "milk") for b in ("hot", "cold", "good", "bad")]
    run = (
        lambda algo, path, more: ppo.train(  # noqa: E731
            reward_fn=score,
            prompts=prompts,
            eval_prompts=prompts[:5] if real else [],
            config=config(model_dir, path, algo, local_batch, merge_dicts(extra, more)),
        )
    )
    for algo in algos:
        run(algo, f"{out}/{algo}", {})
        if resume_copy:
            copy = Path(f"{out}/{algo}-resumed")
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                shutil.copytree(f"{out}/{algo}", copy)
                shutil.rmtree(copy / "final")
            _barrier()
            run(algo, str(copy), {"resume": True, "overwrite": False})


if __name__ == "__main__":
    main(sys.argv[1:])
