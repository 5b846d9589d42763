"""Engines by name: every Engine subclass with a ``name`` in a module of this package (one module, or a
package ``<name>/`` with ``config.py`` + ``engine.py``, and one conf/engine YAML per engine)."""

from __future__ import annotations

from typing import Any, Dict, Type

import decodelab.engines as engines_package
from decodelab.config import block_schema, defined_subclasses, typed_block
from decodelab.engines.base import Engine, EngineConfig

REGISTRY: Dict[str, Type[Engine]] = {}


def discover() -> Dict[str, Type[Engine]]:
    found: Dict[str, Type[Engine]] = {cls.name: cls for cls in defined_subclasses(engines_package, Engine, "engine")
                                      if getattr(cls, "name", None)}
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
