"""A separate PPO critic initialised from a reward model (InstructGPT / OpenRLHF style).

Ouyang et al. 2022 (§3.5) initialise the value function from the RM: the critic is the RM's backbone
and `score` head read at every position (modeling.token_scores), so at step 0 its value after the last
token of a text is the RM's score of that text. It trains LoRA + its score head with the same clipped
value loss as the value head; PPO keeps it inside PolicyWithValue (one module for DDP and checkpoints).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch import nn

from rlhfkit.models.adapters import disable_dropout, save_model
from rlhfkit.models.forward import token_scores, unwrap
from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model
from rlhfkit.runtime.config import to_dict
from rlhfkit.runtime.errors import ConfigError

VALUE_HEAD, FROM_REWARD = "value_head", "rm"


def critic_source(critic: str, reward: str) -> str | None:
    """The RM folder a separate critic starts from, or None for a value head on the policy."""
    if critic == VALUE_HEAD:
        return None
    path = reward if critic == FROM_REWARD else critic
    if not path or not Path(path).is_dir():
        what = f"reward={reward!r}" if critic == FROM_REWARD else f"critic={critic!r}"
        raise ConfigError(
            f"critic: {what} is not a reward-model folder; critic='rm' needs reward to be an RM "
            f"folder, or give critic=<RM folder> (or critic='value_head')"
        )
    return str(path)


class RewardModelCritic(nn.Module):
    """A 1-label sequence classifier (the RM, with trainable LoRA and score head) as a value function."""

    def __init__(self, model, tokenizer, model_cfg: ModelConfig, lora: LoraConfig):
        super().__init__()
        self.model = model
        self.tok, self.model_cfg, self.lora = tokenizer, model_cfg, lora

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> values (B, T-1): values[:, t] reads position t, as the value head on the policy does."""
        return token_scores(self.model, input_ids, attention_mask)[:, :-1].float()

    def save(self, out: Path) -> None:
        """An RM-style folder (adapter or full model + tokenizer), loadable as a reward model."""
        save_model(self.model, self.tok, out, self.model_cfg, self.lora)


def load_critic(path: str, model_cfg: ModelConfig, lora: LoraConfig, policy_tok, template) -> RewardModelCritic:
    """The RM at `path` made trainable: its own LoRA adapter continued (score head included), or a
    fresh LoRA (settings of `lora`) on a full/merged RM. Loaded like the policy (dtype, checkpointing)."""
    cfg, lora = replace(model_cfg, name=path, tokenizer=None, revision=None), replace(lora, continue_adapter=True)
    model, tok = load_model(cfg, lora, kind="seq_cls")
    if not hasattr(unwrap(model), "score"):
        raise ConfigError(
            f"critic {path}: {type(unwrap(model)).__name__} has no per-token 'score' head "
            f"(encoder RMs pool one [CLS] state); use critic='value_head'"
        )
    if tok.get_vocab() != policy_tok.get_vocab():
        raise ConfigError(f"critic {path}: its tokenizer differs from the policy's, whose token ids it reads")
    # Dropout off, as in the policy: rollout values and first-epoch values must agree (Huang et al. 2023);
    # an RM adapter is usually trained with dropout 0.1.
    disable_dropout(model)
    saved = Path(path) / "config.yaml"
    rm_template = (yaml.safe_load(saved.read_text()) or {}).get("template") if saved.exists() else None
    if rm_template is not None and rm_template != to_dict(template):
        print(f"[ppo] warning: critic {path} was trained with template {rm_template}, PPO uses {to_dict(template)}")
    return RewardModelCritic(model, tok, cfg, lora)
