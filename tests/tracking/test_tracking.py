"""Tracker against real MLflow (embedded sqlite and a real ``mlflow server``) and real W&B (offline).

Creating an MLflow sqlite database runs all of MLflow's migrations (seconds), so one migrated database
is made per module and each test uses its own experiment; the server gets a copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from decodelab.config import TrackingConfig, MlflowConfig, WandbConfig
from decodelab.errors import UserError
from decodelab.tracking.tracker import Tracker, upload_run
from decodelab.tracking.mlflow_remote import PARENT_RUN_ENV, HTTP_ENV_DEFAULTS, config_params
from decodelab.tracking.wandb_remote import resolve_mode, sample_row

CONFIG = {
    "model": {"name": "tiny", "source": "tiny_random", "hidden_size": 64},
    "backend": {"device": "cpu", "threads": None},
    "task": {"name": "mini", "stop_strings": ["</s>", "\n\n"], "long": "x" * 7000},
    "tags": {},
}
FINGERPRINT = {"hostname": "test-host", "git_commit": None, "cpu_model": "test-cpu", "seeds": {"backend": 0}}
SUMMARY = {"throughput_tok_s": 12.5, "throughput_tok_s/summarization": 20.25, "samples": 3,
           "lossless": True, "per_category": {"qa": {"tau": 1.5}}, "model": "tiny"}
_ENV_KEYS = [*HTTP_ENV_DEFAULTS, PARENT_RUN_ENV, "WANDB_SILENT", "WANDB_API_KEY"]


@pytest.fixture(autouse=True)
def _restore_env():
    """The tracker sets mlflow's HTTP env defaults process-wide; keep tests independent of that."""
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def sample(i: int) -> dict:
    return {"id": f"q{i}", "category": "qa", "turns": [f"question {i}", "follow-up"],
            "outputs": [f"answer {i}", "more"], "new_tokens": 10 + i, "tok_s": 5.0 + i}


def run_tracker(run_dir: Path, tracking: TrackingConfig, status: str = "FINISHED", error: str | None = None,
                artifacts: tuple = (), n: int = 3, name: str = "test-run") -> Tracker:
    tracker = Tracker(run_dir, tracking, name, tags={"suite": "tests"})
    tracker.start(CONFIG, FINGERPRINT)
    for i in range(n):
        tracker.log_sample(sample(i))
    tracker.finish(SUMMARY, status=status, error=error, artifacts=list(artifacts))
    return tracker


def assert_local_complete(run_dir: Path, n: int = 3, status: str = "FINISHED") -> None:
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name"] == "tiny"
    assert json.loads((run_dir / "fingerprint.json").read_text())["hostname"] == "test-host"
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"q{i}" for i in range(n)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == status and summary["throughput_tok_s"] == 12.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- MLflow fixtures


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> Path:
    """One migrated sqlite database for the module."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlruns.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def sqlite_tracking(db: Path, experiment: str) -> TrackingConfig:
    return TrackingConfig(mlflow=MlflowConfig(tracking_uri=f"sqlite:///{db}", experiment=experiment))


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def artifact_names(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


@pytest.fixture(scope="module")
def mlflow_server(mlflow_db, tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (job execution off and one worker: it starts much faster)."""
    root = tmp_path_factory.mktemp("server")
    shutil.copy(mlflow_db, root / "srv.db")  # already migrated
    port = free_port()
    log = open(root / "server.log", "w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'srv.db'}", "--artifacts-destination", str(root / "art")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, root / "server.log", timeout_s=120)
        yield url
    finally:
        _stop(proc)
        log.close()


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"mlflow server not healthy after {timeout_s}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its uvicorn worker (its own process group, started by this fixture)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


# ---------------------------------------------------------------- W&B helpers


def wandb_records(path: Path) -> list:
    """Records of a ``run-*.wandb`` file (W&B's leveldb-style log of protobuf records).

    Offline runs keep config and summary only in this file (no files/config.yaml or wandb-summary.json),
    so the test reads it directly: 7-byte file header, 32 KiB blocks, 7-byte chunk headers
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, buf, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def wandb_offline_run(base: Path) -> tuple[Path, dict, dict, int]:
    """(run folder, config, merged summary, exit code) of the single offline run under ``base``."""
    runs = sorted((base / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    config, summary, exit_code = {}, {}, None
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "summary":
            for u in record.summary.update:
                summary[u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return runs[0], config, summary, exit_code


def wandb_tracking(tmp_path: Path) -> TrackingConfig:
    return TrackingConfig(wandb=WandbConfig(project="decodelab-tests", mode="offline", dir=str(tmp_path / "wb")))


# ---------------------------------------------------------------- tests


def test_local_files_and_samples_readable_before_finish(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, TrackingConfig(), "local-only")
    tracker.start(CONFIG, FINGERPRINT)
    for i in range(3):
        tracker.log_sample(sample(i))
        # Another reader sees every sample as soon as log_sample returns (the run is still open).
        assert len((run_dir / "samples.jsonl").read_text().splitlines()) == i + 1
    tracker.finish(SUMMARY)
    assert_local_complete(run_dir)
    assert tracker.remote_failures == []
    info = json.loads((run_dir / "tracking.json").read_text())
    assert info["run_name"] == "local-only" and info["remotes"] == {}


def test_failed_run_without_samples_still_writes_everything(tmp_path):
    tracker = Tracker(tmp_path / "run", TrackingConfig(), "crashed")
    tracker.start(CONFIG, FINGERPRINT)
    tracker.finish({}, status="FAILED", error="RuntimeError: boom")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == {"status": "FAILED", "error": "RuntimeError: boom"}
    assert (tmp_path / "run" / "samples.jsonl").read_text() == ""


def test_config_params_flatten_and_truncate():
    params = config_params(CONFIG)
    assert params["model.name"] == "tiny"
    assert params["backend.threads"] == "None"
    assert params["task.stop_strings"] == str(["</s>", "\n\n"])
    assert len(params["task.long"]) == 6000
    assert params["tags"] == "{}"


def test_mlflow_sqlite_roundtrip(tmp_path, mlflow_db):
    plot = tmp_path / "speedup.png"
    plot.write_bytes(b"\x89PNG fake")
    tracker = run_tracker(tmp_path / "run", sqlite_tracking(mlflow_db, "sqlite-roundtrip"), artifacts=(plot,))
    assert tracker.remote_failures == []
    assert_local_complete(tmp_path / "run")
    client = client_for(f"sqlite:///{mlflow_db}")
    run = only_run(client, "sqlite-roundtrip")
    assert run.info.status == "FINISHED" and run.info.run_name == "test-run"
    assert run.data.params["model.name"] == "tiny" and run.data.params["model.hidden_size"] == "64"
    assert len(run.data.params["task.long"]) == 6000
    metrics = run.data.metrics
    assert metrics["throughput_tok_s/summarization"] == 20.25
    assert metrics["per_category/qa/tau"] == 1.5 and metrics["lossless"] == 1.0
    assert "model" not in metrics  # not numeric
    assert run.data.tags["decodelab.run_dir"] == str((tmp_path / "run").resolve())
    assert run.data.tags["suite"] == "tests" and "mlflow.parentRunId" not in run.data.tags
    assert artifact_names(client, run.info.run_id) == {
        "config.yaml", "samples.jsonl", "summary.json", "fingerprint.json", "speedup.png"}
    # Artifacts sit beside the database, not in the working directory.
    assert run.info.artifact_uri.startswith((mlflow_db.parent / "mlartifacts").as_uri())


def test_mlflow_server_roundtrip(tmp_path, mlflow_server):
    tracking = TrackingConfig(mlflow=MlflowConfig(tracking_uri=mlflow_server, experiment="over-http"))
    tracker = run_tracker(tmp_path / "run", tracking)
    assert tracker.remote_failures == []
    client = client_for(mlflow_server)
    run = only_run(client, "over-http")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "tiny"
    assert run.data.metrics["throughput_tok_s/summarization"] == 20.25
    assert {"config.yaml", "samples.jsonl", "summary.json", "fingerprint.json"} <= artifact_names(
        client, run.info.run_id)


def test_unreachable_mlflow_does_not_fail_the_run(tmp_path, capsys):
    for key in HTTP_ENV_DEFAULTS:
        os.environ.pop(key, None)
    tracking = TrackingConfig(mlflow=MlflowConfig(tracking_uri=f"http://127.0.0.1:{free_port()}"))
    started = time.monotonic()
    tracker = run_tracker(tmp_path / "run", tracking)
    assert time.monotonic() - started < 30
    assert_local_complete(tmp_path / "run")
    assert len(tracker.remote_failures) == 1 and tracker.remote_failures[0].startswith("mlflow: ")
    err = capsys.readouterr().err
    assert f"decodelab upload {(tmp_path / 'run').resolve()}" in err
    assert all(os.environ[k] == v for k, v in HTTP_ENV_DEFAULTS.items())  # fail-fast defaults applied


def test_user_http_settings_win(tmp_path):
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "77"
    run_tracker(tmp_path / "run", TrackingConfig(mlflow=MlflowConfig(tracking_uri=f"http://127.0.0.1:{free_port()}")))
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"


def test_bad_mlflow_uri_is_a_remote_failure(tmp_path):
    tracker = run_tracker(tmp_path / "run", TrackingConfig(mlflow=MlflowConfig(tracking_uri="nosuchscheme://x")))
    assert_local_complete(tmp_path / "run")
    assert tracker.remote_failures and tracker.remote_failures[0].startswith("mlflow: ")


def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = run_tracker(tmp_path / "run", wandb_tracking(tmp_path))
    assert tracker.remote_failures == []
    assert_local_complete(tmp_path / "run")
    run_folder, config, summary, exit_code = wandb_offline_run(tmp_path / "wb")
    assert config["model"]["name"] == "tiny" and config["backend"]["threads"] is None
    assert summary["throughput_tok_s/summarization"] == 20.25 and summary["status"] == "FINISHED"
    assert summary["fingerprint"]["hostname"] == "test-host"
    assert summary["sample/tok_s"] == 7.0  # last per-sample step metric
    assert exit_code == 0
    tables = list(run_folder.glob("files/media/table/samples_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["id", "category", "prompt", "output", "new_tokens", "tok_s"]
    assert table["data"][0] == ["q0", "qa", "question 0", "answer 0\n\nmore", 10, 5.0]


def test_wandb_mode_auto_and_row_shapes(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online" and resolve_mode("offline") == "offline"
    assert sample_row({"id": 1, "prompt": "p", "output": "o"}) == ["1", None, "p", "o", None, None]


def test_mlflow_and_wandb_together_failed_run(tmp_path, mlflow_db, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracking = TrackingConfig(mlflow=MlflowConfig(tracking_uri=f"sqlite:///{mlflow_db}", experiment="both"),
                          wandb=WandbConfig(project="decodelab-tests", mode="offline", dir=str(tmp_path / "wb")))
    tracker = run_tracker(tmp_path / "run", tracking, status="FAILED", error="RuntimeError: out of memory")
    assert tracker.remote_failures == []
    assert_local_complete(tmp_path / "run", status="FAILED")
    run = only_run(client_for(f"sqlite:///{mlflow_db}"), "both")
    assert run.info.status == "FAILED" and run.data.tags["decodelab.error"] == "RuntimeError: out of memory"
    assert run.data.metrics["throughput_tok_s"] == 12.5
    _, config, summary, exit_code = wandb_offline_run(tmp_path / "wb")
    assert config["task"]["name"] == "mini" and summary["error"] == "RuntimeError: out of memory"
    assert exit_code == 1
    remotes = json.loads((tmp_path / "run" / "tracking.json").read_text())["remotes"]
    assert remotes["mlflow"]["run_id"] == run.info.run_id and remotes["wandb"]["mode"] == "offline"


def test_mlflow_parent_run(tmp_path, mlflow_db, monkeypatch):
    client = client_for(f"sqlite:///{mlflow_db}")
    experiment_id = client.create_experiment("sweep", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment_id, run_name="sweep-parent")
    monkeypatch.setenv(PARENT_RUN_ENV, parent.info.run_id)
    run_tracker(tmp_path / "run", sqlite_tracking(mlflow_db, "sweep"), name="job-0")
    child = client.search_runs([experiment_id], filter_string="attributes.run_name = 'job-0'")[0]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_upload_run_replays_a_local_run(tmp_path, mlflow_db):
    run_dir = tmp_path / "run"
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"png")
    run_tracker(run_dir, TrackingConfig(), artifacts=(plot,), name="offline-run")
    failures = upload_run(run_dir, sqlite_tracking(mlflow_db, "uploaded"))
    assert failures == []
    client = client_for(f"sqlite:///{mlflow_db}")
    run = only_run(client, "uploaded")
    assert run.info.run_name == "offline-run" and run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "tiny"
    assert run.data.metrics["throughput_tok_s/summarization"] == 20.25
    assert "status" not in run.data.metrics
    assert run.data.tags["decodelab.uploaded"] == "true" and run.data.tags["suite"] == "tests"
    assert artifact_names(client, run.info.run_id) == {
        "config.yaml", "samples.jsonl", "summary.json", "fingerprint.json", "plot.png"}


def test_upload_run_errors(tmp_path, mlflow_db):
    with pytest.raises(UserError, match="not a decodelab run folder"):
        upload_run(tmp_path, sqlite_tracking(mlflow_db, "x"))
    run_tracker(tmp_path / "run", TrackingConfig())
    with pytest.raises(UserError, match="no remote enabled"):
        upload_run(tmp_path / "run", TrackingConfig())
    failures = upload_run(tmp_path / "run", TrackingConfig(mlflow=MlflowConfig(tracking_uri="nosuchscheme://x")))
    assert failures and failures[0].startswith("mlflow: ")
