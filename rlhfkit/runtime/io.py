"""Safe file output: atomic writes, output directories that refuse to clobber, JSONL appends.

Every stage writes through these so that an interrupted or failed run never leaves a half-written
file where a finished one is expected, and nothing is overwritten without `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhfkit.runtime.errors import RlhfkitError

_UMASK = os.umask(0)
os.umask(_UMASK)

PATH_SUFFIXES = {
    ".jsonl",
    ".json",
    ".parquet",
    ".csv",
    ".tsv",
    ".txt",
    ".arrow",
    ".gguf",
    ".yaml",
    ".yml",
    ".xml",
    ".7z",
    ".gz",
    ".bz2",
    ".zip",
    ".safetensors",
    ".bin",
    ".pt",
}


def missing_path(name: str, what: str) -> RlhfkitError | None:
    """An immediate "not found" for a `name` that looks like a local path (a file extension, a leading
    . / ~, or a first component that is a local folder, as in runs/tiny_modl) and does not exist — so a
    typo is never sent to the Hub to time out. None when it exists or may be a hub id (org/name)."""
    import difflib

    path = Path(name).expanduser()
    if path.exists():
        return None
    parts = Path(name).parts
    local = (
        name.startswith((".", "/", "~"))
        or path.suffix.lower() in PATH_SUFFIXES
        or name.count("/") > 1
        or (len(parts) > 1 and Path(parts[0]).expanduser().is_dir())
    )
    if not local:
        return None
    hint = ""
    if path.parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1, cutoff=0.6)
        hint = f" (did you mean {path.parent / close[0]}?)" if close else ""
    else:
        parent = next((p for p in path.parents if p.is_dir()), Path("."))
        hint = f" ({path.parent} does not exist; {parent} does)"
    return RlhfkitError(f"{what} not found: {name}{hint}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over it (normal permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line (flushed) — used for metrics.jsonl and samples.jsonl."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=_jsonable) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


OWNER_FILE = ".rlhfkit"  # written into every out_dir rlhfkit creates: proof of authorship
LOCK_FILE = ".lock"
_OWN_EARLY = {OWNER_FILE, LOCK_FILE, "config.yaml"}  # what a stage writes before it can fail on input


def written_by_rlhfkit(path: Path) -> bool:
    return (Path(path) / OWNER_FILE).is_file()


def contents(path: Path) -> list[Path]:
    """What is in `path` beyond its lock file, and beyond a config.yaml that rlhfkit wrote there before
    failing on bad input (so the corrected rerun is not blocked)."""
    ignore = _OWN_EARLY if written_by_rlhfkit(path) else {LOCK_FILE}
    return [p for p in path.iterdir() if p.name not in ignore]


def prepare_out_dir(path: Path, overwrite: bool = False, resume: bool = False, owner: str = "rlhfkit") -> Path:
    """Create `path` for a stage run and mark it as rlhfkit's (OWNER_FILE).

    An existing non-empty directory is an error unless `resume` (keep it) or `overwrite` (wipe it; the
    lock file stays, since the caller holds it).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RlhfkitError(f"output path {path} exists and is not a directory")
    if path.exists() and contents(path):
        if resume:
            return path
        if not overwrite:
            raise RlhfkitError(
                f"output directory {path} is not empty: pass --overwrite to replace it or --resume to continue it"
            )
    if path.exists():
        for p in path.iterdir():
            if p.name != LOCK_FILE:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / OWNER_FILE, {"owner": owner, "pid": os.getpid()})
    return path


def lock_dir(path: Path):
    """Hold an exclusive lock on `path` (created if needed) for as long as the returned file stays open
    (the process's lifetime): a second writer is refused at once with the holder's pid."""
    import fcntl

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fh = open(path / LOCK_FILE, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise RlhfkitError(
            f"{path} is in use by another rlhfkit process (pid {holder}): wait for it to finish, or use another out_dir"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file below `folder` and the folders themselves, so a rename publishes whole files."""
    for root, _, files in os.walk(folder):
        for f in files:
            fsync_path(Path(root) / f)
        fsync_path(Path(root))


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False, mark: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is fsynced and replaces `path`, on error it is
    removed. `mark` writes OWNER_FILE into it (a run-directory stage output: proof of authorship).

    Use for outputs that must appear whole or not at all (a dataset folder, a merged model).
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise RlhfkitError(f"{path} already exists: pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if mark:
        atomic_write_json(tmp / OWNER_FILE, {"owner": mark, "pid": os.getpid()})
    fsync_tree(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)
