"""decodelab train-drafter on tiny-random: the loss falls, the checkpoint round-trips into drafter=eagle / medusa
(lossless against AR through a real run), a killed run resumes to the very head an uninterrupted one trains,
MLflow gets the curves, and bad input is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decodelab.cli.train import CONFIG_NAME, register_train_schema
from decodelab.errors import UserError
from decodelab.experiment.compose import compose, group_options
from decodelab.models.heads import load_head, trained_state
from decodelab.training import fit
from decodelab.training.fit import batch_indices
from decodelab.training.trainer import train, to_train_config
from tests.helpers.drafters import tiny_model

SMALL = ["model=tiny-random", "data.self_prompts=12", "data.max_new_tokens=20", "data.prompt_tokens=12",
         "data.held_out=0.2", "train.batch_size=4", "train.eval_every=10", "train.checkpoint_every=10",
         "train.warmup_steps=2", "train.vocab_size=120", "progress=false", "tracking=none"]


def train_cfg(tmp_path: Path, *overrides: str, name: str = "run"):
    register_train_schema()
    return compose([*SMALL, f"model.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'runs' / name}",
                    *overrides], config_name=CONFIG_NAME)


@pytest.mark.parametrize("option", group_options("train"))
def test_every_train_config_composes(option):
    register_train_schema()
    run = to_train_config(compose([f"train={option}", "output_dir=unused"], config_name=CONFIG_NAME))
    assert run.train.kind == option and run.task is None


def test_batches_cover_every_example_once_per_epoch():
    seen = [i for step in range(5) for i in batch_indices(step, 10, 4, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(2, 10, 4, 3) == batch_indices(2, 10, 4, 3) != batch_indices(2, 10, 4, 4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both kinds trained for 40 steps on the same (cached) self-written data."""
    tmp = tmp_path_factory.mktemp("train")
    out = {}
    for kind, extra in (("eagle", ["train.lr=0.01"]), ("medusa", ["train.num_heads=3", "train.lr=0.02"])):
        summary = train(train_cfg(tmp, f"train={kind}", "train.steps=40", "train.vocab_size=120", *extra, name=kind))
        out[kind] = (tmp / "runs" / kind, summary)
    return tmp, out


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_loss_falls_and_the_run_is_recorded(trained, kind):
    _, runs = trained
    run_dir, summary = runs[kind]
    assert summary["status"] == "FINISHED" and summary["steps"] == 40
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[-1]["train/loss"] < 0.9 * rows[0]["train/loss"]  # the first row already averages 10 steps
    assert rows[-1]["held_out/loss"] < rows[0]["held_out/loss"]
    assert all(0 <= r["held_out/top1/1"] <= 1 for r in rows)
    if kind == "medusa":
        assert {"held_out/top1/1", "held_out/top1/2", "held_out/top1/3"} <= set(rows[-1])
    fingerprint = json.loads((run_dir / "fingerprint.json").read_text())
    assert fingerprint["python"] and fingerprint["seeds"] == {"train": 0, "data": 0} and fingerprint["versions"]
    spec = json.loads((run_dir / "checkpoint" / "head.json").read_text())
    assert spec["kind"] == kind and spec["training"]["steps"] == 40 and len(spec["vocab"]) == 120


def test_both_heads_share_one_data_generation(trained):
    tmp, _ = trained
    assert len(list((tmp / "cache" / "train_data").glob("*.pt"))) == 1


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_checkpoint_round_trips_into_a_lossless_run(trained, kind, tmp_path):
    from decodelab.experiment.runner import run

    _, runs = trained
    run_dir, _ = runs[kind]
    loaded = tiny_model()
    head, spec = load_head(run_dir / "checkpoint", loaded.model, loaded.fingerprint, kind=kind)
    saved = torch.load(run_dir / "checkpoint" / fit.STATE_FILE, weights_only=False)["head"]
    assert all(torch.equal(saved[k], v) for k, v in trained_state(head).items())
    cfg = compose(["model=tiny-random", f"drafter={kind}", f"drafter.checkpoint={run_dir}", "task.limit=2",
                   "task.max_new_tokens=24", "tracking=none", "baseline=fresh", "progress=false",
                   "print_table=false", f"output_dir={tmp_path / 'decode'}"])
    summary = run(cfg)
    assert summary["lossless_rate"] == 1.0


def test_killed_run_resumes_to_the_uninterrupted_head(tmp_path, monkeypatch):
    straight = train(train_cfg(tmp_path, "train=medusa", "train.steps=30", "resume=false", name="straight"))
    assert straight["steps"] == 30
    calls = {"n": 0}
    real_step = fit.train_step

    def killed_after_24(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 24:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    import decodelab.training.trainer as trainer

    monkeypatch.setattr(trainer, "train_step", killed_after_24)
    resume_dir = tmp_path / "resumable"
    with pytest.raises(KeyboardInterrupt):
        train(train_cfg(tmp_path, "train=medusa", "train.steps=30", f"resume_dir={resume_dir}",
                        f"output_dir={resume_dir / 'first'}"))
    assert json.loads((resume_dir / "first" / "summary.json").read_text())["status"] == "FAILED"
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = train(train_cfg(tmp_path, "train=medusa", "train.steps=30", f"resume_dir={resume_dir}",
                              f"output_dir={resume_dir / 'second'}"))
    assert resumed["steps"] == 30
    tracking = json.loads((resume_dir / "second" / "tracking.json").read_text())
    assert tracking["tags"]["resumed_from"].endswith("first")
    rows = [json.loads(line)["step"] for line in (resume_dir / "second" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [10, 20, 30]  # the killed run's curve up to its checkpoint (step 20), then the rest
    loaded = tiny_model()
    a, _ = load_head(tmp_path / "runs" / "straight" / "checkpoint", loaded.model, loaded.fingerprint)
    b, _ = load_head(resume_dir / "second" / "checkpoint", loaded.model, loaded.fingerprint)
    for (name, x), y in zip(trained_state(a).items(), trained_state(b).values()):
        assert torch.allclose(x, y, atol=1e-6), name
    again = train(train_cfg(tmp_path, "train=medusa", "train.steps=30", f"resume_dir={resume_dir}",
                            f"output_dir={resume_dir / 'third'}"))
    assert again["reused_from"].endswith("second")


def test_mlflow_gets_the_step_series(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    train(train_cfg(tmp_path, "train=medusa", "train.steps=20", "tracking=mlflow",
                    f"tracking.mlflow.tracking_uri={uri}"))
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("decodelab").experiment_id])
    history = client.get_metric_history(run.info.run_id, "held_out/loss")
    assert [m.step for m in history][:2] == [10, 20] and {m.step for m in history} == {10, 20}
    assert run.data.tags["config_hash"] and "steps" in run.data.metrics
    # drafter.checkpoint may name the training run by its MLflow id: its run folder, else its logged head files.
    from decodelab.experiment.runner import run as decode

    import shutil

    shutil.rmtree(tmp_path / "runs" / "run" / "checkpoint")
    cfg = compose(["model=tiny-random", "drafter=medusa", f"drafter.checkpoint={run.info.run_id}", "task.limit=1",
                   "task.max_new_tokens=12", "tracking=mlflow", f"tracking.mlflow.tracking_uri={uri}",
                   f"model.cache_dir={tmp_path / 'cache'}", "baseline=fresh", "progress=false", "print_table=false",
                   f"output_dir={tmp_path / 'decode'}"])
    assert decode(cfg)["lossless_rate"] == 1.0
    assert (tmp_path / "cache" / "checkpoints" / run.info.run_id / "head.json").is_file()
    cfg = compose(["model=tiny-random", "drafter=medusa", "drafter.checkpoint=" + "0" * 32, "tracking=mlflow",
                   f"tracking.mlflow.tracking_uri={uri}", f"output_dir={tmp_path / 'never'}"])
    with pytest.raises(UserError, match="drafter.checkpoint: 0{32} is neither a path nor an MLflow run"):
        decode(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["train.num_heads=0"], "train.num_heads: must be in [1, 16], got 0"),
    (["train=eagle", "train.num_heads=2"], "train.num_heads: an EAGLE drafter has one layer"),
    (["train.vocab_size=100000"], "train.vocab_size: 100000 is larger than the vocabulary of tiny-random (320)"),
    (["task=specbench-mini"], "is also a prompt id of the evaluation task specbench-mini"),
])
def test_bad_input_is_one_line(tmp_path, overrides, message):
    with pytest.raises(UserError) as err:
        train(train_cfg(tmp_path, *overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_jsonl_with_an_evaluation_prompts_text_is_refused(tmp_path):
    from decodelab.tasks import load_task
    from decodelab.config import TaskConfig

    text = load_task(TaskConfig(name="specbench-mini", source="specbench_mini"))[3].turns[0]
    path = tmp_path / "mine.jsonl"
    rows = [{"question_id": "mine-1", "category": "x", "turns": ["Tell me about owls."]},
            {"question_id": "mine-2", "category": "x", "turns": ["  " + text.upper() + " "]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError, match="'mine-2' of task=jsonl has the text of prompt '4' of the evaluation task"):
        train(train_cfg(tmp_path, "task=jsonl", f"task.path={path}"))


def test_cli_refuses_overlap_with_exit_2_before_recording(tmp_path):
    proc = subprocess.run([str(Path(sys.executable).with_name("decodelab")), "train-drafter", "model=tiny-random",
                           "task=mtbench", "tracking=none", f"hydra.run.dir={tmp_path / 'never'}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "evaluation task mtbench" in lines[0]
    assert not (tmp_path / "never").exists()
