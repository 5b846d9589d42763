"""``decodelab report``: tables and plots of a real (tiny) sweep, from its folder and from MLflow."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from decodelab.errors import UserError
from decodelab.experiment.plots import pareto_front
from decodelab.analysis.report import (MISSING, load_job, varied_keys, write_report, _acceptance)
from decodelab.cli.report import cli
pytestmark = pytest.mark.usefixtures("one_thread")
DECODELAB = Path(sys.executable).with_name("decodelab")
DRAFTERS = ("none", "prompt_lookup", "suffix")
# Two categories with reference-based quality (rouge_l, exact_match): shuffle seed 3 picks one prompt of each.
SWEEP_ARGS = ["model=tiny-random", f"drafter={','.join(DRAFTERS)}", "task.categories=[summarization,rag]",
              "task.shuffle_seed=3", "task.limit=2", "task.max_new_tokens=12", "backend.threads=1",
              "progress=false", "print_table=false"]
Tables = Dict[str, Tuple[List[str], List[List[str]]]]


@pytest.fixture(scope="module")
def mlflow_sweep(tmp_path_factory):
    """One real sweep logged both to its folder and to a sqlite MLflow store, under a parent run.

    The parent is created here and handed to the jobs by environment, as the brief of the tracker says;
    the sweep callback may replace it by its own, so tests take the parent from the children's tags.
    """
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("sweep_report")
    uri = f"sqlite:///{tmp}/mlruns.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("decodelab", artifact_location=(tmp / "mlartifacts").as_uri())
    parent = client.create_run(experiment, run_name="test-sweep-parent").info.run_id
    env = {**os.environ, "DECODELAB_MLFLOW_PARENT_RUN_ID": parent}
    sweep = tmp / "sweep"
    proc = subprocess.run([str(DECODELAB), "run", "-m", *SWEEP_ARGS, "tracking=mlflow",
                           f"tracking.mlflow.tracking_uri={uri}", f"hydra.sweep.dir={sweep}"],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads((sweep / "0" / "tracking.json").read_text())["remotes"]["mlflow"]["run_id"]
    parent = client.get_run(child).data.tags["mlflow.parentRunId"]
    return {"dir": sweep, "uri": uri, "parent": parent, "tmp": tmp}


def parse_tables(markdown: str) -> Tables:
    """Markdown tables by section title: (headers, rows)."""
    tables: Tables = {}
    title = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
        elif line.startswith("| ") and title is not None:
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if title not in tables:
                tables[title] = (cells, [])
            else:
                tables[title][1].append(cells)
    return tables


def close(cell: str, value, digits: int) -> bool:
    if value is None:
        return cell == MISSING
    return cell != MISSING and abs(float(cell) - value) <= 0.5 * 10 ** -digits + 1e-9


def check_row_against_summary(headers: List[str], row: List[str], summary: dict, suffix: str) -> None:
    cells = dict(zip(headers, row))
    speedup = summary.get("speedup" + suffix)
    if speedup is None:
        assert cells["speedup [95% CI]"] == MISSING
    else:
        value, low, high = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cells["speedup [95% CI]"]).groups()
        assert close(value, speedup, 3) and close(low, summary["speedup_ci_low" + suffix], 3)
        assert close(high, summary["speedup_ci_high" + suffix], 3)
    for column, key, digits in (("tau", "mean_accepted_length", 3), ("alpha", "acceptance_rate", 3),
                                ("lossless", "lossless_rate", 3), ("tok/s", "throughput_tok_s", 2),
                                ("n", "num_samples", 0), ("rouge_l", "rouge_l", 3), ("exact_match", "exact_match", 3)):
        if column in cells:
            assert close(cells[column], summary.get(key + suffix), digits), (column, cells[column], summary.get(key + suffix))


def test_folder_report_matches_run_summaries(mlflow_sweep, tmp_path):
    sweep = mlflow_sweep["dir"]
    result = write_report(sweep, tmp_path / "rep", log_to_mlflow=False)
    markdown = result["markdown"].read_text(encoding="utf-8")
    page = result["html"].read_text(encoding="utf-8")
    tables = parse_tables(markdown)

    headers, rows = tables["Results: overall"]
    assert [r[headers.index("drafter")] for r in rows] == list(DRAFTERS)
    assert {"rouge_l", "exact_match"} <= set(headers)
    for category in ("rag", "summarization"):
        cat_headers, cat_rows = tables[f"Results: {category}"]
        assert len(cat_rows) == 3
        for row in cat_rows:
            summary = json.loads((sweep / row[0] / "summary.json").read_text())
            check_row_against_summary(cat_headers, row, summary, f"/{category}")
    for row in rows:
        summary = json.loads((sweep / row[0] / "summary.json").read_text())
        check_row_against_summary(headers, row, summary, "")
    none_row = dict(zip(headers, rows[0]))
    assert none_row["speedup [95% CI]"] == MISSING and none_row["alpha"] == MISSING
    assert "Failed and unfinished jobs" not in tables and "## Failed and unfinished jobs\n\nNone.\n" in markdown

    names = {p.name for p in result["plots"]}
    assert {"speedup_vs_draft_length.png", "acceptance_histograms.png", "per_position_acceptance.png",
            "pareto_rouge_l.png", "pareto_exact_match.png"} <= names
    from PIL import Image

    for path in result["plots"]:
        assert path.parent == result["out_dir"] and f'<img src="{path.name}"' in page and f"]({path.name})" in markdown
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    assert "<table>" in page and "<script" not in page and "<link" not in page
    assert not re.search(r'(src|href)="(https?:|/)', page)
    assert result["jobs"] == {"0": "FINISHED", "1": "FINISHED", "2": "FINISHED"}


def test_mlflow_source_gives_the_same_tables_and_logs_to_parent(mlflow_sweep, tmp_path):
    from mlflow import MlflowClient

    folder = write_report(mlflow_sweep["dir"], tmp_path / "from_folder", log_to_mlflow=False)
    remote = write_report(mlflow_sweep["parent"], tmp_path / "from_mlflow", tracking_uri=mlflow_sweep["uri"])
    folder_tables = parse_tables(folder["markdown"].read_text(encoding="utf-8"))
    remote_tables = parse_tables(remote["markdown"].read_text(encoding="utf-8"))
    assert remote_tables == folder_tables and len(folder_tables["Results: overall"][1]) == 3
    assert sorted(p.name for p in remote["plots"]) == sorted(p.name for p in folder["plots"])

    assert remote["mlflow_run_id"] == mlflow_sweep["parent"]
    client = MlflowClient(tracking_uri=mlflow_sweep["uri"])
    logged = {Path(a.path).name for a in client.list_artifacts(mlflow_sweep["parent"], "report")}
    assert {"report.md", "report.html", "acceptance_histograms.png"} <= logged


def test_mlflow_children_that_never_finished_are_listed(mlflow_sweep, tmp_path):
    """Jobs that died before logging artifacts: config rebuilt from params, status from the run."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    client = MlflowClient(tracking_uri=mlflow_sweep["uri"])
    experiment = client.get_experiment_by_name("decodelab").experiment_id
    parent = client.create_run(experiment, run_name="broken-sweep").info.run_id
    for job, status, error in (("0", "RUNNING", None), ("1", "FAILED", "MemoryError: out of memory")):
        tags = {"mlflow.parentRunId": parent, "decodelab.run_dir": f"/gone/sweep/{job}"}
        if error:
            tags["decodelab.error"] = error
        child = client.create_run(experiment, tags=tags).info.run_id
        client.log_batch(child, params=[Param("drafter.name", "suffix"), Param("drafter.max_spec_tokens", str(8 + int(job))),
                                        Param("task.limit", "2")], tags=[RunTag("x", "y")])
        if status != "RUNNING":
            client.set_terminated(child, status)
    result = write_report(parent, tmp_path / "rep", tracking_uri=mlflow_sweep["uri"])
    tables = parse_tables(result["markdown"].read_text(encoding="utf-8"))
    headers, rows = tables["Failed and unfinished jobs"]
    assert headers == ["job", "drafter", "drafter.max_spec_tokens", "status", "error"]
    assert rows == [["0", "suffix", "8", "UNFINISHED", MISSING], ["1", "suffix", "9", "FAILED", "MemoryError: out of memory"]]
    assert "Results: overall" not in tables and result["plots"] == []


def test_cli_writes_into_the_sweep_folder_and_prints_paths(mlflow_sweep, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(mlflow_sweep["dir"], sweep, ignore=shutil.ignore_patterns("report"))
    (sweep / "sweep.json").unlink(missing_ok=True)  # no parent run: nothing to log, nothing to warn about
    cli([str(sweep)])
    out = capsys.readouterr().out
    for name in ("report.md", "report.html", "per_position_acceptance.png"):
        assert (sweep / "report" / name).is_file() and f"wrote {sweep.resolve() / 'report' / name}" in out


def test_a_sweep_name_reports_its_latest_folder(mlflow_sweep, tmp_path, monkeypatch, capsys):
    """`decodelab report drafters` after `decodelab sweep drafters`: the latest multirun/drafters/<time>_<id>/."""
    for stamp in ("2026-01-01_00-00-00_aaaaaa", "2026-01-02_00-00-00_bbbbbb"):
        shutil.copytree(mlflow_sweep["dir"], tmp_path / "multirun" / "drafters" / stamp,
                        ignore=shutil.ignore_patterns("report"))
        (tmp_path / "multirun" / "drafters" / stamp / "sweep.json").unlink(missing_ok=True)
    monkeypatch.chdir(tmp_path)
    cli(["drafters"])
    latest = tmp_path / "multirun" / "drafters" / "2026-01-02_00-00-00_bbbbbb"
    assert (latest / "report" / "report.md").is_file()
    assert not (tmp_path / "multirun" / "drafters" / "2026-01-01_00-00-00_aaaaaa" / "report").exists()
    with pytest.raises(UserError, match=r"SWEEP: sampling is neither .*\(drafters\)"):
        cli(["sampling"])


def test_failed_and_unfinished_jobs_are_listed(mlflow_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(mlflow_sweep["dir"], sweep, ignore=shutil.ignore_patterns("report", "sweep.json"))
    for job in ("3", "4"):
        (sweep / job).mkdir()
        shutil.copy(sweep / "1" / "config.yaml", sweep / job / "config.yaml")
    (sweep / "3" / "summary.json").write_text(json.dumps({"status": "FAILED", "error": "RuntimeError: boom | pipe"}))
    result = write_report(sweep, None)
    markdown = result["markdown"].read_text(encoding="utf-8")
    tables = parse_tables(markdown)
    headers, rows = tables["Failed and unfinished jobs"]
    failed = {row[0]: dict(zip(headers, row)) for row in rows}
    assert failed["3"]["status"] == "FAILED" and failed["3"]["error"] == "RuntimeError: boom | pipe"
    assert failed["4"]["status"] == "UNFINISHED" and failed["4"]["drafter"] == "prompt_lookup"
    assert [row[0] for row in tables["Results: overall"][1]] == ["0", "1", "2"]
    assert "Jobs: 5 (3 finished, 1 failed, 1 unfinished)" in markdown
    assert "RuntimeError: boom | pipe" in result["html"].read_text(encoding="utf-8")


def test_acceptance_is_recomputed_from_samples_when_summary_lacks_it(mlflow_sweep, tmp_path):
    job_dir = tmp_path / "1"
    shutil.copytree(mlflow_sweep["dir"] / "1", job_dir)
    original = load_job(job_dir, "1")
    summary = json.loads((job_dir / "summary.json").read_text())
    stripped = {k: v for k, v in summary.items()
                if k not in ("accepted_histogram", "per_position_acceptance") and not k.startswith("acceptance_rate_pos_")}
    (job_dir / "summary.json").write_text(json.dumps(stripped))
    histogram, per_position = _acceptance(load_job(job_dir, "1"))
    assert sum(histogram) > 0
    assert (histogram, per_position) == (original.summary["accepted_histogram"],
                                         pytest.approx(original.summary["per_position_acceptance"]))


def test_baseline_only_sweep_without_quality_skips_plots(mlflow_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    for name in ("config.yaml", "samples.jsonl"):
        shutil.copy(mlflow_sweep["dir"] / "0" / name, sweep / "0" / name)
    summary = json.loads((mlflow_sweep["dir"] / "0" / "summary.json").read_text())
    summary = {k: v for k, v in summary.items() if not k.startswith(("rouge_l", "exact_match"))}
    (sweep / "0" / "summary.json").write_text(json.dumps(summary))
    result = write_report(sweep, None)
    markdown = result["markdown"].read_text(encoding="utf-8")
    assert result["plots"] == [] and not list(result["out_dir"].glob("*.png"))
    assert len(result["skipped"]) == 4 and markdown.count("_Skipped: ") == 4
    assert "no finished job has a quality metric" in markdown and "drafted any tokens" in markdown
    headers, rows = parse_tables(markdown)["Results: overall"]
    assert dict(zip(headers, rows[0]))["speedup [95% CI]"] == MISSING and "rouge_l" not in headers
    assert "Varied across jobs: nothing" in markdown


def test_varied_keys_ignore_options_other_drafters_lack():
    configs = [{"drafter": {"name": "none"}, "output_dir": "a", "task": {"limit": 2}},
               {"drafter": {"name": "prompt_lookup", "num_speculative_tokens": 4}, "output_dir": "b", "task": {"limit": 2}},
               {"drafter": {"name": "prompt_lookup", "num_speculative_tokens": 8}, "output_dir": "c", "task": {"limit": 3}},
               {"drafter": {"name": "suffix", "max_spec_tokens": 16}, "output_dir": "d", "task": {"limit": 2}}]
    assert varied_keys(configs) == ["task.limit", "drafter.num_speculative_tokens"]
    assert varied_keys(configs[:2]) == []


def test_pareto_front_keeps_points_nothing_beats_on_both_axes():
    points = [(1.0, 0.5), (2.0, 0.4), (1.5, 0.3), (0.5, 0.5), (2.0, 0.4)]
    assert pareto_front(points) == [0, 1, 4]


def test_bad_sweep_is_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match=r"^SWEEP: .*nope is neither a sweep folder, a sweep name under multirun/ "
                                        r"\(none found\) nor an MLflow run id"):
        write_report(tmp_path / "nope", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no job folders"):
        write_report(tmp_path / "empty", None)
    missing_db = tmp_path / "missing.db"
    with pytest.raises(UserError, match="no MLflow database"):
        write_report("0" * 32, None, tracking_uri=f"sqlite:///{missing_db}")
    assert not missing_db.exists()
    with pytest.raises(UserError, match="unexpected argument '--bogus'"):
        cli([str(tmp_path), "--bogus"])
    with pytest.raises(UserError, match="report needs SWEEP"):
        cli([])


def test_unknown_run_id_in_a_real_store(mlflow_sweep):
    with pytest.raises(UserError, match="not a sweep folder nor a run in the MLflow store"):
        write_report("f" * 32, None, tracking_uri=mlflow_sweep["uri"])
    child = json.loads((mlflow_sweep["dir"] / "1" / "tracking.json").read_text())["remotes"]["mlflow"]["run_id"]
    with pytest.raises(UserError, match="has no child runs"):
        write_report(child, None, tracking_uri=mlflow_sweep["uri"])


def test_cli_exit_code_and_one_line(tmp_path):
    proc = subprocess.run([str(DECODELAB), "report", str(tmp_path / "nope")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("decodelab: error: SWEEP: ")
