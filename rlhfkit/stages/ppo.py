"""RL stage: one trainer, the estimator is a setting (`algo`): PPO, RLOO, GRPO (+ Dr. GRPO / DAPO), REINFORCE++.

Each iteration is a numbered story over one `Rollout` record (as vwxyzjn's summarize_from_feedback_details):
  1 rollout     sample k responses per prompt from the current policy
  2 score       the reward source on the decoded text (dynamic sampling re-draws groups with no signal),
                then baseline, running normalisation, clipping
  3 logprobs    policy log-probs, reference log-probs, values (ppo), per-token KL; no-grad forwards, but the
                first mini-batch's is the update's own training forward, kept for its backward (exact: no
                weight has moved yet); where the engine allows, a prompt runs once for its k samples
  4 advantages  the estimator: GAE (ppo), leave-one-out (rloo), group-normalised (grpo), whitened
                returns-to-go (reinforce_pp)
  5 update      epochs of mini-batches: clipped surrogate (+ value loss, or + k3 KL for grpo), guards
  6 log         global means of what the literature logs; adapt β.
Reference = the same weights with the adapter disabled (fresh LoRA) or a frozen copy of the starting
adapter (continued LoRA), so KL at step 0 is exactly 0 and no second copy of the base exists.
Every dropout is off and the no-grad forwards run in eval mode (as TRL-classic; Huang et al. 2023), so
the first mini-batch's ratio is 1 before any update. Only `ppo` builds a value head or critic.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from rlhfkit.algorithms import estimators, rl
from rlhfkit.inputs.prompts import PromptDataConfig, encode_prompts, load_prompts
from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
from rlhfkit.models import policy as policy_model
from rlhfkit.models.adapters import save_model
from rlhfkit.models.critic import VALUE_HEAD, critic_source
from rlhfkit.models.forward import eval_mode, forward_logprobs
from rlhfkit.models.generation import (
    RolloutSampling,
    check_unbiased,
    generate,
    query_response,
    response_logprobs,
    right_pad,
)
from rlhfkit.models.loading import LoraConfig, ModelConfig
from rlhfkit.rewards.scoring import load_scorer
from rlhfkit.runtime import engines
from rlhfkit.runtime.config import save_config
from rlhfkit.runtime.errors import ConfigError, RlhfkitError
from rlhfkit.runtime.io import append_jsonl, atomic_write_text, read_jsonl
from rlhfkit.runtime.rundir import before_after_table
from rlhfkit.runtime.training import StageConfig, StageRun, StepPlan, TrainConfig

# not entropy: it skips a row's NaN with its 0 · log 0 terms (rl.entropy_from_logprobs); NaN logits show in pg_loss
GUARDED_STATS = ("score", "kl", "pg_loss", "vf_loss", "approxkl")
GROUP_ALGOS = ("rloo", "grpo", "reinforce_pp_baseline")
KL_IN_REWARD = ("rloo", "reinforce_pp", "reinforce_pp_baseline")  # the estimators whose advantages hold β·KL


@dataclass
class PPOConfig(StageConfig):
    out_dir: str = "runs/ppo"
    """Output directory (config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/)."""
    algo: Literal["ppo", "rloo", "grpo", "reinforce_pp", "reinforce_pp_baseline"] = "ppo"
    """Estimator: 'ppo' (GAE with a value head or critic), 'rloo' (leave-one-out baseline, KL in the
    sequence reward; Ahmadian et al. 2024), 'grpo' (group-normalised advantages, k3 KL as a loss term;
    Shao et al. 2024; ppo.loss_agg / clip_high / group_std / dynamic_sampling give Dr. GRPO and DAPO),
    'reinforce_pp' (REINFORCE++: token-level KL in the reward, returns whitened over the global batch;
    Hu et al. 2025), 'reinforce_pp_baseline' (the group's mean score subtracted first). Only ppo builds,
    trains and saves a value model."""
    samples_per_prompt: int = 0
    """k: responses sampled per prompt (a group, kept on one process); train.batch_size counts
    rollouts, prompts × k. 0 = 1 for ppo and reinforce_pp, 4 for rloo, grpo and reinforce_pp_baseline."""
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
    generation: RolloutSampling = field(default_factory=RolloutSampling)
    """Rollout sampling."""
    ppo: rl.PPOHyperConfig = field(default_factory=rl.PPOHyperConfig)
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
            raise ValueError(f"train.max_steps must be ≥ 1 RL iterations, got {self.train.max_steps}")
        if self.train.epochs != 1.0:
            raise ValueError("train.epochs does not apply to RL (prompts are streamed); set train.max_steps")
        grouped = self.algo in GROUP_ALGOS
        if self.samples_per_prompt == 0:
            self.samples_per_prompt = 4 if grouped else 1
        k = self.samples_per_prompt
        if k < 1 or (grouped and k < 2):
            raise ValueError(f"samples_per_prompt must be ≥ {2 if grouped else 1} for algo={self.algo}, got {k}")
        if self.train.batch_size % k:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} (rollouts per process) must be a multiple of "
                f"samples_per_prompt={k}: every process holds whole groups"
            )
        if self.algo != "ppo" and self.critic != VALUE_HEAD:
            raise ValueError(f"critic={self.critic!r} applies to algo=ppo only; {self.algo} has no value model")
        if self.ppo.dynamic_sampling and not grouped:
            raise ValueError(f"ppo.dynamic_sampling needs a group estimator ({', '.join(GROUP_ALGOS)})")
        if self.ppo.loss_agg == "auto":
            self.ppo.loss_agg = "sequence" if self.algo in ("grpo", "rloo") else "token"
        elif self.algo == "rloo" and self.ppo.loss_agg != "sequence":
            raise ValueError("algo=rloo has one ratio per response: ppo.loss_agg must be auto or sequence")


CONFIG = PPOConfig


def build_policy(cfg: PPOConfig):
    """The policy (+ value head or critic for ppo only) and its tokenizer, from the stage's config."""
    critic = critic_source(cfg.critic, cfg.reward) if cfg.algo == "ppo" else None
    return policy_model.build_policy(cfg.model, cfg.lora, cfg.template, critic, value_head=cfg.algo == "ppo")


# --------------------------------------------------------------------------- the record
@dataclass
class Rollout:
    """One iteration's batch on this process, filled phase by phase (B = prompts × k rows, the k samples
    of a prompt in consecutive rows; R = response tokens; Q + R = left-padded query + right-padded response)."""

    prompts: list[str]  # B prompt texts
    queries: list[list[int]]  # B prompt token ids
    response_ids: list[list[int]]  # B sampled response token ids (up to and including EOS)
    responses: list[str]  # B decoded responses (what the reward source reads)
    raw_scores: torch.Tensor | None = None  # (B,) the reward source's scores
    scores: torch.Tensor | None = None  # (B,) after baseline, running normalisation, clipping
    weights: torch.Tensor | None = None  # (B,) 1 = in the loss; 0 = a group dynamic sampling could not replace
    input_ids: torch.Tensor | None = None  # (B, Q+R) query + response
    attention_mask: torch.Tensor | None = None  # (B, Q+R)
    response_mask: torch.Tensor | None = None  # (B, R) 1 = real response token
    logprobs: torch.Tensor | None = None  # (B, R) policy log-probs of the sampled tokens, before any update
    ref_logprobs: torch.Tensor | None = None  # (B, R) reference log-probs
    values: torch.Tensor | None = None  # (B, R) value estimates (ppo), else None
    kl: torch.Tensor | None = None  # (B, R) per-token KL estimate (ppo.kl_estimator)
    rewards: torch.Tensor | None = None  # (B, R) −β·KL_t + score on the last token (ppo, reinforce_pp)
    advantages: torch.Tensor | None = None  # (B, R) per token, or (B,) per response (rloo, grpo)
    returns: torch.Tensor | None = None  # (B, R) value targets (ppo), else None
    order: list[int] | None = None  # the first epoch's row order, drawn in phase 3 when it runs `first_out`
    first_out: dict | None = None  # the first mini-batch's training forward (with its graph), run in phase 3


def _rows(parts: list[list[int]], outs: list[dict], key: str) -> torch.Tensor | None:
    """Forward outputs over row subsets `parts` of a batch (n_i, R[, V]) -> the batch's (B, R[, V]), in row order."""
    got = [o.get(key) for o in outs]
    if not got or got[0] is None:
        return None
    rows = [i for part in parts for i in part]
    cat = torch.cat(got)
    if rows == list(range(len(rows))):
        return cat
    out = torch.empty_like(cat)
    out[torch.tensor(rows, device=cat.device)] = cat
    return out


# --------------------------------------------------------------------------- trainer
class RLTrainer(StageRun):
    fsdp_ready = True  # self.shard / self.prepare; rl_step unshards for the rollout, update reshards

    def __init__(self, cfg: PPOConfig, reward_fn=None, prompts=None, eval_prompts=None):
        check_unbiased(cfg.generation)
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
        self.k = cfg.samples_per_prompt
        self.plan = StepPlan(
            len(self.prompts), cfg.train.batch_size, 1, acc.num_processes, acc.process_index, cfg.train.seed
        )
        self.shard(model)  # FSDP on CPUs: the policy's blocks, then the root (value head, embeddings)
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, cfg.train.warmup_steps, cfg.train.max_steps)
        tc = cfg.train  # DeepSpeed: one micro-batch = one PPO mini-batch; ZeRO-3 checks the sampling settings
        engines.configure_deepspeed(acc, p.mini_batch_size, tc.grad_accum, tc.max_grad_norm, cfg.generation)
        self.model, self.optimizer = self.prepare(model, optimizer)
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
                f"[ppo] algo={cfg.algo}: {len(self.prompts)} prompts, {len(self.eval_prompts)} eval prompts; "
                f"{cfg.train.batch_size // self.k} prompts × {self.k} samples × {acc.num_processes} processes "
                f"per step; reward: {self.scorer.name}; engine: {engines.describe(self.model)}"
            )

    def step_prompts(self, step: int) -> list[int]:
        """This rank's prompt indices: a continuous stream over seeded epoch permutations, so every
        step has exactly batch_size / k prompts per process (DDP needs equal work on every rank)."""
        acc = self.accelerator
        G = self.cfg.train.batch_size // self.k * acc.num_processes
        n, out = len(self.prompts), []
        for i in range(step * G, (step + 1) * G):
            epoch, j = divmod(i, n)
            out.append(self.plan.order(epoch)[j])
        return out[acc.process_index :: acc.num_processes]

    def _generator(self, step: int, salt: int) -> torch.Generator:
        acc = self.accelerator
        return torch.Generator().manual_seed(
            ((self.cfg.train.seed * 1_000_003 + step) * 97 + salt) * 64 + acc.process_index
        )

    def global_mean(self, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        """This rank's share of a loss Σ_ranks num / Σ_ranks den: DDP averages the rank gradients, so
        num · world / Σ den gives the gradient of the global loss whatever the process count."""
        return num * self.accelerator.num_processes / self.sum_across(den.detach().float()).clamp(min=1e-8)

    # ------------------------------------------------------------------ one iteration
    def rl_step(self, prompt_idx: list[int], gen: torch.Generator) -> dict:
        """The numbered story of the module docstring, over one Rollout."""
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        # FSDP2: whole weights on every rank for phases 1-3, whose forwards differ in count across ranks
        engines.unshard(self.model)
        ro = self.rollout(prompt_idx, gen)  # 1
        t["time/generate"], t0 = time.perf_counter() - t0, time.perf_counter()
        self.score(ro, gen)  # 2
        t["time/score"], t0 = time.perf_counter() - t0, time.perf_counter()
        self.logprobs(ro, gen)  # 3
        t["time/forward"], t0 = time.perf_counter() - t0, time.perf_counter()
        self.advantages(ro)  # 4
        t["time/advantages"], t0 = time.perf_counter() - t0, time.perf_counter()
        try:
            stats = self.update(ro, gen)  # 5
        finally:
            ro.first_out = None  # phase 3's graph, if update() never reached its backward
        t["time/update"] = time.perf_counter() - t0
        return self.log_step(ro, stats, t)  # 6

    def rollout(self, prompt_idx: list[int], gen: torch.Generator) -> Rollout:
        """1. k responses per prompt from the current policy (left-padded queries, KV cache)."""
        cfg, acc = self.cfg, self.accelerator
        idx = [i for i in prompt_idx for _ in range(self.k)]
        queries = [self.queries[i] for i in idx]
        lengths = self.length_sampler.sample(len(queries), generator=gen).tolist()
        g, policy = cfg.generation, acc.unwrap_model(self.model).policy
        share = self.share_queries()
        resp, rmask = generate(policy, self.tok, queries, lengths, g, acc.device, g.response_max, share_queries=share)
        ids, texts = self._decode(resp, rmask)
        return Rollout([self.prompts[i] for i in idx], queries, ids, texts)

    def _decode(self, resp: torch.Tensor, rmask: torch.Tensor) -> tuple[list[list[int]], list[str]]:
        """(B, R) right-padded responses -> their token ids and decoded texts."""
        ids = [r[m.bool()].tolist() for r, m in zip(resp.cpu(), rmask.cpu())]
        return ids, [self.tok.decode(r, skip_special_tokens=True) for r in ids]

    def score(self, ro: Rollout, gen: torch.Generator) -> None:
        """2. Scores of the decoded text; dynamic sampling; baseline, running scaling, clipping."""
        p, dev = self.cfg.ppo, self.accelerator.device
        all_reduce = self.sum_across if self.accelerator.num_processes > 1 else None
        ro.raw_scores = torch.tensor(self.scorer(ro.prompts, ro.responses), dtype=torch.float32, device=dev)
        ro.weights = torch.ones_like(ro.raw_scores)
        if p.dynamic_sampling:
            self._refill(ro, gen)
        scores = ro.raw_scores - p.reward_baseline
        if p.score_norm != "none":
            self.score_stats.update(scores, all_reduce=all_reduce)
            scores = (scores - self.score_stats.mean) if p.score_norm == "normalize" else scores
            scores = scores / (self.score_stats.std + 1e-8)
        if p.score_clip > 0:
            scores = scores.clamp(-p.score_clip, p.score_clip)
        ro.scores = scores

    def _refill(self, ro: Rollout, gen: torch.Generator) -> None:
        """DAPO dynamic sampling: groups with k equal scores are replaced by groups of other prompts
        (drawn with the step's generator); rounds are global so every process runs the same number."""
        k = self.k
        for _ in range(self.cfg.ppo.max_refills):
            flat = estimators.degenerate_groups(ro.raw_scores, k)
            if self.sum_across(flat.sum().float()).item() == 0:
                break
            slots = flat.nonzero().flatten().tolist()
            if not slots:
                continue
            new = self.rollout(torch.randint(len(self.prompts), (len(slots),), generator=gen).tolist(), gen)
            new_scores = torch.tensor(self.scorer(new.prompts, new.responses), dtype=torch.float32)
            for j, g in enumerate(slots):
                rows, src = slice(g * k, (g + 1) * k), slice(j * k, (j + 1) * k)
                for name in ("prompts", "queries", "response_ids", "responses"):
                    getattr(ro, name)[rows] = getattr(new, name)[src]
                ro.raw_scores[rows] = new_scores[src].to(ro.raw_scores.device)
        flat = estimators.degenerate_groups(ro.raw_scores, k)
        ro.weights = (~flat).repeat_interleave(k).float()

    @torch.no_grad()
    def logprobs(self, ro: Rollout, gen: torch.Generator | None = None) -> None:
        """3. Policy, reference (and value) forwards over the response positions only, no-grad in eval mode —
        but given the step's generator (which draws the update's first row order), the first mini-batch's policy
        forward is the update's own training forward where that is exact (`_first_forward_serves_update`)."""
        p, acc = self.cfg.ppo, self.accelerator
        model, dev = acc.unwrap_model(self.model), acc.device
        resp, rmask = right_pad(ro.response_ids, self.tok.pad_token_id)
        ids, mask = query_response(ro.queries, resp, rmask, self.tok.pad_token_id)
        ro.input_ids, ro.attention_mask, ro.response_mask = ids.to(dev), mask.to(dev), rmask.to(dev)
        B, R = rmask.shape
        full, deferred, share = p.kl_estimator == "full", self._old_is_current(), self.share_queries()
        kw = {"return_logits": full, "keep": R, "share_queries": share, "pack": p.padding_free}
        parts, first = [list(range(B))], None
        if gen is not None and not deferred and self._first_forward_serves_update():
            ro.order = torch.randperm(B, generator=gen).tolist()  # what update() would draw first
            first = ro.order[: p.mini_batch_size]  # run last: its graph then lives through no other forward
            parts = [part for part in (ro.order[p.mini_batch_size :], first) if part]
        own = parts[:-1] if first is not None else parts  # the policy forwards run here, in eval mode
        with eval_mode(model):
            outs = [] if deferred else [model(ro.input_ids[i], ro.attention_mask[i], **kw) for i in own]
            with model.as_reference() as ref_model:  # row for row the policy's batches: KL at step 0 stays exactly 0
                refs = [forward_logprobs(ref_model, ro.input_ids[i], ro.attention_mask[i], **kw) for i in parts]
        if first is not None:
            first_group = min(self.cfg.train.grad_accum, math.ceil(B / p.mini_batch_size))  # update()'s accum
            with torch.enable_grad(), self._grad_sync(last=first_group == 1):
                ro.first_out = self._train_forward(ro, first)
            outs.append({k: v.detach() if torch.is_tensor(v) else v for k, v in ro.first_out.items()})
        ro.ref_logprobs = _rows(parts, refs, "logprobs")
        if deferred:  # filled by update()'s own forward, before its first optimizer step
            ro.logprobs = torch.full_like(ro.ref_logprobs, float("nan"))
            return
        ro.logprobs, ro.values = _rows(parts, outs, "logprobs"), _rows(parts, outs, "values")
        self._token_kl(ro, _rows(parts, outs, "logits"), _rows(parts, refs, "logits"))

    def _first_forward_serves_update(self) -> bool:
        """Before any update the first mini-batch's training forward computes exactly the rollout policy's
        log-probs and values (every dropout is off), so phase 3 runs it once for both, and update()
        backpropagates it: one forward of a mini-batch less per step. Not under ZeRO / FSDP (weights
        gathered per call; forward and backward must pair there), nor for the full-distribution KL."""
        model = self.model
        plain = engines.engine() == "ddp" and not engines.is_sharded(model) and not engines.gathers_per_forward(model)
        # checkpointed training forwards run without the shared query cache the eval forwards use (forward.py)
        same = not (self.cfg.model.gradient_checkpointing and self.share_queries())
        return plain and same and self.cfg.ppo.kl_estimator != "full"

    def _grad_sync(self, last: bool):
        """Around a mini-batch's forward and backward: gradients are all-reduced (DDP) for the last of an
        accumulation group only."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def _train_forward(self, ro: Rollout, idx: list[int]) -> dict:
        """One mini-batch's training forward (train mode, with grad), inside the caller's `_grad_sync`."""
        self.model.train()
        R = ro.response_mask.shape[1]
        return self.model(
            ro.input_ids[idx],
            ro.attention_mask[idx],
            return_entropy=True,
            keep=R,
            share_queries=self.share_queries(),
            pack=self.cfg.ppo.padding_free,
        )

    def share_queries(self) -> bool:
        """Run each prompt once for its k samples (forward.shared_query_cache): not where weights are gathered
        per forward call (ZeRO-3, FSDP2's sharded update), whose ranks must all make the same calls."""
        return self.k > 1 and not engines.gathers_per_forward(self.model)

    def _old_is_current(self) -> bool:
        """The whole batch is one optimizer step (1 epoch): the rollout policy is the one every mini-batch's
        forward sees, so its log-probs come from that forward (TRL's GRPO/RLOO trainers do too). With KL in
        the reward (rloo, reinforce_pp) the advantages need every row first: one mini-batch only."""
        cfg, p = self.cfg, self.cfg.ppo
        one_step = p.ppo_epochs == 1 and p.mini_batch_size * cfg.train.grad_accum >= cfg.train.batch_size
        if p.kl_estimator == "full" or not one_step:
            return False
        return cfg.algo == "grpo" or (cfg.algo in KL_IN_REWARD and cfg.train.grad_accum == 1)

    def _token_kl(self, ro: Rollout, logits=None, ref_logits=None) -> None:
        kl = rl.kl_penalty(ro.logprobs, ro.ref_logprobs, self.cfg.ppo.kl_estimator, logits, ref_logits)
        ro.kl = torch.where(ro.response_mask.bool(), kl, torch.zeros_like(kl)).to(ro.logprobs.dtype)

    @torch.no_grad()
    def advantages(self, ro: Rollout) -> None:
        """4. The estimator (`algo`)."""
        cfg, p, k = self.cfg, self.cfg.ppo, self.k
        if ro.kl is None and cfg.algo in KL_IN_REWARD:  # deferred old log-probs: update() calls this
            return
        all_reduce = self.sum_across if self.accelerator.num_processes > 1 else None
        m, beta = ro.response_mask, self.kl_ctl.value
        if cfg.algo == "rloo":  # KL in the sequence reward (Ahmadian et al. 2024; TRL RLOOTrainer)
            ro.advantages = estimators.rloo_advantages(ro.scores - beta * rl.masked_sum(ro.kl, m, dim=1), k)
        elif cfg.algo == "grpo":  # KL is a loss term (update)
            ro.advantages = estimators.group_advantages(ro.scores, k, scale=p.group_std)
        elif cfg.algo == "ppo":
            ro.rewards = rl.token_rewards(ro.scores, ro.kl, m, beta)
            ro.advantages, ro.returns = rl.compute_gae(ro.values, ro.rewards, m, p.gamma, p.lam)
            if p.whiten_advantages:
                ro.advantages = rl.masked_whiten(ro.advantages, m, all_reduce=all_reduce)
        else:  # REINFORCE++ (-baseline): returns-to-go of the KL-penalised rewards, whitened globally
            scores = estimators.group_mean_baseline(ro.scores, k) if cfg.algo == "reinforce_pp_baseline" else ro.scores
            ro.rewards = rl.token_rewards(scores, ro.kl, m, beta)
            returns = estimators.discounted_returns(ro.rewards, m, p.gamma)
            ro.advantages = rl.masked_whiten(returns, m * ro.weights[:, None], all_reduce=all_reduce)

    def loss(self, ro: Rollout, idx: list[int], out: dict) -> tuple[torch.Tensor, dict]:
        """This rank's share of the mini-batch loss `idx` (model output `out`) and its local stats."""
        cfg, p = self.cfg, self.cfg.ppo
        m, w, old = ro.response_mask[idx], ro.weights[idx], ro.logprobs[idx]
        new, adv, high = out["logprobs"], ro.advantages[idx], p.clip_high or p.cliprange
        if cfg.algo == "rloo":
            losses, clipped = estimators.sequence_surrogate(new, old, adv, m, p.cliprange, high)
            clipfrac = (clipped.float() * w).sum() / w.sum().clamp(min=1)
        else:
            losses, clipped = rl.clipped_surrogate(new, old, adv, m, p.cliprange, high)
            clipfrac = rl.masked_mean(clipped.float(), m)
            if cfg.algo == "grpo" and self.kl_ctl.value > 0:  # k3 KL to the reference as a loss term
                k3 = rl.kl_penalty(new, ro.ref_logprobs[idx], "k3")
                losses = losses + self.kl_ctl.value * torch.where(m.bool(), k3, torch.zeros_like(k3))
        num, den = estimators.aggregate(losses, m, p.loss_agg, w, cfg.generation.response_max)
        loss = self.global_mean(num, den)
        stats = {"pg_loss": (num.detach(), den.detach()), "clipfrac": clipfrac}
        if ro.values is not None:
            vf_loss, vf_stats = rl.value_loss(out["values"], ro.values[idx], ro.returns[idx], m, p.cliprange_value)
            n_tok = m.sum().float()
            loss = loss + p.vf_coef * self.global_mean(vf_loss * n_tok, n_tok)
            stats.update(vf_loss=vf_loss, vf_clipfrac=vf_stats["vf_clipfrac"])
        return loss, stats

    def update(self, ro: Rollout, gen: torch.Generator) -> dict[str, list[float]]:
        """5. ppo_epochs passes of shuffled mini-batches, grad_accum of them per optimizer step; guards on
        the ratio (a blown-up mini-batch adds no gradient) and on approx KL (early stop)."""
        cfg, p, acc = self.cfg, self.cfg.ppo, self.accelerator
        B, mb = len(ro.prompts), p.mini_batch_size
        stats: dict[str, list[float]] = {"skipped_minibatches": [0.0]}
        stop = False
        engines.reshard(self.model)  # FSDP2: the training forwards all-gather block by block again
        self.model.train()
        for epoch in range(p.ppo_epochs):
            order = ro.order if epoch == 0 and ro.order else torch.randperm(B, generator=gen).tolist()
            groups = [order[i : i + mb] for i in range(0, B, mb)]
            for g0 in range(0, len(groups), cfg.train.grad_accum):
                accum, skipped = groups[g0 : g0 + cfg.train.grad_accum], 0
                for j, idx in enumerate(accum):
                    with self._grad_sync(last=j == len(accum) - 1):
                        out, ro.first_out = ro.first_out or self._train_forward(ro, idx), None
                        if ro.kl is None:  # deferred old log-probs (logprobs phase): this forward's own
                            ro.logprobs[idx] = out["logprobs"].detach()
                            if ro.advantages is None:  # KL in the reward: this forward holds every row
                                self._token_kl(ro)
                                self.advantages(ro)
                        loss, local = self.loss(ro, idx, out)
                        logged = self._global_stats(ro, idx, out, local)
                        blown = logged["ratio"] > p.ratio_threshold  # on global numbers: every rank agrees
                        if blown:
                            skipped, loss = skipped + 1, loss * 0.0
                        if not (blown and engines.steps_in_backward(self.model)):  # DeepSpeed: no zero-grad step
                            acc.backward(loss / len(accum))  # a zero loss still joins DDP's gradient all-reduce
                    for name, v in logged.items():
                        stats.setdefault(name, []).append(v)
                    del out
                if cfg.train.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
                if skipped < len(accum):  # Adam's momentum would move the weights on an all-zero gradient
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                stats["skipped_minibatches"][0] += skipped
                stop = p.early_stop_kl > 0 and stats["approxkl"][-1] > p.early_stop_kl
                if stop:
                    break
            if stop:
                break
        if ro.kl is None:  # deferred old log-probs: every row was filled by the forwards above
            self._token_kl(ro)
        return stats

    @torch.no_grad()
    def _global_stats(self, ro: Rollout, idx: list[int], out: dict, local: dict) -> dict[str, float]:
        """Token-weighted means over all ranks of one mini-batch's diagnostics (pg_loss: Σ num / Σ den)."""
        m = ro.response_mask[idx]
        n_tok = m.sum().float()
        ratio = rl.ratio_stats(out["logprobs"], ro.logprobs[idx], m)
        num, den = local.pop("pg_loss")
        local = {**local, **ratio, "entropy": rl.masked_mean(out["entropy"], m)}
        names = list(local)
        vals = torch.stack([torch.as_tensor(local[k]).detach().float() for k in names] + [n_tok, num, den])
        vals = torch.cat([vals[: len(names)] * n_tok, vals[len(names) :]])
        glob = self.sum_across(vals)
        tok = glob[len(names)].clamp(min=1)
        logged = {k: float(glob[i] / tok) for i, k in enumerate(names)}
        logged["pg_loss"] = float(glob[-2] / glob[-1].clamp(min=1e-8))
        return logged

    def log_step(self, ro: Rollout, stats: dict[str, list[float]], t: dict[str, float]) -> dict:
        """6. Global means (across processes) of what the RL literature logs; adapt β."""
        all_reduce = self.sum_across if self.accelerator.num_processes > 1 else None
        m, dev = ro.response_mask, self.accelerator.device
        n = self.sum_across(torch.tensor(float(len(ro.prompts)), device=dev))
        glob = lambda x: (self.sum_across(x.sum().detach().float()) / n).item()  # noqa: E731
        mean_kl = glob(rl.masked_sum(ro.kl, m, dim=1))
        raw = ro.raw_scores
        record = {
            "score": glob(raw),
            "score_std": math.sqrt(max(glob(raw**2) - glob(raw) ** 2, 0.0)),
            "reward": glob(ro.scores),
            "non_score_reward": -self.kl_ctl.value * mean_kl,
            "kl": mean_kl,
            "kl_coef": self.kl_ctl.value,
            "response_length": glob(m.sum(1).float()),
            **({"rm_inputs_cut": self.scorer.n_cut} if hasattr(self.scorer, "n_cut") else {}),
            **({"dropped_groups": glob(1 - ro.weights) * n.item() / self.k} if self.cfg.ppo.dynamic_sampling else {}),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            **t,
        }
        if ro.values is not None:
            record["explained_variance"] = float(rl.explained_variance(ro.values, ro.returns, m, all_reduce=all_reduce))
        record["tokens_per_s"] = self.sum_across(ro.attention_mask.sum().float()).item() / max(sum(t.values()), 1e-9)
        self.kl_ctl.update(mean_kl, int(n.item()))
        return record

    # ------------------------------------------------------------------ eval / loop
    @torch.no_grad()
    def evaluate(self, tag: str) -> dict:
        """Sample eval prompts with a fixed seed (training RNG untouched), score, KL to reference."""
        if not self.eval_prompts:
            return {}
        acc, model = self.accelerator, self.accelerator.unwrap_model(self.model)
        engines.unshard(model)  # FSDP2: uneven eval shards, so forwards that run no collective
        prompts = self.eval_prompts[acc.process_index :: acc.num_processes]
        queries = self.eval_queries[acc.process_index :: acc.num_processes]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed + 7919)
            g = self.cfg.generation
            resp, rmask = generate(model.policy, self.tok, queries, [g.response_max] * len(queries), g, acc.device)
        responses = self._decode(resp, rmask)[1]
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
                kept = [r for r in read_jsonl(self.samples_path) if r["step"] <= self.step]
                atomic_write_text(self.samples_path, "".join(json.dumps(r) + "\n" for r in kept))
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
            record = self.rl_step(idx, self._generator(self.step, 0))
            bad = [k for k in GUARDED_STATS if not math.isfinite(record.get(k, 0.0))]
            if bad:  # stop before a NaN reaches the weights or a checkpoint
                raise RlhfkitError(f"RL step {self.step + 1}: non-finite {bad} ({record}); lower lr or raise β")
            self.scheduler.step()  # once per RL iteration (train.lr_scheduler, over train.max_steps)
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
            "algo": cfg.algo,
            "steps": self.step,
            "last_score": record.get("score"),
            "last_kl": record.get("kl"),
            "out_dir": str(self.out / "final"),
            **self.prompt_stats,
        }
        if acc.is_main_process and after:
            summary.update(before_after_table(self.samples_path, self.out / "before_after.md"))
        if cfg.train.report_to:
            acc.end_training()
        return summary

    def _save_policy(self, out: Path) -> None:
        from safetensors.torch import save_file

        model = self.accelerator.unwrap_model(self.model)
        save_model(model.policy, self.tok, out, self.cfg.model, self.cfg.lora, selected_adapters=["default"])
        if model.v_head is not None:
            save_file(
                {k: v.contiguous() for k, v in model.v_head.state_dict().items()}, str(out / "value_head.safetensors")
            )
        elif model.critic is not None:  # an RM-style folder, whose config.yaml gives the template it scores with
            model.critic.save(out / "critic")
            save_config(self.cfg, out / "critic" / "config.yaml")


def run(cfg: PPOConfig) -> dict:
    return RLTrainer(cfg).fit()


def train(reward_fn=None, prompts=None, eval_prompts=None, config=None, **overrides) -> dict:
    """trlX-style API: `rlhfkit.train(reward_fn=f, prompts=[...], eval_prompts=[...], config={...})`.

    reward_fn(prompts, responses) -> scores; config is a PPOConfig, a nested dict or dotted overrides.
    """
    from rlhfkit.runtime.config import load_config

    if isinstance(config, PPOConfig):
        cfg = config
    else:
        cfg = load_config(PPOConfig, overrides={**(config or {}), **overrides})
    return RLTrainer(cfg, reward_fn=reward_fn, prompts=prompts, eval_prompts=eval_prompts).fit()
