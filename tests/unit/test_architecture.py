"""The package's folders are its layers: every import points down (or sideways within a layer), the
pure-math layer imports no HF library, no private name crosses a module, and the CLI and the recipe
runner read one stage registry."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# bottom → top; a module may import from its own layer or any layer before it
LAYERS = ["runtime", "algorithms", "inputs", "models", "rewards", "data", "stages", "apps", "cli", "__init__"]
PACKAGE = REPO / "rlhfkit"


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts == ["rlhfkit"]:
        return "__init__"
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every rlhfkit import in a file, lazy ones inside functions too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rlhfkit":
            names = [a.name for a in node.names]
            if node.module == "rlhfkit":  # from rlhfkit import x: the submodule x (or the package itself)
                out += [
                    (
                        f"rlhfkit.{n}" if (PACKAGE / n).exists() or (PACKAGE / f"{n}.py").exists() else "rlhfkit",
                        [n],
                        node.lineno,
                    )
                    for n in names
                ]
            else:
                out.append((node.module, names, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "rlhfkit"]
    return out


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield path, module


def test_every_module_lives_in_a_layer_folder():
    loose = [m for _, m in _modules() if _layer(m) not in LAYERS and m != "rlhfkit"]
    assert not loose, f"modules outside the layer folders {LAYERS}: {loose}"


def test_imports_point_down():
    bad = []
    for path, module in _modules():
        here = LAYERS.index(_layer(module))
        for target, names, line in _imports(path):
            if target == "rlhfkit" and names == ["__version__"]:  # package metadata, not a layer
                continue
            if LAYERS.index(_layer(target)) > here:
                bad.append(f"{path.relative_to(REPO)}:{line} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)


def test_algorithms_are_pure_torch():
    hf = ("transformers", "peft", "accelerate", "datasets", "trl")
    bad = []
    for path in (PACKAGE / "algorithms").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in hf]
    assert not bad, bad


def test_no_private_name_crosses_a_module():
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {n} from {target}"
        for path, _ in _modules()
        for target, names, line in _imports(path)
        for n in names
        if n.startswith("_") and n != "__version__"
    ]
    assert not bad, "\n".join(bad)


def test_cli_and_recipe_runner_read_one_stage_registry():
    from rlhfkit import cli, stages
    from rlhfkit.apps import runner

    assert cli.STAGES is stages.STAGES and runner.STAGES is stages.STAGES
    assert set(runner.recipe_stages()) <= set(cli._commands()) and "merge" not in runner.recipe_stages()
    import importlib

    for name, stage in stages.STAGES.items():  # every registered stage is importable and has its entry point
        module = importlib.import_module(stage.module)
        assert hasattr(module, "run") or hasattr(module, "main"), name


def test_stages_do_not_import_each_other():
    """Stages talk only through the run directory: no stage module imports another stage module."""
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {target}"
        for path, module in _modules()
        if module.startswith("rlhfkit.stages.")
        for target, _, line in _imports(path)
        if target.startswith("rlhfkit.stages.") and target != module
    ]
    assert not bad, "\n".join(bad)
