"""Model registry: register a run's model, keep `challenger` current, move `champion` only when it is beaten.

The comparison is like for like: the stage scores the challenger and the current champion on the
same data (this run's validation slices) and hands both scores here; the test split never decides.

Aliases (not the deprecated stages) name versions; versions are never deleted. An alias points at
exactly one version, so concurrent promotions can never leave two champions.
"""

from __future__ import annotations

from emseg.errors import EmsegError

CHAMPION, CHALLENGER = "champion", "challenger"


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
                        min_gain: float, tags: dict | None = None) -> dict:
    """Register the run's model as `challenger`; move `champion` to it only if ``score`` beats
    ``champion_score`` (the champion re-scored by the caller on the same data) by more than ``min_gain``.
    A tie keeps the old champion; versions are never deleted."""
    import mlflow

    client = _client()
    promote = champion is None or champion_score is None or score > champion_score + min_gain
    decision = "promoted" if promote else "kept previous champion"
    mv = mlflow.register_model(model_uri, name, tags={"source_run": run_id, "val_iou": f"{score:.6f}",
                                                      "decision": decision, **(tags or {})})
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    client.set_model_version_tag(name, mv.version, "champion_before",
                                 "none" if champion is None else str(champion.version))
    client.set_model_version_tag(name, mv.version, "champion_val_iou_before",
                                 "none" if champion_score is None else f"{champion_score:.6f}")
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return {"name": name, "version": int(mv.version), "val_iou": score, "promoted": promote, "min_gain": min_gain,
            "champion_version_before": None if champion is None else int(champion.version),
            "champion_val_iou_before": champion_score, "decision": decision}


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
