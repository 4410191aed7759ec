"""Honest DVC: every stage depends on all the code its command runs, so `dvc status` tells the truth.

The import closure of a stage is read statically from the source (every `import` and `from ... import`
of an `emseg` module, also those inside functions, and the packages above each module), starting at
the stage's module under `emseg/stages/` and the CLI that dispatches to it. A file of the closure that
no `deps` entry of the stage covers (the file itself or a folder above it) fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SRC = ROOT / "src"
PIPELINES = [ROOT / "dvc.yaml", *sorted((ROOT / "pipelines").glob("*/dvc.yaml"))]


def _module_file(name: str) -> Path | None:
    p = SRC.joinpath(*name.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


def _imported(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "emseg"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "emseg":
                found.add(name)
                found |= {f"{name}.{a.name}" for a in node.names if _module_file(f"{name}.{a.name}")}
    return found


def import_closure(*roots: str, shallow: tuple[str, ...] = ()) -> set[Path]:
    """Files of every emseg module reachable from ``roots``; ``shallow`` modules count, but their own
    imports are not followed (the CLI: its imports inside functions serve other commands)."""
    seen: set[str] = set()
    todo = list(roots) + list(shallow)
    while todo:
        name = todo.pop()
        f = _module_file(name)
        if name in seen or f is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # packages above run their __init__
        if name not in shallow:
            todo += sorted(_imported(f, name))
    return {_module_file(m).relative_to(ROOT) for m in seen}


def _stages():
    for dvc_yaml in PIPELINES:
        for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
            command = stage["cmd"].split()[1]
            yield pytest.param(dvc_yaml, name, stage, command, id=f"{dvc_yaml.relative_to(ROOT)}:{name}")


@pytest.mark.parametrize("dvc_yaml, name, stage, command", list(_stages()))
def test_every_stage_depends_on_the_code_it_runs(dvc_yaml, name, stage, command):
    wdir = (dvc_yaml.parent / stage.get("wdir", ".")).resolve()
    deps = [(wdir / d).resolve().relative_to(ROOT) for d in stage.get("deps", [])]
    code = import_closure(f"emseg.stages.{command.replace('-', '_')}", shallow=("emseg.cli",))
    assert Path("src/emseg/stages") / f"{command.replace('-', '_')}.py" in code
    missing = sorted(str(f) for f in code if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"{dvc_yaml.relative_to(ROOT)} stage {name}: deps miss {missing}"


def test_the_closure_sees_imports_inside_functions():
    """The check has teeth: `tune` reaches the training code only through imports inside its functions."""
    code = import_closure("emseg.stages.tune", shallow=("emseg.cli",))
    assert Path("src/emseg/model/train.py") in code and Path("src/emseg/cli.py") in code
    assert Path("src/emseg/evaluate.py") not in import_closure("emseg.stages.fetch", shallow=("emseg.cli",))
