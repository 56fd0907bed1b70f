"""Stable split assignment: a question goes to one split, chosen by a seeded hash of its id.

The hash depends only on (seed, site, question id), so a question keeps its split whatever else is in
the input (another dump date, more sites, a different file order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from rlhfkit.data.options import SPLITS

_SCALE = float(1 << 64)


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from `parts` (blake2b; independent of PYTHONHASHSEED)."""
    key = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / _SCALE


def assign_split(key: object, fractions: Sequence[float], seed: int = 0, site: str = "") -> str:
    """Split name for question `key` of `site`: buckets [0, f_sft), [f_sft, f_sft + f_rm_train), … of a
    seeded hash. `fractions` are (sft, rm_train, rm_eval, rl_prompts) and add up to 1."""
    u = unit_hash("split", seed, site, key)
    acc = 0.0
    last = None
    for name, frac in zip(SPLITS, fractions):
        if frac <= 0:
            continue
        acc += frac
        last = name
        if u < acc:
            return name
    return last or SPLITS[-1]  # rounding: sum(fractions) may be 1 - 1e-16
