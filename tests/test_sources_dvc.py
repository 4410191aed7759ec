"""The EPFL download path against a real local HTTP server, and DVC repro/push/pull for real."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import pytest

from conftest import EPFL, SMALL_GENERATED, make_project, run_cli, write_params
from emseg.config import parse_params
from emseg.data.io import sha256_of
from emseg.data.sources import EPFL_FILES, ensure_epfl_file, fetch_raw
from emseg.errors import DownloadError


@pytest.fixture()
def epfl_server():
    """Serve ../shared/data/epfl-hippocampus on 127.0.0.1; count the requests per file."""
    hits: dict[str, int] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits[self.path.strip("/")] = hits.get(self.path.strip("/"), 0) + 1
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(EPFL)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def _epfl(url, cache, sha=None, mirrors=None):
    return parse_params({"data": {"source": "epfl", "epfl": {
        "mirrors": mirrors or [url], "cache_dir": str(cache), "sha256": sha or {}, "timeout_s": 10}}}).data


def test_epfl_download_verified_cached_and_never_repeated(tmp_path, epfl_server):
    url, hits = epfl_server
    sha = {name: sha256_of(EPFL / name) for name in EPFL_FILES.values()}
    # The first mirror is down (nothing listens there); the second serves the files.
    params = _epfl(url, tmp_path / "cache", sha, mirrors=["http://127.0.0.1:9/", url])
    desc = fetch_raw(params, tmp_path / "raw")
    assert desc["files"]["test_labels"]["sha256"] == sha["testing_groundtruth.tif"]
    assert hits == {name: 1 for name in EPFL_FILES.values()}
    assert (tmp_path / "cache" / "training.tif.sha256").read_text().strip() == sha["training.tif"]
    fetch_raw(params, tmp_path / "raw2")  # from the cache: the server sees no new request
    assert hits == {name: 1 for name in EPFL_FILES.values()}
    assert sha256_of(tmp_path / "raw2" / "train_image.tif") == sha["training.tif"]


def test_epfl_checksum_mismatch_is_refused(tmp_path, epfl_server):
    url, _ = epfl_server
    params = _epfl(url, tmp_path / "cache", {"testing_groundtruth.tif": "0" * 64})
    with pytest.raises(DownloadError, match="testing_groundtruth.tif has SHA-256 .* expected 0000"):
        ensure_epfl_file("testing_groundtruth.tif", params.epfl)
    assert not (tmp_path / "cache" / "testing_groundtruth.tif").exists()


def test_epfl_offline_gives_clear_error_not_hang(tmp_path):
    params = _epfl("http://127.0.0.1:9", tmp_path / "cache")
    with pytest.raises(DownloadError,
                       match="not available from any mirror: http://127.0.0.1:9/training.tif: cannot download"):
        ensure_epfl_file("training.tif", params.epfl)


def test_epfl_corrupted_cache_is_refetched(tmp_path, epfl_server):
    url, hits = epfl_server
    params = _epfl(url, tmp_path / "cache")
    path = ensure_epfl_file("testing_groundtruth.tif", params.epfl)
    path.write_bytes(b"garbage")  # bit rot / a crashed copy
    again = ensure_epfl_file("testing_groundtruth.tif", params.epfl)
    assert sha256_of(again) == sha256_of(EPFL / "testing_groundtruth.tif")
    assert hits["testing_groundtruth.tif"] == 2
    assert (tmp_path / "cache" / "testing_groundtruth.tif.bad").read_bytes() == b"garbage"


def test_dvc_repro_push_pull_roundtrip(tmp_path):
    proj = make_project(tmp_path / "proj")
    write_params(proj, SMALL_GENERATED)
    remote = tmp_path / "remote"
    run_cli(["dvc", "remote", "add", "-d", "-f", "scratch", str(remote)], proj, check=True)
    run_cli(["dvc", "repro", "prepare"], proj, check=True)
    status = run_cli(["dvc", "status", "prepare"], proj, check=True)
    assert "up to date" in status.stdout.lower()
    manifest_sha = sha256_of(proj / "data" / "prepared" / "manifest.json")
    raw_sha = sha256_of(proj / "data" / "raw")
    run_cli(["dvc", "push", "fetch", "prepare"], proj, check=True)
    # Lose the workspace data and the local cache; the remote alone must bring them back.
    shutil.rmtree(proj / "data" / "raw")
    shutil.rmtree(proj / "data" / "prepared")
    shutil.rmtree(proj / ".dvc" / "cache")
    run_cli(["dvc", "pull", "fetch", "prepare"], proj, check=True)
    assert sha256_of(proj / "data" / "prepared" / "manifest.json") == manifest_sha
    assert sha256_of(proj / "data" / "raw") == raw_sha
    assert "up to date" in run_cli(["dvc", "status", "prepare"], proj, check=True).stdout.lower()
    # Changing a prepare param makes only prepare stale, not fetch.
    write_params(proj, {"data": {"val_slices": 2}})
    status = run_cli(["dvc", "status"], proj, check=True).stdout
    assert "prepare" in status and "fetch:" not in status
