"""Engines by name: every Engine subclass with a ``name`` in a module of this package (one module, or a
package ``<name>/`` with ``config.py`` + ``engine.py``, and one conf/engine YAML per engine)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Dict, Type

import decodelab.engines as engines_package
from decodelab.config import block_schema, typed_block
from decodelab.engines.base import Engine, EngineConfig

REGISTRY: Dict[str, Type[Engine]] = {}


def discover() -> Dict[str, Type[Engine]]:
    found: Dict[str, Type[Engine]] = {}
    for info in pkgutil.iter_modules(engines_package.__path__):
        name = f"{engines_package.__name__}.{info.name}"
        module = importlib.import_module(f"{name}.engine" if info.ispkg else name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Engine) and value.__module__ == module.__name__ \
                    and getattr(value, "name", None):
                found[value.name] = value
    REGISTRY.clear()
    REGISTRY.update(sorted(found.items()))
    return REGISTRY


discover()


def schemas() -> Dict[str, type]:
    return {name: cls.config_class for name, cls in REGISTRY.items()}


def engine_config(node: Any) -> EngineConfig:
    """Type an untyped engine node by its name: unknown keys and wrong types fail here, in one line."""
    return typed_block(node, schemas(), "engine")


def check_engine_keys(node: Dict[str, Any]) -> type:
    return block_schema(node, schemas(), "engine")


def check_engine(run) -> None:
    """What the run's engine cannot serve of the run, refused in one line (before any model loads)."""
    REGISTRY[run.engine.name].check(run)


def build_engine(cfg: EngineConfig, **parts) -> Engine:
    return REGISTRY[cfg.name](cfg, **parts)
