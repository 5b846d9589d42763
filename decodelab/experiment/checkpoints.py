"""``drafter.checkpoint`` as a path or as the MLflow run id of a training run (``decodelab train-drafter``)."""

from __future__ import annotations

import re
from pathlib import Path

from decodelab.config import DEFAULT_TRACKING_URI, TrackingConfig
from decodelab.errors import UserError

RUN_ID = re.compile(r"[0-9a-f]{32}")


def resolve_checkpoint(value: str, tracking: TrackingConfig, cache_dir: str, key: str = "drafter.checkpoint") -> str:
    """``value`` itself when it is a path (or not a run id); for an MLflow run id (in ``tracking.mlflow``'s store,
    or the default one), the training run folder that run recorded, or else its logged head files, downloaded
    once into ``cache_dir``."""
    from decodelab.models.heads import SPEC_FILE, WEIGHTS_FILE
    from decodelab.tracking.mlflow_remote import RUN_DIR_TAG, existing_store_client

    if Path(value).expanduser().exists() or not RUN_ID.fullmatch(value):
        return value
    uri = tracking.mlflow.tracking_uri if tracking.mlflow is not None else DEFAULT_TRACKING_URI
    client = existing_store_client(uri, key)
    try:
        run = client.get_run(value)
    except Exception as err:  # noqa: BLE001 - not found, or an unreadable store: the user's to fix
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{key}: {value} is neither a path nor an MLflow run in {uri} ({first})") from None
    recorded = run.data.tags.get(RUN_DIR_TAG)
    if recorded and (Path(recorded) / "checkpoint" / SPEC_FILE).is_file():
        return recorded
    folder = Path(cache_dir).expanduser() / "checkpoints" / value
    listed = {a.path for a in client.list_artifacts(value)}
    if not {SPEC_FILE, WEIGHTS_FILE} <= listed:
        raise UserError(f"{key}: MLflow run {value} logged no draft-head checkpoint ({SPEC_FILE}, {WEIGHTS_FILE}); "
                        "it is not a decodelab train-drafter run")
    folder.mkdir(parents=True, exist_ok=True)
    for name in (SPEC_FILE, WEIGHTS_FILE):
        client.download_artifacts(value, name, str(folder))
    return str(folder)
