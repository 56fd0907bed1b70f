"""Output of the data stage: split writers (Arrow `datasets` folder or Parquet), length filters, stats.

Rows are written in batches as they are produced (pyarrow IPC stream / ParquetWriter), so memory does
not grow with the number of rows. Canonical columns, shared with the training stages:

    sft         prompt, response, qid, answer_id, score, site
    rm_train    prompt, chosen, rejected, qid, chosen_id, rejected_id, chosen_score, rejected_score, site
    rm_eval     (same as rm_train)
    rl_prompts  prompt, qid, site

`prompt` is the raw question text; prompt templates ("Question: …\\n\\nAnswer: …") are applied later
by the training stages, never here. Ids and scores are null where the source has none (HF schemas).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from rlhfkit.data.options import SPLITS
from rlhfkit.runtime.errors import RlhfkitError

_S, _I = pa.string(), pa.int64()
SCHEMAS: dict[str, pa.Schema] = {
    "sft": pa.schema([("prompt", _S), ("response", _S), ("qid", _I), ("answer_id", _I), ("score", _I), ("site", _S)]),
    "rm_train": pa.schema(
        [
            ("prompt", _S),
            ("chosen", _S),
            ("rejected", _S),
            ("qid", _I),
            ("chosen_id", _I),
            ("rejected_id", _I),
            ("chosen_score", _I),
            ("rejected_score", _I),
            ("site", _S),
        ]
    ),
    "rl_prompts": pa.schema([("prompt", _S), ("qid", _I), ("site", _S)]),
}
SCHEMAS["rm_eval"] = SCHEMAS["rm_train"]
TEXT_COLUMNS = {
    "sft": ("prompt", "response"),
    "rm_train": ("prompt", "chosen", "rejected"),
    "rm_eval": ("prompt", "chosen", "rejected"),
    "rl_prompts": ("prompt",),
}

_ARROW_FILE = "data-00000-of-00001.arrow"
_BATCH_ROWS = 1000
_BATCH_CHARS = 4 << 20  # per split: bounds the rows held before a write


class SplitWriter:
    """Append rows to the four splits, written in place in `out` as they come; `close()` finalises them
    (arrow: `<split>/data-00000-of-00001.arrow` + the datasets JSON files; parquet: `<split>.parquet`)."""

    def __init__(self, out: Path, fmt: str):
        self.out, self.fmt = Path(out), fmt
        self.columns = {s: {c: [] for c in SCHEMAS[s].names} for s in SPLITS}
        self.chars = dict.fromkeys(SPLITS, 0)
        self.rows = dict.fromkeys(SPLITS, 0)
        self.lengths = {s: {c: array("q") for c in TEXT_COLUMNS[s]} for s in SPLITS}
        self._writers: dict[str, Any] = {}
        self._sinks: dict[str, Any] = {}

    def path_of(self, split: str) -> Path:
        if self.fmt == "parquet":
            return self.out / f"{split}.parquet"
        return self.out / split / _ARROW_FILE

    def add(self, split: str, row: dict) -> None:
        cols = self.columns[split]
        for name, values in cols.items():
            values.append(row.get(name))
        for name, lens in self.lengths[split].items():
            n = len(row[name])
            lens.append(n)
            self.chars[split] += n
        self.rows[split] += 1
        if len(cols["prompt"]) >= _BATCH_ROWS or self.chars[split] >= _BATCH_CHARS:
            self._flush(split)

    def _writer(self, split: str):
        if split not in self._writers:
            path = self.path_of(split)
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                self._writers[split] = pq.ParquetWriter(str(path), SCHEMAS[split], compression="zstd")
            else:
                sink = pa.OSFile(str(path), "wb")
                self._sinks[split] = sink
                self._writers[split] = pa.ipc.new_stream(sink, _hf_schema(SCHEMAS[split]))
        return self._writers[split]

    def _flush(self, split: str) -> None:
        cols = self.columns[split]
        if cols["prompt"]:
            batch = pa.RecordBatch.from_pydict(cols, schema=SCHEMAS[split])
            self._writer(split).write_batch(batch)
            for values in cols.values():
                values.clear()
        self.chars[split] = 0

    def close(self) -> None:
        """Flush and finalise; for arrow, build the DatasetDict folder in `out`."""
        for split in SPLITS:
            self._flush(split)
            self._writer(split)  # an empty split still gets a file with the schema
        for split in SPLITS:
            self._writers[split].close()
            if split in self._sinks:
                self._sinks[split].close()
        if self.fmt == "arrow":
            _write_dataset_dict_metadata(self.out, self.rows)

    def abort(self) -> None:
        for w in self._writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - best effort on the error path
                pass
        for sink in self._sinks.values():
            try:
                sink.close()
            except Exception:  # noqa: BLE001
                pass

    def length_stats(self) -> dict:
        import numpy as np

        out: dict = {}
        for split in SPLITS:
            out[split] = {}
            for name, lens in self.lengths[split].items():
                if not len(lens):
                    out[split][name] = None
                    continue
                arr = np.frombuffer(lens, dtype=np.int64)
                p50, p90, p99 = np.percentile(arr, [50, 90, 99])
                out[split][name] = {
                    "p50": int(p50),
                    "p90": int(p90),
                    "p99": int(p99),
                    "max": int(arr.max()),
                    "mean": round(float(arr.mean()), 1),
                }
        return out


def _hf_schema(schema: pa.Schema) -> pa.Schema:
    """The Arrow schema with the `huggingface` features metadata that `datasets` writes."""
    import datasets

    return datasets.Features.from_arrow_schema(schema).arrow_schema


def _write_dataset_dict_metadata(out: Path, rows: dict[str, int]) -> None:
    """The JSON files of a `DatasetDict.save_to_disk` folder around the Arrow files written above.

    Writing the Arrow stream files in place (instead of building datasets and calling save_to_disk,
    which copies every split through a memory map) keeps memory flat and avoids a second copy; the
    layout is the one `datasets.load_from_disk` reads (checked by the tests)."""
    import dataclasses
    import json
    import os

    import datasets

    for split in SPLITS:
        features = datasets.Features.from_arrow_schema(SCHEMAS[split])
        info = dataclasses.asdict(datasets.DatasetInfo(features=features))
        state = {
            "_data_files": [{"filename": _ARROW_FILE}],
            "_fingerprint": os.urandom(8).hex(),  # like Dataset.from_file: a cache key must never be shared
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        with open(out / split / "state.json", "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2, sort_keys=True)
        with open(out / split / "dataset_info.json", "w", encoding="utf-8") as fh:
            json.dump({k: info[k] for k in sorted(info)}, fh, indent=2)
    with open(out / "dataset_dict.json", "w", encoding="utf-8") as fh:
        json.dump({"splits": list(SPLITS)}, fh)


class LengthFilter:
    """Drops rows longer than max_chars characters and/or max_tokens tokens (prompt + response)."""

    def __init__(
        self, max_chars: int | None = None, max_tokens: int | None = None, tokenizer: str | Callable | None = None
    ):
        self.max_chars, self.max_tokens = max_chars, max_tokens
        self._count: Callable[[str], int] | None = None
        if max_tokens is not None:
            if tokenizer is None:
                raise RlhfkitError("max_tokens needs a tokenizer")
            self._count = tokenizer if callable(tokenizer) else _token_counter(tokenizer)

    @property
    def active(self) -> bool:
        return self.max_chars is not None or self.max_tokens is not None

    def reason(self, prompt: str, responses: list[str], cache: dict | None = None) -> str | None:
        """None if the row fits, else 'max_chars' or 'max_tokens'. `responses`: the longest one counts."""
        if self.max_chars is not None:
            if len(prompt) + max((len(r) for r in responses), default=0) > self.max_chars:
                return "max_chars"
        if self.max_tokens is not None:
            count = self._cached(cache)
            if count(prompt) + max((count(r) for r in responses), default=0) > self.max_tokens:
                return "max_tokens"
        return None

    def _cached(self, cache: dict | None) -> Callable[[str], int]:
        if cache is None:
            return self._count  # type: ignore[return-value]

        def count(text: str) -> int:
            key = id(text)
            if key not in cache:
                cache[key] = (self._count(text), text)  # keep text alive so its id stays unique
            return cache[key][0]

        return count


def _token_counter(name: str) -> Callable[[str], int]:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # missing, offline, not a tokenizer
        raise RlhfkitError(f"cannot load tokenizer '{name}': {exc}") from exc

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count
