"""Every file in conf/ composes and validates (as lightning-hydra-template's tests do)."""

from __future__ import annotations

import importlib.util

import pytest
from omegaconf import OmegaConf

from decodelab.experiment.compose import GROUPS, conf_dir, group_options
from decodelab.experiment.compose import VALIDATED_GROUPS, compose, expand_sweep
from decodelab.experiment.compose import to_run_config
from decodelab.errors import UserError

# Options that need a user-supplied value (model.path, task.path) before they validate.
NEEDS_VALUE = {("model", "hf"): ["model.path=/tmp"], ("task", "jsonl"): ["task.path=x.jsonl"], ("drafter", "medusa"): ["drafter.checkpoint=/tmp"],
               ("drafter", "eagle"): ["drafter.checkpoint=/tmp"]}


def all_options():
    return [(group, option) for group in GROUPS for option in group_options(group)]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group} is empty"
    assert (conf_dir() / "config.yaml").exists()


@pytest.mark.parametrize("group,option", all_options())
def test_every_config_composes(group, option):
    cfg = compose([f"{group}={option}", *NEEDS_VALUE.get((group, option), []), "output_dir=unused"])
    from decodelab.drafters.registry import drafter_config
    from decodelab.strategies.registry import strategy_config

    for part in VALIDATED_GROUPS:
        node = OmegaConf.to_object(cfg[part])
        if part == "drafter":
            node = drafter_config(node)
        if part == "strategy":
            node = strategy_config(node)
        if (group, option) not in NEEDS_VALUE:
            node.validate(part)
    if (group, option) == ("engine", "vllm") and importlib.util.find_spec("vllm") is None:
        with pytest.raises(UserError, match=r"^engine: engine=vllm needs vLLM, which is not installed.*make vllm"):
            to_run_config(cfg)  # the core venv: one line saying how to install it
    elif (group, option) not in NEEDS_VALUE:
        run = to_run_config(cfg)
        assert run.output_dir == "unused"


def test_defaults_are_the_quickstart_parts():
    cfg = compose(["output_dir=x"])
    assert cfg.model.name == "smollm2-135m" and cfg.backend.device == "cpu"
    assert cfg.drafter.name == "none" and cfg.strategy.do_sample is False
    assert cfg.task.name == "specbench-mini" and cfg.tracking.mlflow is not None
    quick = compose(["experiment=quickstart", "output_dir=x"])
    assert quick.tags.experiment == "quickstart" and quick.task.max_new_tokens == 64


def test_tracking_list_selects_both():
    cfg = compose(["tracking=[mlflow,wandb]", "output_dir=x"])
    assert cfg.tracking.mlflow is not None and cfg.tracking.wandb is not None
    assert compose(["tracking=all"]).tracking.wandb.mode == "auto"
    assert compose(["tracking=none"]).tracking.mlflow is None


def test_expand_sweep_grid():
    jobs = expand_sweep(["strategy=greedy,sample", "task.limit=1,2,3", "backend=cpu"])
    assert len(jobs) == 6
    assert ["strategy=sample", "task.limit=3", "backend=cpu"] in jobs


SCHEMAS = {"model": "ModelConfig", "backend": "BackendConfig", "strategy": "StrategyConfig", "task": "TaskConfig",
           "tracking": "TrackingConfig"}


def _restated_defaults(values, schema, prefix=""):
    """Keys of a group YAML whose value equals the schema's own default: they belong in the dataclass only."""
    import dataclasses

    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else
                         f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                for f in dataclasses.fields(schema)}
    out = []
    for key, value in (values or {}).items():
        if key == "defaults":
            continue
        default = defaults.get(key)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            out += _restated_defaults(value, type(default), f"{prefix}{key}.")
        elif value == default and value != {}:
            out.append(f"{prefix}{key}")
    return out


@pytest.mark.parametrize("group", [*SCHEMAS, "drafter"])
def test_group_yamls_hold_only_deltas(group):
    """Every conf/ YAML of a typed group holds only what differs from its dataclass (the ConfigStore schema)."""
    import yaml

    import decodelab.config as schemas
    from decodelab.drafters.registry import REGISTRY
    from decodelab.strategies.registry import REGISTRY as STRATEGIES

    registries = {"drafter": REGISTRY, "strategy": STRATEGIES}
    restated = {}
    for option in group_options(group):
        values = yaml.safe_load((conf_dir() / group / f"{option}.yaml").read_text()) or {}
        name = compose([f"{group}={option}"])[group].name if group in registries else None  # cad_plain serves cad
        schema = registries[group][name].config_class if group in registries else getattr(schemas, SCHEMAS[group])
        found = _restated_defaults(values, schema)
        if found:
            restated[option] = found
    assert not restated, f"{group} YAMLs restate schema defaults: {restated}"
