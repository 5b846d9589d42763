"""Every file in conf/ composes and validates (as lightning-hydra-template's tests do)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from decodelab.experiment.compose import GROUPS, conf_dir, group_options
from decodelab.experiment.compose import VALIDATED_GROUPS, compose, expand_sweep
from decodelab.experiment.compose import to_run_config

# Options that need a user-supplied value (model.path, task.path) before they validate.
NEEDS_VALUE = {("model", "hf"): ["model.path=/tmp"], ("task", "jsonl"): ["task.path=x.jsonl"]}


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

    for part in VALIDATED_GROUPS:
        node = OmegaConf.to_object(cfg[part])
        if part == "drafter":
            node = drafter_config(node)
        if (group, option) not in NEEDS_VALUE:
            node.validate(part)
    if (group, option) not in NEEDS_VALUE:
        run = to_run_config(cfg)
        assert run.output_dir == "unused"


def test_defaults_are_the_quickstart_parts():
    cfg = compose(["output_dir=x"])
    assert cfg.model.name == "smollm2-135m" and cfg.backend.device == "cpu"
    assert cfg.drafter.name == "none" and cfg.strategy.do_sample is False
    assert cfg.task.name == "specbench-mini" and cfg.logger.mlflow is not None
    quick = compose(["experiment=quickstart", "output_dir=x"])
    assert quick.tags.experiment == "quickstart" and quick.task.max_new_tokens == 64


def test_logger_list_selects_both():
    cfg = compose(["logger=[mlflow,wandb]", "output_dir=x"])
    assert cfg.logger.mlflow is not None and cfg.logger.wandb is not None
    assert compose(["logger=all"]).logger.wandb.mode == "auto"
    assert compose(["logger=none"]).logger.mlflow is None


def test_expand_sweep_grid():
    jobs = expand_sweep(["strategy=greedy,sample", "task.limit=1,2,3", "backend=cpu"])
    assert len(jobs) == 6
    assert ["strategy=sample", "task.limit=3", "backend=cpu"] in jobs
