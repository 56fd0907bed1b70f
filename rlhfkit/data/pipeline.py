"""`build(cfg)`: inputs → splits + stats.json + config.yaml in out_dir, whole or not at all."""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from rlhfkit.data.jobs import ConverterPool, Emitter, converted
from rlhfkit.data.markdown import converter, converter_description
from rlhfkit.data.options import SPLITS, DataConfig
from rlhfkit.data.posts import extract_posts, find_dumps
from rlhfkit.data.writer import LengthFilter, SplitWriter
from rlhfkit.runtime.errors import RlhfkitError
from rlhfkit.runtime.io import atomic_dir, atomic_write_json

_AUTO_WORKERS_BYTES = 32 << 20  # below this, converter processes cost more than they save
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz", ".bz2", ".xz", ".zst")


def _workers(cfg: DataConfig, input_bytes: int) -> int:
    if cfg.workers > 0:
        return cfg.workers
    if input_bytes < _AUTO_WORKERS_BYTES or converter() == "rust":  # rust: sending texts costs more than converting
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def build(cfg: DataConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the data stage described by `cfg`; returns the stats (also written to out_dir/stats.json)."""
    from rlhfkit.runtime.config import save_config

    say = log or (lambda msg: None)
    t0 = time.time()
    if not cfg.paths:
        raise RlhfkitError(f"no input paths given (rlhfkit data {cfg.source} PATH ...)")
    lengths = LengthFilter(cfg.max_chars, cfg.max_tokens, cfg.tokenizer)
    try:
        converter()  # env RLHFKIT_MARKDOWN: fail here, not in a worker process
    except (ValueError, ImportError) as exc:
        raise RlhfkitError(str(exc)) from None
    with atomic_dir(Path(cfg.out_dir), overwrite=cfg.overwrite, mark="data") as tmp:
        scratch = tmp / ".scratch"
        scratch.mkdir()
        writer = SplitWriter(tmp, cfg.format)
        emitter = Emitter(writer, lengths, cfg.prompt_style)
        try:
            with ConverterPool(cfg.workers) as pool:
                if cfg.source == "stackexchange":
                    inputs = _stackexchange(cfg, emitter, scratch, pool, say)
                else:
                    inputs = _hf(cfg, emitter, pool, say)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        shutil.rmtree(scratch, ignore_errors=True)
        stats = _stats(cfg, inputs, emitter, writer, time.time() - t0)
        atomic_write_json(tmp / "stats.json", stats)
        save_config(cfg, tmp / "config.yaml")
    return stats


# --------------------------------------------------------------------------- Stack Exchange
def _stackexchange(cfg: DataConfig, emitter: Emitter, scratch: Path, pool: ConverterPool, say) -> list[dict]:
    from rlhfkit.data.stackexchange import SiteScan, SiteStats

    dumps = find_dumps(cfg.paths)
    pool.resize(_workers(cfg, sum(d.path.stat().st_size for d in dumps)))
    convert = True if cfg.markdown is None else cfg.markdown
    if convert:
        say(f"[data] HTML → Markdown with {converter_description()}")
    inputs = []
    for dump in dumps:
        t = time.time()
        xml_path, display = dump.path, str(dump.path)
        if dump.is_archive:
            say(f"[data] {dump.site}: extracting Posts.xml from {dump.path.name}")
            xml_path = extract_posts(dump, scratch)
            display = f"{dump.path}:{xml_path.name}"
        scan = SiteScan(dump.site, scratch / f"{dump.site}.store", cfg.fractions.as_tuple(), cfg.seed)
        scan.run(xml_path, display, cfg.allow_partial)
        t_parse = time.time() - t
        site_stats = SiteStats(dump.site)
        for job, texts in converted(
            scan.jobs(cfg.max_pairs_per_question, convert, site_stats), pool if convert else None
        ):
            emitter.emit(job, texts)
        info = {
            "path": str(dump.path),
            "site": dump.site,
            "bytes": dump.path.stat().st_size,
            **site_stats.as_dict(scan),
            "rows_written": emitter.site_rows(dump.site),
            "markdown_converter": converter() if convert else None,
            "seconds": round(time.time() - t, 3),
            "parse_seconds": round(t_parse, 3),
        }
        inputs.append(info)
        (scratch / f"{dump.site}.store").unlink(missing_ok=True)
        if dump.is_archive:
            shutil.rmtree(xml_path.parent, ignore_errors=True)
        note = f" (PARTIAL: {scan.partial['reason']})" if scan.partial else ""
        say(
            f"[data] {dump.site}: {scan.rows} rows, {site_stats.questions} questions, {site_stats.answers} answers "
            f"in {info['seconds']:.1f}s{note}"
        )
    return inputs


# --------------------------------------------------------------------------- HF schemas
def _hf(cfg: DataConfig, emitter: Emitter, pool: ConverterPool, say) -> list[dict]:
    from rlhfkit.data.hf import HFReader
    from rlhfkit.inputs.tables import load_table

    inputs = []
    for source in cfg.paths:
        t = time.time()
        path = Path(source).expanduser()
        if not path.exists() and (source.startswith((".", "/", "~")) or source.lower().endswith(_FILE_SUFFIXES)):
            raise RlhfkitError(f"input not found: {source}")
        ds = load_table(str(path) if path.exists() else source, cfg.input_split)
        site = path.name if path.exists() else source
        try:
            reader = HFReader(
                ds, cfg.schema, site, cfg.fractions.as_tuple(), cfg.seed, cfg.max_pairs_per_question, convert=False
            )
        except RlhfkitError as exc:
            raise RlhfkitError(f"{source}: {exc}") from None
        reader.convert = cfg.markdown if cfg.markdown is not None else reader.schema == "h4"
        if reader.convert:
            say(f"[data] {site}: HTML → Markdown with {converter_description()}")
        size = path.stat().st_size if path.is_file() else int(getattr(ds.data, "nbytes", 0))
        pool.resize(max(pool.workers, _workers(cfg, size)))
        for job, texts in converted(reader.jobs(), pool if reader.convert else None):
            emitter.emit(job, texts)
        info = {
            "path": source,
            "site": site,
            "bytes": size,
            **reader.stats(),
            "rows_written": emitter.site_rows(site),
            "markdown_converter": converter() if reader.convert else None,
            "seconds": round(time.time() - t, 3),
        }
        inputs.append(info)
        say(f"[data] {site}: {reader.rows} rows ({reader.schema} schema) in {info['seconds']:.1f}s")
    return inputs


# --------------------------------------------------------------------------- stats
def _stats(cfg: DataConfig, inputs: list[dict], emitter: Emitter, writer: SplitWriter, seconds: float) -> dict:
    by_type: Counter = Counter()
    by_split: Counter = Counter()
    skipped: Counter = Counter()
    hist: Counter = Counter()
    for info in inputs:
        by_type.update(info.get("rows_by_post_type", {}))
        by_split.update(info["questions_by_split"])
        skipped.update(info["skipped"])
        hist.update({int(k): v for k, v in info["score_histogram"].items()})
    skipped.update(emitter.skipped)
    rows = {s: writer.rows[s] for s in SPLITS}
    total_bytes = sum(i["bytes"] for i in inputs)
    return {
        "source": cfg.source,
        "out_dir": str(cfg.out_dir),
        "format": cfg.format,
        "inputs": inputs,
        "rows_by_post_type": dict(by_type),
        "questions": sum(i["questions"] for i in inputs),
        "answers": sum(i["answers"] for i in inputs),
        "questions_by_split": {s: by_split.get(s, 0) for s in SPLITS},
        "rows": rows,
        "pairs": {
            "rm_train": rows["rm_train"],
            "rm_eval": rows["rm_eval"],
            "candidates": sum(i["candidate_pairs"] for i in inputs),
            "candidates_capped": sum(i["candidate_pairs_capped"] for i in inputs),
        },
        "score_histogram": {str(k): v for k, v in sorted(hist.items())},
        "skipped": {k: v for k, v in sorted(skipped.items()) if v},
        "filtered": {k: v for k, v in sorted(emitter.filtered.items()) if v},
        "lengths_chars": writer.length_stats(),
        "partial": [i["partial"] for i in inputs if i.get("partial")],
        "seconds": round(seconds, 3),
        "mb_per_second": round(total_bytes / 1e6 / seconds, 2) if seconds > 0 and total_bytes else None,
    }


def summary_text(stats: dict) -> str:
    """The human summary printed by `rlhfkit data`."""
    rows = stats["rows"]
    sites = ", ".join(i["site"] for i in stats["inputs"])
    lines = [
        f"rlhfkit data: {len(stats['inputs'])} input(s) ({sites}) → {stats['out_dir']} [{stats['format']}] "
        f"in {stats['seconds']:.1f}s",
        f"  questions {stats['questions']}, answers {stats['answers']}; candidate pairs {stats['pairs']['candidates']} "
        f"({stats['pairs']['candidates_capped']} after the per-question cap)",
        f"  rows: sft {rows['sft']} | rm_train {rows['rm_train']} pairs | rm_eval {rows['rm_eval']} pairs | "
        f"rl_prompts {rows['rl_prompts']}",
    ]
    if stats["skipped"]:
        lines.append("  skipped: " + ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()))
    if stats["filtered"]:
        lines.append("  filtered (too long): " + ", ".join(f"{k} {v}" for k, v in stats["filtered"].items()))
    for p in stats["partial"]:
        lines.append(f"  PARTIAL input kept up to the error: {p['reason']}")
    return "\n".join(lines)
