"""PPO-RLHF: policy (+LoRA) with a value head (or a critic from the RM), per-token KL penalty to a frozen reference.

The update reads as a numbered story (as vwxyzjn's summarize_from_feedback_details):
  1 rollout   2 score   3 KL-penalised reward   4 whiten/normalise scores   5 GAE + whitened advantages
  6 minibatch epochs (clipped policy + value losses)   7 log.
Reference = the same weights with the adapter disabled (fresh LoRA) or a frozen copy of the starting
adapter (continued LoRA), so KL at step 0 is exactly 0 and no second copy of the base exists.
Every dropout is off and the no-grad forwards run in eval mode (as TRL-classic; Huang et al. 2023), so
the first mini-batch's ratio is 1 before any update. Prompts are bounded by prompts.max_length.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from rlhfkit.algorithms import rl
from rlhfkit.inputs.prompts import PromptDataConfig, encode_prompts, load_prompts
from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
from rlhfkit.models.adapters import disable_dropout, save_model
from rlhfkit.models.critic import VALUE_HEAD, critic_source, load_critic
from rlhfkit.models.forward import ScalarHead, eval_mode, forward_logprobs
from rlhfkit.models.generation import SamplingConfig, generate, pad_left, response_logprobs
from rlhfkit.models.loading import LoraConfig, ModelConfig, is_adapter_dir, load_model, resolve_model_path
from rlhfkit.rewards.scoring import load_scorer
from rlhfkit.runtime.config import save_config
from rlhfkit.runtime.errors import ConfigError, RlhfkitError
from rlhfkit.runtime.io import append_jsonl, atomic_write_text
from rlhfkit.runtime.training import StageConfig, StageRun, TrainConfig, check_positive

REF_ADAPTER = "reference"
GUARDED_STATS = ("score", "kl", "pg_loss", "vf_loss", "approxkl", "entropy")


@dataclass
class GenerationConfig(SamplingConfig):
    """Rollout sampling: the shared sampling knobs, a length sampler, and the KL-bias guard."""

    response_min: int = 32
    """Length sampler: each rollout's max new tokens is drawn uniformly from [response_min, response_max]."""
    response_max: int = 64
    """Upper end of the length sampler."""
    accept_kl_bias: bool = False
    """Allow top_k/top_p/temperature/min_new_tokens settings that make samples come from a distribution
    other than the policy (they bias the KL estimate; refused otherwise)."""


@dataclass
class PPOHyperConfig:
    init_kl_coef: float = 0.2
    """β: weight of the per-token KL penalty (initial value when adaptive)."""
    adaptive_kl: bool = True
    """Adapt β towards target_kl (Ziegler et al. 2019); false keeps β fixed."""
    target_kl: float = 6.0
    """KL (nats per sequence) the adaptive controller aims for."""
    horizon: int = 10000
    """Adaptive controller horizon (in rollouts)."""
    kl_estimator: Literal["kl", "abs", "mse", "full"] = "kl"
    """Per-token KL estimator for the penalty: k1 'kl', 'abs', 'mse' (k2), or exact 'full' over the vocab."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE λ."""
    cliprange: float = 0.2
    """Policy ratio clip ε."""
    cliprange_value: float = 0.2
    """Value clip around the rollout values."""
    vf_coef: float = 0.1
    """Value-loss weight."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts."""
    mini_batch_size: int = 4
    """Rollouts per gradient step (per process)."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch (across processes)."""
    reward_baseline: float = 0.0
    """Subtracted from every score (StackLLaMA used the RM's mean)."""
    score_norm: Literal["none", "scale", "normalize"] = "none"
    """Running score statistics: 'scale' divides by the running std, 'normalize' also subtracts the mean."""
    score_clip: float = 0.0
    """Clip scores to ±score_clip after scaling (0 = off)."""
    ratio_threshold: float = 10.0
    """Skip a mini-batch whose mean probability ratio exceeds this (a stability guard from TRL-classic)."""
    early_stop_kl: float = 0.0
    """Stop the epoch loop early once approx KL of a mini-batch exceeds this (0 = off)."""

    def __post_init__(self):
        check_positive(self, ("mini_batch_size", "ppo_epochs", "horizon", "cliprange"))
        check_positive(self, ("init_kl_coef", "vf_coef", "score_clip", "early_stop_kl"), zero_ok=True)


@dataclass
class PPOConfig(StageConfig):
    out_dir: str = "runs/ppo"
    """Output directory (config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy start: a base/merged model, or an SFT adapter folder (merged, or continued with lora.continue_adapter)."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(dropout=0.0))
    """Policy LoRA. PPO turns every dropout off (LoRA's, a continued adapter's, the base's): with it the
    first ratio is ≠ 1 and the KL penalty noisy (Huang et al. 2023), so lora.dropout is not used here."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    """Prompt template (keep it the same as SFT and the RM)."""
    prompts: PromptDataConfig = field(default_factory=PromptDataConfig)
    """Training and eval prompts."""
    reward: str = ""
    """Reward: an RM folder, 'pipeline:<model>:<label>', or 'module:function' taking (prompts, responses)."""
    critic: str = VALUE_HEAD
    """Value function: 'value_head' (a scalar head on the policy's last hidden state), 'rm' (a separate
    critic initialised from the `reward` RM folder: its score head at every token, its LoRA continued or
    a fresh one with `lora`'s settings, dropout off; saved in final/critic), or an RM folder to start it from."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Rollout sampling."""
    ppo: PPOHyperConfig = field(default_factory=PPOHyperConfig)
    """PPO and KL hyper-parameters."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1.41e-5, lr_scheduler="constant", batch_size=8, max_steps=100, seed=0)
    )
    """Optimisation and run length, as in every trained stage: max_steps PPO iterations of batch_size
    rollouts per process each; grad_accum mini-batches per optimizer step; lr (AdamW, policy adapter and
    value head or critic), stepped once per iteration by lr_scheduler; seed for prompt order, sampling
    and mini-batch shuffles; eval_every / save_every in iterations."""
    # The keys this stage had before they joined `train` (a config naming one gets told the new key).
    RENAMED: ClassVar[dict[str, str]] = {
        "steps": "train.max_steps",
        "batch_size": "train.batch_size",
        "lr": "train.lr",
        "seed": "train.seed",
        "eval_every": "train.eval_every",
        "save_every": "train.save_every",
        "keep_checkpoints": "train.keep_checkpoints",
        "report_to": "train.report_to",
        "ppo.grad_accum": "train.grad_accum",
        "ppo.max_grad_norm": "train.max_grad_norm",
    }

    def __post_init__(self):
        if self.train.max_steps < 1:
            raise ValueError(f"train.max_steps must be ≥ 1 PPO iterations, got {self.train.max_steps}")
        if self.train.epochs != 1.0:
            raise ValueError("train.epochs does not apply to PPO (prompts are streamed); set train.max_steps")


CONFIG = PPOConfig


# --------------------------------------------------------------------------- model pieces
class PolicyWithValue(nn.Module):
    """Policy LM + value head on its last hidden state (or a separate critic), as one module for
    accelerate/DDP/checkpoints."""

    def __init__(self, policy, reference: Literal["disable_adapter", "adapter"], critic: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.v_head = ScalarHead(policy.config.get_text_config().hidden_size) if critic is None else None
        self.reference = reference

    def forward(self, input_ids, attention_mask, return_logits=False, keep: int = 0):
        """input_ids, attention_mask (B, T) -> logprobs, values (B, T-1) [+ logits (B, T-1, V)];
        keep=R: those of the last R tokens only (B, R[, V]) — the response, after left-padded queries."""
        head = self.v_head is not None
        out = forward_logprobs(
            self.policy, input_ids, attention_mask, return_hidden=head, return_logits=return_logits, keep=keep
        )
        if head:
            out["values"] = self.v_head(out.pop("hidden"))
        else:
            values = self.critic(input_ids, attention_mask)
            out["values"] = values[:, -keep:] if keep else values
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


def check_generation(g: GenerationConfig) -> None:
    """Refuse sampling settings that make the KL estimate (and penalty) biased, unless accepted."""
    problems = []
    if g.min_new_tokens > 0:
        problems.append(f"min_new_tokens={g.min_new_tokens} suppresses EOS, so samples are not from the policy")
    if g.top_k > 0:
        problems.append(f"top_k={g.top_k} truncates the distribution")
    if g.top_p < 1.0:
        problems.append(f"top_p={g.top_p} truncates the distribution")
    if g.temperature != 1.0:
        problems.append(f"temperature={g.temperature} samples from a reshaped distribution")
    if g.response_min < 1 or g.response_max < g.response_min:
        raise ConfigError("generation.response_min must be ≥ 1 and ≤ generation.response_max")
    if problems and not g.accept_kl_bias:
        raise ConfigError(
            "generation settings bias the KL penalty: " + "; ".join(problems) + ". The KL term is estimated from "
            "log π(y)/π_ref(y) on samples y, which is only unbiased when y is drawn from π itself — with these "
            "settings the estimate can go negative and PPO can exploit it (see trl#1340 discussions). "
            "Set generation.accept_kl_bias=true to run anyway."
        )


def build_policy(cfg: PPOConfig):
    """Policy + value head (or critic) and how to reach the reference (never a second copy of base weights)."""
    rm_path = critic_source(cfg.critic, cfg.reward)
    path = resolve_model_path(cfg.model.name)
    continuing = is_adapter_dir(path) and cfg.lora.continue_adapter
    if not continuing and not cfg.lora.enabled:
        raise ConfigError("PPO with lora.enabled=false would need a second full copy as reference; use LoRA")
    policy, tok = load_model(cfg.model, cfg.lora, kind="causal_lm")
    if continuing:  # reference = frozen copy of the starting adapter (fixes trl#1340: KL(step 0) = 0)
        policy.load_adapter(path, adapter_name=REF_ADAPTER, is_trainable=False)
        policy.set_adapter("default")
        for n, p in policy.named_parameters():
            if f".{REF_ADAPTER}." in n:
                p.requires_grad_(False)
    n_drop = disable_dropout(policy)
    if n_drop or cfg.lora.dropout > 0:
        print(
            f"[ppo] dropout off in every forward ({n_drop} dropout layers/attention rates were > 0"
            + (f"; lora.dropout={cfg.lora.dropout} is not used" if cfg.lora.dropout > 0 else "")
            + ")"
        )
    critic = None if rm_path is None else load_critic(rm_path, cfg.model, cfg.lora, tok, cfg.template)
    model = PolicyWithValue(policy, "adapter" if continuing else "disable_adapter", critic)
    tok.padding_side = "left"
    return model, tok


# --------------------------------------------------------------------------- trainer
class PPOTrainer(StageRun):
    def __init__(self, cfg: PPOConfig, reward_fn=None, prompts=None, eval_prompts=None):
        check_generation(cfg.generation)
        super().__init__(cfg, "ppo")
        acc, p = self.accelerator, cfg.ppo
        if reward_fn is None and not cfg.reward:
            raise ConfigError("reward: give an RM folder, 'pipeline:<model>:<label>' or 'module:function'")
        self.scorer = load_scorer(reward_fn if reward_fn is not None else cfg.reward)
        model, self.tok = build_policy(cfg)
        self.fmt = PromptFormat(cfg.template, self.tok)
        if prompts is None:
            self.prompts, self.eval_prompts = load_prompts(cfg.prompts, cfg.train.seed)
        else:
            self.prompts, self.eval_prompts = list(prompts), list(eval_prompts or [])
        if not self.prompts:
            raise RlhfkitError("no training prompts")
        self.prompts, self.queries, self.prompt_stats = encode_prompts(self.prompts, self.fmt, cfg.prompts, "ppo")
        self.eval_prompts, self.eval_queries, _ = (
            encode_prompts(self.eval_prompts, self.fmt, cfg.prompts, "ppo eval") if self.eval_prompts else ([], [], {})
        )
        from rlhfkit.runtime.training import StepPlan

        self.plan = StepPlan(
            len(self.prompts), cfg.train.batch_size, 1, acc.num_processes, acc.process_index, cfg.train.seed
        )
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, cfg.train.warmup_steps, cfg.train.max_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.kl_ctl = (
            rl.AdaptiveKLController(p.init_kl_coef, p.target_kl, p.horizon)
            if p.adaptive_kl
            else rl.FixedKLController(p.init_kl_coef)
        )
        self.score_stats = rl.RunningMoments()
        self.length_sampler = rl.LengthSampler(cfg.generation.response_min, cfg.generation.response_max)
        self.samples_path = self.out / "samples.jsonl"
        if acc.is_main_process:
            print(
                f"[ppo] {len(self.prompts)} prompts, {len(self.eval_prompts)} eval prompts; "
                f"{cfg.train.batch_size} rollouts × {acc.num_processes} processes per step; reward: {self.scorer.name}"
            )

    def step_prompts(self, step: int) -> list[int]:
        """This rank's prompt indices: a continuous stream over seeded epoch permutations, so every
        step has exactly batch_size × processes rollouts (DDP needs equal work on every rank)."""
        G, acc = self.cfg.train.batch_size * self.accelerator.num_processes, self.accelerator
        n, out = len(self.prompts), []
        for i in range(step * G, (step + 1) * G):
            epoch, k = divmod(i, n)
            out.append(self.plan.order(epoch)[k])
        return out[acc.process_index :: acc.num_processes]

    def _generator(self, step: int, salt: int) -> torch.Generator:
        acc = self.accelerator
        return torch.Generator().manual_seed(
            ((self.cfg.train.seed * 1_000_003 + step) * 97 + salt) * 64 + acc.process_index
        )

    def _decode(self, resp: torch.Tensor, rmask: torch.Tensor) -> list[str]:
        return [self.tok.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(resp, rmask)]

    # ------------------------------------------------------------------ one PPO iteration
    def ppo_step(self, prompts: list[str], queries: list[list[int]], gen: torch.Generator) -> dict:
        cfg, p, acc = self.cfg, self.cfg.ppo, self.accelerator
        model, dev = acc.unwrap_model(self.model), acc.device
        full_kl = p.kl_estimator == "full"
        all_reduce = self.sum_across if acc.num_processes > 1 else None  # cross-rank sums for the masked statistics
        t = {}

        # 1. Rollout: sample responses from the current policy (left-padded queries, KV cache).
        t0 = time.perf_counter()
        lengths = self.length_sampler.sample(len(queries), generator=gen).tolist()
        resp, rmask = generate(
            model.policy, self.tok, queries, lengths, cfg.generation, dev, cfg.generation.response_max
        )
        q_ids, q_mask = pad_left(queries, self.tok.pad_token_id)
        input_ids = torch.cat([q_ids, resp], 1).to(dev)
        attention_mask = torch.cat([q_mask, rmask], 1).to(dev)
        rmask = rmask.to(dev)
        R = resp.shape[1]
        t["time/generate"] = time.perf_counter() - t0

        # 2. Score: the reward source sees the decoded text; baseline, running scaling, clipping.
        t0 = time.perf_counter()
        responses = self._decode(resp, rmask.cpu())
        raw_scores = torch.tensor(self.scorer(prompts, responses), dtype=torch.float32, device=dev)
        scores = raw_scores - p.reward_baseline
        if p.score_norm != "none":
            mean, std = self.score_stats.update(scores, all_reduce=all_reduce)
            scores = (scores - self.score_stats.mean) if p.score_norm == "normalize" else scores
            scores = scores / (self.score_stats.std + 1e-8)
        if p.score_clip > 0:
            scores = scores.clamp(-p.score_clip, p.score_clip)
        t["time/score"] = time.perf_counter() - t0

        # 3. KL-penalised reward: old log-probs and values, reference log-probs, −β·KL_t per token.
        #    Every forward keeps only the R response positions (the queries are left-padded before them).
        t0 = time.perf_counter()
        with torch.no_grad(), eval_mode(model):
            old = model(input_ids, attention_mask, return_logits=full_kl, keep=R)
            with model.as_reference() as ref_model:
                ref = forward_logprobs(ref_model, input_ids, attention_mask, return_logits=full_kl, keep=R)
        logprobs, values, ref_logprobs = old["logprobs"], old["values"], ref["logprobs"]
        logits, ref_logits = (old["logits"], ref["logits"]) if full_kl else (None, None)
        del old, ref
        rewards, non_score_reward, kl = rl.penalized_rewards(
            scores, logprobs, ref_logprobs, rmask, self.kl_ctl.value, p.kl_estimator, logits, ref_logits
        )
        t["time/forward"] = time.perf_counter() - t0

        # 4 + 5. GAE on the per-token rewards, then advantages whitened across all processes.
        t0 = time.perf_counter()
        advantages, returns = rl.compute_gae(values, rewards, rmask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = rl.masked_whiten(advantages, rmask, all_reduce=all_reduce)

        # 6. Minibatch epochs: clipped surrogate + clipped value loss, guards on ratio and approx KL.
        B, mb = len(queries), p.mini_batch_size
        stats: dict[str, list[float]] = {}
        skipped, stop = 0, False
        self.model.train()
        for _ in range(p.ppo_epochs):
            order = torch.randperm(B, generator=gen).tolist()
            groups = [order[i : i + mb] for i in range(0, B, mb)]
            for g0 in range(0, len(groups), cfg.train.grad_accum):
                accum = groups[g0 : g0 + cfg.train.grad_accum]
                for k, idx in enumerate(accum):
                    ctx = contextlib.nullcontext() if k == len(accum) - 1 else acc.no_sync(self.model)
                    with ctx:
                        out = self.model(input_ids[idx], attention_mask[idx], return_logits=True, keep=R)
                        new_logprobs, new_values = out["logprobs"], out["values"]
                        m = rmask[idx]
                        pg_loss, pg_stats = rl.policy_loss(new_logprobs, logprobs[idx], advantages[idx], m, p.cliprange)
                        vf_loss, vf_stats = rl.value_loss(new_values, values[idx], returns[idx], m, p.cliprange_value)
                        # Token means over the *global* mini-batch (DDP averages the rank gradients),
                        # and guard decisions taken on global numbers so every rank takes the same one.
                        n_tok = m.sum().float()
                        glob_tok = self.sum_across(n_tok.clone()).clamp(min=1)
                        share = n_tok * acc.num_processes / glob_tok
                        pg_stats["ratio"] = self.sum_across(pg_stats["ratio"].detach() * n_tok) / glob_tok
                        pg_stats["approxkl"] = self.sum_across(pg_stats["approxkl"].detach() * n_tok) / glob_tok
                        loss = (pg_loss + p.vf_coef * vf_loss) * share
                        if float(pg_stats["ratio"]) > p.ratio_threshold:  # a blown-up ratio: skip, don't step on it
                            skipped += 1
                            loss = loss * 0.0
                        acc.backward(loss / len(accum))
                    with torch.no_grad():
                        ent = rl.masked_mean(rl.entropy_from_logits(out["logits"]), m)
                        local = {
                            "pg_loss": pg_loss,
                            "vf_loss": vf_loss,
                            "entropy": ent,
                            "clipfrac": pg_stats["clipfrac"],
                            "vf_clipfrac": vf_stats["vf_clipfrac"],
                        }
                        names = list(local)
                        glob = (
                            self.sum_across(
                                torch.stack([torch.as_tensor(local[k]).detach().float() for k in names]) * n_tok
                            )
                            / glob_tok
                        )
                        logged = {
                            **dict(zip(names, glob.tolist())),
                            "approxkl": float(pg_stats["approxkl"]),
                            "ratio": float(pg_stats["ratio"]),
                        }
                    for name, v in logged.items():
                        stats.setdefault(name, []).append(v)
                    del out
                if cfg.train.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if p.early_stop_kl > 0 and stats["approxkl"][-1] > p.early_stop_kl:
                    stop = True
                    break
            if stop:
                break
        t["time/update"] = time.perf_counter() - t0

        # 7. Log: global means (across processes) of what the PPO literature logs; adapt β.
        n = torch.tensor(float(B), device=dev)
        seq_kl = rl.masked_sum(kl, rmask, dim=1)
        glob = lambda x: (self.sum_across(x.sum().detach()) / self.sum_across(n)).item()  # noqa: E731
        mean_kl = glob(seq_kl)
        record = {
            "score": glob(raw_scores),
            "score_std": math.sqrt(max(glob(raw_scores**2) - glob(raw_scores) ** 2, 0.0)),
            "reward": glob(scores),
            "non_score_reward": glob(rl.masked_sum(non_score_reward, rmask, dim=1)),
            "kl": mean_kl,
            "kl_coef": self.kl_ctl.value,
            "response_length": glob(rmask.sum(1).float()),
            "explained_variance": float(rl.explained_variance(values, returns, rmask, all_reduce=all_reduce)),
            "skipped_minibatches": skipped,
            **({"rm_inputs_cut": self.scorer.n_cut} if hasattr(self.scorer, "n_cut") else {}),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            **t,
        }
        tokens = self.sum_across(attention_mask.sum().float()).item()
        record["tokens_per_s"] = tokens / max(sum(t.values()), 1e-9)
        self.kl_ctl.update(mean_kl, int(self.sum_across(n).item()))
        return record

    # ------------------------------------------------------------------ eval / loop
    @torch.no_grad()
    def evaluate(self, tag: str) -> dict:
        """Sample eval prompts with a fixed seed (training RNG untouched), score, KL to reference."""
        if not self.eval_prompts:
            return {}
        acc, model = self.accelerator, self.accelerator.unwrap_model(self.model)
        prompts = self.eval_prompts[acc.process_index :: acc.num_processes]
        queries = self.eval_queries[acc.process_index :: acc.num_processes]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed + 7919)
            lengths = [self.cfg.generation.response_max] * len(queries)
            resp, rmask = generate(
                model.policy,
                self.tok,
                queries,
                lengths,
                self.cfg.generation,
                acc.device,
                self.cfg.generation.response_max,
            )
        responses = self._decode(resp, rmask)
        rewards = self.scorer(prompts, responses)
        with eval_mode(model):
            logp = response_logprobs(model.policy, queries, resp, rmask, self.tok.pad_token_id)
            with model.as_reference() as ref_model:
                ref_logp = response_logprobs(ref_model, queries, resp, rmask, self.tok.pad_token_id)
        seq_kl = (logp - ref_logp).sum(1)
        n = torch.tensor(float(len(prompts)), device=acc.device)
        result = {
            "reward": (self.sum_across(torch.tensor(sum(rewards), device=acc.device)) / self.sum_across(n)).item(),
            "kl": (self.sum_across(seq_kl.sum()) / self.sum_across(n)).item(),
            "response_length": (self.sum_across(rmask.sum().float().to(acc.device)) / self.sum_across(n)).item(),
        }
        if acc.is_main_process:
            for q, r, s in zip(prompts, responses, rewards):
                append_jsonl(
                    self.samples_path, {"step": self.step, "tag": tag, "prompt": q, "response": r, "reward": s}
                )
        return result

    def _fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        state = self.maybe_resume()
        if state:
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.score_stats.load_state_dict(state["score_stats"])
            if acc.is_main_process:
                kept = [r for r in _read(self.samples_path) if r["step"] <= self.step]
                atomic_write_text(self.samples_path, "".join(_dump(r) for r in kept))
        else:
            before = self.evaluate("before")
            if before:
                self.log({"step": 0, **{f"eval/{k}": v for k, v in before.items()}})
        bar = tqdm(
            total=cfg.train.max_steps,
            initial=self.step,
            desc="ppo",
            disable=not acc.is_local_main_process,
            dynamic_ncols=True,
        )
        record: dict = {}
        while self.step < cfg.train.max_steps:
            idx = self.step_prompts(self.step)
            record = self.ppo_step(
                [self.prompts[i] for i in idx], [self.queries[i] for i in idx], self._generator(self.step, 0)
            )
            bad = [k for k in GUARDED_STATS if not math.isfinite(record.get(k, 0.0))]
            if bad:  # stop before a NaN reaches the weights or a checkpoint
                raise RlhfkitError(f"PPO step {self.step + 1}: non-finite {bad} ({record}); lower lr or raise β")
            self.scheduler.step()  # once per PPO iteration (train.lr_scheduler, over train.max_steps)
            self.step += 1
            record = {"step": self.step, **record, "lr": self.scheduler.get_last_lr()[0]}
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                self.log(record)
            bar.update(1)
            bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}", beta=f"{record['kl_coef']:.3f}")
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.max_steps:
                self.log({"step": self.step, **{f"eval/{k}": v for k, v in self.evaluate("during").items()}})
            if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                self.save_checkpoint({"kl_ctl": self.kl_ctl.state_dict(), "score_stats": self.score_stats.state_dict()})
                self.maybe_fault()
        bar.close()
        after = self.evaluate("after")
        if after:
            self.log({"step": self.step, **{f"eval/{k}": v for k, v in after.items()}})
        self.save_final(self._save_policy)
        summary = {
            "stage": "ppo",
            "steps": self.step,
            "last_score": record.get("score"),
            "last_kl": record.get("kl"),
            "out_dir": str(self.out / "final"),
            **self.prompt_stats,
        }
        if acc.is_main_process and after:
            summary.update(self._before_after())
        if cfg.train.report_to:
            acc.end_training()
        return summary

    def _save_policy(self, out: Path) -> None:
        from safetensors.torch import save_file

        model = self.accelerator.unwrap_model(self.model)
        save_model(model.policy, self.tok, out, self.cfg.model, self.cfg.lora, selected_adapters=["default"])
        if model.critic is None:
            save_file(
                {k: v.contiguous() for k, v in model.v_head.state_dict().items()}, str(out / "value_head.safetensors")
            )
        else:  # an RM-style folder, whose config.yaml gives the template it scores with
            model.critic.save(out / "critic")
            save_config(self.cfg, out / "critic" / "config.yaml")

    def _before_after(self) -> dict:
        """Seed-003-style table: the same eval prompts before and after PPO, with rewards."""
        rows = _read(self.samples_path)
        before = {r["prompt"]: r for r in rows if r["tag"] == "before"}
        after = {r["prompt"]: r for r in rows if r["tag"] == "after" and r["prompt"] in before}
        if not after:
            return {}
        lines = ["| prompt | before | reward | after | reward |", "|---|---|---|---|---|"]
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:200]  # noqa: E731
        for q, a in after.items():
            b = before[q]
            lines.append(
                f"| {cell(q)} | {cell(b['response'])} | {b['reward']:.3f} | {cell(a['response'])} | {a['reward']:.3f} |"
            )
        mb = sum(before[q]["reward"] for q in after) / len(after)
        ma = sum(a["reward"] for a in after.values()) / len(after)
        lines += ["", f"mean reward: before {mb:.4f} → after {ma:.4f} on {len(after)} held-out prompts"]
        atomic_write_text(self.out / "before_after.md", "\n".join(lines) + "\n")
        return {"eval_reward_before": mb, "eval_reward_after": ma}


def _read(path: Path) -> list[dict]:
    from rlhfkit.runtime.io import read_jsonl

    return read_jsonl(path)


def _dump(r: dict) -> str:
    import json

    return json.dumps(r) + "\n"


def run(cfg: PPOConfig) -> dict:
    return PPOTrainer(cfg).fit()


def train(reward_fn=None, prompts=None, eval_prompts=None, config=None, **overrides) -> dict:
    """trlX-style API: `rlhfkit.train(reward_fn=f, prompts=[...], eval_prompts=[...], config={...})`.

    reward_fn(prompts, responses) -> scores; config is a PPOConfig, a nested dict or dotted overrides.
    """
    from rlhfkit.runtime.config import load_config

    if isinstance(config, PPOConfig):
        cfg = config
    else:
        cfg = load_config(PPOConfig, overrides={**(config or {}), **overrides})
    return PPOTrainer(cfg, reward_fn=reward_fn, prompts=prompts, eval_prompts=eval_prompts).fit()
