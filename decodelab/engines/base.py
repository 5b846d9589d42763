"""The engine interface: start once, decode batches of requests into :class:`Generation` records, close.

A :class:`Generation` is what every metric is computed from (decodelab/experiment/metrics.py), so an engine's
only job beyond decoding is to fill it honestly: tokens, TTFT and wall time, one :class:`StepRecord` per
verification step (drafted, accepted, bonus) where the engine exposes them, and its forward counts. Each engine
documents beside its code how its own counters map onto these fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from decodelab.decoding.stop import StopCriteria
from decodelab.decoding.types import Generation
from decodelab.errors import ConfigError


@dataclass
class EngineConfig:
    # The registry key (conf/engine/<name>.yaml); each engine's schema subclasses this one.
    name: str = "decodelab"

    def validate(self, key: str = "engine") -> None:
        """Ranges of the engine's own fields (what it can serve of the run is :meth:`Engine.check`)."""


@dataclass
class Request:
    """One turn to decode: the prompt's token ids (chat template applied by the runner, the same for every
    engine) and the seed of its sampling."""

    ids: List[int]
    seed: int


class Engine:
    """Base class. ``batched`` engines decode up to ``task.concurrency`` requests at once."""

    name: str = ""
    config_class: type = EngineConfig
    batched: bool = False
    # Installation hint for an engine whose package is missing (None: nothing beyond decodelab's core).
    install_hint: str = ""

    @classmethod
    def check(cls, run) -> None:
        """Refuse, in one line naming the option and the engine, what of ``run`` this engine cannot serve
        (called at validation, before any model loads)."""
        if run.task.concurrency > 1 and not cls.batched:
            raise ConfigError("task.concurrency", f"engine={cls.name} decodes one request at a time; "
                                                  f"got {run.task.concurrency}, use 1 or a batching engine (vllm)")

    def __init__(self, cfg: EngineConfig, *, run, loaded, stop: StopCriteria, **_parts):
        self.cfg = cfg
        self.run = run
        self.loaded = loaded
        self.stop = stop
        self.start_s = 0.0  # start-up time, apart from any sample's timing

    def generate(self, requests: Sequence[Request]) -> List[Generation]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine (its processes, caches); called once when the process is done with it."""


def refuse(key: str, engine: str, what: str, served: Sequence[str]) -> ConfigError:
    """The one line an engine gives for an option it cannot serve."""
    return ConfigError(key, f"engine={engine} cannot serve {what}; it serves: {', '.join(served)}")


# The strategies another engine's sampler has: the logits pipeline's sampling family, verified losslessly.
SAMPLING_STRATEGIES = ("greedy", "sample", "top_p", "min_p")


def check_served(run, engine: str, drafters: Sequence[str], strategies: Sequence[str] = SAMPLING_STRATEGIES,
                 occurrences: Optional[Sequence[str]] = ("earliest",)) -> None:
    """The refusals every engine other than decodelab's shares: the drafter and strategy it maps, lossless
    acceptance, prompt lookup's first-occurrence rule (``occurrences``: what to say is served instead; None
    where decodelab's own prompt lookup drafts, any occurrence), and none of decodelab's own kernels or static
    cache (the engine brings its own)."""
    drafter, strategy, backend = run.drafter, run.strategy, run.backend
    if drafter.name not in drafters:
        raise refuse("drafter", engine, f"drafter={drafter.name}", drafters)
    if strategy.name not in strategies:
        raise refuse("strategy", engine, f"strategy={strategy.name}", strategies)
    if strategy.acceptance != "lossless":
        raise refuse("strategy.acceptance", engine, f"acceptance={strategy.acceptance}", ("lossless",))
    lookup = occurrences is not None and drafter.name == "prompt_lookup"
    if lookup and drafter.occurrence != "earliest":  # transformers' and vLLM's n-gram rule
        raise refuse("drafter.occurrence", engine, f"occurrence={drafter.occurrence} (its n-gram lookup drafts from "
                     "the first occurrence)", occurrences)
    if backend.kernels != "torch":
        raise refuse("backend.kernels", engine, f"kernels={backend.kernels}", ("torch",))
    if backend.kv_cache == "static":
        raise refuse("backend.kv_cache", engine, "kv_cache=static (decodelab's own cache)", ("auto", "dynamic"))


def cut(tokens: List[int], stop: StopCriteria) -> tuple:
    """``tokens`` as decodelab's stop rule keeps them (the first EOS or stop string, or the budget) and why."""
    ended = stop.check(tokens, len(tokens))
    if ended is None:
        return tokens, "max_new_tokens" if len(tokens) >= stop.max_new_tokens else "engine"
    keep, reason = ended
    return tokens[:keep], reason
