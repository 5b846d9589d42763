"""End-to-end runs: the CLI and the run loop on tiny models, and one short SmolLM2 run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from decodelab.experiment.compose import compose
from decodelab.experiment.metrics import HEADLINE
from decodelab.experiment.runner import run
from decodelab.tracking.run_folder import RunFolder

EXE = str(Path(sys.executable).with_name("decodelab"))
TINY = ["model=tiny-random", "task.max_new_tokens=12"]


def _cli(args, cwd, timeout=300):
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})


def _samples(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_cli_run_writes_run_folder(tmp_path):
    proc = _cli(["run", *TINY, "tracking=none", "task.limit=6", "task.shuffle_seed=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = list((tmp_path / "runs").iterdir())
    for name in ("config.yaml", "samples.jsonl", "summary.json", "fingerprint.json"):
        assert (run_dir / name).exists(), name
    samples = _samples(run_dir)
    assert len(samples) == 6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED"
    for key in HEADLINE:
        assert key in summary
    categories = {s["category"] for s in samples}
    for category in categories:
        assert f"throughput_tok_s/{category}" in summary
    assert summary["new_tokens"] == sum(s["new_tokens"] for s in samples)
    assert "decodelab results" in proc.stdout and "overall" in proc.stdout


def test_cli_multirun_folders_never_collide(tmp_path):
    proc = _cli(["run", "-m", *TINY, "tracking=none", "task.limit=1", "strategy=greedy,sample,top_p"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sweep,) = list((tmp_path / "multirun").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 3
    assert all((job / "summary.json").exists() for job in jobs)


def test_cli_hydra_grammar_and_list(tmp_path):
    # Free-form keys go under tags (the one place the schema leaves open); +key elsewhere is refused.
    proc = _cli(["run", "--cfg", "job", *TINY, "~print_table", "+tags.extra_note=hello"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "extra_note: hello" in proc.stdout and "tiny-random" in proc.stdout and "print_table" not in proc.stdout
    listing = _cli(["list"], tmp_path)
    assert listing.returncode == 0
    assert "model:" in listing.stdout and "smollm2-135m" in listing.stdout and "specbench-mini" in listing.stdout
    assert "train (decodelab train-drafter train=NAME): eagle, medusa" in listing.stdout


def test_run_logs_to_mlflow_and_wandb_at_once(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = compose([*TINY, "tracking=all", f"tracking.mlflow.tracking_uri={uri}", f"tracking.wandb.dir={tmp_path}",
                   "tracking.wandb.mode=offline", "task.limit=3"])
    summary = run(cfg, output_dir=str(tmp_path / "run"))
    client = MlflowClient(tracking_uri=uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("decodelab").experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.metrics["throughput_tok_s"] == pytest.approx(summary["throughput_tok_s"])
    assert "throughput_tok_s/conversation" in mlrun.data.metrics
    assert mlrun.data.params["model.name"] == "tiny-random"
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_unreachable_mlflow_keeps_results(tmp_path, capsys):
    cfg = compose([*TINY, "tracking=mlflow", "tracking.mlflow.tracking_uri=http://127.0.0.1:9", "task.limit=2"])
    run(cfg, output_dir=str(tmp_path / "run"))
    assert len(_samples(tmp_path / "run")) == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "FINISHED"
    assert "decodelab upload" in capsys.readouterr().err


def test_multi_turn_second_turn_follows_first_answer(tmp_path):
    cfg = compose([*TINY, "tracking=none", "task=mtbench", "task.limit=2", "task.max_new_tokens=8"])
    run(cfg, output_dir=str(tmp_path / "run"))
    for sample in _samples(tmp_path / "run"):
        assert len(sample["turns"]) == 2 and len(sample["outputs"]) == 2
        assert len(sample["output_tokens"][1]) >= 1


def test_humaneval_scored_in_sandbox(tmp_path):
    cfg = compose([*TINY, "tracking=none", "task=humaneval", "task.limit=1", "task.max_new_tokens=8"])
    summary = run(cfg, output_dir=str(tmp_path / "run"))
    assert summary["pass@1"] == 0.0  # random weights write no working code
    assert [s["code_execution"] for s in _samples(tmp_path / "run")] == ["isolated"]


def test_unsafe_execution_is_warned_and_recorded(tmp_path, capsys):
    cfg = compose([*TINY, "tracking=none", "task=humaneval", "task.limit=2", "task.max_new_tokens=4",
                   "task.unsafe_execution=true"])
    run(cfg, output_dir=str(tmp_path / "run"))
    assert "UNCONFINED" in capsys.readouterr().err
    assert [s["code_execution"] for s in _samples(tmp_path / "run")] == ["unconfined"] * 2
    assert RunFolder(tmp_path / "run").tracking()["tags"]["code_execution"] == "unconfined"


def test_same_seed_same_samples(tmp_path):
    overrides = [*TINY, "tracking=none", "strategy=sample", "task.limit=3"]
    run(compose(overrides), output_dir=str(tmp_path / "a"))
    run(compose(overrides), output_dir=str(tmp_path / "b"))
    run(compose([*overrides, "strategy.seed=123"]), output_dir=str(tmp_path / "c"))
    a, b, c = (_samples(tmp_path / x) for x in "abc")
    assert [s["output_tokens"] for s in a] == [s["output_tokens"] for s in b]
    assert [s["output_tokens"] for s in a] != [s["output_tokens"] for s in c]


@pytest.mark.slow
def test_smollm2_short_integration_run(tmp_path, monkeypatch):
    """The real default model through the whole stack: chat template, quality scores, MLflow."""
    monkeypatch.chdir(tmp_path)
    cfg = compose(["model=smollm2-135m", "task.categories=[summarization,math_reasoning]", "task.limit=2",
                   "task.shuffle_seed=0", "task.max_new_tokens=24", f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"])
    summary = run(cfg, output_dir=str(tmp_path / "run"))
    samples = _samples(tmp_path / "run")
    assert len(samples) == 2
    assert all(s["outputs"][0].strip() for s in samples)
    assert summary["throughput_tok_s"] > 0 and summary["ttft_s"] > 0
    assert any(k in summary for k in ("rouge_l", "exact_match"))
