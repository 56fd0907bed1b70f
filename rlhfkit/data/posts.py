"""Stack Exchange dumps: find the Posts.xml files of the inputs and stream their rows.

Inputs: a `Posts.xml`, a `Posts.xml.gz`, a site's `.7z` archive (the Internet Archive layout,
`beer.stackexchange.com.7z` or `stackoverflow.com-Posts.7z`), a site folder holding one of those, or a
folder of site folders / archives (several sites at once).

Parsing streams with the standard library's expat parser: each `<row .../>` is handed to a callback as
an attribute dict and dropped, so no element tree is ever built and memory stays flat whatever the
file size. The UTF-8 BOM, CRLF line ends and XML-escaped HTML bodies are handled by expat. A malformed
or truncated file raises `DumpError` with the file name, line and column.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.parsers import expat

from rlhfkit.runtime.errors import RlhfkitError

POST_TYPES = {
    1: "question",
    2: "answer",
    3: "orphaned_tag_wiki",
    4: "tag_wiki_excerpt",
    5: "tag_wiki",
    6: "moderator_nomination",
    7: "wiki_placeholder",
    8: "privilege_wiki",
}

_CHUNK = 1 << 20
_POSTS_NAMES = ("Posts.xml", "Posts.xml.gz", "posts.xml", "posts.xml.gz")


def post_type_name(type_id: int) -> str:
    return POST_TYPES.get(type_id, f"type_{type_id}")


class DumpError(RlhfkitError):
    """A Posts.xml that cannot be parsed (the message names the file and the line)."""

    def __init__(
        self,
        message: str,
        path: str,
        line: int | None = None,
        column: int | None = None,
        rows: int = 0,
        fatal: bool = False,
    ):
        super().__init__(message)
        self.path, self.line, self.column, self.rows = path, line, column, rows
        self.fatal = fatal  # not a Posts.xml at all: allow_partial does not apply

    def as_dict(self) -> dict:
        return {
            "file": self.path,
            "line": self.line,
            "column": self.column,
            "rows_parsed": self.rows,
            "reason": str(self),
        }


@dataclass
class Dump:
    """One site's posts: where to read them, and the site name written in the `site` column."""

    site: str
    path: Path  # Posts.xml, Posts.xml.gz or a .7z archive
    member: str | None = None  # the Posts.xml inside a .7z

    @property
    def is_archive(self) -> bool:
        return self.path.suffix.lower() == ".7z"


def _site_of_archive(path: Path) -> str:
    name = path.name[: -len(".7z")]
    if name.endswith("-Posts"):  # stackoverflow.com-Posts.7z
        name = name[: -len("-Posts")]
    return name


def _site_of_file(path: Path) -> str:
    if path.name in _POSTS_NAMES:
        return path.resolve().parent.name
    name = path.name
    for suffix in (".gz", ".xml"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _dumps_in_folder(folder: Path) -> list[Dump]:
    for name in _POSTS_NAMES:
        if (folder / name).is_file():
            return [Dump(_site_of_file(folder / name), folder / name)]
    found: list[Dump] = []
    for child in sorted(folder.iterdir()):
        if child.is_file() and child.suffix.lower() == ".7z":
            found.append(Dump(_site_of_archive(child), child))
        elif child.is_dir():
            for name in _POSTS_NAMES:
                if (child / name).is_file():
                    found.append(Dump(_site_of_file(child / name), child / name))
                    break
    return found


def find_dumps(paths: list[str | os.PathLike]) -> list[Dump]:
    """Resolve the inputs to one `Dump` per site (errors name the path that is missing or empty)."""
    if not paths:
        raise RlhfkitError("no input: give one or more Posts.xml files, .7z archives or dump folders")
    dumps: list[Dump] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise RlhfkitError(f"input not found: {path}")
        if path.is_dir():
            found = _dumps_in_folder(path)
            if not found:
                raise RlhfkitError(
                    f"{path}: no Posts.xml, Posts.xml.gz or .7z archive in this folder or its sub-folders"
                )
            dumps.extend(found)
        elif path.suffix.lower() == ".7z":
            dumps.append(Dump(_site_of_archive(path), path))
        else:
            dumps.append(Dump(_site_of_file(path), path))
    for d in dumps:
        if d.path.stat().st_size == 0:
            raise RlhfkitError(f"{d.path}: file is empty")
    seen: dict[str, Path] = {}
    for d in dumps:
        if d.site in seen:
            raise RlhfkitError(f"site '{d.site}' given twice ({seen[d.site]} and {d.path}); question ids would clash")
        seen[d.site] = d.path
    return dumps


def extract_posts(dump: Dump, scratch: Path) -> Path:
    """Extract the Posts.xml of a .7z archive into `scratch` (py7zr; streaming to disk)."""
    import py7zr

    try:
        with py7zr.SevenZipFile(dump.path, mode="r") as archive:
            names = archive.getnames()
            member = next((n for n in names if n.rsplit("/", 1)[-1].lower() == "posts.xml"), None)
            if member is None:
                raise RlhfkitError(f"{dump.path}: no Posts.xml in the archive (it holds {names[:10]})")
            target = scratch / f"{dump.site}.7z-extract"
            target.mkdir(parents=True, exist_ok=True)
            archive.extract(path=target, targets=[member])
    except RlhfkitError:
        raise
    except Exception as exc:  # py7zr raises Bad7zFile, LZMAError, EOFError, ...
        raise RlhfkitError(f"{dump.path}: cannot read the 7z archive: {type(exc).__name__}: {exc}") from exc
    out = target / member
    if not out.is_file() or out.stat().st_size == 0:
        raise RlhfkitError(f"{dump.path}: Posts.xml in the archive is empty")
    return out


def _open_bytes(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def parse_rows(path: Path, on_row: Callable[[dict], None], display: str | None = None) -> int:
    """Stream `<row>` elements of Posts.xml (or .gz) to `on_row(attrs)`; returns the number of rows.

    Raises DumpError (file, line, column) for malformed XML, a truncated file or a corrupt gzip stream,
    and for a root element other than <posts>. Exceptions raised by `on_row` propagate unchanged.
    """
    name = display or str(path)
    parser = expat.ParserCreate()
    state = {"rows": 0, "depth": 0, "root": None}
    callback_error: list[BaseException] = []

    def start(tag: str, attrs: dict) -> None:
        depth = state["depth"]
        state["depth"] = depth + 1
        if depth == 0:
            state["root"] = tag
            if tag != "posts":
                raise DumpError(
                    f"{name}: not a Stack Exchange Posts.xml (root element is <{tag}>, expected <posts>)",
                    name,
                    parser.CurrentLineNumber,
                    parser.CurrentColumnNumber + 1,
                    fatal=True,
                )
            return
        if depth == 1 and tag == "row":
            state["rows"] += 1
            try:
                on_row(attrs)
            except BaseException as exc:  # keep the callback's own exception type
                callback_error.append(exc)
                raise

    def end(tag: str) -> None:
        state["depth"] -= 1

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        _feed(path, parser)
    except expat.ExpatError as exc:
        raise _malformed(exc, name, state["rows"], state["root"] is None) from None
    except DumpError:
        raise
    except BaseException as exc:
        if callback_error and exc is callback_error[0]:
            raise
        if isinstance(exc, (EOFError, OSError, zlib.error)):  # truncated / corrupt gzip, unreadable file
            line = parser.CurrentLineNumber
            raise DumpError(
                f"{name}: cannot read the file after line {line}: {type(exc).__name__}: {exc}",
                name,
                line,
                None,
                state["rows"],
            ) from None
        raise
    if state["root"] is None:
        raise DumpError(f"{name}: no XML content", name, 1, 1, 0, fatal=True)
    return state["rows"]


def _feed(path: Path, parser) -> None:
    with _open_bytes(path) as fh:
        while True:
            chunk = fh.read1(_CHUNK)  # read1: a truncated gzip loses no data already decompressed
            if not chunk:
                break
            parser.Parse(chunk, False)
        parser.Parse(b"", True)


def _malformed(exc: expat.ExpatError, name: str, rows: int, fatal: bool) -> DumpError:
    msg = expat.ErrorString(exc.code)
    if msg == "no element found":
        msg = "unexpected end of file (truncated?)" if rows else "no XML content"
    return DumpError(
        f"{name}: malformed XML at line {exc.lineno}, column {exc.offset + 1}: {msg}",
        name,
        exc.lineno,
        exc.offset + 1,
        rows,
        fatal=fatal,
    )


def iter_posts(path: str | os.PathLike) -> Iterator[dict]:
    """Convenience: every row of a Posts.xml(.gz) as its attribute dict (buffers 1 MiB chunks)."""
    path = Path(path)
    parser = expat.ParserCreate()
    pending: list[dict] = []
    depth = [0]

    def start(tag: str, attrs: dict) -> None:
        if depth[0] == 1 and tag == "row":
            pending.append(attrs)
        depth[0] += 1

    def end(tag: str) -> None:
        depth[0] -= 1

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    name = str(path)
    try:
        with _open_bytes(path) as fh:
            while True:
                chunk = fh.read1(_CHUNK)  # read1: a truncated gzip loses no data already decompressed
                parser.Parse(chunk, not chunk)
                yield from pending
                pending.clear()
                if not chunk:
                    break
    except expat.ExpatError as exc:
        raise DumpError(
            f"{name}: malformed XML at line {exc.lineno}, column {exc.offset + 1}: {expat.ErrorString(exc.code)}",
            name,
            exc.lineno,
            exc.offset + 1,
        ) from None
