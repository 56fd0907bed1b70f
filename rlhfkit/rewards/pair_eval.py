"""A reward model scored on preference pairs: accuracy, margin, loss and the length-aware numbers.

One function for the RM stage's held-out evaluation and for `rlhfkit rm-eval`. Pairs come from
inputs.pairs.encode_pairs (token ids plus the full answers' lengths). Sharded over ranks: the sums
are reduced and the per-pair margins gathered, so any number of processes gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhfkit.algorithms.preference_eval import length_aware_metrics, pearson_r
from rlhfkit.inputs.pairs import collate_pairs
from rlhfkit.models.forward import sequence_scores

LENGTH_KEYS = ("chosen_chars", "rejected_chars", "chosen_tokens", "rejected_tokens")


def pair_scores(model, batch: dict, head: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores, (B,) each — or (B, K) with head=None — for a collate_pairs batch."""
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"], head=head)
    B = scores.shape[0] // 2
    return scores[:B], scores[B:]


def _scores_by_collate(model, pad_id: int) -> Callable:
    dev = next(model.parameters()).device

    def score(chunk: list[dict]):
        batch = {k: v.to(dev) for k, v in collate_pairs(chunk, pad_id).items()}
        lengths = batch["attention_mask"].sum(1)
        c, r = pair_scores(model, batch, head=None)
        return c, r, lengths[: len(chunk)] > lengths[len(chunk) :]

    return score


@torch.no_grad()
def evaluate_pairs(
    model,
    pairs: list[dict],
    pad_id: int,
    batch_size: int,
    accelerator=None,
    margins: list | None = None,
    score_fn: Callable | None = None,
    head_names: list[str] | None = None,
) -> dict:
    """Held-out numbers of `model` on `pairs` (empty dict for no pairs). The score is head 0 (what PPO
    reads); with several heads (ODIN) each head and their sum also get `<name>/...` numbers.
    `margins` is filled with every pair's head-0 margin, in pair order. `score_fn(chunk)` replaces the
    model's forward (the cached-trunk path): it returns chosen, rejected (B, K) scores and the
    (B,) bools "chosen has more tokens seen by the RM"."""
    was_training = model.training
    model.eval()
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    score_fn = score_fn or _scores_by_collate(model, pad_id)
    dev = next(model.parameters()).device
    sums, mine = _score_shard(pairs, list(range(rank, len(pairs), world)), score_fn, batch_size, dev)
    if world > 1:
        from accelerate.utils import gather_object

        sums = accelerator.reduce(sums, "sum")
        mine = gather_object(mine)
    model.train(was_training)
    n, loss, rsum, rsq, seen = sums.tolist()
    if n == 0:
        return {}
    ordered = [m for _, m in sorted(mine)]
    by_pair = [m[0] for m in ordered]  # per-head margins
    if margins is not None:
        margins += [m[0] for m in by_pair]
    mean = rsum / (2 * n)
    var = max(rsq / (2 * n) - mean**2, 0.0) * (2 * n) / max(2 * n - 1, 1)
    out = {"loss": loss / n, "reward_mean": mean, "reward_std": var**0.5}
    out.update(_margin_metrics([m[0] for m in by_pair], pairs))
    corr = _length_corr(ordered, pairs)  # per head: Pearson of the response scores with their lengths
    # The old baseline on the tokens the RM sees (after data.truncate): cut pairs count as equal.
    out["longer_wins_seen"] = seen / n
    if corr:
        out["length_corr"] = corr[0]
    names = head_names or [f"head{k}" for k in range(len(by_pair[0]))]
    if len(by_pair[0]) > 1:
        heads = {name: [m[k] for m in by_pair] for k, name in enumerate(names)}
        heads["sum"] = [sum(m) for m in by_pair]
        for k, (name, ms) in enumerate(heads.items()):
            out.update({f"{name}/{key}": v for key, v in _margin_metrics(ms, pairs).items() if key != "bins"})
            if corr:
                out[f"{name}/length_corr"] = corr[k]
    return out


def _length_corr(ordered: list, pairs: list[dict]) -> list[float | None]:
    """Pearson's r of each head's (and, with several heads, their sum's) response scores with the
    responses' full token lengths; [] when the pairs carry no lengths (as ODIN reports it)."""
    if not ordered or "chosen_tokens" not in pairs[0]:
        return []
    lengths = [p["chosen_tokens"] for p in pairs] + [p["rejected_tokens"] for p in pairs]
    K = len(ordered[0][1])
    cols = [[m[1][k] for m in ordered] + [m[2][k] for m in ordered] for k in range(K)]
    if K > 1:
        cols.append([sum(m[1]) for m in ordered] + [sum(m[2]) for m in ordered])
    return [pearson_r(col, lengths) for col in cols]


def _score_shard(pairs: list[dict], idx: list[int], score_fn: Callable, batch_size: int, dev):
    """This rank's sums (n, loss, reward sum, sum of squares, longer seen) and its
    (pair index, (per-head margins, chosen scores, rejected scores)) rows."""
    import torch.nn.functional as F

    sums = torch.zeros(5, dtype=torch.float64, device=dev)
    mine: list = []
    for i in range(0, len(idx), batch_size):
        chunk = idx[i : i + batch_size]
        c, r, seen_longer = score_fn([pairs[j] for j in chunk])
        c, r = (x.double().reshape(len(chunk), -1) for x in (c, r))
        d = c - r
        mine += list(zip(chunk, zip(d.cpu().tolist(), c.cpu().tolist(), r.cpu().tolist())))
        both = torch.cat([c[:, 0], r[:, 0]])
        sums += torch.stack(
            [
                torch.tensor(float(len(chunk)), dtype=torch.float64, device=dev),
                -F.logsigmoid(d.sum(1)).sum(),  # the training loss reads the heads' sum
                both.sum(),
                both.square().sum(),
                seen_longer.sum().double(),
            ]
        )
    return sums, mine


def _margin_metrics(ms: list[float], pairs: list[dict]) -> dict:
    """length_aware_metrics when the pairs carry their full lengths; accuracy, ties, margin otherwise."""
    if all(k in pairs[0] for k in LENGTH_KEYS):
        cols = {k: [p[k] for p in pairs] for k in LENGTH_KEYS}
        return length_aware_metrics(ms, **cols)
    n = len(ms)
    return {
        "pairs": n,
        "accuracy": sum(m > 0 for m in ms) / n,
        "ties": sum(m == 0 for m in ms) / n,
        "margin": sum(ms) / n,
    }
