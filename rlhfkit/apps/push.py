"""`rlhfkit push PATH REPO_ID [--private] [--revision BRANCH]`: upload a stage output to the Hub.

PATH is a final/ folder, a merged model, or a stage folder (its final/ is pushed). Only the files
that make it reload on its own are uploaded (runtime.hub.upload_files); a folder that depends on a
path of this machine is refused with the reason. An rlhfkit model card there is refreshed first, so
its loading snippets name the repo. Exit 0 pushed, 1 refused or failed (one line), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlhfkit.runtime import card, hub
from rlhfkit.runtime.errors import RlhfkitError

PROG = "rlhfkit push"


def target(path: str | Path) -> Path:
    """The folder to push: PATH itself, or PATH/final for a stage folder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise RlhfkitError(f"{p}: no such folder")
    if (p / "final").is_dir() and not any((p / f).exists() for f in hub.WEIGHT_FILES):
        return p / "final"
    return p


def _refresh(folder: Path, repo_id: str) -> None:
    stage_dir = folder.parent if folder.name == "final" else None
    card.write_card(folder, stage_dir=stage_dir, repo_id=repo_id)


def push_folder(path, repo_id: str, private: bool = False, revision: str | None = None, api=None) -> dict:
    return hub.push(target(path), repo_id, private=private, revision=revision, api=api, refresh_card=_refresh)


def stage_output(cfg, summary: dict | None) -> Path:
    """What a stage wrote: its final/, or the merged folder of `rlhfkit merge`."""
    return Path((summary or {}).get("merged") or Path(cfg.out_dir) / "final")


def push_stage_output(cfg, summary: dict | None = None, api=None) -> dict | None:
    """The `push_to_hub: REPO_ID` key of a stage config: push what the stage wrote; None when unset."""
    repo = getattr(cfg, "push_to_hub", None)
    if not repo:
        return None
    return push_folder(stage_output(cfg, summary), repo, api=api)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("path", metavar="PATH", help="final/ folder, merged model, or stage folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repo, 'org/name' (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, metavar="BRANCH", help="push to this branch (created if missing)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded and stop")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.dry_run:
            folder = target(args.path)
            files, problems = hub.upload_files(folder)
            print(
                json.dumps({"folder": str(folder), "files": files, "left_out": hub.left_out(folder, files)}, indent=2)
            )
            for p in problems:
                print(f"{PROG}: would refuse: {p}", file=sys.stderr)
            return 1 if problems else 0
        result = push_folder(args.path, args.repo_id, args.private, args.revision)
    except RlhfkitError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"pushed {len(result['files'])} files to {result['url']} ({result['revision']})")
    return 0
