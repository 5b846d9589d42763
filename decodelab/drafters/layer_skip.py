"""drafter=layer_skip: self-speculative decoding with the target's own weights (no second copy).

The draft model is the target cut short (an LMAdapter with ``layers``): the embedding, the first
``exit_layer`` decoder layers (or every layer except ``skip_layers``), then the target's final norm and LM head (early exit as in LayerSkip /
Draft & Verify / SWIFT; training-free here, so acceptance depends on how well the model's intermediate
layers already predict through its head). The drafter keeps its own KV cache (a transformers
DynamicCache holding only the layers it runs), kept in step with the context as draft_model does.

Works on llama / qwen2-style models (``model.model`` with embed_tokens, rotary_emb, layers, norm, and
``model.lm_head``) whose layers all use full attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from decodelab.decoding.lm import LMAdapter
from decodelab.decoding.static import FAMILIES, layout_problem
from decodelab.config import BackendConfig, DrafterConfig, StrategyConfig
from decodelab.drafters.length import DraftLengthConfig
from decodelab.decoding.types import Draft
from decodelab.drafters.draft_model import ChainDrafter, model_eos_ids, output_vocab, resolve_pipeline
from decodelab.errors import ConfigError, check
from decodelab.decoding.logits import LogitsPipeline



@dataclass
class LayerSkipConfig(DrafterConfig):
    name: str = "layer_skip"
    # Draft with decoder layers [0, exit_layer); null: half of the model's layers (unless skip_layers is set).
    exit_layer: Optional[int] = None
    # Alternatively: draft with every layer except these (0-based); needs exit_layer=null.
    skip_layers: List[int] = field(default_factory=list)
    # How many tokens to draft per step: decodelab/drafters/length.py.
    length: DraftLengthConfig = field(default_factory=DraftLengthConfig)

    def set_draft_length(self, length: int) -> None:
        self.length.set_length(length)

    def validate(self, key: str = "drafter") -> None:
        self.length.validate(f"{key}.length")
        if self.exit_layer is not None:
            check(self.exit_layer >= 1, f"{key}.exit_layer", f"must be >= 1 or null, got {self.exit_layer}")
            check(not self.skip_layers, f"{key}.skip_layers",
                  "set either drafter.exit_layer or drafter.skip_layers, not both (exit_layer=null to skip layers)")
        check(all(i >= 0 for i in self.skip_layers), f"{key}.skip_layers",
              f"layer indices must be >= 0, got {list(self.skip_layers)}")

    def layer_ids(self, num_layers: int, key: str = "drafter") -> List[int]:
        """The decoder layers the draft runs, in order; range-checked against the model."""
        if self.skip_layers:
            bad = [i for i in self.skip_layers if i >= num_layers]
            check(not bad, f"{key}.skip_layers", f"the model has {num_layers} layers (0..{num_layers - 1}), got {bad}")
            ids = [i for i in range(num_layers) if i not in set(self.skip_layers)]
            check(len(ids) >= 1, f"{key}.skip_layers", "must leave at least one layer to draft with")
            return ids
        exit_layer = self.exit_layer if self.exit_layer is not None else max(1, num_layers // 2)
        check(1 <= exit_layer <= num_layers, f"{key}.exit_layer",
              f"must be in [1, {num_layers}] (the model has {num_layers} layers), got {exit_layer}")
        return list(range(exit_layer))


def check_supported(model) -> None:
    problem = layout_problem(model)
    if problem is not None:
        raise ConfigError("drafter.name", f"layer_skip supports {'/'.join(FAMILIES)}-style models; the target has "
                          f"{problem}; use drafter=draft_model or a model-free drafter")


class LayerSkipDrafter(ChainDrafter):
    name = "layer_skip"
    config_class = LayerSkipConfig
    draft_length_key = "length.k"

    def __init__(self, cfg: LayerSkipConfig, *, target, loaded, pipeline: Optional[LogitsPipeline] = None,
                 strategy: Optional[StrategyConfig] = None, backend: Optional[BackendConfig] = None, **_parts):
        self.cfg = cfg
        model = loaded.model
        check_supported(model)
        cfg.validate("drafter")
        self.layer_ids = cfg.layer_ids(int(model.config.num_hidden_layers))
        pipeline = resolve_pipeline(pipeline, strategy, self.name)
        seed = pipeline.cfg.seed if pipeline.cfg.seed is not None else (backend.seed if backend else 0)
        self.vocab = output_vocab(model)
        self.eos_ids = model_eos_ids(model, loaded.tokenizer)
        self._init_common(cfg, pipeline, seed, next(model.parameters()).device)
        self.lm = LMAdapter(model, layers=self.layer_ids, cache=backend.kv_cache if backend else "auto",
                            compile=bool(backend and backend.compile), linear=backend.linear if backend else "torch")

    def propose(self, context: Sequence[int]) -> Draft:
        return self._draft_chain(context, self.controller.next_length())
