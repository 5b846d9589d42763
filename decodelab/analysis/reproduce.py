"""``decodelab reproduce RUN``: re-run a recorded run from its logged resolved config and compare.

RUN is a run folder or an MLflow run id (its artifacts are downloaded to a temporary folder). The
reproduction decodes in this process into a new run folder, then three questions are answered:

- outputs: are the output tokens of every sample both runs share identical? Greedy decoding must be
  (a mismatch exits 1); seeded sampling is reported but never fails.
- metrics: throughput, speedup (against the original's bootstrap interval), acceptance, losslessness
  and quality, side by side.
- environment: every fingerprint key that changed (versions, hardware, git commit, threads, seeds).

The comparison is written to ``reproduce.json`` in the new run folder.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf, open_dict

from decodelab.config import DEFAULT_TRACKING_URI
from decodelab.errors import UserError, one_line, warn
from decodelab.experiment.compose import allowed_keys
from decodelab.tracking.run_folder import CONFIG_FILE, RUN_FILES, SAMPLES_FILE, FolderError, RunFolder, write_json
from decodelab.tracking.sweep_folder import is_sweep, run_dirs

RESULT_FILE = "reproduce.json"
MLFLOW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# (summary key, label) of the side-by-side table; rows appear when either run has the key.
METRIC_ROWS = (("throughput_tok_s", "throughput tok/s"), ("mean_sample_tok_s", "mean sample tok/s"),
               ("speedup", "speedup"), ("mean_accepted_length", "tau (mean accepted length)"),
               ("acceptance_rate", "alpha (acceptance rate)"), ("lossless_rate", "lossless rate"),
               ("baseline_cached_fraction", "baseline cached fraction"))
QUALITY_KEYS = ("rouge_l", "exact_match", "pass@1", "distinct_1", "distinct_2", "repetition_rate")
# Fingerprint keys that differ between any two runs by construction.
VOLATILE_FINGERPRINT_KEYS = ("timestamp",)


# ---------------------------------------------------------------- the source run


@dataclass
class Source:
    """The recorded run: its files in ``files_dir`` (the run folder, or a download of its artifacts)."""

    label: str
    files_dir: Path
    run_dir: Optional[Path] = None  # the original run folder, when it is on this machine
    mlflow_run_id: Optional[str] = None
    name_hint: str = "run"
    config: dict = field(default_factory=dict)

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.files_dir)

    def samples(self) -> List[dict]:
        return self.folder.samples()

    def summary(self) -> dict:
        return self.folder.summary() or {}

    def fingerprint(self) -> dict:
        return self.folder.fingerprint()


def _read_config(folder: Path, label: str) -> dict:
    run = RunFolder(folder)
    if not run.has(CONFIG_FILE) and is_sweep(folder):
        jobs = ", ".join(str(p) for p in run_dirs(folder)[:3]) or "none finished"
        raise UserError(f"RUN: {label} is a sweep folder; reproduce one of its run folders ({jobs})")
    if not run.has(CONFIG_FILE):
        raise UserError(f"RUN: {label} has no {CONFIG_FILE}; reproduce needs a run folder written by decodelab run")
    try:
        return run.config()
    except FolderError as err:
        raise UserError(f"RUN: {label}/{err.detail}") from None


def folder_source(run_dir: Path) -> Source:
    run_dir = run_dir.expanduser().resolve()
    if not run_dir.is_dir():
        raise UserError(f"RUN: {run_dir} is not a folder; give a run folder (runs/<date>_<time>_<id>) "
                        "or an MLflow run id (32 hex characters)")
    return Source(label=str(run_dir), files_dir=run_dir, run_dir=run_dir, name_hint=run_dir.name,
                  config=_read_config(run_dir, str(run_dir)))


def mlflow_source(run_id: str, tracking_uri: str, download_dir: Path) -> Source:
    """Find ``run_id`` in the tracking store and download its run files into ``download_dir``."""
    from mlflow.exceptions import MlflowException

    from decodelab.tracking.mlflow_remote import RUN_DIR_TAG, existing_store_client

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # four small files
    client = existing_store_client(tracking_uri, "--tracking-uri")
    try:
        run = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - not found, or a store that cannot be read: the user's to fix
        found = "no MLflow run" if isinstance(err, MlflowException) else "cannot read MLflow run"
        raise UserError(f"RUN: {found} {run_id} in {tracking_uri} ({_first_line(err)}); "
                        "pass --tracking-uri of the store that logged it") from None
    try:
        listed = {a.path for a in client.list_artifacts(run_id)}
    except Exception as err:  # noqa: BLE001 - any store failure is the user's URI or store to fix
        raise UserError(f"RUN: cannot list the artifacts of MLflow run {run_id} ({_first_line(err)})") from None
    if CONFIG_FILE not in listed:
        raise UserError(f"RUN: MLflow run {run_id} has no {CONFIG_FILE} artifact; it was not logged by decodelab")
    for name in RUN_FILES:
        if name in listed:
            client.download_artifacts(run_id, name, str(download_dir))
    recorded_dir = run.data.tags.get(RUN_DIR_TAG)
    local_dir = Path(recorded_dir) if recorded_dir and (Path(recorded_dir) / CONFIG_FILE).is_file() else None
    return Source(label=f"MLflow run {run_id} ({tracking_uri})", files_dir=download_dir, run_dir=local_dir,
                  mlflow_run_id=run_id, name_hint=Path(recorded_dir).name if recorded_dir else run_id[:12],
                  config=_read_config(download_dir, f"MLflow run {run_id}"))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# ---------------------------------------------------------------- the config to re-run


def reproduction_config(logged: dict, overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """The logged resolved config typed by the run schema, with a new ``output_dir`` and ``overrides``.

    Override grammar as in Hydra, on an already resolved config: ``group=option`` swaps the whole group
    for that option's defaults (before any value override, as in Hydra), ``key=value`` sets a known key,
    ``+key=value`` / ``++key=value`` add one, ``~key`` drops one.
    """
    from decodelab.config import RunConfig
    from decodelab.experiment.compose import register_configs, register_resolvers
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    register_configs()
    groups, values = parse_overrides(overrides)
    logged = {**logged, **{group: _group_defaults(group, option) for group, option in groups.items()}}
    schema = OmegaConf.structured(RunConfig)
    known = {k: v for k, v in logged.items() if k in schema}
    extra = {k: v for k, v in logged.items() if k not in schema}  # ``+key=value`` of the original command
    try:
        cfg = OmegaConf.merge(schema, known)
        with open_dict(cfg):
            for key, value in extra.items():
                cfg[key] = value
        cfg.print_table = False  # our comparison table replaces the run's; an override may turn it back on
        for override in values:
            _apply_value(cfg, override)
        cfg.output_dir = str(output_dir)
    except UserError:
        raise
    except OmegaConfBaseException as err:
        raise UserError(one_line(err, allowed_keys)) from None
    return cfg


def parse_overrides(overrides: Sequence[str]) -> Tuple[Dict[str, str], list]:
    """``({group: option}, [value overrides])``; sweeps, Hydra settings, output_dir and experiment refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from decodelab.experiment.compose import GROUPS, check_group_options

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # noqa: BLE001 - Hydra's grammar errors are bad input
        raise UserError(one_line(err, allowed_keys)) from None
    groups: Dict[str, str] = {}
    values = []
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            raise UserError(f"{override.input_line}: reproduce re-runs one config; sweeps are not allowed")
        if key == "hydra" or key.startswith("hydra.") or override.package:
            raise UserError(f"{override.input_line}: Hydra settings do not apply to reproduce (use --out DIR)")
        if key == "output_dir":
            raise UserError("output_dir: set the reproduction's folder with --out DIR")
        if key == "experiment":
            raise UserError("experiment: the logged config already holds its experiment's deltas; "
                            "override single keys instead (e.g. task.limit=2)")
        if key in GROUPS and not override.is_delete():
            check_group_options([f"{key}={override.value()}"])
            groups[key] = str(override.value())
        else:
            values.append(override)
    return groups, values


def _group_defaults(group: str, option: str) -> dict:
    from decodelab.experiment.compose import compose

    return OmegaConf.to_container(compose([f"{group}={option}"])[group], resolve=True)  # type: ignore[return-value]


def _apply_value(cfg: DictConfig, override: Any) -> None:
    key = override.key_or_group
    if override.is_delete():
        _delete(cfg, key, override.input_line)
    elif override.is_add() or override.is_force_add():
        with open_dict(cfg):
            OmegaConf.update(cfg, key, override.value(), merge=False, force_add=True)
    else:
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise UserError(f"{key}: unknown key; allowed: {', '.join(allowed_keys(key))} "
                            f"(use +{key}=... to add one)")
        OmegaConf.update(cfg, key, override.value(), merge=False)


_MISSING = object()


def _delete(cfg: DictConfig, key: str, line: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise UserError(f"{line}: no key {key} in the logged config")
    with open_dict(cfg):
        del parent[leaf]


def default_output_dir(source: Source, short_id: str) -> Path:
    """Beside the original folder; a sweep job's reproduction goes beside the sweep folder (inside it would
    look like one more job to sweep reports). Without a local original: ``runs/``."""
    if source.run_dir is not None:
        parent = source.run_dir.parent
        if is_sweep(parent):
            return parent.parent / f"{parent.name}_{source.run_dir.name}_reproduce_{short_id}"
        return parent / f"{source.run_dir.name}_reproduce_{short_id}"
    return Path("runs") / f"{source.name_hint}_reproduce_{short_id}"


# ---------------------------------------------------------------- comparisons


def compare_outputs(original: List[dict], reproduced: List[dict]) -> dict:
    """Per sample id both runs hold: identical output tokens, or the first (turn, token index) that differs."""
    new_by_id = {r["id"]: r for r in reproduced}
    old_ids = [r["id"] for r in original]
    known = set(old_ids)
    differing = []
    compared = 0
    for record in original:
        other = new_by_id.get(record["id"])
        if other is None:
            continue
        compared += 1
        first = first_difference(record.get("output_tokens") or [], other.get("output_tokens") or [])
        if first is not None:
            differing.append({"id": record["id"], "turn": first[0], "index": first[1]})
    return {"compared": compared, "identical": compared - len(differing), "differing": differing,
            "only_original": [i for i in old_ids if i not in new_by_id],
            "only_reproduced": [r["id"] for r in reproduced if r["id"] not in known]}


def first_difference(old_turns: Sequence[Sequence[int]],
                     new_turns: Sequence[Sequence[int]]) -> Optional[Tuple[int, int]]:
    """(turn, token index) of the first difference, None when equal; a missing turn differs at index 0."""
    for turn in range(max(len(old_turns), len(new_turns))):
        old = list(old_turns[turn]) if turn < len(old_turns) else []
        new = list(new_turns[turn]) if turn < len(new_turns) else []
        if old == new and turn < len(old_turns) and turn < len(new_turns):
            continue
        for index, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return turn, index
        return turn, min(len(old), len(new))
    return None


def compare_metrics(original: dict, reproduced: dict) -> List[dict]:
    """Rows of (key, original, reproduced) for the headline keys either summary has."""
    keys = [(k, label) for k, label in METRIC_ROWS] + [(q, q) for q in QUALITY_KEYS]
    rows = []
    for key, label in keys:
        old, new = _number(original.get(key)), _number(reproduced.get(key))
        if old is None and new is None:
            continue
        row: Dict[str, Any] = {"key": key, "label": label, "original": old, "reproduced": new}
        if key == "speedup":
            low, high = _number(original.get("speedup_ci_low")), _number(original.get("speedup_ci_high"))
            row.update(original_ci=[low, high] if low is not None and high is not None else None,
                       reproduced_ci=[_number(reproduced.get("speedup_ci_low")),
                                      _number(reproduced.get("speedup_ci_high"))])
            row["within_original_ci"] = (low <= new <= high) if row["original_ci"] and new is not None else None
        rows.append(row)
    return rows


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def flatten_fingerprint(data: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts and lists to dotted keys (``versions.torch``, ``gpus.0.name``)."""
    if isinstance(data, dict):
        items: Iterable[Tuple[Any, Any]] = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return {prefix: data}
    out: Dict[str, Any] = {}
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)) and value:
            out.update(flatten_fingerprint(value, name))
        else:
            out[name] = value
    return out


def environment_changes(original: dict, reproduced: dict) -> Dict[str, List[Any]]:
    """Every fingerprint key whose value differs, as ``key -> [old, new]`` (absent keys read None)."""
    old, new = flatten_fingerprint(original), flatten_fingerprint(reproduced)
    changes = {}
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in VOLATILE_FINGERPRINT_KEYS:
            continue
        if old.get(key) != new.get(key):
            changes[key] = [old.get(key), new.get(key)]
    return changes


# ---------------------------------------------------------------- the command


def reproduce(source: str, out_dir: Optional[str] = None, overrides: Sequence[str] = (),
              tracking_uri: str = DEFAULT_TRACKING_URI, announce: Callable[[str], None] = lambda _: None) -> dict:
    """Re-run ``source`` (run folder or MLflow run id) into ``out_dir`` and compare; returns reproduce.json.

    ``announce`` gets one line naming the source and the new folder before the run starts (the CLI prints it).

    ``result["ok"]`` is False when a greedy run's outputs differ (the CLI then exits 1).
    """
    with tempfile.TemporaryDirectory(prefix="decodelab-reproduce-") as tmp:
        src = _open_source(source, tracking_uri, Path(tmp))
        output_dir = Path(out_dir) if out_dir else default_output_dir(src, uuid.uuid4().hex[:6])
        output_dir = output_dir.expanduser().resolve()
        if (output_dir / CONFIG_FILE).exists() or (output_dir / SAMPLES_FILE).exists():
            raise UserError(f"--out: {output_dir} already holds a run; choose a new folder")
        announce(f"reproducing {src.label}\n  -> {output_dir}")
        return _reproduce(src, output_dir, list(overrides))


def _open_source(source: str, tracking_uri: str, download_dir: Path) -> Source:
    path = Path(source).expanduser()
    if path.exists() or not MLFLOW_RUN_ID.match(source):
        return folder_source(path)
    return mlflow_source(source, tracking_uri, download_dir)


def _reproduce(src: Source, output_dir: Path, overrides: List[str]) -> dict:
    from decodelab.experiment.compose import validate
    from decodelab.experiment.metrics import summarize
    from decodelab.experiment.runner import run

    cfg = reproduction_config(src.config, overrides, output_dir)
    with open_dict(cfg):
        cfg.tags["reproduce_of"] = src.mlflow_run_id or str(src.run_dir)
    validate(cfg)
    summary = run(cfg, output_dir=str(output_dir))

    original_samples = src.samples()
    reproduced = RunFolder(output_dir)
    reproduced_samples = reproduced.samples()
    outputs = compare_outputs(original_samples, reproduced_samples)
    original_summary = src.summary()
    common = {r["id"] for r in reproduced_samples}
    subset = [r for r in original_samples if r["id"] in common]
    over_subset = bool(original_samples) and len(subset) < len(original_samples)
    # The same prompts on both sides of the table: a subset's metrics are recomputed from its records.
    original_metrics = summarize(subset) if over_subset else original_summary
    greedy = not bool(src.config.get("strategy", {}).get("do_sample", False))
    result = {
        "source": src.label, "original_run_dir": str(src.run_dir) if src.run_dir else None,
        "mlflow_run_id": src.mlflow_run_id, "reproduced_run_dir": str(output_dir), "overrides": overrides,
        "greedy": greedy, "original_status": original_summary.get("status"),
        "reproduced_status": (reproduced.summary() or {}).get("status"),
        "original_metrics_over": "subset" if over_subset else "all",
        "outputs": outputs,
        "metrics": compare_metrics(original_metrics, summary),
        "environment_changes": environment_changes(src.fingerprint(), reproduced.fingerprint()),
    }
    speedup = next((row for row in result["metrics"] if row["key"] == "speedup"), None)
    result["speedup_within_original_ci"] = speedup.get("within_original_ci") if speedup else None
    result["ok"] = not (greedy and outputs["differing"])
    result["notes"] = _notes(result, summary, cfg)
    write_json(output_dir / RESULT_FILE, result)
    _log_to_mlflow(output_dir)
    return result


def _notes(result: dict, summary: dict, cfg: DictConfig) -> List[str]:
    """What makes the timings of the two runs hard to compare, and how to change it."""
    notes = []
    if summary.get("baseline_cached_fraction"):
        notes.append("the reproduced speedup divides by cached baseline timings from an earlier run; "
                     "add baseline=fresh to measure the baseline again")
    threads = result["environment_changes"].get("torch_num_threads")
    if threads and threads[0] and cfg.backend.threads is None:
        notes.append(f"thread count changed; backend.threads={threads[0]} pins the original's")
    if result["outputs"]["compared"] == 0:
        notes.append("no sample id is in both runs: nothing to compare outputs on")
    return notes


def _log_to_mlflow(run_dir: Path) -> None:
    """Attach reproduce.json to the reproduction's own MLflow run, when it logged one (best effort)."""
    info = RunFolder(run_dir).tracking()
    remote = (info.get("remotes") or {}).get("mlflow") or {}
    if not remote.get("run_id"):
        return
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=remote["tracking_uri"]).log_artifact(remote["run_id"], str(run_dir / RESULT_FILE))
    except Exception as err:  # noqa: BLE001 - the local reproduce.json is the record
        warn(f"mlflow: {RESULT_FILE} not logged ({_first_line(err)})")
