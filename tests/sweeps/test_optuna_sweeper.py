"""The decodelab_optuna Hydra sweeper: real Hydra apps in subprocesses, real Optuna studies in sqlite.

A standalone Hydra app (written to tmp_path) gives exact control over which trial fails, violates a
constraint or wins; one search runs ``decodelab run -m`` itself on a tiny random model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from decodelab.errors import UserError
from hydra_plugins.decodelab_optuna_sweeper.optuna_sweeper import (Constraint, DecodelabOptunaSweeper, judge,
                                                                   parse_search_space)

pytestmark = pytest.mark.usefixtures("one_thread")

EXE = str(Path(sys.executable).with_name("decodelab"))
TINY = ["model=tiny-random", "drafter=prompt_lookup", "task.limit=1", "task.max_new_tokens=8", "tracking=none",
        "progress=false", "print_table=false", "backend.threads=1"]

# x=3 raises, x=4 reports FAILED like decodelab's isolated jobs, x=5 breaks the quality floor of CONFIG.
APP = '''
import hydra

@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def app(cfg):
    if cfg.x == 3:
        raise ValueError("x=3 is forced to fail\\nsecond line of the message")
    if cfg.x == 4:
        return {"status": "FAILED", "error": "CUDA out of memory\\ntraceback..."}
    return {"status": "FINISHED", "score": 10.0 - (cfg.x - 2) ** 2 + cfg.y, "quality": 1.0 / cfg.x,
            "x_seen": cfg.x, "y_seen": cfg.y}

if __name__ == "__main__":
    app()
'''
CONFIG = '''
defaults:
  - override hydra/sweeper: decodelab_optuna
  - _self_
x: 1
y: 0.0
hydra:
  sweeper:
    objective: score
    sampler: grid
    n_trials: 5
    constraints:
      quality: ">=0.3"
    params:
      x: choice(1,2,3,4,5)
'''


def _app(tmp_path: Path) -> Path:
    (tmp_path / "conf").mkdir(exist_ok=True)
    (tmp_path / "conf" / "config.yaml").write_text(textwrap.dedent(CONFIG))
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    return tmp_path / "app.py"


def _run_app(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    app = _app(tmp_path)
    return subprocess.run([sys.executable, str(app), "-m", *overrides], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def _study(db: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def _by_x(study: optuna.Study) -> dict:
    return {t.params["x"]: t for t in study.trials}


def test_plugin_is_discovered_outside_the_checkout(tmp_path):
    """Hydra scans hydra_plugins with pkgutil; an editable install must not hide our portion from it."""
    code = ("from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
            "from hydra.core.config_store import ConfigStore; "
            "print(sorted(c.__name__ for c in Plugins.instance().discover(Sweeper))); "
            "print('decodelab_optuna.yaml' in ConfigStore.instance().list('hydra/sweeper'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["['BasicSweeper', 'DecodelabOptunaSweeper']", "True"]


def test_search_space_follows_hydra_grammar():
    space = parse_search_space(["a=choice(x,y)", "b=range(2,12)", "c=interval(0.1,1.0)", "d=tag(log,interval(1e-3,1))",
                                "e=int(interval(1,16))", "f=7", "g=2,4,8", "h=range(1,10,3)", "b=range(2,5)",
                                "i=choice([1,2],[3])"])
    d = space.distributions
    assert d["a"] == CategoricalDistribution(["x", "y"])
    assert d["b"] == IntDistribution(2, 4)  # the later (command-line) line wins; range's stop is excluded
    assert d["c"] == FloatDistribution(0.1, 1.0)
    assert d["d"] == FloatDistribution(1e-3, 1.0, log=True)
    assert d["e"] == IntDistribution(1, 16)
    assert d["g"] == CategoricalDistribution([2, 4, 8])
    assert d["h"] == IntDistribution(1, 7, step=3)
    assert space.fixed == {"f": "7"}
    assert space.overrides({"a": "x y", "i": "[1,2]", "e": 3}) == ["a=x\\ y", "i=[1,2]", "e=3", "f=7"]
    for line in space.overrides({"a": "x y", "i": "[1,2]", "e": 3}):  # every line is a valid override again
        OverridesParser.create().parse_override(line)
    with pytest.raises(UserError, match=r"^x=tag\(log,interval\(0,1\)\): .*low > 0"):
        parse_search_space(["x=tag(log,interval(0,1))"])
    with pytest.raises(UserError, match=r"sampler=grid: c is continuous"):
        space.grid()


def test_constraints_and_job_outcomes():
    floor = Constraint.parse("rouge_l", ">= 0.2")
    assert floor == Constraint("rouge_l", ">=", 0.2)
    assert floor.violation({"rouge_l": 0.25}) is None
    assert floor.violation({"rouge_l": 0.15}) == "rouge_l=0.15 violates >=0.2 (off by 0.05)"
    assert "missing" in floor.violation({})
    for bad in ("=>1", "1.0", "<= high", ""):
        with pytest.raises(UserError, match=r"^hydra.sweeper.constraints.rouge_l: malformed condition"):
            Constraint.parse("rouge_l", bad)

    def ret(value, status=JobStatus.COMPLETED):
        return JobReturn(status=status, _return_value=value)

    lossless = [Constraint.parse("lossless_rate", ">=1.0")]
    ok = judge(ret({"speedup": 1.5, "lossless_rate": 1.0, "status": "FINISHED"}), "speedup", lossless)
    assert (ok.state, ok.value, ok.attrs["metrics"]["lossless_rate"]) == ("COMPLETE", 1.5, 1.0)
    lossy = judge(ret({"speedup": 2.0, "lossless_rate": 0.5}), "speedup", lossless)
    assert lossy.state == "PRUNED" and lossy.attrs["objective_value"] == 2.0
    assert lossy.attrs["infeasible"] == "lossless_rate=0.5 violates >=1 (off by 0.5)"
    crashed = judge(ret(RuntimeError("boom\nmore"), JobStatus.FAILED), "speedup", lossless)
    assert (crashed.state, crashed.attrs["error"]) == ("FAIL", "RuntimeError: boom more")
    reported = judge(ret({"status": "FAILED", "error": "OOM"}), "speedup", lossless)
    assert (reported.state, reported.attrs["error"]) == ("FAIL", "OOM")
    assert judge(ret({"throughput_tok_s": 3.0}), "speedup", []).attrs["error"].startswith("objective 'speedup' missing")
    assert judge(ret(float("nan")), "speedup", []).state == "FAIL"
    assert judge(ret(None), "speedup", []).state == "FAIL"
    assert judge(ret(0.25), "speedup", []).value == 0.25  # a plain Hydra app may return the number itself


def test_failures_and_constraints_are_recorded_and_the_study_goes_on(tmp_path):
    out = _run_app(tmp_path, f"hydra.sweep.dir={tmp_path}/sw")
    assert out.returncode == 0, out.stderr[-3000:]
    study = _study(tmp_path / "sw" / "optuna.db", "app")  # default: sqlite in the sweep dir, study named by the job
    trials = _by_x(study)
    assert sorted(trials) == [1, 2, 3, 4, 5]
    assert {x: t.state for x, t in trials.items()} == {
        1: TrialState.COMPLETE, 2: TrialState.COMPLETE, 3: TrialState.FAIL, 4: TrialState.FAIL, 5: TrialState.PRUNED}
    assert trials[3].user_attrs["error"] == "ValueError: x=3 is forced to fail second line of the message"
    assert trials[4].user_attrs["error"] == "CUDA out of memory traceback..."
    assert trials[5].user_attrs["infeasible"] == "quality=0.2 violates >=0.3 (off by 0.1)"
    assert trials[5].user_attrs["objective_value"] == 1.0
    assert (study.best_value, study.best_params) == (10.0, {"x": 2})
    for x, trial in trials.items():  # job numbering follows the trials; each job got its override
        job_dir = tmp_path / "sw" / str(trial.user_attrs["job_num"])
        assert trial.user_attrs["output_dir"] == str(job_dir)
        assert yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) == [f"x={x}"]
        if trial.state != TrialState.FAIL:
            assert trial.user_attrs["metrics"]["x_seen"] == x
    assert sorted(t.user_attrs["job_num"] for t in trials.values()) == [0, 1, 2, 3, 4]
    results = yaml.safe_load((tmp_path / "sw" / "optuna_results.yaml").read_text())
    assert results["best"]["value"] == 10.0 and results["best"]["params"] == {"x": 2}
    assert results["n_trials"] == {"COMPLETE": 2, "FAIL": 2, "PRUNED": 1}
    assert "best score = 10 (trial" in out.stdout and "x=2" in out.stdout


def test_continuous_space_and_batches(tmp_path):
    """interval / int(interval) / tag(log, ...) from the command line, trials asked two at a time."""
    out = _run_app(tmp_path, f"hydra.sweep.dir={tmp_path}/sw", "hydra.sweeper.sampler=random", "hydra.sweeper.seed=3",
                   "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2", "x=int(interval(1,2))",
                   "y=tag(log,interval(0.01,1.0))")
    assert out.returncode == 0, out.stderr[-3000:]
    trials = _study(tmp_path / "sw" / "optuna.db", "app").trials
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for trial in trials:
        x, y = trial.params["x"], trial.params["y"]
        assert isinstance(x, int) and x in (1, 2) and 0.01 <= y <= 1.0
        assert trial.user_attrs["metrics"]["x_seen"] == x and trial.user_attrs["metrics"]["y_seen"] == pytest.approx(y)
        assert trial.value == pytest.approx(10.0 - (x - 2) ** 2 + y)
    assert out.stdout.count("Launching 2 jobs locally") == 1 and out.stdout.count("Launching 1 jobs locally") == 1


def test_resume_runs_only_the_missing_trials(tmp_path):
    db = tmp_path / "shared.db"
    common = [f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=resumable"]
    first = _run_app(tmp_path, *common, f"hydra.sweep.dir={tmp_path}/sw", "hydra.sweeper.n_trials=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(_study(db, "resumable").trials) == 3

    second = _run_app(tmp_path, *common, f"hydra.sweep.dir={tmp_path}/sw")  # n_trials=5 from the config
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 of 5 trials finished, 2 to go" in second.stdout
    study = _study(db, "resumable")
    assert sorted(_by_x(study)) == [1, 2, 3, 4, 5]  # the grid continues where it stopped
    assert sorted(t.user_attrs["job_num"] for t in study.trials) == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "sw").iterdir() if p.name.isdigit()) == ["0", "1", "2", "3", "4"]

    third = _run_app(tmp_path, *common, f"hydra.sweep.dir={tmp_path}/other")  # another run on the same file
    assert third.returncode == 0, third.stderr[-3000:]
    assert "5 of 5 trials finished, 0 to go" in third.stdout
    assert len(_study(db, "resumable").trials) == 5
    assert not any(p.name.isdigit() for p in (tmp_path / "other").iterdir())

    other_direction = _run_app(tmp_path, *common, "hydra.sweeper.direction=minimize")
    assert other_direction.returncode == 2 and "Traceback" not in other_direction.stderr
    assert other_direction.stderr.strip().splitlines()[-1:] == [
        f"decodelab: error: hydra.sweeper.study_name=resumable: that study in sqlite:///{db} was run with "
        "direction=maximize, not minimize; choose another study_name or storage for a new study"]


@pytest.mark.parametrize("settings, message", [
    ({"direction": "up"}, "hydra.sweeper.direction: 'up' is not allowed; use maximize or minimize"),
    ({"sampler": "cmaes"}, "hydra.sweeper.sampler: unknown sampler 'cmaes'; available: tpe, random, grid"),
    ({"constraints": {"lossless_rate": "=>1"}},
     "hydra.sweeper.constraints.lossless_rate: malformed condition '=>1'; expected an operator "
     "(>=, <=, >, <, ==, !=) and a number, e.g. '>=1.0'"),
    ({"n_jobs": 0}, "hydra.sweeper.n_jobs: must be an integer >= 1, got 0"),
    ({"n_trials": "many"}, "hydra.sweeper.n_trials: must be an integer >= 1, got 'many'"),
    ({"seed": 1.5}, "hydra.sweeper.seed: must be an integer or null, got 1.5"),
])
def test_bad_sweeper_settings_name_the_key(settings, message):
    with pytest.raises(UserError) as err:
        DecodelabOptunaSweeper(**settings).validate()
    assert str(err.value) == message


@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.direction=up", "hydra.sweeper.direction: 'up' is not allowed; use maximize or minimize"),
    ("y=interval(0,1)", "hydra.sweeper.sampler=grid: y is continuous; a grid needs choice(...), a,b,c or range(...) "
                        "values (or use sampler=tpe|random)"),
    ("z=choice(1,2)", "search space: ConfigCompositionException: Could not override 'z'. To append to your config "
                      "use +z=1"),
])
def test_bad_sweeper_config_stops_hydra_in_one_line(tmp_path, override, message):
    """Through Hydra: exit code 2 and one line, not a traceback; no job runs, no study is created."""
    out = _run_app(tmp_path, override, f"hydra.sweep.dir={tmp_path}/sw")
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [f"decodelab: error: {message}"]
    assert not (tmp_path / "sw").exists()


def test_decodelab_search_end_to_end(tmp_path):
    """decodelab run -m with the sweeper: interval and range overrides pass the CLI preflight, every trial's
    value is the speedup in its run folder's summary.json, and its config holds the sampled values."""
    args = ["run", "-m", "hydra/sweeper=decodelab_optuna", *TINY, "drafter.num_speculative_tokens=int(interval(2,8))",
            "drafter.max_ngram_size=range(1,3)", "hydra.sweeper.n_trials=3", "hydra.sweeper.seed=0",
            "+hydra.sweeper.constraints.lossless_rate='>=1.0'", f"hydra.sweep.dir={tmp_path}/sw"]
    out = subprocess.run([EXE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    study = _study(tmp_path / "sw" / "optuna.db", "decodelab")
    assert len(study.trials) == 3
    assert all(t.state == TrialState.COMPLETE for t in study.trials), [t.user_attrs for t in study.trials]
    for trial in study.trials:
        run_dir = Path(trial.user_attrs["output_dir"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "FINISHED" and summary["lossless_rate"] == 1.0
        assert trial.value == pytest.approx(summary["speedup"])
        drafter = yaml.safe_load((run_dir / "config.yaml").read_text())["drafter"]
        assert drafter["num_speculative_tokens"] == trial.params["drafter.num_speculative_tokens"]
        assert drafter["max_ngram_size"] == trial.params["drafter.max_ngram_size"] in (1, 2)
    results = yaml.safe_load((tmp_path / "sw" / "optuna_results.yaml").read_text())
    assert results["best"]["value"] == pytest.approx(study.best_value)
    assert results["n_trials"] == {"COMPLETE": 3}
