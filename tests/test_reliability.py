"""Faults injected for real: SIGKILL in the middle of `dvc repro`, racing promotions, bad input through DVC.

Each test here is a row of docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import time

import pytest

from conftest import SMALL_GENERATED, log_tail, make_project, mlflow_client, run_cli, start_logged, write_params

KILLABLE = {
    **SMALL_GENERATED,
    "model": {"decoder_channels": [64, 32, 16, 16, 8]},
    "train": {"patch_size": 96, "patches_per_epoch": 32, "batch_size": 8, "max_epochs": 6,
              "early_stopping_patience": 20},
    "tune": {"n_trials": 1, "epochs_per_trial": 1, "batch_sizes": [8], "heartbeat_s": 2},
}



def _train_runs(client):
    exp = client.get_experiment_by_name("emseg")
    return [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name.startswith("train-")]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """`dvc repro`, SIGKILL to its whole process group once training has checkpointed an epoch, then
    `dvc repro` again."""
    proj = make_project(tmp_path_factory.mktemp("kill") / "proj")
    write_params(proj, KILLABLE)
    log = proj.parent / "killed-repro.log"  # outside the DVC project: not an untracked file of it
    proc = start_logged(["dvc", "repro"], log, cwd=proj, start_new_session=True)
    deadline = time.time() + 900
    try:
        while time.time() < deadline and proc.poll() is None:
            if list((proj / "checkpoints").glob("train-*/checkpoints/last.ckpt")):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"training never wrote a checkpoint:\n{log_tail(log)}")
        os.killpg(proc.pid, signal.SIGKILL)  # dvc and the `emseg train` it started: no cleanup runs
    finally:
        proc.wait()
    killed_state = {
        "model_exists": (proj / "models" / "model.pt").exists(),
        "metrics_exist": (proj / "reports" / "train" / "metrics.json").exists(),
        "statuses": [r.info.status for r in _train_runs(mlflow_client(proj))],
    }
    second = run_cli(["dvc", "repro"], proj)
    return proj, killed_state, second


@pytest.mark.slow
def test_kill_during_train_resumes_from_the_checkpoint(killed_and_resumed):
    proj, killed, second = killed_and_resumed
    # While dead: no half-written output that DVC or a user could take for a result.
    assert not killed["model_exists"] and not killed["metrics_exist"]
    assert killed["statuses"] == ["RUNNING"]  # what SIGKILL leaves behind before the next start
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "resuming from checkpoints/train-" in out
    resumed_from = int(out.split("interrupted after epoch ")[1].split(")")[0])
    assert 0 <= resumed_from < 5
    # The history is whole: the epochs before the kill and those after it, once each.
    hist = (proj / "reports/train/history.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in hist] == list(range(6))
    assert not list((proj / "checkpoints").glob("train-*"))  # removed once the outputs were written
    assert "up to date" in run_cli(["dvc", "status", "dvc.yaml"], proj, check=True).stdout.lower()


@pytest.mark.slow
def test_kill_during_train_marks_the_dead_mlflow_run_failed(killed_and_resumed):
    proj, _, second = killed_and_resumed
    assert "marked 1 run(s) of dead processes as FAILED" in second.stdout + second.stderr
    client = mlflow_client(proj)
    runs = {r.info.status: r for r in _train_runs(client)}
    assert sorted(runs) == ["FAILED", "FINISHED"]
    dead, alive = runs["FAILED"], runs["FINISHED"]
    assert "died without ending the run" in dead.data.tags["emseg.failure"]
    assert alive.data.tags["resumed_from_epoch"] == str(int(alive.data.tags["resumed_from_epoch"]))
    # The resumed run carries the whole curve, so the MLflow UI shows all six epochs in one run.
    steps = [m.step for m in client.get_metric_history(alive.info.run_id, "val_iou")]
    assert sorted(steps) == list(range(6))
    # ...and it is the one the registry got.
    mv = client.get_model_version_by_alias("emseg-unet", "champion")
    assert mv.run_id == alive.info.run_id


@pytest.mark.slow
def test_two_promotions_at_once_leave_exactly_one_champion(killed_and_resumed):
    proj, _, _ = killed_and_resumed
    client = mlflow_client(proj)
    v1 = client.get_model_version_by_alias("emseg-unet", "champion")
    v2 = client.create_model_version("emseg-unet", v1.source, run_id=v1.run_id)
    procs = [subprocess.Popen(["emseg", "promote", "emseg-unet", str(v), "--alias", "champion"], cwd=proj,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for v in (v1.version, v2.version)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    holders = [v.version for v in client.search_model_versions("name='emseg-unet'")
               if "champion" in client.get_model_version("emseg-unet", v.version).aliases]
    assert len(holders) == 1 and str(holders[0]) in (str(v1.version), str(v2.version))
    assert len(client.search_model_versions("name='emseg-unet'")) == 2  # nothing deleted


# ---- Bad input through `dvc repro`, on a project that already holds a good run and a champion ----

def _bad_stacks(tmp_path, case):
    """Write the image/label pair for a data case; return (image, labels, extra data params)."""
    import numpy as np
    import tifffile

    from emseg.data.generate import generate_slice

    img = np.stack([generate_slice(7, z, 192, 192)[0] for z in range(10)])
    lab = np.stack([generate_slice(7, z, 192, 192)[1] for z in range(10)])
    extra = {}
    if case == "corrupt_tiff":
        tifffile.imwrite(tmp_path / "lab.tif", lab)
        (tmp_path / "img.tif").write_bytes(np.random.default_rng(0).bytes(5000))
        return tmp_path / "img.tif", tmp_path / "lab.tif", extra
    if case == "truncated_tiff":
        tifffile.imwrite(tmp_path / "full.tif", img, compression="zlib")
        data = (tmp_path / "full.tif").read_bytes()
        (tmp_path / "img.tif").write_bytes(data[: len(data) * 2 // 3])
    elif case == "shape_mismatch":
        lab = lab[:, :160]
    elif case == "label_values":
        lab = lab.copy()
        lab[0, :5, :5] = 7
    elif case == "all_background":
        lab = np.zeros_like(lab)
    elif case == "nan_image":
        img = img.astype(np.float32)
        img[1, 10:20, 10:20] = np.nan
    elif case == "constant_image":
        img = np.full_like(img, 117)
    elif case == "ignore_everything":
        lab = np.full_like(lab, 128)  # every pixel carries the ignore value
        extra = {"ignore_value": 128}
    if not (tmp_path / "img.tif").exists():
        tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    return tmp_path / "img.tif", tmp_path / "lab.tif", extra


BAD_DATA = {
    "corrupt_tiff": "img.tif: not a readable TIFF file",
    "truncated_tiff": "corrupt or truncated TIFF",
    "shape_mismatch": "label stack shape (10, 160, 192) differs from image stack",
    "label_values": "lab.tif: label values [7] unexpected",
    "all_background": "lab.tif: the training slices [0, 3] hold no foreground",
    "nan_image": "img.tif slice 1: image holds NaN or infinite values",
    "constant_image": "img.tif: image stack is constant",
    "ignore_everything": "every pixel of the train slices [0, 3] is the ignore value",
}
BAD_PARAMS = {
    "patch_larger_than_image": ({"train": {"patch_size": 512}}, "train.patch_size: 512 is larger than the slices ("),
    "lr_zero": ({"train": {"lr": 0}}, "train.lr: Input should be greater than 0"),
    "batch_negative": ({"train": {"batch_size": -4}}, "train.batch_size: Input should be greater than 0"),
    "unknown_encoder": ({"model": {"encoder": "efficientnet-b99"}},
                        "model.encoder: 'efficientnet-b99' is not an encoder"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [*BAD_DATA, *BAD_PARAMS])
def test_bad_input_through_dvc_repro_changes_nothing(repro_project, tmp_path, case):
    import shutil

    good, _ = repro_project
    proj = tmp_path / "proj"
    shutil.copytree(good, proj, symlinks=True)
    client = mlflow_client(proj)
    exp = client.get_experiment_by_name("emseg")
    runs_before = {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id])}
    champion = client.get_model_version_by_alias("emseg-unet", "champion").version
    n_versions = len(client.search_model_versions("name='emseg-unet'"))
    import yaml

    def downstream_lock():  # the stages after the failing one: DVC may record those before it that succeeded
        stages = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
        return {k: stages[k] for k in ("train", "evaluate", "register")}

    lock, model = downstream_lock(), (proj / "models" / "model.pt").read_bytes()

    if case in BAD_DATA:
        img, lab, extra = _bad_stacks(tmp_path, case)
        write_params(proj, {"data": {"source": "tiff", "train_slices": 2, "val_slices": 1, "test_slices": 2,
                                     "tiff": {"image": str(img), "labels": str(lab)}, **extra}})
        expect = BAD_DATA[case]
    else:
        updates, expect = BAD_PARAMS[case]
        write_params(proj, updates)
    proc = run_cli(["dvc", "repro"], proj)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    ours = [ln for ln in out.splitlines() if ln.startswith("emseg ") and ": error: " in ln]
    assert len(ours) == 1 and expect in ours[0], out[-3000:]
    assert "Traceback" not in out
    # The registry and the earlier runs are as they were; a run the failure opened is FAILED, not RUNNING.
    runs_after = {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id])}
    assert {k: runs_after[k] for k in runs_before} == runs_before
    assert all(s == "FAILED" for k, s in runs_after.items() if k not in runs_before)
    assert client.get_model_version_by_alias("emseg-unet", "champion").version == champion
    assert len(client.search_model_versions("name='emseg-unet'")) == n_versions
    # dvc.lock still describes the good model, and `dvc checkout` brings it back byte for byte.
    assert downstream_lock() == lock
    assert not [p for p in (proj / "data").glob(".*tmp*")]
    run_cli(["dvc", "checkout", "--force", "dvc.yaml"], proj, check=True)
    assert (proj / "models" / "model.pt").read_bytes() == model


@pytest.mark.slow
def test_disk_full_while_predicting_is_one_line_and_leaves_nothing(repro_project, tmp_path, shared):
    """A real full disk: a 64 KiB tmpfs (root, as CI runs), else a 64 KiB file-size limit."""
    import resource

    import numpy as np
    import tifffile

    proj, _ = repro_project
    stack = tmp_path / "in.tif"
    tifffile.imwrite(stack, tifffile.imread(shared / "isbi2012" / "train-volume.tif", key=range(4)),
                     photometric="minisblack")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)],
                             capture_output=True).returncode == 0
    limit = None if mounted else (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)))
    try:
        for fmt in ("tiff", "ome-zarr"):
            proc = subprocess.run(["emseg", "predict", "--format", fmt, "--model", str(proj / "models" / "model.pt"),
                                   str(stack), str(tiny / "pred")], cwd=proj, capture_output=True, text=True,
                                  preexec_fn=limit)
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "%|" not in ln]
            assert proc.returncode == 1, proc.stderr[-3000:]
            assert len(lines) == 1 and "pred: cannot write output (" in lines[0], proc.stderr[-3000:]
            assert ("disk full" if mounted else "File too large") in lines[0]
            if fmt == "tiff":
                assert list(tiny.iterdir()) == []  # no partial output, no temporary folder left behind
            else:  # blockwise: only the resumable state, which a rerun with more space continues from
                assert [p.name for p in tiny.iterdir()] in ([], ["pred.partial"])
                assert "run the same command again" in lines[0] or not (tiny / "pred.partial").exists()
                shutil.rmtree(tiny / "pred.partial", ignore_errors=True)
    finally:
        if mounted:
            subprocess.run(["umount", str(tiny)], check=False)
    assert np.asarray(tifffile.imread(stack)).shape == (4, 512, 512)  # the input untouched


def test_a_trial_killed_before_its_first_heartbeat_is_marked_failed_not_left_running(tmp_path):
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    from emseg.tuning import fail_trials_without_heartbeat

    storage = RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=storage)
    orphan = study.ask()  # RUNNING, and its worker died before any heartbeat
    alive = study.ask()
    storage.record_heartbeat(alive._trial_id)  # a live worker's trial: Optuna's own stale check owns it
    assert fail_trials_without_heartbeat(study, storage, grace_s=60) == []  # too young to judge
    time.sleep(1.5)
    assert fail_trials_without_heartbeat(study, storage, grace_s=1) == [orphan.number]
    states = {t.number: t.state for t in study.trials}
    assert states == {orphan.number: TrialState.FAIL, alive.number: TrialState.RUNNING}
    assert fail_trials_without_heartbeat(study, storage, grace_s=1) == []  # idempotent
