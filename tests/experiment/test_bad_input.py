"""Bad input: one line on stderr naming the bad key/value and what is allowed, exit code 2, nothing recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decodelab.cli import main

CASES = [
    # (overrides, words the one-line message must contain)
    (["model=gpt5"], ["model=gpt5", "smollm2-135m", "tiny-random"]),
    (["strategy.tempreature=0.5"], ["strategy.tempreature", "unknown key", "temperature"]),
    (["strategy=sample", "strategy.temperature=hot"], ["strategy.temperature", "hot"]),
    (["strategy=sample", "strategy.top_p=1.5"], ["strategy.top_p", "(0, 1]", "1.5"]),
    (["strategy=sample", "strategy.top_p=0"], ["strategy.top_p", "(0, 1]"]),
    (["strategy=sample", "strategy.temperature=-0.1"], ["strategy.temperature", ">= 0"]),
    (["strategy=sample", "strategy.top_k=-3"], ["strategy.top_k", ">= 0"]),
    (["strategy=sample", "strategy.min_p=1.2"], ["strategy.min_p", "[0, 1]"]),
    (["task.max_new_tokens=0"], ["task.max_new_tokens", ">= 1"]),
    (["task=jsonl", "task.path=/nonexistent/questions.jsonl"], ["task.path", "not found", "/nonexistent/questions.jsonl"]),
    (["model.package=not-a-real-package-xyz"], ["not-a-real-package-xyz", "pip install"]),
    (["model.gguf_file=missing.gguf"], ["missing.gguf"]),
    (["backend.dtype=float8"], ["backend.dtype", "float8", "bfloat16"]),
    (["task=nope"], ["task=nope", "specbench-mini", "humaneval"]),
    (["task.categories=[poetry]"], ["task.categories", "poetry", "summarization"]),
    (["model=tiny-random", "model.num_heads=3"], ["model.hidden_size", "divisible"]),
    (["model=hf", "model.path=/nonexistent/model-dir"], ["model.path", "/nonexistent/model-dir", "never downloads"]),
    (["drafter=warp_drive"], ["drafter=warp_drive", "prompt_lookup"]),
    (["drafter=prompt_lookup", "drafter.max_ngram_size=0"], ["drafter.max_ngram_size", ">= 1"]),
    (["drafter=draft_model", "drafter.model=qwen2.5-coder-0.5b"], ["drafter.model", "model@drafter.model"]),
    (["drafter=draft_model", "+drafter.length.bogus=1"], ["drafter.length.bogus", "policy"]),
    (["drafter=layer_skip", "drafter.length.policy=magic"], ["drafter.length.policy", "heuristic", "ucb"]),
    (["strategy=sample", "strategy.acceptance=yolo"], ["strategy.acceptance", "lossless", "typical"]),
    (["baseline=sometimes"], ["baseline", "fresh"]),
    # Keys added with + or ++ are checked against the schema too (Hydra would let the typed config drop them).
    (["+strategy.temprature=0.5"], ["strategy.temprature", "unknown key", "temperature"]),
    (["++task.max_new_token=5"], ["task.max_new_token", "unknown key", "max_new_tokens"]),
    (["+backend.compile_mode=max"], ["backend.compile_mode", "unknown key", "compile"]),
    (["+extra_note=hello"], ["extra_note", "unknown key", "tags"]),
    (["logger=none"], ["logger=none", "tracking=none"]),
    (["task.unsafe_execution=true"], ["task.unsafe_execution", "no generated code"]),
    # Strategies (decodelab/strategies): ranges, pairings with drafters, what the task must provide.
    (["strategy=beam", "strategy.num_beams=0"], ["strategy.num_beams", ">= 1"]),
    (["strategy=beam", "strategy.num_beams=3", "strategy.num_beam_groups=2"], ["strategy.num_beams", "divisible"]),
    (["strategy=beam", "strategy.diversity_penalty=0.5"], ["strategy.diversity_penalty", "num_beam_groups > 1"]),
    (["strategy=beam", "drafter=suffix"], ["drafter=suffix", "strategy=beam", "drafter=none"]),
    (["strategy=contrastive_search", "strategy.penalty_alpha=1.5"], ["strategy.penalty_alpha", "[0, 1]"]),
    (["strategy=cad"], ["strategy=cad", "context", "task.categories"]),
    (["strategy=dola", "strategy.layers=middle"], ["strategy.layers", "low", "high"]),
    (["strategy=mbr", "strategy.utility=bleu"], ["strategy.utility", "rouge_l", "chrf"]),
    (["strategy.name=beam_search"], ["strategy.name", "beam_search", "beam"]),
]


def _run_cli(args, capsys, cwd: Path, monkeypatch):
    return _run_cli_command(["run", *args], capsys, cwd, monkeypatch)


def _run_cli_command(args, capsys, cwd: Path, monkeypatch):
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def _assert_one_line_error(code, err, words):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("decodelab: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("args,words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_one_line_exit_2(args, words, capsys, tmp_path, monkeypatch):
    code, err = _run_cli(args, capsys, tmp_path, monkeypatch)
    _assert_one_line_error(code, err, words)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns.db").exists()


def test_humaneval_without_isolation_refuses_before_loading_the_model(capsys, tmp_path, monkeypatch):
    """Fail closed: no unshare on PATH, so generated code cannot be isolated and nothing runs."""
    from decodelab.experiment import sandbox

    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox.isolation_problem.cache_clear()
    try:
        code, err = _run_cli(["model=tiny-random", "task=humaneval", "task.limit=1"], capsys, tmp_path, monkeypatch)
    finally:
        sandbox.isolation_problem.cache_clear()
    _assert_one_line_error(code, err, ["task=humaneval", "cannot isolate", "unshare", "task.unsafe_execution=true"])
    assert not (tmp_path / "runs").exists()


def test_malformed_jsonl_names_the_line(capsys, tmp_path, monkeypatch):
    path = tmp_path / "q.jsonl"
    good = json.dumps({"question_id": 1, "category": "qa", "turns": ["hi"]})
    path.write_text(good + "\n" + good.replace('"question_id": 1', '"question_id": 2') + "\n{not json\n")
    code, err = _run_cli(["task=jsonl", f"task.path={path}"], capsys, tmp_path, monkeypatch)
    _assert_one_line_error(code, err, ["line 3", str(path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(capsys, tmp_path, monkeypatch):
    code, err = _run_cli(["backend=cuda"], capsys, tmp_path, monkeypatch)
    _assert_one_line_error(code, err, ["backend.device", "cuda", "not available"])


def test_multirun_checks_every_job_before_starting(capsys, tmp_path, monkeypatch):
    """Every job of the grid is bad: one line, exit 2, nothing runs."""
    code, err = _run_cli(["-m", "strategy=sample", "strategy.top_p=1.5,2.0", "model=tiny-random", "tracking=none"],
                         capsys, tmp_path, monkeypatch)
    _assert_one_line_error(code, err, ["strategy.top_p", "1.5"])
    assert not (tmp_path / "multirun").exists()


def test_multirun_composition_error_in_one_job_stops_the_sweep(capsys, tmp_path, monkeypatch):
    """A typo in one value of a grid is bad input, not a failed job: one line, exit 2, nothing runs."""
    code, err = _run_cli(["-m", "drafter=none,promt_lookup", "model=tiny-random", "tracking=none"],
                         capsys, tmp_path, monkeypatch)
    _assert_one_line_error(code, err, ["drafter=promt_lookup", "prompt_lookup"])
    assert not (tmp_path / "multirun").exists()


def test_multirun_bad_job_is_warned_then_recorded_failed(capsys, tmp_path, monkeypatch):
    """One out-of-range point of a grid: warned up front, recorded FAILED, the other job finishes, exit 1."""
    code, err = _run_cli(["-m", "strategy=sample", "strategy.top_p=0.9,1.5", "model=tiny-random", "tracking=none",
                          "task.limit=1", "task.max_new_tokens=4", "progress=false", "print_table=false"],
                         capsys, tmp_path, monkeypatch)
    assert code == 1 and "Traceback" not in err
    assert "will fail: strategy.top_p: must be in (0, 1], got 1.5" in err.splitlines()[0]
    summary = json.loads(next((tmp_path / "multirun").rglob("sweep_summary.json")).read_text())
    assert [job["status"] for job in summary["jobs"]] == ["FINISHED", "FAILED"]
    assert "strategy.top_p" in summary["jobs"][1]["error"]


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "frobnicate" in capsys.readouterr().err


def test_real_cli_process_exit_code(tmp_path):
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("decodelab")
    proc = subprocess.run([str(exe), "run", "strategy=sample", "strategy.top_p=2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    _assert_one_line_error(proc.returncode, proc.stderr.strip(), ["strategy.top_p"])


def test_added_key_typo_in_a_sweep_file_or_grid_is_refused(capsys, tmp_path, monkeypatch):
    """A typo added with + fails the whole command before any job runs, from the command line's grid or from a
    sweep file's hydra.sweeper.params."""
    code, err = _run_cli(["-m", "model=tiny-random", "tracking=none", "+strategy.temprature=0.5,0.7"],
                         capsys, tmp_path, monkeypatch)
    _assert_one_line_error(code, err, ["strategy.temprature", "unknown key", "temperature"])
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "typo.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n"
                                      "      +task.max_new_token: 4,8\n")
    monkeypatch.setenv("DECODELAB_SWEEPS_DIR", str(sweeps))
    code, err = _run_cli_command(["sweep", "typo", "model=tiny-random", "tracking=none"], capsys, tmp_path,
                                 monkeypatch)
    _assert_one_line_error(code, err, ["task.max_new_token", "unknown key", "max_new_tokens"])
    assert not (tmp_path / "multirun").exists()
