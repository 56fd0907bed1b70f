"""rlhfkit: data → SFT → reward model → PPO (or DPO) → evaluation, on transformers + peft + accelerate."""

__version__ = "0.1.0"


def train(reward_fn=None, prompts=None, eval_prompts=None, config=None, **kwargs):
    """trlX-style entry point: PPO on `prompts` against `reward_fn` (see `rlhfkit.stages.ppo.train`)."""
    from rlhfkit.stages.ppo import train as _train

    summary = _train(reward_fn=reward_fn, prompts=prompts, eval_prompts=eval_prompts, config=config, **kwargs)
    from_config = config.get("push_to_hub") if isinstance(config, dict) else getattr(config, "push_to_hub", None)
    repo = kwargs.get("push_to_hub") or from_config
    if repo:  # `push_to_hub: REPO_ID` in the config: upload final/ as `rlhfkit push` does
        from rlhfkit.apps.push import push_folder

        summary["pushed"] = push_folder(summary["out_dir"], repo)["url"]
    return summary
