"""The local run folder: the source of truth for every run.

Remotes may be down or misconfigured; these files are always written, samples one line at a time with an
fsync, so a crash loses at most the sample in flight and ``decodelab upload`` can replay the run later.

Layout of a run folder::

    config.yaml       resolved config
    fingerprint.json  environment fingerprint
    samples.jsonl     one json record per decoded prompt, appended as it completes
    metrics.jsonl     step metrics of a run that has steps (a training run's loss curves), appended
    summary.json      summary metrics plus "status" and "error", written at finish
    tracking.json     run name, tags, remote run ids and failures, extra artifacts (for upload)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional

import yaml

from decodelab.errors import UserError

CONFIG_FILE = "config.yaml"
FINGERPRINT_FILE = "fingerprint.json"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
TRACKING_FILE = "tracking.json"
METRICS_FILE = "metrics.jsonl"
RUN_FILES = (CONFIG_FILE, SAMPLES_FILE, SUMMARY_FILE, FINGERPRINT_FILE)
# A run's status when its folder has config.yaml but no summary.json (killed, or still running), and when
# summary.json cannot be read (torn by a crash mid-write).
FINISHED, UNFINISHED, UNREADABLE = "FINISHED", "UNFINISHED", "UNREADABLE"


def plain(value: Any) -> Any:
    """Turn a value into json/yaml-safe builtins (unknown objects become str) so writing never fails."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return plain(item())
        except Exception:  # noqa: BLE001 - not a scalar after all
            pass
    return str(value)


def write_json(path: Path, data: Any) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plain(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class LocalRun:
    """Writer for one run folder."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self._samples: Optional[IO[str]] = None

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def write_start(self, resolved_config: dict, fingerprint: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(plain(resolved_config), sort_keys=False, allow_unicode=True)
        self.path(CONFIG_FILE).write_text(text, encoding="utf-8")
        write_json(self.path(FINGERPRINT_FILE), fingerprint)
        self.close_samples()
        self._open_samples(mode="w")  # a new run starts with no samples

    def _open_samples(self, mode: str = "a") -> IO[str]:
        if self._samples is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._samples = open(self.path(SAMPLES_FILE), mode, encoding="utf-8")
        return self._samples

    def append_sample(self, record: dict) -> None:
        """One line per sample, flushed and fsynced: durable before the next prompt starts."""
        _append(self._open_samples(), record)

    def append_metrics(self, step: int, metrics: dict) -> None:
        """One line of step metrics (``{"step": step, ...}``), durable like a sample."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path(METRICS_FILE), "a", encoding="utf-8") as f:
            _append(f, {"step": step, **metrics})

    def close_samples(self) -> None:
        if self._samples is not None:
            self._samples.close()
            self._samples = None

    def write_summary(self, summary: dict, status: str, error: Optional[str]) -> None:
        self.close_samples()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path(SAMPLES_FILE).touch()  # a run with no samples still has the (empty) file
        write_json(self.path(SUMMARY_FILE), {**summary, "status": status, "error": error})

    def write_tracking(self, info: dict) -> None:
        write_json(self.path(TRACKING_FILE), info)


def _append(f: IO[str], record: dict) -> None:
    f.write(json.dumps(plain(record), ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


class FolderError(UserError):
    """A file of a run folder is missing or unreadable. ``detail`` names the file and the fault, so each command
    can lead it with its own argument (``RUN: <label>/<detail>``)."""

    def __init__(self, folder: Path, detail: str):
        self.folder, self.detail = folder, detail
        super().__init__(f"{folder}/{detail}")


class RunFolder:
    """The one reader of a run folder (written by LocalRun): every command that reads runs goes through it."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def config(self) -> Dict[str, Any]:
        """The resolved config; FolderError when config.yaml is missing, not YAML or not a mapping."""
        if not self.has(CONFIG_FILE):
            raise FolderError(self.path, f"{CONFIG_FILE} is missing")
        try:
            config = yaml.safe_load((self.path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise FolderError(self.path, f"{CONFIG_FILE} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise FolderError(self.path, f"{CONFIG_FILE} is not a mapping of config keys")
        if "logger" in config and "tracking" not in config:  # run folders written before the group's rename
            config["tracking"] = config.pop("logger")
        return config

    def summary(self) -> Optional[Dict[str, Any]]:
        """summary.json, None while the run has not finished; FolderError when it is torn or not an object."""
        if not self.has(SUMMARY_FILE):
            return None
        return self._json(SUMMARY_FILE)

    def status(self) -> tuple[str, Optional[str], Dict[str, Any]]:
        """(status, error, summary): FINISHED/FAILED/... from summary.json, UNFINISHED without one, UNREADABLE
        when it cannot be read."""
        try:
            summary = self.summary()
        except FolderError as err:
            return UNREADABLE, err.detail, {}
        if summary is None:
            return UNFINISHED, None, {}
        return str(summary.get("status") or FINISHED), summary.get("error"), summary

    def fingerprint(self) -> Dict[str, Any]:
        return self._json(FINGERPRINT_FILE) if self.has(FINGERPRINT_FILE) else {}

    def tracking(self) -> Dict[str, Any]:
        return self._json(TRACKING_FILE) if self.has(TRACKING_FILE) else {}

    def samples(self, strict: bool = False) -> List[dict]:
        """Records of samples.jsonl in order. Lenient: a torn line (crash mid-write) is skipped. Strict: it is a
        FolderError naming the line."""
        return list(self.iter_samples(strict))

    def metrics(self) -> List[dict]:
        """Rows of metrics.jsonl (``step`` and the metrics), torn lines skipped."""
        return list(self.iter_samples(name=METRICS_FILE))

    def iter_samples(self, strict: bool = False, name: str = SAMPLES_FILE) -> Iterator[dict]:
        path = self.path / name
        if not path.is_file():
            return
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    if strict:
                        raise FolderError(self.path, f"{name} line {lineno} is not valid JSON ({err.msg})") \
                            from None
                    continue
                yield record

    def _json(self, name: str) -> Dict[str, Any]:
        try:
            data = read_json(self.path / name)
        except (OSError, ValueError) as err:
            raise FolderError(self.path, f"{name}: {err}") from None
        if not isinstance(data, dict):
            raise FolderError(self.path, f"{name} is not a JSON object")
        return data

