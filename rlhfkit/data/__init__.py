"""Data stage: Stack Exchange dumps and HF preference schemas → sft / rm_train / rm_eval / rl_prompts.

    from rlhfkit.data import DataConfig, build
    stats = build(DataConfig(paths=["dumps/beer.stackexchange.com"], out_dir="runs/data"))

Building blocks (each importable on its own): `answer_score`, `sample_pairs`, `html_to_markdown`,
`assign_split`, `split_hh`, `find_dumps`, `parse_rows`, `iter_posts`.
"""

from __future__ import annotations

from rlhfkit.data.options import SPLITS, DataConfig, SplitFractions
from rlhfkit.data.scoring import answer_score, candidate_pairs, count_pairs, pick_sft_answer, sample_pairs
from rlhfkit.data.splits import assign_split

__all__ = [
    "SPLITS",
    "DataConfig",
    "SplitFractions",
    "build",
    "build_stackexchange",
    "build_hf",
    "answer_score",
    "candidate_pairs",
    "count_pairs",
    "pick_sft_answer",
    "sample_pairs",
    "assign_split",
    "html_to_markdown",
    "split_hh",
    "detect_schema",
    "find_dumps",
    "parse_rows",
    "iter_posts",
    "DumpError",
]


def build(cfg: DataConfig, log=None) -> dict:
    """Run the data stage for `cfg` (see DataConfig); returns the stats written to out_dir/stats.json."""
    from rlhfkit.data.pipeline import build as _build

    return _build(cfg, log=log)


def build_stackexchange(paths, out_dir: str, **options) -> dict:
    """`rlhfkit data stackexchange PATHS out_dir=...` from Python; options are DataConfig fields."""
    return build(_config("stackexchange", paths, out_dir, options))


def build_hf(source, out_dir: str, **options) -> dict:
    """`rlhfkit data hf SOURCE out_dir=...` from Python; options are DataConfig fields."""
    return build(_config("hf", source, out_dir, options))


def _config(source: str, paths, out_dir: str, options: dict) -> DataConfig:
    from rlhfkit.runtime.config import load_config

    paths = [str(p) for p in ([paths] if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__") else paths)]
    return load_config(DataConfig, overrides={"source": source, "paths": paths, "out_dir": str(out_dir), **options})


def __getattr__(name: str):  # lazy: markdownify/bs4, expat helpers, HF readers
    if name == "html_to_markdown":
        from rlhfkit.data.markdown import html_to_markdown

        return html_to_markdown
    if name in ("split_hh", "detect_schema"):
        from rlhfkit.data import hf

        return getattr(hf, name)
    if name in ("find_dumps", "parse_rows", "iter_posts", "DumpError"):
        from rlhfkit.data import posts

        return getattr(posts, name)
    raise AttributeError(f"module 'rlhfkit.data' has no attribute {name!r}")
