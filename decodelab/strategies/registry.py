"""Strategies: what is decoded. Adding one means one module here and one conf/strategy YAML per name it serves:
the module defines a Strategy subclass with its ``names`` and its config schema as ``config_class``; the
registry finds it by importing every module of this package."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Dict, Type

import decodelab.strategies as strategies_package
from decodelab.config import BackendConfig, StrategyConfig, block_schema, typed_block
from decodelab.errors import ConfigError
from decodelab.strategies.base import Strategy

REGISTRY: Dict[str, Type[Strategy]] = {}


def discover() -> Dict[str, Type[Strategy]]:
    """(Re)fill REGISTRY, one entry per served name, from every module of this package."""
    found: Dict[str, Type[Strategy]] = {name: Strategy for name in Strategy.names}
    for module_info in pkgutil.iter_modules(strategies_package.__path__):
        module = importlib.import_module(f"{strategies_package.__name__}.{module_info.name}")
        for value in vars(module).values():
            # Only a class that names its own strategies serves them (a shared base such as PairStrategy does not).
            if isinstance(value, type) and issubclass(value, Strategy) and value.__module__ == module.__name__ \
                    and "names" in vars(value):
                found.update({name: value for name in value.names})
    REGISTRY.clear()
    REGISTRY.update(sorted(found.items()))
    return REGISTRY


def schemas() -> Dict[str, type]:
    return {name: cls.config_class for name, cls in REGISTRY.items()}


def strategy_config(node: Any) -> StrategyConfig:
    """Type an untyped strategy node by its name: unknown keys and wrong types fail here, in one line."""
    return typed_block(node, schemas(), "strategy")


def check_strategy_keys(node: Dict[str, Any]) -> type:
    return block_schema(node, schemas(), "strategy")


def check_pairing(strategy: StrategyConfig, drafter_name: str, backend: BackendConfig) -> None:
    """A strategy that no drafter can accelerate refuses every drafter but none, naming both and why; one that
    reads the residual stream needs the static forward."""
    cls = REGISTRY[strategy.name]
    if cls.drafter_conflict and drafter_name != "none":
        raise ConfigError("drafter", f"drafter={drafter_name} cannot run with strategy={strategy.name}: "
                                     f"{cls.drafter_conflict}; use drafter=none")
    if cls.hidden_states and backend.kv_cache == "dynamic":
        raise ConfigError("backend.kv_cache", f"strategy={strategy.name} reads the target's layers from the static "
                                              "forward; use backend.kv_cache=auto or static")


def build_strategy(cfg: StrategyConfig, **parts) -> Strategy:
    return REGISTRY[cfg.name](cfg, **parts)


discover()

__all__ = ["build_strategy", "check_pairing", "check_strategy_keys", "discover", "REGISTRY", "strategy_config"]
