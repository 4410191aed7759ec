"""The ready-made overlays in profiles/ stay valid params and keep the contracts their names promise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from emseg.config import ConfigError, parse_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_epfl_train import merge  # noqa: E402  (the deep merge the benchmarks apply profiles with)

PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


def overlaid(profile: Path) -> dict:
    return merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(profile.read_text()))


def test_there_are_profiles():
    assert {p.stem for p in PROFILES} >= {"epfl-cpu", "epfl-gpu", "epfl-cpu-pretrained"}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_overlays_params_into_valid_params(profile):
    params = parse_params(overlaid(profile), str(profile))
    assert params.data.source == "epfl"
    assert params.data.train_slices == 12  # the few-label setting
    if "-cpu" in profile.stem:
        assert params.train.max_minutes is not None and params.train.max_minutes <= 15
    if params.train.init.mode == "checkpoint":
        # what pipelines/pretrain or pipelines/ssl writes
        assert params.train.init.path in ("models/pretrained.pt", "models/ssl.pt")
    if params.train.init.path == "models/ssl.pt":  # restoration is learnt by the network fine-tuning uses
        assert params.ssl.max_minutes is not None and params.ssl.max_minutes <= 30


def test_a_misspelt_profile_key_is_refused(tmp_path):
    raw = overlaid(ROOT / "profiles" / "epfl-cpu.yaml")
    raw["train"]["patch_sise"] = 192
    with pytest.raises(ConfigError, match="patch_sise"):
        parse_params(raw, "profiles/epfl-cpu.yaml")
