"""Generative check of the data-safety invariants (hypothesis): random small stacks, dtypes, file names,
folder layouts, junk beside the slices and output locations, through `emseg predict`, `suggest` and
`fetch` + `prepare` (in-process `emseg.cli.main`, the CLI's own entry point, so that one example costs
a fraction of a second rather than a Python start-up).

For every example: exit 0, or exactly one line `emseg CMD: error: ...` and exit 1; never an exception
(a traceback); the input byte for byte untouched; nothing created, changed or removed outside the
output; and an output that exists carries emseg's marker. Bounded in count (and derandomised on CI),
so it takes well under a minute.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import EPFL
from test_data_safety import tree, weights  # noqa: F401  (weights: the small real network, a fixture)

CI = bool(os.environ.get("CI"))
SETTINGS = dict(deadline=None, derandomize=CI, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Real EM content (a crop with mitochondria) and its labels, loaded once.
_IMG = tifffile.imread(EPFL / "training.tif", key=range(0, 60, 10))[:, 380:444, 460:524]
_LAB = tifffile.imread(EPFL / "training_groundtruth.tif", key=range(0, 60, 10))[:, 380:444, 460:524]


DTYPES = ("uint8", "uint16", "float32", "float_nan", "float_huge", "mixed")
OUTPUTS = ("new", "nested_new", "inside_input_folder", "input_itself", "parent", "existing_file",
           "foreign_folder", "emseg_output", "long_name")


@st.composite
def cases(draw, command: str):
    n = draw(st.integers(5, 6) if command == "prepare" else st.integers(1, 4))
    layout = draw(st.sampled_from(("file", "folder_tif", "folder_png")))
    dtype = draw(st.sampled_from(DTYPES))
    prefix = draw(st.sampled_from(("s", "slice_", "é ", "z-", "")))
    pad = draw(st.sampled_from((0, 3)))
    order = draw(st.permutations(range(n)))  # the order in which files are created on disk
    junk = draw(st.sets(st.sampled_from(("stray_txt", "subfolder", "link_loop", "dir_named_tif"))))
    output = draw(st.sampled_from(OUTPUTS))
    overwrite = draw(st.booleans())
    ignore = draw(st.sampled_from((None, None, 128, 0))) if command == "prepare" else None
    return dict(n=n, layout=layout, dtype=dtype, prefix=prefix, pad=pad, order=order, junk=junk, output=output,
                overwrite=overwrite, ignore=ignore, command=command)


def _slices(dtype: str, n: int, source: np.ndarray) -> list[np.ndarray]:
    out = []
    for z in range(n):
        a = source[z]
        if dtype == "uint16" or (dtype == "mixed" and z == 1):
            a = a.astype(np.uint16) * 257
        elif dtype.startswith("float"):
            a = a.astype(np.float32) / 255
            if z == n - 1 and dtype == "float_nan":
                a[3, 3] = np.nan
            if z == n - 1 and dtype == "float_huge":
                a[3, 3] = -3e38
        out.append(a)
    return out


def _write_stack(where: Path, slices: list[np.ndarray], case: dict) -> Path:
    """The stack as the case lays it out; returns the path to give emseg."""
    if case["layout"] == "file":
        path = where.with_suffix(".tif")
        same = all(s.dtype == slices[0].dtype for s in slices)
        stack = np.stack(slices) if same else np.stack([s.astype(np.uint16) for s in slices])
        tifffile.imwrite(path, stack if len(slices) > 1 else stack[0], photometric="minisblack")
        return path
    where.mkdir()
    png = case["layout"] == "folder_png"
    for z in case["order"]:
        name = f"{case['prefix']}{z + 1:0{case['pad']}d}"
        if png and slices[z].dtype != np.float32:
            from PIL import Image

            Image.fromarray(slices[z]).save(where / f"{name}.png")
        else:
            tifffile.imwrite(where / f"{name}.tif", slices[z])
    if "stray_txt" in case["junk"]:
        (where / "notes.txt").write_text("mine")
    if "subfolder" in case["junk"]:
        (where / "old").mkdir()
        tifffile.imwrite(where / "old" / "x1.tif", slices[0])
    if "link_loop" in case["junk"]:
        (where / "up").symlink_to(where.parent)
    if "dir_named_tif" in case["junk"]:
        (where / "fake.tif").mkdir()
    return where


def _output(ws: Path, inp: Path, case: dict) -> str:
    kind = case["output"]
    if kind == "nested_new":
        return "a/b/pred"
    if kind == "inside_input_folder":
        return str((inp if inp.is_dir() else inp.parent).relative_to(ws) / "pred")
    if kind == "input_itself":
        return str(inp.relative_to(ws))
    if kind == "parent":
        return "."
    if kind == "existing_file":
        (ws / "results.csv").write_text("a,b\n1,2\n")
        return "results.csv"
    if kind == "foreign_folder":
        (ws / "figures").mkdir()
        (ws / "figures" / "fig1.svg").write_text("<svg/>")
        return "figures"
    if kind == "emseg_output":
        (ws / "old-pred").mkdir()
        (ws / "old-pred" / ".emseg-output.json").write_text(json.dumps({"written_by": "emseg"}))
        (ws / "old-pred" / "summary.json").write_text("{}")
        return "old-pred"
    if kind == "long_name":
        return "q" * 300
    return "pred"


def _outside(snapshot: dict[str, str], outputs: list[str]) -> dict[str, str]:
    def inside(key: str) -> bool:
        # the output, what is in it, and the folders made to hold it
        return any(key == out or key.startswith(out + "/") or out.startswith(key + "/") for out in outputs)

    return {k: v for k, v in snapshot.items() if not inside(k)}


def _run(argv: list[str], cwd: Path) -> tuple[int, str]:
    from emseg.cli import main

    err = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)  # an exception escaping here is a traceback for the user: the test fails
    finally:
        os.chdir(old)
    return rc, err.getvalue()


def _check(ws: Path, argv: list[str], outputs: list[str], command: str) -> None:
    before = tree(ws)
    rc, err = _run(argv, ws)
    after = tree(ws)
    assert rc in (0, 1), (rc, err)
    event(f"{command}: exit {rc}"
          + (f" ({err.strip().splitlines()[-1].split(': error: ')[-1].split(':')[-1][:40].strip()})"
             if rc else ""))
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln and "it/s]" not in ln]
    if rc == 1:
        assert len(lines) == 1 and lines[0].startswith(f"emseg {command}: error: "), err
        assert after == before, "a refused or failed command changed files"
        return
    real_outputs = [o for o in outputs if o != "."]
    assert _outside(after, real_outputs) == _outside(before, real_outputs), "files outside the output changed"
    for out in real_outputs:
        if command in ("predict", "suggest"):
            assert (ws / out / ".emseg-output.json").is_file()


@settings(max_examples=60, **SETTINGS)
@given(case=st.one_of(cases("predict"), cases("suggest")))
def test_predict_and_suggest_keep_every_invariant(weights, case):  # noqa: F811 (the fixture)
    with tempfile.TemporaryDirectory() as d:
        ws = Path(d)
        inp = _write_stack(ws / "stack", _slices(case["dtype"], case["n"], _IMG), case)
        out = _output(ws, inp, case)
        argv = [case["command"], "--model", str(weights), str(inp.relative_to(ws)), out]
        if case["command"] == "suggest":
            argv += ["-k", "2", "--patch-size", "32"]
        if case["overwrite"]:
            argv.append("--overwrite")
        _check(ws, argv, [out], case["command"])


@settings(max_examples=60, **SETTINGS)
@given(case=cases("prepare"))
def test_fetch_and_prepare_keep_every_invariant(case):
    with tempfile.TemporaryDirectory() as d:
        ws = Path(d)
        (ws / "in").mkdir()
        img = _write_stack(ws / "in" / "image", _slices(case["dtype"], case["n"], _IMG), case)
        lab = _write_stack(ws / "in" / "labels", [s for s in _LAB[:case["n"]]], case)
        params = {"data": {"source": "tiff", "train_slices": 1, "val_slices": 1, "test_slices": 1,
                           "ignore_value": case["ignore"],
                           "tiff": {"image": str(img.relative_to(ws)), "labels": str(lab.relative_to(ws))}}}
        (ws / "params.yaml").write_text(yaml.safe_dump(params))
        for command in ("fetch", "prepare"):
            _check(ws, [command], ["data"], command)
            if not (ws / "data" / ("raw" if command == "fetch" else "prepared")).is_dir():
                break
        if (ws / "data" / "prepared").is_dir():
            manifest = json.loads((ws / "data" / "prepared" / "manifest.json").read_text())
            files = manifest["files"]["train_image"].get("slice_files")
            if files:  # natural order, whatever order the files were created in
                numbers = [int("".join(c for c in f.rsplit(".", 1)[0] if c.isdigit())) for f in files]
                assert numbers == sorted(numbers) == list(range(1, case["n"] + 1))
