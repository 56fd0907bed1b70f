"""Load a table of rows from wherever users keep it: JSONL/JSON(.gz), Parquet, CSV, a `datasets`
folder (saved with `save_to_disk`, or our `rlhfkit data` output), or a Hugging Face hub id.

    rows = load_table("runs/x/data", split="rm_train")   # datasets.Dataset
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.runtime.errors import RlhfkitError
from rlhfkit.runtime.io import missing_path

_FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def check_jsonl(path: Path) -> None:
    """Name the first row of a JSONL file that is not UTF-8 or not a JSON object (datasets' own error
    says neither); a truncated last line is such a row."""
    import json

    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise RlhfkitError(f"{path}: row {n} is not UTF-8 (byte {exc.start} of the line)") from None
            except json.JSONDecodeError as exc:
                raise RlhfkitError(f"{path}: row {n} is not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise RlhfkitError(f"{path}: row {n} is a JSON {type(row).__name__}, not an object")


def _builder_for(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    return _FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def load_table(source: str | Path, split: str | None = None):
    """Return a `datasets.Dataset` for `source` (file, folder or hub id) and `split`.

    For a folder holding several splits (a DatasetDict, or one file per split named `<split>.*`),
    `split` chooses one; hub ids default to the "train" split.
    """
    import datasets

    path = Path(source)
    if path.is_file():
        builder = _builder_for(path)
        if builder is None:
            raise RlhfkitError(f"{path}: unsupported file type (use .jsonl, .json, .parquet or .csv)")
        if path.stat().st_size == 0:
            raise RlhfkitError(f"{path}: file is empty")
        if path.suffix == ".jsonl":
            check_jsonl(path)
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # e.g. a 0-row Parquet file, a corrupt file: one line, naming the file
            raise RlhfkitError(f"{path}: cannot read as {builder}: {str(exc).splitlines()[0][:300]}") from exc
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return _pick_split(loaded, split, path)
            return loaded
        if split is not None:
            if (path / split).is_dir():
                return load_table(path / split)
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.name.split(".")[0] == split)
            if matches:
                return load_table(matches[0])
            raise RlhfkitError(f"{path}: no split '{split}' (looked for {split}/ or {split}.*)")
        files = sorted(p for p in path.iterdir() if p.is_file() and _builder_for(p))
        if len(files) == 1:
            return load_table(files[0])
        raise RlhfkitError(f"{path}: folder holds {len(files)} data files; name a split or a file")
    missing = missing_path(str(source), "data source")
    if missing is not None:  # a mistyped local path, not a hub id: say so now, not after a hub time-out
        raise missing
    if str(source).count("/") == 1:
        try:
            return datasets.load_dataset(str(source), split=split or "train")
        except Exception as exc:  # offline, missing, gated: surface the hub's own reason
            raise RlhfkitError(f"could not load hub dataset '{source}': {exc}") from exc
    raise RlhfkitError(f"data source not found: {source}")


def _pick_split(dd, split: str | None, path: Path):
    if split is None:
        if len(dd) == 1:
            return next(iter(dd.values()))
        raise RlhfkitError(f"{path}: has splits {sorted(dd)}; choose one")
    if split not in dd:
        raise RlhfkitError(f"{path}: no split '{split}' (has {sorted(dd)})")
    return dd[split]
