"""drafter=none: propose nothing; the engine then decodes one token per target forward."""

from __future__ import annotations

from typing import Sequence

from decodelab.config import DrafterConfig
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter


class NoDrafter(Drafter):
    name = "none"
    config_class = DrafterConfig

    def __init__(self, cfg: DrafterConfig, **_parts):
        self.cfg = cfg

    def propose(self, context: Sequence[int]) -> Draft:
        return Draft(tokens=[])
