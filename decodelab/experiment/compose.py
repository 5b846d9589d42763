"""Compose configs outside a Hydra app (tests, benchmarks, preflight) and turn composition errors into
one-line messages that name the bad key or value and what is allowed."""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path
from typing import Iterable, List, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from decodelab.config import RunConfig
from decodelab.errors import UserError, one_line, warn

GROUPS = ("model", "backend", "drafter", "strategy", "engine", "task", "tracking", "launcher", "experiment")
# The groups of each primary config: config (a run), train_drafter (decodelab train-drafter).
CONFIG_GROUPS = {"config": GROUPS, "train_drafter": ("model", "backend", "task", "tracking", "train")}
VALIDATED_GROUPS = ("model", "backend", "drafter", "strategy", "engine", "task", "tracking")
MAX_PREFLIGHT_JOBS = 1024


def conf_dir() -> Path:
    """conf/ of the checkout (editable install) or the one packaged beside the code."""
    override = os.environ.get("DECODELAB_CONF_DIR")
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parents[1]
    candidates += [here.parent / "conf", here / "conf"]
    for candidate in candidates:
        if (candidate / "config.yaml").exists():
            return candidate
    raise UserError(f"config folder not found (looked in {', '.join(map(str, candidates))}); set DECODELAB_CONF_DIR")


def group_options(group: str) -> List[str]:
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("uid"):
        # A short random id per run folder: jobs started in the same second never collide.
        OmegaConf.register_new_resolver("uid", lambda: uuid.uuid4().hex[:6], use_cache=True)


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False, config_name: str = "config") -> DictConfig:
    """The composed config for ``overrides`` (no Hydra run; ``output_dir`` must be given to run it). ``config_name``:
    the primary config (config: a run; train_drafter: a head training, whose schema its command registers)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    register_configs()
    check_group_options(overrides, CONFIG_GROUPS[config_name])
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides),
                                return_hydra_config=return_hydra_config)
        if config_name == "config":
            check_run_keys(cfg)
        return cfg
    except UserError:
        raise
    except Exception as err:  # Hydra and OmegaConf raise many kinds; all are bad input here.
        raise UserError(_group_hint(one_line(err, allowed_keys))) from None


def check_run_keys(cfg: DictConfig) -> None:
    """No key the schemas lack, anywhere in a composed config, including ``+key=value`` additions (which the
    typed config would drop without a word)."""
    from decodelab.config import check_keys
    from decodelab.drafters.registry import check_drafter_keys
    from decodelab.engines.registry import check_engine_keys
    from decodelab.strategies.registry import check_strategy_keys

    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)  # type: ignore[union-attr]
    blocks = {"drafter": check_drafter_keys, "strategy": check_strategy_keys, "engine": check_engine_keys}
    nodes = {group: plain.pop(group, None) for group in blocks}  # type: ignore[union-attr]
    check_keys(plain, RunConfig)
    for group, check_block in blocks.items():
        if isinstance(nodes[group], dict):
            check_block(nodes[group])


def _group_hint(message: str) -> str:
    """A group option assigned as a plain string (``drafter.model=qwen2.5-coder-0.5b``) is a block picked with
    ``<group>@<key>=<option>``: say so, instead of OmegaConf's type complaint."""
    import re

    from decodelab.config import block_expected, group_of

    match = re.match(r"^(\S+): Invalid type assigned: str is not a subclass of (\w+)\. value: (.*)$", message)
    if not match or group_of(match.group(2)) is None:
        return message
    key, schema, value = match.groups()
    return f"{key}: {block_expected(schema, value, key)}"


def validate(cfg: DictConfig) -> None:
    """Types, ranges and availability of everything a run needs, without loading a model."""
    from decodelab.models.loading import check_model_available, resolve_device
    from decodelab.drafters.registry import drafter_config
    from decodelab.engines.registry import check_engine, engine_config
    from decodelab.experiment.quality import code_execution
    from decodelab.strategies.registry import REGISTRY as STRATEGIES
    from decodelab.strategies.registry import check_pairing, strategy_config
    from decodelab.kernels.provider import check_kernels
    from decodelab.tasks import load_task

    parts = {}
    for group in VALIDATED_GROUPS:
        try:
            parts[group] = OmegaConf.to_object(cfg[group])
        except OmegaConfBaseException as err:
            raise UserError(one_line(err, allowed_keys)) from None
        if group == "drafter":
            parts[group] = drafter_config(parts[group])
        if group == "strategy":
            parts[group] = strategy_config(parts[group])
        if group == "engine":
            parts[group] = engine_config(parts[group])
        parts[group].validate(group)
    run = RunConfig(**parts, baseline=cfg.get("baseline", "cached"), draft_length=cfg.get("draft_length", None))
    apply_draft_length(run)
    run.validate()
    check_pairing(run.strategy, run.drafter.name, run.backend)
    check_engine(run)
    resolve_device(run.backend)
    check_kernels(run.backend, run.strategy)
    for model in [run.model] + STRATEGIES[run.strategy.name].models(run.strategy):
        check_model_available(model)
    prompts = load_task(run.task)
    STRATEGIES[run.strategy.name].check_prompts(run.strategy, prompts)
    code_execution(run.task, prompts, announce=False)
    if run.task.mauve:
        from decodelab.experiment.mauve import require_mauve

        require_mauve()


def validate_overrides(overrides: Sequence[str], multirun: bool) -> None:
    """Compose and validate every job a command line describes (every point of a multirun grid, including
    the grid a sweep file sets in ``hydra.sweeper.params``).

    A composition error (unknown option or key, wrong type) fails the command. In a multirun, a job whose
    values are out of range or impossible together only gets a warning here: it runs, is recorded as
    FAILED with that error, and the other jobs go on; if every job would fail the command fails.
    """
    if not multirun:
        validate(compose(overrides))
        return
    jobs = expand_sweep(sweeper_params(overrides) + list(overrides))
    failures = []
    for job in jobs:
        cfg = compose(job)
        try:
            validate(cfg)
        except UserError as err:
            failures.append((job, str(err)))
    if failures and len(failures) == len(jobs):
        raise UserError(failures[0][1])
    for job, message in failures:
        warn(f"job [{' '.join(job)}] will fail: {message}")


def sweeper_params(overrides: Sequence[str]) -> List[str]:
    """``hydra.sweeper.params`` of the composed config as overrides, minus keys the command line sets."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        plain = [o.input_line for o in parsed if not o.is_sweep_override()]  # a single composition
        params = OmegaConf.select(compose(plain, return_hydra_config=True), "hydra.sweeper.params")
    except Exception:  # noqa: BLE001 - the jobs' own composition reports what is wrong, in one line
        return []
    if not params:
        return []
    given = {line.split("=", 1)[0].lstrip("+~") for line in overrides}
    return [f"{key}={value}" for key, value in params.items() if key not in given]


def expand_sweep(overrides: Sequence[str]) -> List[List[str]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:
        raise UserError(one_line(err, allowed_keys)) from None
    choices: List[List[str]] = []
    for override in parsed:
        if override.is_sweep_override() and not override.is_hydra_override():
            try:
                values = list(override.sweep_string_iterator())
            except Exception:  # interval()/search spaces belong to a sweeper; it checks them itself
                continue
            choices.append([f"{override.get_key_element()}={value}" for value in values])
        elif not override.is_hydra_override() or override.get_key_element().startswith("hydra.searchpath"):
            choices.append([override.input_line])  # the search path decides which configs exist
    jobs = [list(job) for job in itertools.islice(itertools.product(*choices), MAX_PREFLIGHT_JOBS)]
    return jobs or [[]]


def check_group_options(overrides: Iterable[str], groups: Sequence[str] = GROUPS) -> None:
    for line in overrides:
        key, sep, value = line.partition("=")
        key = key.lstrip("+~")
        if key.split(".")[0] == "logger":
            raise UserError(f"{line}: the logger group is now called tracking; write tracking{line.partition('logger')[2]}")
        if not sep or key not in groups or value in ("", "null"):
            continue
        options = group_options(key)
        for item in value.strip("[]").split(","):
            item = item.strip()
            if item and item not in options:
                raise UserError(f"{key}={item}: unknown {key} option; available: {', '.join(options)}")



def allowed_keys(full_key: str) -> List[str]:
    """Keys of the parent node of ``full_key`` in the default config, for 'unknown key' messages."""
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    try:
        base = compose([])
        node = OmegaConf.select(base, parent) if parent else base
        return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    except Exception:
        return []


SCHEMA_GROUP = "schema"


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore: the run schema (first in conf/config.yaml's defaults, it types
    model, backend, task and tracking), one ``schema/drafter/<name>`` node per registered drafter and one
    ``schema/strategy/<name>`` node per strategy name. A conf/drafter or conf/strategy YAML extends its node (``defaults: [/schema/drafter/<name>@_here_, _self_]``), so every YAML
    holds only what differs from its dataclass defaults, and a mistyped key fails at composition."""
    from hydra.core.config_store import ConfigStore

    from decodelab.drafters.registry import REGISTRY
    from decodelab.engines.registry import REGISTRY as ENGINES
    from decodelab.strategies.registry import REGISTRY as STRATEGIES

    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for name, drafter in REGISTRY.items():
        store.store(group=f"{SCHEMA_GROUP}/drafter", name=name, node=drafter.config_class)
    for name, strategy in STRATEGIES.items():
        store.store(group=f"{SCHEMA_GROUP}/strategy", name=name, node=strategy.config_class(name=name))
    for name, engine in ENGINES.items():
        store.store(group=f"{SCHEMA_GROUP}/engine", name=name, node=engine.config_class)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve, type and validate a composed config; raises UserError on bad values."""
    from decodelab.drafters.registry import drafter_config
    from decodelab.engines.registry import check_engine, engine_config
    from decodelab.strategies.registry import check_pairing, strategy_config

    check_run_keys(cfg)
    try:
        run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise UserError(one_line(err, allowed_keys)) from None
    run.drafter = drafter_config(run.drafter)
    run.strategy = strategy_config(run.strategy)
    run.engine = engine_config(run.engine)
    apply_draft_length(run)
    run.validate()
    check_pairing(run.strategy, run.drafter.name, run.backend)
    check_engine(run)
    return run


def apply_draft_length(run: RunConfig) -> None:
    """The run-level ``draft_length`` onto the drafter's own field; a drafter without one is named with those
    that have one."""
    from decodelab.drafters.registry import draft_length_drafters
    from decodelab.errors import ConfigError, check

    if run.draft_length is None:
        return
    check(run.draft_length >= 1, "draft_length", f"must be >= 1 or null, got {run.draft_length}")
    try:
        run.drafter.set_draft_length(run.draft_length)
    except ConfigError as err:
        raise ConfigError("draft_length", f"{str(err).split(': ', 1)[1]}; allowed with: "
                                          f"{', '.join(draft_length_drafters())}") from None
