"""Contrastive decoding (Li et al.; the (1 + beta) / beta form of O'Brien & Lewis): the expert (the run's model)
against an amateur (any model config with the expert's tokenizer, ``model@strategy.amateur=<option>``).

Scores are ``(1 + beta) * expert - beta * amateur`` on the logits, over the tokens the expert itself finds
plausible (probability at least ``alpha`` times its top token's; the rest are removed). The run's logits
pipeline then picks from them: greedy takes the argmax, sampling draws from their softmax. A drafter is verified
against these scores, so it accelerates contrastive decoding losslessly; speculative contrastive decoding is the
amateur as the drafter too (``drafter=draft_model`` with ``model@drafter.model`` the same model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from decodelab.config import ModelConfig, StrategyConfig
from decodelab.decoding.lm import LMAdapter
from decodelab.errors import ConfigError, check
from decodelab.strategies.scorer import Combine, PairStrategy, contrast


@dataclass
class ContrastiveDecodingConfig(StrategyConfig):
    name: str = "contrastive_decoding"
    # The amateur: any model config (conf/model/*.yaml), chosen with model@strategy.amateur=<option>.
    amateur: ModelConfig = field(default_factory=ModelConfig)
    alpha: float = 0.1
    beta: float = 0.5

    def validate(self, key: str = "strategy") -> None:
        super().validate(key)
        self.amateur.validate(f"{key}.amateur")
        check(0 <= self.alpha < 1, f"{key}.alpha", f"must be in [0, 1) (0 disables the plausibility cutoff), "
                                                   f"got {self.alpha}")
        check(self.beta >= 0, f"{key}.beta", f"must be >= 0 (0 is the expert alone), got {self.beta}")


class ContrastiveDecoding(PairStrategy):
    names = ("contrastive_decoding",)
    config_class = ContrastiveDecodingConfig

    @classmethod
    def models(cls, cfg: ContrastiveDecodingConfig) -> List[ModelConfig]:
        return [cfg.amateur]

    def __init__(self, cfg: ContrastiveDecodingConfig, *, loaded=None, backend=None):
        super().__init__(cfg, loaded=loaded, backend=backend)
        from decodelab.models.loading import load_model

        self.amateur = load_model(cfg.amateur, backend)
        if loaded is not None:
            check_same_vocabulary(loaded, self.amateur, "strategy.amateur")

    def other_model(self, target: LMAdapter):
        return self.amateur.model

    def combine(self) -> Combine:
        cfg: ContrastiveDecodingConfig = self.cfg  # type: ignore[assignment]
        return contrast(cfg.beta, cfg.alpha)


def check_same_vocabulary(target, other, key: str) -> None:
    """Contrasting logits token by token needs one vocabulary: the same tokenizer and the same LM head width."""
    if target.tokenizer.get_vocab() != other.tokenizer.get_vocab():
        raise ConfigError(key, f"{other.name} has another tokenizer than the target {target.name}; "
                               "contrast needs the same token ids (e.g. qwen2.5-coder-1.5b with qwen2.5-coder-0.5b)")
    width = target.model.get_output_embeddings().weight.shape[0]
    other_width = other.model.get_output_embeddings().weight.shape[0]
    if width != other_width:
        raise ConfigError(key, f"{other.name} scores {other_width} tokens, the target {target.name} {width}")
