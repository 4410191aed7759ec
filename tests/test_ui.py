"""The real MLflow UI, in Debian's headless Chromium driven by Playwright, on a real pipeline's store.

What a user sees after `dvc repro` and `make ui`: the runs with their key metrics, a run's per-epoch
curves and artifacts, and the registered model with its `champion` alias. Screenshots are kept in
test-artifacts/ui/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import ROOT, free_port, log_tail, start_logged, wait_until_answers

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "test-artifacts" / "ui"
# Chromium as root in a container, and no calls home: this machine has no internet.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def ui(repro_project):
    proj, _ = repro_project
    port = free_port()
    log = proj.parent / "mlflow-ui.log"  # beside the project, not an untracked file in it
    server = start_logged(["mlflow", "ui", "--backend-store-uri", f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}",
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "2"], log, cwd=proj)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{base}/health", server, 120, "mlflow ui", lambda: log_tail(log))
        yield proj, base, log
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    assert shutil.which("chromium") or (ROOT / CHROMIUM).exists(), \
        "Debian's chromium is missing: `apt-get install chromium` (.ci/run does it)"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # Wide enough that the runs table renders its metric columns beside MLflow's assistant panel.
        pg = browser.new_page(viewport={"width": 2800, "height": 1000})
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def _see(page, text: str, log, exact: bool = False) -> None:
    """Wait until ``text`` is visible; if it never is, fail with what the page and the server showed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.get_by_text(text, exact=exact).first.wait_for()
    except PlaywrightTimeout:
        shot = SHOTS / f"missing-{''.join(c if c.isalnum() else '-' for c in text)}.png"
        page.screenshot(path=str(shot))
        pytest.fail(f"{text!r} never appeared on {page.url} (screenshot {shot}).\nPage:\n"
                    f"{page.inner_text('body')[-1500:]}\nmlflow ui:\n{log_tail(log, 2000)}")


def _store(proj):
    """The client, the experiment and the run behind the registered champion (what a user opens)."""
    uri = f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # an earlier test in this process may have pointed it elsewhere
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("emseg")
    train = client.get_run(client.get_model_version_by_alias("emseg-unet", "champion").run_id)
    return client, exp, train


@pytest.mark.slow
def test_experiment_page_lists_the_runs_with_their_key_metrics(ui, page):
    proj, base, log = ui
    _, exp, train = _store(proj)
    # The address `make ui` prints: the runs view of MLflow's "Model training" side, not GenAI traces.
    page.goto(f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
    _see(page, train.info.run_name, log)
    _see(page, "tune-", log)
    # A user adds the metric columns: Columns, search for the metric, tick it.
    page.get_by_role("button", name="Columns", exact=True).click()
    for metric in ("test_iou", "best_val_iou"):
        page.get_by_placeholder("Search columns").fill(metric)
        page.wait_for_timeout(800)
        page.get_by_role("dialog").get_by_text(metric, exact=True).click()
        page.wait_for_timeout(800)
    page.keyboard.press("Escape")
    _see(page, str(train.data.metrics["test_iou"])[:6], log)
    page.screenshot(path=str(SHOTS / "experiment_runs.png"))
    table = page.inner_text("body")
    for metric in ("test_iou", "best_val_iou"):
        assert metric in table and str(train.data.metrics[metric])[:6] in table, (metric, table[-2000:])


@pytest.mark.slow
def test_run_page_shows_the_per_epoch_curves_and_the_artifacts(ui, page):
    proj, base, log = ui
    _, exp, train = _store(proj)
    run_url = f"{base}/#/experiments/{exp.experiment_id}/runs/{train.info.run_id}"
    page.set_viewport_size({"width": 1600, "height": 5000})  # every chart in view (they render lazily)
    page.goto(f"{run_url}/model-metrics")
    for curve in ("train_loss", "val_loss", "train_acc", "val_acc", "train_iou", "val_iou"):
        _see(page, curve, log, exact=True)
    _see(page, "Step", log)  # per-epoch line charts, not single values
    page.wait_for_timeout(1500)
    page.screenshot(path=str(SHOTS / "run_curves.png"), full_page=True)

    page.set_viewport_size({"width": 1600, "height": 1000})
    # Lineage: the run's overview lists the data it was trained, validated and tested on (MLflow datasets).
    # The champion's data are whatever an earlier test in this process last trained it on (generated, or a
    # TIFF source): the names come from the run itself.
    names = sorted(d.dataset.name for d in train.inputs.dataset_inputs)
    first = next(n for n in names if n.endswith("-train"))
    assert len(names) == 3 and {n.rsplit("-", 1)[1] for n in names} == {"train", "val", "test"}, names
    page.goto(run_url)
    page.reload()  # a full load of the run's page: a hash-only change can leave the last view up on a busy machine
    _see(page, first, log)
    page.get_by_text("+2", exact=True).first.click()  # the overview shows one dataset, the rest on request
    for name in names:
        _see(page, name, log)
    body = page.inner_text("body")
    assert all(context in body for context in ("Training", "Validation", "Testing")), body[-1500:]
    page.screenshot(path=str(SHOTS / "run_datasets.png"))
    page.keyboard.press("Escape")
    page.goto(f"{run_url}/artifacts")
    for name in ("curves.png", "val_overlays.png", "history.csv", "weights", "evaluation"):
        _see(page, name, log, exact=True)
    page.get_by_text("curves.png", exact=True).first.click()
    # The preview shows the PNG itself (about 1000 px wide; MLflow's own logo and icons are far smaller).
    page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth > 500)")
    page.screenshot(path=str(SHOTS / "run_artifacts.png"))


@pytest.mark.slow
def test_registered_model_page_shows_the_champion(ui, page):
    proj, base, log = ui
    client, _, train = _store(proj)
    champion = client.get_model_version_by_alias("emseg-unet", "champion")
    page.goto(f"{base}/#/models/emseg-unet")
    _see(page, f"Version {champion.version}", log)
    _see(page, "champion", log)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(SHOTS / "registered_model.png"))
    page.goto(f"{base}/#/models/emseg-unet/versions/{champion.version}")
    page.reload()  # as above: this version's own page, not the list still showing "champion"
    described = champion.description.split(" (")[0]  # "Trained on SOURCE"
    assert described.startswith("Trained on "), champion.description
    _see(page, described, log)  # its description
    _see(page, "champion", log)
    body = page.inner_text("body")
    assert train.info.run_name in body or train.info.run_id in body  # the version links its run
    assert described in body and "labelled slices" in body, body[:3000]  # its description
    page.screenshot(path=str(SHOTS / "model_version.png"))
    (SHOTS / "pages.json").write_text(json.dumps({"base": base, "run": train.info.run_id,
                                                   "champion": champion.version}, indent=1))
