"""Drafters (proposers): who proposes tokens. Adding one means one module here and one conf/drafter YAML:
the module defines a Drafter subclass with a ``name`` and its config schema as ``config_class``; the
registry finds it by importing every module of this package."""

from __future__ import annotations

from typing import Any, Dict, List, Type

import decodelab.drafters as drafters_package
from decodelab.config import DrafterConfig, block_schema, defined_subclasses, typed_block
from decodelab.drafters.base import Drafter

REGISTRY: Dict[str, Type[Drafter]] = {}


def discover() -> Dict[str, Type[Drafter]]:
    """(Re)fill REGISTRY from every module on ``decodelab.drafters.__path__`` (a folder appended to that path
    adds its drafters too); updated in place, so every importer of REGISTRY sees the same drafters."""
    found: Dict[str, Type[Drafter]] = {cls.name: cls for cls in defined_subclasses(drafters_package, Drafter)
                                       if getattr(cls, "name", None)}
    REGISTRY.clear()
    REGISTRY.update(sorted(found.items()))
    return REGISTRY


discover()


def drafter_config(node: Any) -> DrafterConfig:
    """Type an untyped drafter node by its name: unknown keys and wrong types fail here, in one line."""
    return typed_block(node, schemas(), "drafter")


def check_drafter_keys(node: Dict[str, Any]) -> type:
    """The schema of the drafter a plain node names, after checking the node's keys against it."""
    return block_schema(node, schemas(), "drafter")


def schemas() -> Dict[str, type]:
    return {name: cls.config_class for name, cls in REGISTRY.items()}


def draft_length_drafters() -> List[str]:
    """Drafters whose config maps the run-level ``draft_length`` onto a field of their own."""
    return [name for name, cls in REGISTRY.items()
            if cls.config_class.set_draft_length is not DrafterConfig.set_draft_length]


def build_drafter(cfg: DrafterConfig, **parts) -> Drafter:
    return REGISTRY[cfg.name](cfg, **parts)


__all__ = ["build_drafter", "draft_length_drafters", "drafter_config", "REGISTRY"]
