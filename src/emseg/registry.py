"""Model registry, the one module that reads and writes `models:/`: resolve a URI, fetch a version's
weights to a local file that is removed afterwards, register a run's model, keep `challenger` current,
move `champion` only when it is beaten, set aliases by hand.

The comparison is like for like: the stage scores the challenger and the current champion on the
same data (this run's validation slices) and hands both scores here; the test split never decides.

Aliases (not the deprecated stages) name versions; versions are never deleted. An alias points at
exactly one version, so concurrent promotions can never leave two champions.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from emseg.errors import EmsegError

CHAMPION, CHALLENGER = "champion", "challenger"
PREFIX = "models:/"
# A version's weights: the self-describing file `register` attaches (weights and the post-processing
# chosen on validation), else the plain training weights of older versions.
# Where a version's weights live in its source run: the version tag WEIGHTS_TAG names the evaluated file
# (one folder per content, so a later evaluation of the same run never changes an earlier version's
# post-processing); versions registered before that tag fall back to these.
WEIGHTS_TAG = "weights_artifact"
WEIGHT_ARTIFACTS = ("weights/emseg.pt", "weights/model.pt")


def is_uri(ref: str | Path) -> bool:
    """Whether a --model value names a registry version rather than a file."""
    return str(ref).startswith(PREFIX)


def logged_model_id(model_uri: str | None) -> str | None:
    """The MLflow logged-model id in a ``models:/m-...`` URI (what tracking.log_model returns), else None."""
    tail = (model_uri or "").removeprefix(PREFIX)
    return tail if tail.startswith("m-") and "/" not in tail and "@" not in tail else None


def resolve(uri: str):
    """models:/NAME@ALIAS or models:/NAME/VERSION -> ModelVersion, with one clear error if absent."""
    from mlflow.exceptions import MlflowException

    if not is_uri(uri):
        raise EmsegError(f"{uri}: expected a registry URI models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = uri[len(PREFIX):]
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return _client().get_model_version_by_alias(name, alias)
        name, version = rest.rsplit("/", 1)
        return _client().get_model_version(name, version)
    except MlflowException as exc:
        raise EmsegError(f"{uri}: not found in the model registry ({str(exc).splitlines()[0]})") from None
    except ValueError:
        raise EmsegError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION") from None


@contextmanager
def fetched_weights(version, uri: str | None = None) -> Iterator[Path]:
    """A local copy of a model version's weights file for the length of the block; the download
    folder is removed afterwards. ``version``: a ModelVersion, or a URI to resolve first."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if isinstance(version, str):
        uri, version = version, resolve(version)
    uri = uri or f"{PREFIX}{version.name}/{version.version}"
    if not version.run_id:
        raise EmsegError(f"{uri}: model version {version.version} has no source run with weights")
    dst = Path(tempfile.mkdtemp(prefix="emseg-weights-"))
    try:
        path = None
        tagged = (getattr(version, "tags", None) or {}).get(WEIGHTS_TAG)
        for artifact in ((tagged,) if tagged else ()) + WEIGHT_ARTIFACTS:
            try:
                path = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact,
                                                                dst_path=str(dst)))
                break
            except (MlflowException, OSError):
                continue
        if path is None:
            raise EmsegError(f"{uri}: model version {version.version} has no weights file in run {version.run_id}")
        yield path
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def postprocess_of(blob: dict, tags: dict | None = None, name: str = "the model") -> dict:
    """The post-processing chosen for a model's weights on validation: the record its weights file
    carries (threshold, tta, instances) or, for a version registered before files carried one, what the
    version's tags say (flip TTA, watershed h; ``chosen_on`` names the tags). Empty when neither says
    anything (plain training weights). A record that is not what evaluate writes raises, naming ``name``."""
    from emseg.errors import EmsegError

    record = blob.get("postprocess")
    if record:
        if (not isinstance(record, dict) or not {"threshold", "tta", "instances"} <= record.keys()
                or not isinstance(record["instances"], dict)):
            raise EmsegError(f"{name}: its post-processing record is damaged (expected a mapping with threshold, "
                             f"tta and instances; found {record!r:.200})")
        return dict(record)
    tags = tags or {}
    legacy: dict = {}
    if tags.get("tta") in ("true", "false"):
        legacy["tta"] = tags["tta"] == "true"
    if tags.get("watershed_h") is not None:
        try:
            legacy["instances"] = {"h": float(tags["watershed_h"])}
        except ValueError:
            raise EmsegError(f"{name}: registry tag watershed_h={tags['watershed_h']!r} is not a number") from None
    if legacy:
        legacy["chosen_on"] = "this version's registry tags"
    return legacy


@contextmanager
def local_init(params, root: str | Path = "."):
    """``params`` whose ``train.init``, where it names a registry version (mode ``registry``), also
    carries ``path``: a local copy of that version's weights, fetched once for the block and removed
    afterwards. The model layer loads files only; it never reaches the registry itself."""
    init = params.train.init
    if init.mode != "registry":
        yield params
        return
    if not init.uri:
        from emseg.errors import ConfigError

        raise ConfigError("params.yaml: train.init.uri: required (models:/NAME@ALIAS) when train.init.mode is "
                          "'registry'")
    from emseg import tracking

    tracking.configure(params.tracking, root)  # the project's registry (root: the project), whichever stage asks
    version = resolve(init.uri)  # an alias that moves later does not change what this run started from
    with fetched_weights(version, init.uri) as path:
        local = init.model_copy(update={"uri": f"{PREFIX}{version.name}/{version.version}", "path": str(path)})
        yield params.model_copy(update={"train": params.train.model_copy(update={"init": local})})


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def champion_version(name: str):
    """The model version the `champion` alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register_and_decide(model_uri: str, name: str, run_id: str, score: float, champion, champion_score: float | None,
                        min_gain: float, tags: dict | None = None, not_comparable: str | None = None,
                        description: str | None = None) -> dict:
    """Register the run's model as `challenger`; move `champion` to it only if ``score`` beats
    ``champion_score`` (the champion re-scored by the caller on the same data) by more than ``min_gain``.
    A tie keeps the old champion; versions are never deleted. ``not_comparable``: why the champion
    could not be scored on these data; it then stays champion (a person decides, with `emseg promote`)."""
    import mlflow

    client = _client()
    if champion is not None and not_comparable:
        promote, decision = False, f"kept previous champion, not comparable: {not_comparable}"
    else:
        promote = champion is None or champion_score is None or score > champion_score + min_gain
        decision = "promoted" if promote else "kept previous champion"
    mv = mlflow.register_model(model_uri, name, tags={"source_run": run_id, "val_iou": f"{score:.6f}",
                                                      "decision": decision, **(tags or {})})
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    if description:
        client.update_model_version(name, mv.version, description=f"{description} Decision: {decision}.")
    client.set_model_version_tag(name, mv.version, "champion_before",
                                 "none" if champion is None else str(champion.version))
    client.set_model_version_tag(name, mv.version, "champion_val_iou_before",
                                 "none" if champion_score is None else f"{champion_score:.6f}")
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return {"name": name, "version": int(mv.version), "val_iou": score, "promoted": promote, "min_gain": min_gain,
            "champion_version_before": None if champion is None else int(champion.version),
            "champion_val_iou_before": champion_score, "decision": decision}


def register_as(model_uri: str, name: str, alias: str, tags: dict | None = None) -> int:
    """Register a run's model under ``name`` and point ``alias`` at the new version (no comparison:
    for models such as the pretrained encoder that are not champions). Returns the version number."""
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags=tags or {})
    _client().set_registered_model_alias(name, alias, mv.version)
    return int(mv.version)


def promote(name: str, version: str, alias: str) -> None:
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise EmsegError(f"registered model {name!r} has no version {version}") from None
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        raise EmsegError(f"--alias {alias!r}: {str(exc).splitlines()[0]}") from None
