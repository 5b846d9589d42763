"""Resume by config hash: skip a config that already finished, complete an unfinished one from its samples.

A run's identity is the hash of its typed config without the keys that only say where results go or how
they are shown (output folder, trackers, progress bars, names, tags, resume settings). Every run records
its hash in its tags (tracking.json, MLflow tag ``config_hash``) when it starts, so a re-run of a sweep
finds earlier runs of the same config under ``resume_dir`` whatever folder they were written to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from decodelab.config import RunConfig
from decodelab.errors import UserError
from decodelab.tracking.run_folder import SUMMARY_FILE, TRACKING_FILE, RunFolder

# Where results go or how they are shown: not part of what a run computes.
NOT_HASHED = ("tracking", "output_dir", "progress", "print_table", "run_name", "tags", "resume", "resume_dir",
              "experiment", "draft_length")


def config_hash(run: RunConfig) -> str:
    """16 hex digits identifying what a run computes (draft_length is hashed through the drafter it set)."""
    data = asdict(run)
    for key in NOT_HASHED:
        data.pop(key, None)
    data["model"].pop("cache_dir", None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Previous:
    """An earlier run of the same config: finished (reuse it) or not (continue from its samples)."""

    run_dir: Path
    finished: bool
    summary: Dict[str, object] = field(default_factory=dict)
    samples: List[dict] = field(default_factory=list)


def find_previous(resume_dir: Path, digest: str, exclude: Path,
                  progress: Callable[[Previous], int] = lambda p: len(p.samples)) -> Optional[Previous]:
    """The newest finished run with this hash under ``resume_dir``, else the unfinished one with most progress
    (samples recorded; a training run counts its checkpointed steps)."""
    finished: List[Previous] = []
    unfinished: List[Previous] = []
    if not resume_dir.is_dir():
        return None
    for tracking in resume_dir.rglob(TRACKING_FILE):
        run_dir = tracking.parent
        if run_dir.resolve() == exclude.resolve():
            continue
        folder = RunFolder(run_dir)
        try:
            if folder.tracking().get("tags", {}).get("config_hash") != digest:
                continue
            summary = folder.summary() or {}
        except UserError:
            continue  # a half-written file of a killed run: not a candidate
        if summary.get("status") == "FINISHED":
            finished.append(Previous(run_dir, True, summary))
        else:
            unfinished.append(Previous(run_dir, False, summary, folder.samples()))
    if finished:
        return max(finished, key=lambda p: (p.run_dir / SUMMARY_FILE).stat().st_mtime)
    unfinished = [p for p in unfinished if progress(p) > 0]
    return max(unfinished, key=progress) if unfinished else None
