"""rlhfkit: data → SFT → reward model → PPO (or DPO) → evaluation, on transformers + peft + accelerate."""

__version__ = "0.1.0"


def train(reward_fn=None, prompts=None, eval_prompts=None, config=None, **kwargs):
    """trlX-style entry point: PPO on `prompts` against `reward_fn` (see `rlhfkit.stages.ppo.train`)."""
    from rlhfkit.stages.ppo import train as _train

    return _train(reward_fn=reward_fn, prompts=prompts, eval_prompts=eval_prompts, config=config, **kwargs)
