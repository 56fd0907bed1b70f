"""The RL policy as one module: the LM (+LoRA), an optional value model (a scalar head on its last
hidden state, or a separate critic from the RM), and the way to its frozen reference.

Reference = the adapter disabled (fresh LoRA) or a frozen copy of the starting adapter (continued
LoRA): KL at step 0 is exactly 0 and no second copy of the base weights exists (trl#1340).
"""

from __future__ import annotations

import contextlib
from typing import Literal

from torch import nn

from rlhfkit.models.adapters import disable_dropout
from rlhfkit.models.critic import load_critic
from rlhfkit.models.forward import ScalarHead, forward_logprobs
from rlhfkit.models.loading import is_adapter_dir, load_model, resolve_model_path
from rlhfkit.runtime.errors import ConfigError

REF_ADAPTER = "reference"


class PolicyWithValue(nn.Module):
    """Policy LM + value head on its last hidden state, a separate critic, or no value model
    (critic-free estimators), as one module for accelerate/DDP/checkpoints."""

    def __init__(
        self,
        policy,
        reference: Literal["disable_adapter", "adapter"],
        critic: nn.Module | None = None,
        value_head: bool = True,
    ):
        super().__init__()
        self.policy = policy
        self.critic = critic
        head = value_head and critic is None
        self.v_head = ScalarHead(policy.config.get_text_config().hidden_size) if head else None
        self.reference = reference

    def forward(
        self,
        input_ids,
        attention_mask,
        return_logits: bool = False,
        return_entropy: bool = False,
        keep: int = 0,
        share_queries: bool = False,
        pack: bool = False,
    ):
        """input_ids, attention_mask (B, T) -> logprobs, values (B, T-1) [+ logits (B, T-1, V)] [+ entropy (B, T-1)
        with return_entropy=True];
        keep=R: those of the last R tokens only (B, R[, V]) — the response, after left-padded queries.
        values is None without a value model. share_queries, pack: see forward_logprobs."""
        head = self.v_head is not None
        out = forward_logprobs(
            self.policy,
            input_ids,
            attention_mask,
            return_hidden=head,
            return_logits=return_logits,
            keep=keep,
            share_queries=share_queries,
            return_entropy=return_entropy,
            pack=pack,
        )
        if head:
            out["values"] = self.v_head(out.pop("hidden"))
        elif self.critic is not None:
            values = self.critic(input_ids, attention_mask)
            out["values"] = values[:, -keep:] if keep else values
        else:
            out["values"] = None
        return out

    @contextlib.contextmanager
    def as_reference(self):
        """The frozen reference: adapter off, or the frozen copy of the starting adapter."""
        if self.reference == "disable_adapter":
            with self.policy.disable_adapter():
                yield self.policy
        else:
            self.policy.set_adapter(REF_ADAPTER)
            try:
                yield self.policy
            finally:
                self.policy.set_adapter("default")
                for n, p in self.policy.named_parameters():  # set_adapter may re-enable grads
                    if f".{REF_ADAPTER}." in n:
                        p.requires_grad_(False)


def build_policy(model_cfg, lora_cfg, template, critic_path: str | None, value_head: bool):
    """Policy + value head (value_head), a critic started from the RM folder `critic_path`, or no value
    model, and how to reach the reference (never a second copy of base weights)."""
    path = resolve_model_path(model_cfg.name)
    continuing = is_adapter_dir(path) and lora_cfg.continue_adapter
    if not continuing and not lora_cfg.enabled:
        raise ConfigError("PPO with lora.enabled=false would need a second full copy as reference; use LoRA")
    policy, tok = load_model(model_cfg, lora_cfg, kind="causal_lm")
    if continuing:  # reference = frozen copy of the starting adapter (fixes trl#1340: KL(step 0) = 0)
        policy.load_adapter(path, adapter_name=REF_ADAPTER, is_trainable=False)
        policy.set_adapter("default")
        for n, p in policy.named_parameters():
            if f".{REF_ADAPTER}." in n:
                p.requires_grad_(False)
    n_drop = disable_dropout(policy)
    if n_drop or lora_cfg.dropout > 0:
        print(
            f"[ppo] dropout off in every forward ({n_drop} dropout layers/attention rates were > 0"
            + (f"; lora.dropout={lora_cfg.dropout} is not used" if lora_cfg.dropout > 0 else "")
            + ")"
        )
    critic = None if critic_path is None else load_critic(critic_path, model_cfg, lora_cfg, tok, template)
    model = PolicyWithValue(policy, "adapter" if continuing else "disable_adapter", critic, value_head)
    tok.padding_side = "left"
    return model, tok
