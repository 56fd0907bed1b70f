"""Single source for what reads a model: token log-probs, last-token indices, scalar heads.

SFT, reward, PPO, DPO and eval all call these; drifted copies of exactly these functions are where
silent RLHF bugs come from (off-by-one shifts, pooling on the pad id when pad == eos, …).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from rlhfkit.algorithms.losses import IGNORE_INDEX, sequence_logps
from rlhfkit.algorithms.rl import (
    entropy_from_logprobs,
    last_token_index,  # noqa: F401  (re-exported: one definition)
)
from rlhfkit.models import packed


def unwrap(model):
    """The plain HF model beneath accelerate/DDP and peft wrappers."""
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def lm_head(model):
    """The module mapping hidden states to vocabulary logits (get_output_embeddings), or None where a
    remote-code model does not say which module it is (NotImplementedError)."""
    try:
        return model.get_output_embeddings()
    except NotImplementedError:
        return None


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode (no dropout) inside the block; the previous train/eval mode is restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, entropy: bool = False):
    """log p(labels) under logits; positions labelled IGNORE_INDEX get 0.

    logits (B, T, V), labels (B, T) -> (B, T), in fp32 whatever the logits' dtype. entropy=True: also the
    (detached) entropy (B, T), from the same log-softmax — computing it from the logits again cost a
    third of the PPO loss head's time (docs/benchmarks/ppo.md, fifth run).
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V): what cross_entropy would make inside
    ignored = labels == IGNORE_INDEX
    picked = logp.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if not entropy:
        return picked
    with torch.no_grad():
        return picked, entropy_from_logprobs(logp)


def causal_lm_nll_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and the number of target tokens for a batch.

    batch: input_ids (B, T), labels (B, T) already shifted (see shift_labels), and either
    attention_mask (B, T) or position_ids (B, T) restarting per packed sample (attention_mask None
    then, so transformers builds the block-diagonal mask — no attention across samples).
    Returning a *sum* lets the caller divide by the token count of the whole optimizer step,
    which makes grad accumulation 1×8 equal 8×1 exactly.
    """
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    logp = token_logprobs(out.logits, batch["labels"])
    n_tokens = (batch["labels"] != IGNORE_INDEX).sum()
    return -logp.sum(), n_tokens


def forward_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    return_logits: bool = False,
    return_hidden: bool = False,
    return_entropy: bool = False,
    keep: int = 0,
    share_queries: bool = False,
    pack: bool = False,
) -> dict:
    """Log-prob of each next token of a (left- or right-) padded batch.

    input_ids, attention_mask (B, T) -> {"logprobs": (B, T-1)} where logprobs[:, t] = log p(input_ids[:, t+1]
    | input_ids[:, :t+1]); padded targets get 0. Optional "logits" (B, T-1, V), "entropy" (B, T-1, detached)
    and "hidden" (B, T-1, H): the last-layer state at the position that *predicts* token t+1 (what a value
    head reads).
    keep=K > 0: only the predictions of the last K tokens — every output (B, K[, ·]) — and the LM head
    runs on those K positions only (HF `logits_to_keep`): PPO's left-padded queries are ~half the
    sequence, so no (B, Q, V) logits are made (memory; docs/benchmarks/ppo.md has the measurement).
    share_queries (with keep): rows with the same query (GRPO/RLOO's k samples of a prompt) run it once
    (shared_query_cache); the caller says when, as sharded engines need every rank to make the same calls.
    pack (with keep, without share_queries): the rows' real tokens as one padding-free row (models/packed.py)
    where the model allows it (`padding_free`); the same outputs up to float rounding, 0 where a target is pad.
    """
    if pack and keep and not share_queries and padding_free(model, attention_mask):
        return _packed_logprobs(model, input_ids, attention_mask, keep, return_logits, return_hidden, return_entropy)
    if keep:  # left-pad columns no row uses (a mini-batch cut from a batch padded to its own longest query)
        first_used = int(attention_mask.any(0).int().argmax())  # outputs are the last K: same without them
        lead = min(first_used, input_ids.shape[1] - keep - 1)
        input_ids, attention_mask = input_ids[:, lead:], attention_mask[:, lead:]
    ids, position_ids = input_ids, position_ids_from_mask(attention_mask)
    P = input_ids.shape[1] - keep - 1 if keep else 0  # the query but its last token
    cache = shared_query_cache(model, input_ids, attention_mask, P) if share_queries and P > 0 else None
    if cache is not None:  # the last query token and the response, on the query's copied KV cache
        ids, position_ids = ids[:, P:], position_ids[:, P:]
    extra = {"logits_to_keep": keep + 1} if keep and "logits_to_keep" in _forward_params(type(unwrap(model))) else {}
    out = model(
        input_ids=ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=cache is not None,
        output_hidden_states=return_hidden,
        **extra,
        **({} if cache is None else {cache_kwarg(model): cache}),
    )
    cut = (lambda x: x[:, -keep:]) if keep else (lambda x: x)  # noqa: E731
    labels = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)  # (B, T-1)
    # The head's output whole, the last position labelled IGNORE, its column dropped after: slicing the
    # (B, K+1, V) logits first made log_softmax copy them and their gradient a zero-filled (B, K+1, V)
    labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, -out.logits.shape[1] :]
    if return_entropy:
        logprobs, entropy = token_logprobs(out.logits, labels, entropy=True)
        result = {"logprobs": cut(logprobs[:, :-1]), "entropy": cut(entropy[:, :-1])}
    else:
        result = {"logprobs": cut(token_logprobs(out.logits, labels)[:, :-1])}
    if return_logits:
        result["logits"] = cut(out.logits[:, :-1])
    if return_hidden:
        result["hidden"] = cut(out.hidden_states[-1][:, :-1])
    return result


def _packed_logprobs(model, input_ids, attention_mask, keep, return_logits, return_hidden, return_entropy) -> dict:
    """forward_logprobs(keep=K) on the padding-free row: the LM head runs on the P kept predictions only."""
    pk = packed.pack(input_ids, attention_mask, position_ids_from_mask(attention_mask), keep)
    with packed.packed_attention_on(unwrap(model)):
        out = model(
            input_ids=pk.input_ids,
            position_ids=pk.position_ids,
            logits_to_keep=pk.predictors,
            use_cache=False,
            output_hidden_states=return_hidden,
            **{packed.SEGMENTS: pk.segments},
        )
    logits = out.logits[0]  # (P, V)
    if return_entropy:
        logprobs, entropy = token_logprobs(logits, pk.targets, entropy=True)
        result = {"logprobs": pk.unpack(logprobs), "entropy": pk.unpack(entropy)}
    else:
        result = {"logprobs": pk.unpack(token_logprobs(logits, pk.targets))}
    if return_logits:
        result["logits"] = pk.unpack(logits)
    if return_hidden:
        result["hidden"] = pk.unpack(out.hidden_states[-1][0, pk.predictors])
    return result


_PACKING_REFUSALS: set[str] = set()


def padding_free(model, attention_mask: torch.Tensor) -> bool:
    """Whether forward_logprobs(pack=True) runs this batch padding-free: it has padding, each row is one run
    of tokens, and the model's attention can run per row (`packed.refusal`, then checked once per model on a
    toy batch: padded and packed log-probs agree — no attention across rows). Why not is said once.
    The check runs at the first call whatever the batch: under ZeRO-3 / FSDP every rank must make the same
    forward calls, and ranks' batches differ."""
    hf = unwrap(model)
    reason = packed.refusal(hf, _forward_params(type(hf)))
    if reason is None:
        if getattr(hf, "_rlhfkit_packing_check", None) is None:
            hf._rlhfkit_packing_check = _packing_check(model)
        reason = hf._rlhfkit_packing_check or None
    if reason is not None and reason not in _PACKING_REFUSALS:
        print(f"[rl] padding-free forwards are not used: {reason}; rows run padded")
        _PACKING_REFUSALS.add(reason)
    mask = attention_mask.bool()
    return reason is None and not bool(mask.all()) and packed.contiguous_rows(mask)


def _packing_check(model) -> str:
    """ "" if packed and padded forwards agree on a left-padded toy batch, else why not."""
    hf = unwrap(model)
    emb = hf.get_input_embeddings().weight  # its device and dtype (under ZeRO-3 its shape is a placeholder)
    vocab = hf.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids, mask = ids.to(emb.device), mask.to(emb.device)
    with torch.no_grad(), eval_mode(model):
        padded = forward_logprobs(model, ids, mask, keep=4)["logprobs"]
        rows = _packed_logprobs(model, ids, mask, 4, False, False, False)["logprobs"]
    err = (padded - rows).abs().max().item()
    tol = 1e-3 if emb.dtype == torch.float32 else 1e-1
    return "" if err <= tol else f"packed and padded log-probs differ by {err:.2e} on a toy batch"


@functools.cache
def _forward_params(model_cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_cls.forward).parameters)


def cache_kwarg(model) -> str:
    """The forward/generate keyword of a KV cache: `cache` from transformers 5.22, `past_key_values` before."""
    return "cache" if "cache" in _forward_params(type(unwrap(model))) else "past_key_values"


def shared_query_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int):
    """The KV cache of input_ids[:, :length], run once per distinct row and copied to every row.

    input_ids, attention_mask (B, T): left-padded queries, then anything. GRPO/RLOO's k samples of a
    prompt share their query (56% of the tokens in benchmarks/bench_rl_estimators.py), so its forward
    runs once; index_select copies the cache and carries the k rows' gradients back to that one forward.
    Equal to the full forward up to float rounding. None when every row differs, under gradient
    checkpointing in training (transformers drops the cache there), or when the model filled no cache.
    """
    from transformers.cache_utils import Cache

    hf = unwrap(model)
    checkpointing = getattr(hf, "is_activation_checkpointing", None)  # transformers ≥ 5.22; the old name before
    if hf.training and (getattr(hf, "is_gradient_checkpointing", False) if checkpointing is None else checkpointing):
        return None
    key = torch.cat([input_ids[:, :length], attention_mask[:, :length]], 1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if len(distinct) == len(key):
        return None
    rows = torch.arange(len(key), device=key.device)
    # one row per distinct query: which of its equal rows scatter_ keeps does not matter
    first = torch.empty(len(distinct), dtype=torch.long, device=key.device).scatter_(0, inverse, rows)
    mask = attention_mask[first, :length]
    keep_one = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(type(hf)) else {}  # no (U, P, V) logits
    out = model(
        input_ids=input_ids[first, :length],
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=True,
        **keep_one,
    )
    cache = out["cache"] if "cache" in out else out.get("past_key_values")
    if not isinstance(cache, Cache) or cache.get_seq_length() != length:  # remote code, checkpoint wrappers
        return None
    cache.reorder_cache(inverse)
    return cache


def sequence_logprobs(model, batch: dict, average: bool = False) -> torch.Tensor:
    """Summed (or mean) log-prob of the response tokens: batch input_ids, attention_mask,
    response_mask (B, T) -> (B,). Used by DPO and eval."""
    logprobs = forward_logprobs(model, batch["input_ids"], batch["attention_mask"])["logprobs"]
    mask = batch["response_mask"][:, 1:] * batch["attention_mask"][:, 1:]
    return sequence_logps(logprobs, mask, average=average)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left padding does not shift them (as HF generate).

    attention_mask (B, T) -> (B, T); pads get 0.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values (B, T) -> (B,) at each row's last real token."""
    idx = last_token_index(attention_mask)
    return values.gather(1, idx.clamp(min=0).unsqueeze(1)).squeeze(1)


class ScalarHead(nn.Module):
    """Linear hidden -> 1, used as the PPO value head (and by separate critics).

    hidden (B, T, H) -> (B, T). Zero-initialised bias and small weights so that initial values are
    ~0 and do not dominate the first value-loss updates (Huang et al. 2024, detail 5).
    """

    def __init__(self, hidden_size: int, init_std: float | None = None):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        std = init_std if init_std is not None else 1.0 / (hidden_size + 1) ** 0.5
        nn.init.normal_(self.summary.weight, std=std)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def _score_module(hf_model):
    for name in ("score", "classifier"):
        if hasattr(hf_model, name):
            return name, getattr(hf_model, name)
    raise ValueError(f"{type(hf_model).__name__} has no 'score' or 'classifier' head")


def is_pooled(model) -> bool:
    """An encoder RM (BERT family): a [CLS]-pooled `classifier`, no per-token `score` head."""
    return _score_module(unwrap(model))[0] == "classifier"


def score_weight(model) -> torch.Tensor:
    """The (K, H) weight of a reward model's score layer that training updates (peft's trainable copy
    of a modules_to_save head, else the layer's own)."""
    _, layer = _score_module(unwrap(model))
    weights = [p for n, p in layer.named_parameters() if n.endswith("weight")]
    trainable = [p for p in weights if p.requires_grad]
    return (trainable or weights)[0]


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, head: int | None = 0) -> torch.Tensor:
    """Scalar score per sequence from a sequence-classification reward model.

    input_ids, attention_mask (B, T) -> (B,): output `head` of the score layer (0: the reward; an ODIN
    RM's quality head), or every output (B, K) with head=None. Decoder models: the head's per-token output read at
    the last real token by attention mask (HF's own pooling searches for the pad id, which is wrong
    when pad == eos). The per-token output is captured by a hook during the model's own forward, so
    DDP/peft wrappers run as usual (bypassing DDP's forward would skip the gradient all-reduce).
    Encoder models with a pooled [CLS] classifier (BERT family): their own pooled logit.
    """
    if is_pooled(model):  # encoder: position-independent pooling, padding-safe
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits if head is None else logits[:, head]
    per_token = token_scores(model, input_ids, attention_mask, head=head)  # (B, T[, K])
    idx = last_token_index(attention_mask).clamp(min=0)
    return per_token[torch.arange(per_token.shape[0], device=per_token.device), idx]


def token_scores(
    model, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, head: int | None = 0, inputs_embeds=None
) -> torch.Tensor:
    """A decoder reward model's score head applied at every position: (B, T) -> (B, T).

    scores[:, t] is the RM's score of the prefix input_ids[:, :t+1] (causal attention), so
    sequence_scores is this read at the last real token; a critic initialised from the RM reads every
    position. Hooked from the model's own forward, as sequence_scores (DDP/peft wrappers run as usual).
    """
    hf = unwrap(model)
    if is_pooled(hf):
        raise ValueError(f"{type(hf).__name__} pools one [CLS] state: it has no per-token scores")
    _, layer = _score_module(hf)
    captured = {}
    handle = layer.register_forward_hook(lambda module, args, out: captured.__setitem__("scores", out))
    try:
        model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,  # states of a frozen trunk (models/trunk.py) instead of tokens
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    finally:
        handle.remove()
    return captured["scores"] if head is None else captured["scores"][..., head]


@torch.no_grad()
def eval_perplexity(model, items, collate_items, batch_size: int, accelerator=None) -> dict:
    """Token-weighted mean NLL over `items` (sharded over ranks) and its exp."""
    was_training = model.training
    model.eval()
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    dev = next(model.parameters()).device
    nll, n = torch.zeros((), device=dev), torch.zeros((), device=dev)
    mine = items[rank::world]
    for i in range(0, len(mine), batch_size):
        for sub in collate_items(mine[i : i + batch_size]):
            s, k = causal_lm_nll_sum(model, {key: v.to(dev) for key, v in sub.items()})
            nll, n = nll + s, n + k
    if world > 1:
        nll, n = accelerator.reduce(nll, "sum"), accelerator.reduce(n, "sum")
    model.train(was_training)
    mean = (nll / n.clamp(min=1)).item()
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": int(n.item())}
