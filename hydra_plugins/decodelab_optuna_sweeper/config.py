"""The sweeper's structured config, registered as ``hydra/sweeper=decodelab_optuna``.

Hydra's plugin scan imports this module, which is what puts the option into the ConfigStore; keep it free of
heavy imports (optuna is imported only when a sweep starts) and of ``from __future__ import annotations``
(dataclasses then look the module up in sys.modules, where the scanner has not put it yet).
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class DecodelabOptunaSweeperConf:
    _target_: str = "hydra_plugins.decodelab_optuna_sweeper.optuna_sweeper.DecodelabOptunaSweeper"
    # key -> Hydra override value: choice(a,b) / a,b (categorical), range(a,b[,step]) (int, b excluded),
    # interval(a,b) (float), int(interval(a,b)) (int, both ends), tag(log, ...) (log scale), or a plain
    # value (a fixed override). Sweep overrides given on the command line are merged in (and win).
    params: Optional[Dict[str, Any]] = None
    n_trials: int = 20
    # Trials asked per batch and handed to the launcher together.
    n_jobs: int = 1
    direction: str = "maximize"
    # Key of the job's return value (a summary dict) to optimise; a job that returns a number is used as is.
    objective: str = "speedup"
    # key -> condition on the job's summary, e.g. {lossless_rate: ">=1.0", rouge_l: ">=0.2"}.
    # A trial that violates one is told to the study as PRUNED (see optuna_sweeper.py).
    constraints: Dict[str, str] = field(default_factory=dict)
    sampler: str = "tpe"  # tpe | random | grid
    seed: Optional[int] = None
    # Same storage + same study_name resumes the study: only the trials still missing are run.
    study_name: Optional[str] = "${hydra.job.name}"
    storage: Optional[str] = "sqlite:///${hydra.sweep.dir}/optuna.db"


ConfigStore.instance().store(group="hydra/sweeper", name="decodelab_optuna", node=DecodelabOptunaSweeperConf,
                             provider="decodelab")
