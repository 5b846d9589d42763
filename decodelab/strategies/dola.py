"""DoLa (Chuang et al.): decoding by contrasting the final layer with a premature one.

At each position the premature layer is the candidate whose next-token distribution is farthest (Jensen-Shannon)
from the final layer's; the scores are the final log-probabilities minus the premature ones, over the tokens the
final layer finds plausible (at least ``cutoff`` times its top token's probability). ``layers``: ``high`` (the
upper half, every second layer), ``low`` (the lower half; from layer 2 when the embeddings are tied, as in
transformers' implementation) or a list of residual-stream indices (0: the embeddings, i: after decoder layer i,
below the last layer). A repetition penalty of 1.2 is the paper's recommendation and conf/strategy/dola.yaml's
default. Premature layers are read from the static forward's residual stream, so DoLa runs on the llama/qwen2
families. A drafter is verified against DoLa's scores (lossless for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

from decodelab.config import StrategyConfig
from decodelab.decoding.lm import LMAdapter
from decodelab.errors import ConfigError, check
from decodelab.strategies.base import Strategy
from decodelab.strategies.scorer import LayerScorer

LAYER_SETS = ("low", "high")


@dataclass
class DolaConfig(StrategyConfig):
    name: str = "dola"
    # low | high | a list of residual-stream indices (see the module docstring).
    layers: Any = "high"
    cutoff: float = 0.1

    def validate(self, key: str = "strategy") -> None:
        super().validate(key)
        layers = self.layers
        if isinstance(layers, str):
            check(layers in LAYER_SETS, f"{key}.layers", f"got {layers!r}, allowed: low, high or a list of layer indices")
        else:
            check(isinstance(layers, (list, tuple)) and len(layers) > 0
                  and all(isinstance(i, int) and not isinstance(i, bool) for i in layers),
                  f"{key}.layers", f"must be low, high or a non-empty list of layer indices, got {layers!r}")
        check(0 < self.cutoff < 1, f"{key}.cutoff", f"must be in (0, 1), got {self.cutoff}")


def candidate_layers(layers: Any, count: int, tied: bool) -> List[int]:
    """The premature layers DoLa chooses among, for a model of ``count`` decoder layers (transformers' sets)."""
    if isinstance(layers, str):
        if layers == "low":
            start = 2 if tied else 0
            found = list(range(start, count // 2, 2)) if count <= 40 else list(range(start, 20, 2))
            return found or [start]
        return list(range(count // 2, count, 2)) if count <= 40 else list(range(count - 20, count, 2))
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise ConfigError("strategy.layers", f"layer {bad[0]} is outside this model's premature layers 0..{count - 1} "
                                             f"(0: the embeddings; {count} decoder layers, the last is the final one)")
    return list(layers)


class Dola(Strategy):
    names = ("dola",)
    config_class = DolaConfig
    hidden_states = True

    def wrap(self, target: LMAdapter) -> LayerScorer:
        cfg: DolaConfig = self.cfg  # type: ignore[assignment]
        config = target.model.config
        tied = bool(getattr(config, "tie_word_embeddings", False))
        return LayerScorer(target, candidate_layers(cfg.layers, config.num_hidden_layers, tied), cfg.cutoff)
