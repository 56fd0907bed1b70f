"""`rlhfkit run RECIPE.yaml`: the stages of a recipe in one run directory.

    run_dir: runs/x
    vars: {model: SmolLM2-135M-Instruct}        # "{model}", "{run_dir}" are substituted in strings
    stages: [data, sft, rm, ppo, eval, report]
    sft: {model: {name: "{model}"}, ...}         # each section is that stage's config (validated by it)

Each stage writes <run_dir>/<stage>/ and a marker <run_dir>/.stages/<stage>.json. A stage whose marker says done with
the same fingerprint (its resolved config + every earlier stage's fingerprint) is skipped; an
interrupted one resumes; a changed one — or one after a changed one — re-runs from scratch, and the
log says why. Overrides: `rlhfkit run RECIPE sft.train.lr=1e-4 vars.model=path`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import time
from pathlib import Path

import yaml

from rlhfkit.runtime.card import refresh_cards
from rlhfkit.runtime.config import load_config, merge_dicts, parse_overrides, read_yaml, to_dict
from rlhfkit.runtime.errors import ConfigError, RlhfkitError
from rlhfkit.runtime.io import atomic_write_json, atomic_write_text, contents, lock_dir, written_by_rlhfkit
from rlhfkit.stages import STAGES

MARKERS = ".stages"  # <run_dir>/.stages/<stage>.json: outside the stage dirs, which stages may wipe
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "resources" / "default_recipe.yaml"
TOP_KEYS = {"run_dir", "vars", "stages", "description"}


def recipe_stages() -> list[str]:
    """The stages a recipe may list (the shared registry, `rlhfkit.stages.STAGES`)."""
    return [name for name, s in STAGES.items() if s.in_recipes]


def _fill(text: str, values: dict) -> str:
    """Replace only {name} for names in `values`; other braces (templates) stay as they are."""
    for k, v in values.items():
        text = text.replace("{" + k + "}", str(v))
    return text


def _subst(node, values: dict):
    if isinstance(node, str):
        return _fill(node, values)
    if isinstance(node, list):
        return [_subst(x, values) for x in node]
    if isinstance(node, dict):
        return {k: _subst(v, values) for k, v in node.items()}
    return node


def load_recipe(path: str | Path | None, overrides: list[str]) -> dict:
    path = Path(path) if path else DEFAULT_RECIPE
    recipe = read_yaml(path, "recipe")
    recipe = merge_dicts(recipe, parse_overrides(overrides))
    stages = recipe.get("stages")
    if not stages or not isinstance(stages, list):
        raise ConfigError(f"{path}: 'stages' must list the stages to run ({', '.join(recipe_stages())})")
    for key in recipe:
        if key not in TOP_KEYS and key not in recipe_stages():
            raise ConfigError(
                f"{path}: unknown recipe key '{key}' (stages: {', '.join(recipe_stages())}; also {sorted(TOP_KEYS)})"
            )
    for s in stages:
        if s not in recipe_stages():
            raise ConfigError(f"{path}: unknown stage '{s}' (known: {', '.join(recipe_stages())})")
    run_dir = recipe.get("run_dir") or "runs/" + path.stem
    values = {**{k: str(v) for k, v in (recipe.get("vars") or {}).items()}, "run_dir": run_dir}
    values = {k: _fill(v, values) for k, v in values.items()}
    recipe = _subst(recipe, values)
    recipe["run_dir"] = run_dir
    recipe["_path"] = str(path)
    return recipe


def _stage_config(name: str, section: dict, out: Path):
    module = importlib.import_module(STAGES[name].module)
    if not hasattr(module, "CONFIG"):
        return module, None
    section = {**section, "out_dir": str(out)}
    try:
        return module, load_config(module.CONFIG, overrides=section)
    except ConfigError as exc:
        raise ConfigError(f"[{name}] {exc}") from exc


def _fingerprint(cfg, upstream: str) -> str:
    data = to_dict(cfg) if cfg is not None else {}
    for k in ("out_dir", "overwrite", "resume", "allow_config_change", "push_to_hub"):
        data.pop(k, None)
    return hashlib.sha256((upstream + json.dumps(data, sort_keys=True, default=str)).encode()).hexdigest()[:16]


def run_recipe(recipe: dict, overwrite: bool = False) -> dict:
    run_dir = Path(recipe["run_dir"])
    lock = lock_dir(run_dir)  # noqa: F841  (held until this process ends: one `rlhfkit run` per run_dir)
    atomic_write_text(
        run_dir / "recipe.yaml", yaml.safe_dump({k: v for k, v in recipe.items() if k != "_path"}, sort_keys=False)
    )
    upstream, summaries, rerun_rest = "", {}, overwrite
    pushes: list[tuple[str, object, dict | None]] = []
    for name in recipe["stages"]:
        out = run_dir / name
        module, cfg = _stage_config(name, recipe.get(name) or {}, out)
        fp = _fingerprint(cfg, upstream)
        marker = _read_marker(run_dir, name)
        if marker and marker.get("fingerprint") == fp and marker.get("status") == "done" and not rerun_rest:
            print(f"[run] {name}: done earlier with the same config — skipped")
            summaries[name] = marker.get("summary")
            upstream = fp
            if getattr(cfg, "push_to_hub", None) and (marker.get("pushed") or {}).get("repo") != cfg.push_to_hub:
                pushes.append((name, cfg, marker.get("summary")))  # a push that failed (or was added) earlier
            continue
        resume = False
        if marker and not rerun_rest:
            if marker.get("fingerprint") != fp:
                why = "its config" if marker.get("upstream") == upstream else "an earlier stage"
                print(f"[run] {name}: {why} changed since it ran — re-running {name} and every stage after it")
                rerun_rest = True
            elif marker.get("status") == "running":
                resume = STAGES[name].resumable
                print(f"[run] {name}: interrupted earlier — " + ("resuming" if resume else "starting again"))
        if not overwrite and out.is_dir() and contents(out) and marker is None and not written_by_rlhfkit(out):
            # whatever the earlier stages did: a folder rlhfkit did not write is never wiped without --overwrite
            raise RlhfkitError(f"{out} exists but was not written by `rlhfkit run`: move it away or pass --overwrite")
        summary = _execute_stage(run_dir, name, module, cfg, fp, upstream, resume)
        summaries[name] = summary
        upstream = fp
        rerun_rest = True  # a stage that ran invalidates the ones after it
        if getattr(cfg, "push_to_hub", None):
            pushes.append((name, cfg, summary))
    refresh_cards(run_dir)  # the cards of every final/ now hold the eval figures too
    for name, cfg, summary in pushes:
        _push(run_dir, name, cfg, summary)
    return summaries


def _execute_stage(run_dir: Path, name: str, module, cfg, fp: str, upstream: str, resume: bool):
    """Run one stage between a "running" and a "done" marker, so that the next run sees how it ended."""
    if cfg is not None:
        if hasattr(cfg, "resume"):
            cfg.resume = resume
        cfg.overwrite = not resume
    _write_marker(run_dir, name, {"status": "running", "fingerprint": fp, "upstream": upstream, "started": time.time()})
    print(f"[run] {name}: running → {run_dir / name}")
    t0 = time.time()
    summary = module.run(cfg) if cfg is not None else _run_main(module, name, run_dir)
    _write_marker(
        run_dir,
        name,
        {
            "status": "done",
            "fingerprint": fp,
            "upstream": upstream,
            "seconds": time.time() - t0,
            "summary": summary,
        },
    )
    return summary


def _push(run_dir: Path, name: str, cfg, summary: dict | None) -> None:
    """Push one stage's output after the whole recipe ran; the marker records it, so a failed push is
    retried by the next `rlhfkit run` without re-running the stage."""
    from rlhfkit.apps.push import push_stage_output

    print(f"[run] {name}: pushing to {cfg.push_to_hub}")
    try:
        result = push_stage_output(cfg, summary)
    except RlhfkitError as exc:
        raise RlhfkitError(
            f"[{name}] {exc} (the stage is done; run the same command again to retry the push)"
        ) from None
    marker = _read_marker(run_dir, name) or {}
    _write_marker(run_dir, name, {**marker, "pushed": {"repo": cfg.push_to_hub, "commit": result.get("commit")}})


def _run_main(module, name: str, run_dir: Path):
    code = module.main([str(run_dir)])
    if code:
        raise RlhfkitError(f"stage {name} failed with exit code {code}")
    return {"status": "ok"}


def _read_marker(run_dir: Path, name: str) -> dict | None:
    try:
        return json.loads((run_dir / MARKERS / f"{name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_marker(run_dir: Path, name: str, data: dict) -> None:
    atomic_write_json(run_dir / MARKERS / f"{name}.json", data)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(f"With no RECIPE, runs the embedded default: {DEFAULT_RECIPE.name} (offline, ≈ 30 min on 2 CPU cores).")
        return 0
    recipe_path = argv[0] if argv and not argv[0].startswith("-") and "=" not in argv[0] else None
    rest = argv[1:] if recipe_path else argv
    overwrite, debug = "--overwrite" in rest, "--debug" in rest
    rest = [a for a in rest if a not in ("--overwrite", "--debug")]
    try:
        recipe = load_recipe(recipe_path, rest)
        summaries = run_recipe(recipe, overwrite=overwrite)
    except RlhfkitError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"rlhfkit run: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rlhfkit run: interrupted — run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps({"run_dir": recipe["run_dir"], "stages": summaries}, indent=2, default=str))
    return 0
