"""First-step loss, advantages and gradients of `algo: rloo` and `algo: grpo` (each loss aggregation)
equal TRL's RLOOTrainer / GRPOTrainer (trl 1.x) on the same tiny model, prompts, completions and rewards.

Completions are fed to both (TRL's `_generate_single_turn` is replaced), with varied lengths ending in
EOS so that TRL's mask (up to the first EOS) and ours (the sampled tokens) cover the same tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

from rlhfkit.runtime.config import load_config
from rlhfkit.stages import ppo

PROMPTS = ["how tea hot?", "why bread good?"]
R_MAX = 6


def reward(prompts, responses=None, completions=None, **_):
    """The same function for both: rlhfkit passes `responses`, TRL `completions=`."""
    texts = responses if responses is not None else completions
    return [float(len(t) % 5) + 0.1 * (i % 3) for i, t in enumerate(texts)]


def _ours(model_dir, out, algo, agg, beta):
    cfg = load_config(
        ppo.PPOConfig,
        overrides={
            "out_dir": str(out),
            "algo": algo,
            "model": {"name": str(model_dir)},
            "template": {"template": "{prompt}{response}"},  # TRL tokenizes the bare prompt
            "lora": {"r": 8, "alpha": 16, "target_modules": ["all-linear"], "dropout": 0.0},
            "train": {"batch_size": 8, "max_steps": 1, "lr": 1e-3},
            "generation": {"response_min": R_MAX, "response_max": R_MAX},
            "ppo": {"mini_batch_size": 8, "ppo_epochs": 1, "init_kl_coef": beta, "adaptive_kl": False, "loss_agg": agg},
        },
    )
    return ppo.RLTrainer(cfg, reward_fn=reward, prompts=PROMPTS, eval_prompts=[])


def _trl(trainer, algo, agg, beta, completions, out):
    from datasets import Dataset

    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=R_MAX,
        use_cpu=True,
        bf16=False,
        report_to=[],
        gradient_checkpointing=False,
        epsilon=0.2,
        beta=beta,
    )
    if algo == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common, loss_type={"sequence": "grpo", "token": "dapo", "constant": "dr_grpo"}[agg])
        cls = GRPOTrainer
    else:
        from trl import RLOOConfig, RLOOTrainer

        args, cls = RLOOConfig(**common), RLOOTrainer
    policy = trainer.accelerator.unwrap_model(trainer.model).policy  # the same weights, LoRA included
    peer = cls(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        processing_class=trainer.tok,
    )
    fed = [list(c) for c in completions]
    peer._generate_single_turn = (lambda *a, **k: (fed, None)) if algo == "grpo" else (lambda *a, **k: fed)
    peer.current_gradient_accumulation_steps = 1
    return peer


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n.split("policy.", 1)[-1]: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(
    "algo,agg", [("rloo", "sequence"), ("grpo", "sequence"), ("grpo", "token"), ("grpo", "constant")]
)
def test_first_step_equals_trl(tiny_model_dir, tmp_path, algo, agg):
    beta = 0.05 if algo == "rloo" else 0.04
    trainer = _ours(tiny_model_dir, tmp_path / "ours", algo, agg, beta)
    g = random.Random(0)
    eos = trainer.tok.eos_token_id
    completions = [[g.randrange(3, 390) for _ in range(g.randint(2, R_MAX - 1))] + [eos] for _ in range(8)]
    prompts8 = [p for p in PROMPTS for _ in range(4)]
    queries = [trainer.queries[i] for i in (0, 0, 0, 0, 1, 1, 1, 1)]
    texts = [trainer.tok.decode(c, skip_special_tokens=True) for c in completions]
    ro = ppo.Rollout(prompts8, queries, [list(c) for c in completions], texts)
    trainer._old_is_current = lambda: False  # old log-probs from the no-grad forward (== deferred: tested apart)
    trainer.score(ro, torch.Generator().manual_seed(0))
    trainer.logprobs(ro)
    trainer.advantages(ro)
    model = trainer.model
    model.train()
    out = model(ro.input_ids, ro.attention_mask, return_entropy=True, keep=ro.response_mask.shape[1])
    loss, _ = trainer.loss(ro, list(range(8)), out)
    loss.backward()
    ours = _grads(model)

    peer = _trl(trainer, algo, agg, beta, completions, tmp_path / "trl")
    peer.model.train()
    inputs = peer._generate_and_score_completions([{"prompt": p} for p in prompts8])
    R = ro.response_mask.shape[1]
    assert inputs["prompt_ids"].tolist() == ro.input_ids[:, :-R].tolist()
    assert inputs["completion_mask"].tolist() == ro.response_mask.tolist()  # varied lengths, the same tokens
    assert torch.allclose(inputs["advantages"].float(), ro.advantages.float(), atol=1e-6)
    peer_loss = peer._compute_loss(peer.model, inputs)
    peer_loss.backward()
    theirs = _grads(peer.model)
    assert abs(loss.item() - peer_loss.item()) <= 1e-6, (loss.item(), peer_loss.item())
    assert ours.keys() == theirs.keys() and len(ours) > 0
    biggest = max(t.abs().max().item() for t in ours.values())
    assert biggest > 1e-3  # a real gradient, not two zeros
    for n in ours:
        assert torch.allclose(ours[n], theirs[n], atol=1e-6, rtol=1e-5), (n, (ours[n] - theirs[n]).abs().max())
