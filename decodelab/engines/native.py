"""engine=decodelab: our own decode loop (decodelab/decoding/engine.py) with the run's strategy and drafter.

Its StepRecords come straight from the loop, so every metric is the definition itself (README, 'What a run
records'). One request at a time: the loop decodes one sequence.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from decodelab.decoding.types import Generation
from decodelab.engines.base import Engine, EngineConfig, Request


class NativeEngine(Engine):
    name = "decodelab"
    config_class = EngineConfig

    def __init__(self, cfg: EngineConfig, *, run, loaded, stop, target, strategy, pipeline, drafter, **_parts):
        super().__init__(cfg, run=run, loaded=loaded, stop=stop)
        self.target, self.strategy, self.pipeline, self.drafter = target, strategy, pipeline, drafter

    def generate(self, requests: Sequence[Request]) -> List[Generation]:
        out = []
        for request in requests:
            # Every decode starts from an empty cache: equal footing for baseline, drafters and turns.
            self.target.reset()
            generator = torch.Generator(device=self.target.device)
            generator.manual_seed(request.seed)
            out.append(self.strategy.generate(self.target, request.ids, pipeline=self.pipeline, drafter=self.drafter,
                                              stop=self.stop, generator=generator))
        return out
