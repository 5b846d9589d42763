"""Sweeps at scale: every named sweep runs, failures are isolated, MLflow parent/child across launchers,
resume after SIGKILL, one model load per process. Real Hydra, real launchers, real MLflow (sqlite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decodelab.tracking.sweep_folder import SWEEP_SUMMARY_FILE, job_dirs, read_sweep_meta, run_dirs

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).with_name("decodelab"))
TINY = ["model=tiny-random", "task.limit=1", "task.max_new_tokens=6", "progress=false", "print_table=false",
        "backend.threads=1"]
SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))
# Smaller grids for the smoke runs; everything else comes from the sweep file.
SMOKE_OVERRIDES = {"draft_length": ["draft_length=2,4"],
                   # Seeded: an unseeded sampler may draw the same trial twice (the second then REUSED, not FINISHED).
                   "search_speedup": ["hydra.sweeper.n_trials=2", "hydra.sweeper.seed=0"],
                   "sampling": ["strategy.top_p=0.8"],
                   # vLLM's CPU attention needs head size 32 (tiny-random's default is 16); task.limit=2 fills a batch.
                   "concurrency": ["task.concurrency=1,2", "model.num_heads=2", "model.num_kv_heads=1", "task.limit=2"]}
# Sweeps of another engine, run where it is installed (make test-vllm).
ENGINE_PACKAGES = {"concurrency": "vllm"}


def _cli(args, cwd, timeout=600, env=None):
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _main(args, cwd, monkeypatch, capsys) -> tuple[int, str]:
    """The CLI in this process (no interpreter start-up; the tiny model stays loaded): (exit code, stderr)."""
    from decodelab.cli import main

    monkeypatch.chdir(cwd)
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    return code, capsys.readouterr().err


def _summary(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / SWEEP_SUMMARY_FILE).read_text())


def _only_sweep(root: Path) -> Path:
    found = [p.parent for p in root.rglob("sweep.json")]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("name", SWEEPS)
def test_every_named_sweep_runs_on_a_tiny_model(tmp_path, name, monkeypatch, capsys):
    if name in ENGINE_PACKAGES:
        pytest.importorskip(ENGINE_PACKAGES[name], reason=f"sweeps/{name}.yaml runs in the {ENGINE_PACKAGES[name]} venv")
    extra = SMOKE_OVERRIDES.get(name, [])
    if name == "search_speedup":
        extra = extra + [f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db"]
    code, err = _main(["sweep", name, *TINY, "tracking=none", *extra], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    sweep_dir = _only_sweep(tmp_path / "multirun" / name)
    rows = _summary(sweep_dir)["jobs"]
    assert rows and all(r["status"] == "FINISHED" for r in rows), rows
    expected = {"drafters": 6, "draft_length": 8, "sampling": 4, "search_speedup": 2, "strategies": 10,
                "concurrency": 4}[name]
    assert len(rows) == expected
    samples = 2 if name == "concurrency" else 1
    for run_dir in run_dirs(sweep_dir):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "FINISHED" and summary["num_samples"] == samples
        config = (run_dir / "config.yaml").read_text()
        if "name: none" not in config.split("drafter:")[1].split("strategy:")[0]:
            assert "speedup" in summary, run_dir  # against the AR baseline of the same config
    if name == "concurrency":  # the sweep's own report (written when it ends)
        assert (sweep_dir / "report" / "concurrency.png").stat().st_size > 0
        assert "Serving metrics vs concurrency" in (sweep_dir / "report" / "report.md").read_text()


def test_unknown_sweep_name_is_one_line(tmp_path, monkeypatch, capsys):
    code, err = _main(["sweep", "nope"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"decodelab: error: sweep 'nope': no sweeps/nope.yaml; available: {', '.join(SWEEPS)}"]


def test_failed_job_is_recorded_and_the_others_finish(tmp_path, monkeypatch, capsys):
    """drafter=none has no draft length: an impossible combination inside an otherwise good grid."""
    db = tmp_path / "mlruns.db"
    code, err = _main(["run", "-m", "drafter=none,prompt_lookup,suffix", "draft_length=3", *TINY, "tracking=mlflow",
                       f"tracking.mlflow.tracking_uri=sqlite:///{db}", f"hydra.sweep.dir={tmp_path}/sw"],
                      tmp_path, monkeypatch, capsys)
    assert code == 1, err[-3000:]
    assert "will fail: draft_length: drafter=none has no draft length" in err
    rows = {r["overrides"][0]: r for r in _summary(tmp_path / "sw")["jobs"]}
    assert rows["drafter=none"]["status"] == "FAILED"
    assert "drafter=none has no draft length" in rows["drafter=none"]["error"]
    assert rows["drafter=prompt_lookup"]["status"] == rows["drafter=suffix"]["status"] == "FINISHED"
    failed_summary = json.loads((Path(rows["drafter=none"]["run_dir"]) / "summary.json").read_text())
    assert failed_summary["status"] == "FAILED"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("decodelab").experiment_id])
    parent = [r for r in runs if "decodelab.sweep_dir" in r.data.tags]
    assert len(parent) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED", "FINISHED"]
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "no draft length" in failed.data.tags["decodelab.error"]
    assert parent[0].data.metrics["jobs_failed"] == 1


LAUNCHERS = ["local", "joblib", "submitit_local", "ray"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_parent_run_and_children_across_launchers(tmp_path, launcher):
    if launcher == "ray":
        pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="optional extra: pip install 'decodelab[ray]'")
    db = tmp_path / "mlruns.db"
    out = _cli(["run", "-m", "drafter=none,prompt_lookup", f"launcher={launcher}", *TINY, "tracking=mlflow",
                f"tracking.mlflow.tracking_uri=sqlite:///{db}", f"hydra.sweep.dir={tmp_path}/sw"],
               cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    meta = read_sweep_meta(tmp_path / "sw")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    parent = client.get_run(meta["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["decodelab.sweep_dir"] == str(tmp_path / "sw")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.params["drafter.name"] for c in children) == ["none", "prompt_lookup"]
    assert all(c.info.status == "FINISHED" for c in children)
    folders = {c.data.tags["decodelab.run_dir"] for c in children}
    assert folders == {str(d.resolve()) for d in job_dirs(tmp_path / "sw")} and len(folders) == 2


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_resume_after_sigkill_loses_no_finished_sample(tmp_path):
    args = ["sweep", "drafters", "drafter=none,prompt_lookup,suffix", "model=tiny-random", "task.limit=6",
            "task.max_new_tokens=160", "progress=false", "print_table=false", "backend.threads=1", "tracking=none"]
    proc = subprocess.Popen([EXE, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    root = tmp_path / "multirun" / "drafters"
    deadline = time.time() + 300
    killed_in = None
    while time.time() < deadline and proc.poll() is None:
        for job in (root.glob("*/1") if root.exists() else []):
            if _lines(job / "samples.jsonl") >= 2 and not (job / "summary.json").exists():
                killed_in = job
        if killed_in:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_in is not None, "the sweep ended before it could be killed mid-job"
    first_sweep = killed_in.parent
    before = [json.loads(line) for line in (killed_in / "samples.jsonl").read_text().splitlines() if line.strip()]
    assert 2 <= len(before) < 6 and (first_sweep / "0" / "summary.json").exists()

    out = _cli(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    second_sweep = next(p for p in root.iterdir() if p.is_dir() and p != first_sweep)
    rows = {r["job"]: r for r in _summary(second_sweep)["jobs"]}
    # Job 0 finished before the kill: not run again.
    assert rows["0"]["status"] == "REUSED" and rows["0"]["run_dir"] == str(first_sweep / "0")
    assert not (second_sweep / "0" / "samples.jsonl").exists()
    # Job 1 was killed mid-way: completed from its samples, the finished ones taken as they were.
    assert rows["1"]["status"] == "FINISHED"
    after = [json.loads(line) for line in (second_sweep / "1" / "samples.jsonl").read_text().splitlines()]
    assert len(after) == 6
    by_id = {r["id"]: r for r in after}
    for old in before:
        new = by_id[old["id"]]
        assert new["resumed"] is True and new["wall_s"] == old["wall_s"]
        assert new["output_tokens"] == old["output_tokens"]
    assert sum(bool(r.get("resumed")) for r in after) == len(before)
    assert rows["2"]["status"] == "FINISHED"
    tracking = json.loads((second_sweep / "1" / "tracking.json").read_text())
    assert tracking["tags"]["resumed_from"] == str(killed_in)

    # A third run finds everything finished and decodes nothing.
    out = _cli(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    third = max((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    assert [r["status"] for r in _summary(third)["jobs"]] == ["REUSED"] * 3


def test_jobs_in_one_process_load_the_model_once(tmp_path, monkeypatch):
    from decodelab.models import loading as models
    from decodelab.cli import main

    calls = []
    original = models._load_model
    monkeypatch.setattr(models, "_load_model", lambda cfg, backend: calls.append(cfg.name) or original(cfg, backend))
    monkeypatch.setattr(models, "_LOADED", type(models._LOADED)())
    main(["run", "-m", "drafter=none,prompt_lookup,suffix", *TINY, "tracking=none", f"hydra.sweep.dir={tmp_path}/sw"])
    assert calls == ["tiny-random"]
    assert len(run_dirs(tmp_path / "sw")) == 3


def test_wandb_group_per_sweep_each_job_its_own_finished_run(tmp_path):
    from test_tracking import wandb_records

    out = _cli(["run", "-m", "drafter=none,prompt_lookup", *TINY, "tracking=wandb", "tracking.wandb.mode=offline",
                f"hydra.sweep.dir={tmp_path}/sw"], cwd=tmp_path, env={"WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    group = read_sweep_meta(tmp_path / "sw")["wandb_group"]
    runs = {}
    for job in job_dirs(tmp_path / "sw"):
        files = list(job.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) == 1, job  # one W&B run per job, in its own run folder
        records = wandb_records(files[0])
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == group
        assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)
        runs[run.run_id] = job
    assert len(runs) == 2


def test_job_raising_at_run_time_is_recorded_failed(tmp_path, monkeypatch, capsys):
    """Not a config error: a job runs out of memory on its second prompt. It is recorded FAILED with the
    sample it finished, the sweep goes on, and MLflow shows the failed child with its error."""
    from decodelab.experiment.runner import PromptRunner

    real_run_prompt = PromptRunner.run_prompt

    def run_prompt(self, index, prompt):
        if self.run.drafter.name == "suffix" and index == 1:
            raise MemoryError("simulated: the allocator could not find 2 GiB")
        return real_run_prompt(self, index, prompt)

    monkeypatch.setattr(PromptRunner, "run_prompt", run_prompt)
    db = tmp_path / "mlruns.db"
    code, err = _main(["run", "-m", "drafter=prompt_lookup,suffix,none", "task.limit=2", *TINY[2:], "model=tiny-random",
                       "tracking=mlflow", f"tracking.mlflow.tracking_uri=sqlite:///{db}", f"hydra.sweep.dir={tmp_path}/sw"],
                      tmp_path, monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    rows = _summary(tmp_path / "sw")["jobs"]
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED", "FINISHED"]
    assert rows[1]["error"] == "MemoryError: simulated: the allocator could not find 2 GiB"
    assert _lines(tmp_path / "sw" / "1" / "samples.jsonl") == 1  # the finished sample is kept
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    parent = read_sweep_meta(tmp_path / "sw")["mlflow_parent_run_id"]
    children = client.search_runs([client.get_experiment_by_name("decodelab").experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(children) == 3 and len(failed) == 1 and failed[0].data.tags["decodelab.error"] == rows[1]["error"]
