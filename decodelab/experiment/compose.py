"""Compose configs outside a Hydra app (tests, benchmarks, preflight) and turn composition errors into
one-line messages that name the bad key or value and what is allowed."""

from __future__ import annotations

import itertools
import sys
from typing import Iterable, List, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from decodelab.errors import UserError

VALIDATED_GROUPS = ("model", "backend", "drafter", "strategy", "task", "logger")
MAX_PREFLIGHT_JOBS = 1024


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The composed config for ``overrides`` (no Hydra run; ``output_dir`` must be given to run it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from decodelab.cli import conf_dir, register_resolvers
    from decodelab.config import register_configs

    register_resolvers()
    register_configs()
    _check_group_options(overrides)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides),
                                 return_hydra_config=return_hydra_config)
    except UserError:
        raise
    except Exception as err:  # Hydra and OmegaConf raise many kinds; all are bad input here.
        raise UserError(one_line(err)) from None


def validate(cfg: DictConfig) -> None:
    """Types, ranges and availability of everything a run needs, without loading a model."""
    from decodelab.config import RunConfig
    from decodelab.models.loading import check_model_available, resolve_device
    from decodelab.tasks import load_task

    from decodelab.drafters.registry import drafter_config

    parts = {}
    for group in VALIDATED_GROUPS:
        try:
            parts[group] = OmegaConf.to_object(cfg[group])
        except OmegaConfBaseException as err:
            raise UserError(one_line(err)) from None
        if group == "drafter":
            parts[group] = drafter_config(parts[group])
        parts[group].validate(group)
    run = RunConfig(**parts, baseline=cfg.get("baseline", "cached"), draft_length=cfg.get("draft_length", None))
    run.apply_draft_length()
    run.validate()
    resolve_device(run.backend)
    check_model_available(run.model)
    load_task(run.task)


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
        print(f"decodelab: warning: job [{' '.join(job)}] will fail: {message}", file=sys.stderr)


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
        raise UserError(one_line(err)) from None
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


def _check_group_options(overrides: Iterable[str]) -> None:
    from decodelab.cli import GROUPS, group_options

    for line in overrides:
        key, sep, value = line.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS or value in ("", "null"):
            continue
        options = group_options(key)
        for item in value.strip("[]").split(","):
            item = item.strip()
            if item and item not in options:
                raise UserError(f"{key}={item}: unknown {key} option; available: {', '.join(options)}")


def one_line(err: BaseException) -> str:
    """The most specific message in an exception chain, on one line, led by the full key when known."""
    chain = []
    current = err
    while current is not None and len(chain) < 6:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for exc in reversed(chain):
        full_key = getattr(exc, "full_key", None)
        msg = getattr(exc, "msg", None) or str(exc)
        if full_key:
            first = msg.strip().splitlines()[0]
            if type(exc).__name__ == "ConfigKeyError" or " not in " in first:
                return f"{full_key}: unknown key; allowed: {', '.join(_allowed_keys(full_key))}"
            return f"{full_key}: {first}"
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text or type(err).__name__


def _allowed_keys(full_key: str) -> List[str]:
    """Keys of the parent node of ``full_key`` in the default config, for 'unknown key' messages."""
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    try:
        base = compose([])
        node = OmegaConf.select(base, parent) if parent else base
        return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    except Exception:
        return []
