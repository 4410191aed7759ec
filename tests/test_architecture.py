"""The package's shape, read from its source: no import cycle between emseg modules, and the model and
data layers know nothing of MLflow, DVC or Optuna (only `emseg.registry` touches `models:/`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from emseg.errors import EmsegError

PACKAGE = ROOT / "src" / "emseg"
SERVICES = ("mlflow", "dvc", "optuna", "optuna_integration")


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(path: Path, name: str, mods: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(emseg modules, top-level outside packages) that a module imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] == "emseg":
                if n in mods and n != name:
                    inside.add(n)
            elif n:
                outside.add(n.split(".")[0])
    return inside, outside


def _graph():
    mods = _modules()
    return {m: _imports(f, m, mods) for m, f in mods.items()}


def test_no_import_cycle_between_emseg_modules():
    graph = {m: {d for d in deps if not m.startswith(d + ".") and d != "emseg"} for m, (deps, _) in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_model_and_data_layers_import_no_tracking_or_pipeline_service():
    offenders = {m: sorted(out & set(SERVICES)) for m, (deps, out) in _graph().items()
                 if m.startswith(("emseg.model", "emseg.data")) and out & set(SERVICES)}
    assert not offenders, offenders
    reach = {m: sorted(d for d in deps if d in ("emseg.tracking", "emseg.registry") or d.startswith("emseg.stages"))
             for m, (deps, _) in _graph().items() if m.startswith(("emseg.model", "emseg.data"))}
    assert not any(reach.values()), {m: r for m, r in reach.items() if r}


def test_only_the_registry_module_spells_the_registry_prefix():
    spelled = sorted(str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py")
                     if '"models:/' in f.read_text() and f.name != "registry.py")
    # config.py names the default pretrained URI as a value, cli.py in --help text: values, not lookups.
    assert set(spelled) <= {"config.py", "cli.py"}, spelled
    # Registry writes and alias reads happen in registry.py alone (pretrain registers through it too).
    calls = ("register_model(", "set_registered_model_alias(", "get_model_version_by_alias(", "delete_registered_model")
    writers = sorted(str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py")
                     if f.name != "registry.py" and any(c in f.read_text() for c in calls))
    assert writers == [], writers


def test_the_checks_see_a_cycle_and_a_service_import(tmp_path, monkeypatch):
    """The graph reader itself: a planted cycle and a planted MLflow import are found."""
    pkg = tmp_path / "emseg"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from emseg import b\n")
    (pkg / "b.py").write_text("def f():\n    from emseg.a import x\n")
    (pkg / "model" / "net.py").write_text("def g():\n    import mlflow\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    import pytest

    with pytest.raises(AssertionError, match="import cycle: emseg.a -> emseg.b -> emseg.a"):
        test_no_import_cycle_between_emseg_modules()
    with pytest.raises(AssertionError, match="mlflow"):
        test_model_and_data_layers_import_no_tracking_or_pipeline_service()


def test_derived_training_settings_are_validated_and_name_their_section():
    """The further pipelines derive their training settings through config.derive: the schema checks
    them again (cross-field checks too), and an error names the section the values came from."""
    import pytest

    from emseg.active.loop import round_params
    from emseg.config import derive, load_params
    from emseg.errors import ConfigError

    params = load_params(ROOT / "params.yaml")
    assert derive(params, {}, "x") == params
    got = derive(params, {"train": {"lr": 1e-4, "init": {"mode": "scratch"}}}, "x")
    assert got.train.lr == 1e-4 and got.train.patch_size == params.train.patch_size  # merged, not replaced
    with pytest.raises(ConfigError, match=r"^params.yaml: pretrain \(.*\): train.patch_sise: unknown key$"):
        derive(params, {"train": {"patch_sise": 256}}, "params.yaml: pretrain (its settings as train.*)")
    small = derive(params, {"model": {"input_scale": 0.25}}, "x")
    with pytest.raises(ConfigError, match="active .*train.patch_size: 64 px at model.input_scale 0.25 leaves 16 px"):
        round_params(small, small.active.model_copy(update={"patch_size": 64}), epochs=1, seed=0)
    # No pipeline builds training settings with pydantic's unvalidated model_copy any more.
    for rel in ("stages/pretrain.py", "stages/learning_curve.py", "active/loop.py"):
        assert "train.model_copy(" not in (ROOT / "src/emseg" / rel).read_text(), rel


# --- Paths named once: emseg.paths and the dvc.yaml files agree ------------------------------------

PIPELINES = [ROOT / "dvc.yaml", *sorted((ROOT / "pipelines").glob("*/dvc.yaml"))]
PATH_LITERAL = re.compile(r"^(data/(raw|prepared)|models/|reports/|optuna/)|^(models|data/raw|data/prepared)$")


def _declared(files=PIPELINES) -> tuple[set[str], set[str]]:
    """(outs, non-code deps) of every stage of these dvc.yaml files, as paths relative to the project root."""
    outs, deps = set(), set()
    for dvc_yaml in files:
        for stage in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
            wdir = (dvc_yaml.parent / stage.get("wdir", ".")).resolve()
            rel = lambda p: str((wdir / p).resolve().relative_to(ROOT))  # noqa: E731
            for key in ("outs", "metrics", "plots"):
                outs |= {rel(next(iter(o)) if isinstance(o, dict) else o) for o in stage.get(key, [])}
            deps |= {rel(d) for d in stage.get("deps", []) if not d.startswith("src/")}
    return outs, deps


def _covered(path: str, by: set[str]) -> bool:
    return any(path == b or path.startswith(b + "/") for b in by)


def test_dvc_yaml_declares_exactly_the_paths_the_code_names():
    from emseg import paths

    named = {v for k, v in vars(paths).items() if k.isupper() and isinstance(v, str)}
    inputs = {paths.ANNOTATIONS_DIR}  # the user's painted crops: a dependency no stage writes
    scratch = {paths.PARAMS, paths.CHECKPOINT_ROOT} | inputs  # the params file and git-ignored checkpoints: no outs
    outs, deps = _declared()
    # Every declared output and every data dependency is a path of emseg.paths or lies inside one.
    assert not {o for o in outs if not _covered(o, named)}, "dvc.yaml outs missing from emseg/paths.py"
    assert not {d for d in deps if not _covered(d, named)}, "dvc.yaml deps missing from emseg/paths.py"
    # Every path the code writes is a declared output or a folder of declared outputs ...
    for p in named - scratch:
        assert p in outs or any(o.startswith(p + "/") for o in outs), f"emseg.paths {p!r}: no stage declares it"
    # ... and every data dependency is some stage's output.
    assert all(_covered(d, outs | inputs) for d in deps), sorted(d for d in deps if not _covered(d, outs | inputs))


def test_no_module_but_paths_spells_a_pipeline_path():
    offenders = []
    for name, f in _modules().items():
        if name == "emseg.paths":
            continue
        tree = ast.parse(f.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        offenders += [f"{f.relative_to(ROOT)}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
                      if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
                      and PATH_LITERAL.match(n.value)]
    assert not offenders, offenders


def test_stage_modules_are_thin():
    """Stage modules wire a stage to the core modules: study set-up, learning-curve and active-learning
    logic live in the core, so no stage module grows past about 100 lines."""
    long = {f.name: n for f in sorted((ROOT / "src/emseg/stages").glob("*.py"))
            if (n := len(f.read_text().splitlines())) > 110}
    assert not long, long


def test_postprocess_comes_from_the_weights_or_an_older_versions_tags():
    from emseg.registry import postprocess_of

    record = {"threshold": 0.4, "tta": True, "instances": {"min_size": 30, "h": 6.0, "smooth": 1.0}}
    old_tags = {"tta": "false", "watershed_h": "4"}
    assert postprocess_of({"postprocess": record}, old_tags) == record  # the file's own record wins
    legacy = postprocess_of({}, old_tags)  # registered before files carried a record
    assert legacy == {"tta": False, "instances": {"h": 4.0}, "chosen_on": "this version's registry tags"}
    assert postprocess_of({}, {"test_iou": "0.8"}) == {} and postprocess_of({}) == {}
    for damaged in ({"threshold": 0.4}, ["threshold"], {"threshold": 0.4, "tta": True, "instances": 6}):
        with pytest.raises(EmsegError, match="m.pt: its post-processing record is damaged"):
            postprocess_of({"postprocess": damaged}, name="m.pt")
    with pytest.raises(EmsegError, match="watershed_h='six' is not a number"):
        postprocess_of({}, {"watershed_h": "six"})
