"""DVC conventions (issue 19 item 5): the model is a declared artifact, and `dvc exp show` compares
experiments by their headline metrics and params."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, make_project, run_cli, write_params

pytestmark = pytest.mark.slow


def _rows(exp_show: list) -> list[dict]:
    """Flatten `dvc exp show --json`: the baseline commit and each experiment, with their params and metrics."""
    out = []
    for commit in exp_show:
        for entry in [commit] + [e for exp in commit.get("experiments") or [] for e in exp.get("revs", [])]:
            data = entry.get("data") or {}
            params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
            metrics = {f: (m.get("data") or {}) for f, m in (data.get("metrics") or {}).items()}
            out.append({"name": entry.get("name"), "rev": entry.get("rev"), "params": params, "metrics": metrics})
    return out


def test_two_experiments_show_their_params_and_metrics_and_the_model_is_an_artifact(tmp_path):
    proj = make_project(tmp_path / "proj")
    write_params(proj, TINY)
    run_cli(["git", "add", "-A"], proj, check=True)
    run_cli(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], proj, check=True)

    # The model is declared once, under artifacts:, as a model.
    from dvc.repo import Repo

    declared = Repo(str(proj)).artifacts.read()["dvc.yaml"]
    assert declared["emseg-unet"].type == "model" and declared["emseg-unet"].path == "models/emseg.pt"

    # Two experiments; the second only turns on flip TTA at evaluation, so DVC reruns evaluate and register only.
    first = run_cli(["dvc", "exp", "run", "-n", "seed-7", "-S", "seed=7"], proj, check=True)
    assert "Running stage 'train'" in first.stdout
    second = run_cli(["dvc", "exp", "run", "-n", "tta", "-S", "evaluate.inference.tta=true"], proj, check=True)
    assert "Running stage 'train'" not in second.stdout and "Running stage 'evaluate'" in second.stdout

    shown = run_cli(["dvc", "exp", "show", "--json"], proj, check=True).stdout
    rows = {r["name"]: r for r in _rows(json.loads(shown)) if r["name"] in ("seed-7", "tta")}
    assert set(rows) == {"seed-7", "tta"}, shown[:2000]
    for name, row in rows.items():
        test = row["metrics"]["reports/evaluate/metrics.json"]
        assert 0 < test["iou"] <= 1 and "instance_f1" in test, name
        assert 0 < row["metrics"]["reports/train/metrics.json"]["best_val_iou"] <= 1, name
        assert row["params"]["model"]["encoder"] and row["params"]["seed"] == 7, name
    assert not rows["seed-7"]["params"]["evaluate"]["inference"]["tta"]
    assert rows["tta"]["params"]["evaluate"]["inference"]["tta"]
    # The same trained network, evaluated two ways: identical training metrics, its own test metrics.
    assert (rows["seed-7"]["metrics"]["reports/train/metrics.json"]
            == rows["tta"]["metrics"]["reports/train/metrics.json"])
