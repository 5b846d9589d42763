"""A Hydra sweeper that drives an Optuna study with ask/tell (optuna>=3; the published plugin pins optuna<3).

Each batch asks ``n_jobs`` trials, turns their params into ordinary Hydra overrides
(``drafter.num_speculative_tokens=7``), hands them to the configured launcher, and tells every result back:

* the job raised (Hydra's JobReturn is FAILED) or returned ``{"status": "FAILED", ...}`` -> ``FAIL`` with user
  attr ``error`` (one line); the study goes on. A crashing job never ends the search.
* the job ran but its summary violates a ``constraints`` entry -> ``PRUNED`` with user attr ``infeasible``
  (which constraint, the measured value, by how much) and ``objective_value``. PRUNED rather than COMPLETE:
  infeasible trials then never become ``best_trial``/``best_value`` for any sampler or Optuna version, the
  measurement is still kept, and TPE ranks pruned trials below every completed one, so the search moves away.
* otherwise ``COMPLETE`` with the value of ``objective`` in the job's summary (or the number it returned).

Every trial also records ``overrides``, ``job_num``, ``output_dir`` and the summary's numeric ``metrics``. The
study lives in ``storage`` (default: ``optuna.db`` in the sweep folder); re-running with the same storage and
``study_name`` resumes it and runs only the ``n_trials`` not yet finished (COMPLETE, PRUNED and FAIL all count).
Bad sweeper settings stop before any job with ``decodelab: error: <one line>`` and exit code 2.
"""

import logging
import math
import operator
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from decodelab.errors import UserError

if TYPE_CHECKING:  # optuna is imported when a sweep starts, not by Hydra's plugin scan of every app start.
    import optuna
    from optuna.distributions import BaseDistribution

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "random", "grid")
RESULTS_FILE = "optuna_results.yaml"
OPERATORS: Dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
_CONDITION = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Constraint:
    key: str
    op: str
    bound: float

    @classmethod
    def parse(cls, key: str, condition: Any) -> "Constraint":
        match = _CONDITION.match(str(condition)) if isinstance(condition, str) else None
        if match is None:
            raise UserError(f"hydra.sweeper.constraints.{key}: malformed condition {condition!r}; expected an "
                            f"operator ({', '.join(OPERATORS)}) and a number, e.g. '>=1.0'")
        return cls(key, match.group(1), float(match.group(2)))

    def violation(self, summary: Mapping[str, Any]) -> Optional[str]:
        """None when the summary satisfies the constraint, else why not (one line)."""
        value = _finite(summary.get(self.key))
        if value is None:
            return f"{self.key} missing from the job's summary (needs {self.op}{self.bound:g})"
        if OPERATORS[self.op](value, self.bound):
            return None
        return f"{self.key}={value:.6g} violates {self.op}{self.bound:g} (off by {abs(value - self.bound):.4g})"


@dataclass
class SearchSpace:
    """Distributions to sample, fixed overrides, and how to write a sampled value back as an override."""

    distributions: Dict[str, "BaseDistribution"] = field(default_factory=dict)
    fixed: Dict[str, str] = field(default_factory=dict)
    # Categorical choices that were lists/dicts: stored as their override text, written back verbatim.
    verbatim: Dict[str, Set[str]] = field(default_factory=dict)

    def overrides(self, params: Mapping[str, Any]) -> List[str]:
        lines = [f"{key}={self._text(key, value)}" for key, value in params.items()]
        return lines + [f"{key}={value}" for key, value in self.fixed.items()]

    def _text(self, key: str, value: Any) -> str:
        if isinstance(value, str) and value in self.verbatim.get(key, ()):
            return value
        return Transformer.str(value)

    def probe(self) -> Dict[str, Any]:
        """One point of the space (first choice, lower bounds): enough to catch keys that do not compose."""
        return {key: dist.choices[0] if hasattr(dist, "choices") else dist.low
                for key, dist in self.distributions.items()}

    def grid(self) -> Dict[str, List[Any]]:
        """The grid GridSampler walks; UserError for continuous dimensions."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        grid = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif isinstance(dist, IntDistribution) and not dist.log:
                grid[key] = list(range(dist.low, dist.high + 1, dist.step))
            elif isinstance(dist, FloatDistribution) and dist.step is not None:
                count = int(round((dist.high - dist.low) / dist.step)) + 1
                grid[key] = [dist.low + i * dist.step for i in range(count)]
            else:
                raise UserError(f"hydra.sweeper.sampler=grid: {key} is continuous; a grid needs choice(...), "
                                "a,b,c or range(...) values (or use sampler=tpe|random)")
        return grid


def parse_search_space(lines: Sequence[str]) -> SearchSpace:
    """Hydra override lines (sweeper params, then the command line: later lines win) -> SearchSpace."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(lines))
    except Exception as err:  # Hydra's grammar errors: one line is enough to find the typo.
        raise UserError(f"search space: {_one_line(err)}") from None
    space = SearchSpace()
    for override in parsed:
        key = override.get_key_element()
        space.distributions.pop(key, None)
        space.fixed.pop(key, None)
        if not override.is_sweep_override():
            space.fixed[key] = override.get_value_element_as_str()
            continue
        try:
            space.distributions[key] = _distribution(override, space.verbatim.setdefault(key, set()))
        except UserError:
            raise
        except Exception as err:  # optuna's ValueError for e.g. log scale with low <= 0
            raise UserError(f"{override.input_line}: {_one_line(err)}") from None
    return space


def _distribution(override: Override, verbatim: Set[str]) -> "BaseDistribution":
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        items = value.list if isinstance(value, ChoiceSweep) else list(override.sweep_iterator())
        choices = []
        for item in items:
            if not isinstance(item, (str, int, float, bool)):
                item = Transformer.str(item)  # a list/dict choice: kept as its override text
                verbatim.add(item)
            choices.append(item)
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        points = list(override.sweep_iterator())
        if not points:
            raise UserError(f"{override.input_line}: empty range")
        step = abs(value.step)
        if all(isinstance(p, int) for p in points):
            return IntDistribution(min(points), max(points), step=int(step), log=log_scale and step == 1)
        return FloatDistribution(float(min(points)), float(max(points)), step=float(step))
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)  # both ends, as the official plugin
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise UserError(f"{override.input_line}: unsupported sweep; use choice(...), a,b,c, range(...), "
                    "interval(...), int(interval(...)) or tag(log, ...)")


@dataclass
class Outcome:
    state: str  # COMPLETE | PRUNED | FAIL (optuna.trial.TrialState names)
    value: Optional[float] = None
    attrs: Dict[str, Any] = field(default_factory=dict)


def judge(ret: JobReturn, objective: str, constraints: Sequence[Constraint]) -> Outcome:
    """What to tell the study about one finished job."""
    try:
        result = ret.return_value  # re-raises the job's exception when it failed
    except Exception as err:
        return Outcome("FAIL", attrs={"error": _one_line(err)})
    if result is None:
        return Outcome("FAIL", attrs={"error": f"the job returned None; expected a number or a summary dict with "
                                               f"{objective!r}"})
    summary: Mapping[str, Any] = result if isinstance(result, Mapping) else {}
    if isinstance(result, Mapping):
        if str(summary.get("status", "")).upper() == "FAILED":
            return Outcome("FAIL", attrs={"error": _one_line(summary.get("error") or "the job reported status FAILED")})
        if objective not in summary:
            keys = ", ".join(sorted(str(k) for k in summary)[:12])
            return Outcome("FAIL", attrs={"error": f"objective {objective!r} missing from the job's summary "
                                                   f"(keys: {keys})"})
        raw = summary[objective]
    else:
        raw = result
    value = _finite(raw)
    # Overall metrics only (per-category keys, "name/<category>", stay in the run folder).
    metrics = {str(k): float(v) for k, v in summary.items() if "/" not in str(k) and _finite(v) is not None}
    if value is None:
        return Outcome("FAIL", attrs={"error": f"objective {objective!r} is {raw!r}, not a finite number",
                                      "metrics": metrics})
    violations = [v for v in (c.violation(summary) for c in constraints) if v]
    if violations:
        return Outcome("PRUNED", attrs={"infeasible": "; ".join(violations), "objective_value": value,
                                        "metrics": metrics})
    return Outcome("COMPLETE", value, attrs={"metrics": metrics})


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _one_line(err: Any) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    if isinstance(err, BaseException):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text[:500]


class DecodelabOptunaSweeper(Sweeper):
    """Hydra sweeper: an Optuna study over Hydra overrides, with failure isolation, constraints and resume."""

    def __init__(self, params: Optional[DictConfig] = None, n_trials: int = 20, n_jobs: int = 1,
                 direction: str = "maximize", objective: str = "speedup", constraints: Optional[DictConfig] = None,
                 sampler: str = "tpe", seed: Optional[int] = None, study_name: Optional[str] = None,
                 storage: Optional[str] = None) -> None:
        # Validated in setup(): an exception here would reach the user wrapped in Hydra's multi-line message.
        self.params = params
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.direction = direction
        self.objective = objective
        self.constraints_conf = constraints
        self.constraints: List[Constraint] = []
        self.sampler_name = sampler
        self.seed = seed
        self.study_name = study_name
        self.storage = storage
        self.job_idx = 0
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        with _exit_on_user_error():
            self.validate()
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def validate(self) -> None:
        """UserError (one line naming the key and what is allowed) for bad sweeper settings."""
        for key in ("n_trials", "n_jobs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"hydra.sweeper.{key}: must be an integer >= 1, got {value!r}")
        if self.direction not in DIRECTIONS:
            raise UserError(f"hydra.sweeper.direction: {self.direction!r} is not allowed; use {' or '.join(DIRECTIONS)}")
        if self.sampler_name not in SAMPLERS:
            raise UserError(f"hydra.sweeper.sampler: unknown sampler {self.sampler_name!r}; "
                            f"available: {', '.join(SAMPLERS)}")
        if not isinstance(self.objective, str) or not self.objective:
            raise UserError(f"hydra.sweeper.objective: must be a summary key such as 'speedup', got {self.objective!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise UserError(f"hydra.sweeper.seed: must be an integer or null, got {self.seed!r}")
        conditions = self.constraints_conf or {}
        if not isinstance(conditions, Mapping):
            raise UserError(f"hydra.sweeper.constraints: must map a summary key to a condition like '>=1.0', "
                            f"got {conditions!r}")
        self.constraints = [Constraint.parse(str(key), value) for key, value in conditions.items()]

    def sweep(self, arguments: List[str]) -> List[Sequence[JobReturn]]:
        with _exit_on_user_error():
            return self._sweep(arguments)

    def _sweep(self, arguments: List[str]) -> List[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        space = parse_search_space(self._params_lines() + list(arguments))
        target = self.n_trials
        if self.sampler_name == "grid":
            target = min(target, math.prod(len(values) for values in space.grid().values()))
        self._check_composable([space.overrides(space.probe())])  # before the storage gets a study
        study = self._open_study(space)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        trials = study.get_trials(deepcopy=False)
        finished = sum(1 for t in trials if t.state.is_finished())
        remaining = max(target - finished, 0)
        if finished:
            log.info(f"Resuming study '{study.study_name}': {finished} of {target} trials finished, {remaining} to go")
        self.job_idx = len(trials)  # job folders never collide with those of earlier trials
        returns: List[Sequence[JobReturn]] = []
        while remaining > 0:
            returns.append(self._run_batch(study, space, min(self.n_jobs, remaining)))
            remaining -= len(returns[-1])
        self._report(study, sweep_dir)
        return returns

    def _run_batch(self, study: "optuna.Study", space: SearchSpace, size: int) -> Sequence[JobReturn]:
        """Ask ``size`` trials, launch them together, tell every result."""
        from optuna.trial import TrialState

        batch = [study.ask(space.distributions) for _ in range(size)]
        overrides = [space.overrides(trial.params) for trial in batch]
        for offset, (trial, lines) in enumerate(zip(batch, overrides)):
            trial.set_user_attr("overrides", lines)
            trial.set_user_attr("job_num", self.job_idx + offset)
        self._check_composable(overrides, study, batch)
        told = 0
        try:
            results = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            for trial, ret in zip(batch, results):
                self._tell(study, trial, ret)
                told += 1
        except BaseException as err:  # Ctrl-C or a launcher crash: no trial of this batch stays RUNNING
            for trial in batch[told:]:
                trial.set_user_attr("error", f"sweep interrupted: {_one_line(err)}")
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        self.job_idx += len(results)
        return results

    def _params_lines(self) -> List[str]:
        if not self.params:
            return []
        lines = []
        for key, value in self.params.items():
            if OmegaConf.is_config(value):
                value = Transformer.str(OmegaConf.to_container(value, resolve=True))
            elif not isinstance(value, str):
                value = Transformer.str(value)
            lines.append(f"{key}={value}")
        return lines

    def _open_study(self, space: SearchSpace) -> "optuna.Study":
        import optuna

        storage = self.storage
        if storage and storage.startswith("sqlite:///"):
            from sqlalchemy.engine import make_url

            database = make_url(storage).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        try:
            study = optuna.create_study(storage=storage, study_name=self.study_name, direction=self.direction,
                                        load_if_exists=True)
        except Exception as err:  # unreachable server, bad URL, unsupported driver
            raise UserError(f"hydra.sweeper.storage={storage}: {_one_line(err)}") from None
        self._check_same_study(study, space)
        study.sampler = self._sampler(space, n_existing=len(study.get_trials(deepcopy=False)))
        return study

    def _check_same_study(self, study: "optuna.Study", space: SearchSpace) -> None:
        """Resuming must not mix trials of a different search into one study."""
        from optuna.distributions import distribution_to_json

        signature = {"direction": self.direction, "objective": self.objective,
                     "search_space": {k: distribution_to_json(d) for k, d in sorted(space.distributions.items())}}
        stored = {key: study.user_attrs[key] for key in signature if key in study.user_attrs}
        if not stored and not study.get_trials(deepcopy=False):
            for key, value in signature.items():
                study.set_user_attr(key, value)
            study.set_user_attr("fixed_overrides", space.overrides({}))
            return
        for key, value in signature.items():
            if key in stored and stored[key] != value:
                if key == "search_space":
                    names = sorted(k for k in set(value) | set(stored[key]) if value.get(k) != stored[key].get(k))
                    what = f"a different search space ({', '.join(names)} differ)"
                else:
                    what = f"{key}={stored[key]}, not {value}"
                raise UserError(f"hydra.sweeper.study_name={study.study_name}: that study in {self.storage} was run "
                                f"with {what}; choose another study_name or storage for a new study")
        if study.user_attrs.get("fixed_overrides", space.overrides({})) != space.overrides({}):
            log.warning(f"Resuming study '{study.study_name}' with different fixed overrides: "
                        f"{study.user_attrs['fixed_overrides']} before, {space.overrides({})} now")

    def _sampler(self, space: SearchSpace, n_existing: int) -> "optuna.samplers.BaseSampler":
        import optuna

        # A resumed study must not replay the first run's random draws: offset the seed by the trials done.
        seed = None if self.seed is None else self.seed + n_existing
        if self.sampler_name == "grid":
            return optuna.samplers.GridSampler(space.grid(), seed=seed)
        if self.sampler_name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant_liar is 'experimental' on optuna 3
            return optuna.samplers.TPESampler(seed=seed, constant_liar=self.n_jobs > 1)

    def _check_composable(self, overrides: List[List[str]], study: Optional["optuna.Study"] = None,
                          batch: Sequence[Any] = ()) -> None:
        """Compose jobs before launching them, so a search space naming a bad key fails in one line."""
        try:
            self.validate_batch_is_legal(overrides)
        except Exception as err:
            from optuna.trial import TrialState

            for trial in batch:
                trial.set_user_attr("error", _one_line(err))
                study.tell(trial, state=TrialState.FAIL)
            raise UserError(f"search space: {_one_line(err)}") from None

    def _tell(self, study: "optuna.Study", trial: Any, ret: JobReturn) -> None:
        from optuna.trial import TrialState

        outcome = judge(ret, self.objective, self.constraints)
        output_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
        if output_dir:
            trial.set_user_attr("output_dir", str(output_dir))
        for key, value in outcome.attrs.items():
            trial.set_user_attr(key, value)
        if outcome.state != "COMPLETE":
            log.warning(f"Trial {trial.number} {outcome.state}: "
                        f"{outcome.attrs.get('error') or outcome.attrs.get('infeasible')}")
        try:
            study.tell(trial, outcome.value, state=TrialState[outcome.state])
        except RuntimeError as err:
            if "Study.stop" not in str(err):  # GridSampler stopping when its grid is done; the state is stored
                raise

    def _report(self, study: "optuna.Study", sweep_dir: Path) -> None:
        """Print a short summary and write optuna_results.yaml into the sweep folder."""
        trials = study.get_trials(deepcopy=False)
        counts: Dict[str, int] = {}
        for trial in trials:
            counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        best = study.best_trial if complete else None
        results = {
            "study_name": study.study_name, "storage": self.storage, "direction": self.direction,
            "objective": self.objective, "constraints": {c.key: f"{c.op}{c.bound:g}" for c in self.constraints},
            "best": None if best is None else {"trial": best.number, "value": best.value, "params": best.params,
                                               "overrides": best.user_attrs.get("overrides"),
                                               "output_dir": best.user_attrs.get("output_dir")},
            "n_trials": counts,
            "trials": [{"trial": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                        **{k: t.user_attrs[k] for k in ("error", "infeasible", "output_dir") if k in t.user_attrs}}
                       for t in trials],
        }
        OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS_FILE)
        states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        print(f"optuna study '{study.study_name}': {len(trials)} trials ({states})")
        if best is None:
            print(f"no trial completed; see {sweep_dir / RESULTS_FILE}")
        else:
            params = " ".join(f"{key}={value}" for key, value in best.params.items())
            print(f"best {self.objective} = {best.value:.6g} (trial {best.number}): {params}")
        print(f"results: {sweep_dir / RESULTS_FILE}; storage: {self.storage}")


@contextmanager
def _exit_on_user_error() -> Iterator[None]:
    """Bad sweeper settings end the command in one line with exit code 2, like every decodelab UserError
    (Hydra would print an exception raised from a sweeper as a traceback)."""
    try:
        yield
    except UserError as err:
        print(f"decodelab: error: {err}", file=sys.stderr)
        sys.exit(UserError.exit_code)
