"""``decodelab train-drafter [overrides]``: a Hydra app over conf/train_drafter.yaml that trains a draft head
(train=eagle | train=medusa) on the target's own answers (decodelab/training/).

As with ``run``, the overrides are composed and validated before Hydra starts, so bad input fails in one line
with exit code 2 before any model is loaded or anything is recorded.
"""

from __future__ import annotations

import sys
from typing import List

from decodelab.cli import fail
from decodelab.errors import UserError, notice
from decodelab.experiment.compose import compose, conf_dir, register_configs, register_resolvers

CONFIG_NAME = "train_drafter"


def register_train_schema() -> None:
    from hydra.core.config_store import ConfigStore

    from decodelab.training.config import TrainConfig

    register_configs()
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def cli(args: List[str]) -> None:
    from hydra._internal.utils import get_args_parser

    from decodelab.training.trainer import preflight, to_train_config

    register_resolvers()
    register_train_schema()
    parsed = get_args_parser().parse_args(args)
    if parsed.multirun:
        raise UserError("train-drafter: -m is not supported; train one head per command")
    if not (parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion or parsed.cfg):
        cfg = compose(parsed.overrides, config_name=CONFIG_NAME)
        preflight(to_train_config(_with_output_dir(cfg)))
    _hydra_app(args)


def _with_output_dir(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, {"output_dir": "."})  # ${hydra:...} resolves only inside the app


def _hydra_app(args: List[str]) -> None:
    import hydra

    @hydra.main(config_path=str(conf_dir()), config_name=CONFIG_NAME, version_base="1.3")
    def app(cfg) -> dict:
        from decodelab.training.trainer import train

        try:
            summary = train(cfg)
        except UserError as err:
            fail(str(err))
        held = {k: v for k, v in summary.items() if k.startswith("held_out/top1")}
        shown = ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in sorted(held.items()))
        notice(f"trained {cfg.train.kind} for {summary.get('steps')} steps; held-out {shown}; checkpoint: "
               f"{summary.get('reused_from') or cfg.output_dir}/checkpoint")
        return summary

    sys.argv = ["decodelab train-drafter"] + args
    app()
