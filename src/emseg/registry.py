"""Model registry: register a run's model, keep `challenger` current, move `champion` only on a better test IoU.

Aliases (not the deprecated stages) name versions; versions are never deleted. An alias points at
exactly one version, so concurrent promotions can never leave two champions.
"""

from __future__ import annotations

from emseg.errors import EmsegError

CHAMPION, CHALLENGER = "champion", "challenger"


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def champion_score(name: str) -> tuple[str | None, float | None]:
    """(version, test IoU) of the current champion, or (None, None)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    iou = mv.tags.get("test_iou")
    return mv.version, float(iou) if iou is not None else None


def register_if_better(model_uri: str, name: str, test_iou: float, run_id: str, tags: dict | None = None) -> dict:
    import mlflow

    client = _client()
    before_version, before_iou = champion_score(name)
    mv = mlflow.register_model(model_uri, name, tags={"test_iou": f"{test_iou:.6f}", "source_run": run_id, **(tags or {})})
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    promote = before_iou is None or test_iou > before_iou  # a tie keeps the old champion
    decision = "promoted" if promote else "kept previous champion"
    client.set_model_version_tag(name, mv.version, "decision", decision)
    client.set_model_version_tag(name, mv.version, "champion_test_iou_before",
                                 "none" if before_iou is None else f"{before_iou:.6f}")
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return {"name": name, "version": int(mv.version), "test_iou": test_iou, "promoted": promote,
            "champion_version_before": before_version, "champion_test_iou_before": before_iou, "decision": decision}


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
