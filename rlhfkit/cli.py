"""`rlhfkit` command line: one sub-command per stage, all configured the same way.

    rlhfkit sft --config sft.yaml train.lr=1e-4 --model.name path/to/model --out_dir runs/sft
    rlhfkit sft --help              # every field with its doc and default
    rlhfkit sft … --debug           # a failing command also prints the traceback behind its one-line error

A stage module exposes `CONFIG` (its dataclass), `run(cfg) -> dict`, and optionally `POSITIONAL`:
the config fields that bare positional arguments fill, in order (the last one takes the rest when
it is a list). Modules are imported lazily so `rlhfkit --help` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import traceback
import typing

from rlhfkit.runtime.config import config_help, flag_takes_value, load_config, merge_dicts, parse_overrides
from rlhfkit.runtime.errors import ConfigError, RlhfkitError
from rlhfkit.stages import STAGES

# Commands that are not stages: they take their own arguments (main(argv)).
APPS: dict[str, tuple[str, str]] = {
    "run": ("rlhfkit.apps.runner", "run a whole recipe (data → sft → rm → ppo → eval → report)"),
    "chat": ("rlhfkit.apps.chat", "chat with a model in the browser (Gradio)"),
    "push": ("rlhfkit.apps.push", "upload a stage output (final/, merged model) to the Hugging Face Hub"),
    "rm-eval": ("rlhfkit.apps.rm_eval", "score a reward model on preference pairs, beside length baselines"),
}


def _commands() -> dict[str, tuple[str, str]]:
    return {**{name: (s.module, s.doc) for name, s in STAGES.items()}, **APPS}


def _usage() -> str:
    lines = ["usage: rlhfkit <command> [--config FILE] [key=value | --key value ...]", "", "commands:"]
    for name, (module, doc) in _commands().items():
        if importlib.util.find_spec(module) is not None:
            lines.append(f"  {name:<8} {doc}")
    lines.append("\n`rlhfkit <command> --help` lists that command's options.")
    return "\n".join(lines)


def _split_args(module, argv: list[str]) -> tuple[str | None, dict, list[str]]:
    """Separate --config FILE, positional values and key=value overrides."""
    config_path = None
    positional: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file")
            config_path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            rest.append(arg)
            if flag_takes_value(argv, i):
                rest.append(argv[i + 1])
                i += 1
        elif "=" in arg:
            rest.append(arg)
        else:
            positional.append(arg)
        i += 1
    fields = list(getattr(module, "POSITIONAL", []))
    values: dict = {}
    if positional:
        if not fields:
            raise ConfigError(f"unexpected argument {positional[0]!r}; use key=value")
        hints = typing.get_type_hints(module.CONFIG)
        for j, name in enumerate(fields):
            is_last = j == len(fields) - 1
            tp = hints[name]
            is_list = typing.get_origin(tp) is list or typing.get_origin(tp | None) is list
            if is_last and is_list:
                values[name] = positional[j:]
                positional = []
                break
            if j < len(positional):
                values[name] = positional[j]
        if len(positional) > len(fields):
            raise ConfigError(f"too many positional arguments: {positional[len(fields) :]}")
    return config_path, values, rest


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `rlhfkit sft --help | head`: the reader left; say nothing more (Python docs, signal)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from rlhfkit import __version__

        print(__version__)
        return 0
    name, args = argv[0], argv[1:]
    commands = _commands()
    if name not in commands or importlib.util.find_spec(commands[name][0]) is None:
        print(f"rlhfkit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(commands[name][0])
    if hasattr(module, "main"):  # commands with their own argument handling (e.g. report, chat)
        return module.main(args)
    debug = "--debug" in args  # show the traceback behind a one-line error
    args = [a for a in args if a != "--debug"]
    if "-h" in args or "--help" in args:
        print(
            f"usage: rlhfkit {name} {' '.join(f'[{p.upper()}]' for p in getattr(module, 'POSITIONAL', []))} "
            f"[--config FILE] [key=value ...]\n\n{commands[name][1]}\n\noptions:"
        )
        print(config_help(module.CONFIG))
        return 0
    try:
        config_path, positional, overrides = _split_args(module, args)
        merged = merge_dicts(positional, parse_overrides(overrides))
        cfg = load_config(module.CONFIG, config_path, merged)
        summary = module.run(cfg)
        pushed = _push(cfg, summary)
    except RlhfkitError as exc:
        if debug:
            traceback.print_exc()
        print(f"rlhfkit {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rlhfkit {name}: interrupted (resume with --resume)", file=sys.stderr)
        return 130
    if summary:
        print(json.dumps(summary, indent=2, default=str))
    if pushed:
        print(f"pushed {len(pushed['files'])} files to {pushed['url']}")
    return 0


def _push(cfg, summary):
    """`push_to_hub: REPO_ID`: upload the stage's output once it has finished."""
    if not getattr(cfg, "push_to_hub", None):
        return None
    from rlhfkit.apps.push import push_stage_output, stage_output

    out = stage_output(cfg, summary)
    try:
        return push_stage_output(cfg, summary)
    except RlhfkitError as exc:
        raise RlhfkitError(f"{exc} (the stage finished; retry with `rlhfkit push {out} {cfg.push_to_hub}`)") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
