"""Drafters (proposers): who proposes tokens. Adding one means one module here and one conf/drafter YAML."""

from __future__ import annotations

from decodelab.config import DrafterConfig
from decodelab.drafters.base import Draft, Drafter
from decodelab.drafters.none import NoDrafter
from decodelab.errors import ConfigError

REGISTRY = {"none": NoDrafter}


def build_drafter(cfg: DrafterConfig, **parts) -> Drafter:
    try:
        cls = REGISTRY[cfg.name]
    except KeyError:
        raise ConfigError("drafter.name", f"unknown drafter {cfg.name!r}, available: {', '.join(REGISTRY)}") from None
    return cls(cfg, **parts)


__all__ = ["Draft", "Drafter", "build_drafter", "REGISTRY"]
