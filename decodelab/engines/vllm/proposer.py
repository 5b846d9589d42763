"""engine.proposer=decodelab: decodelab's own drafter inside vLLM's worker, through vLLM's ``custom_class``
proposer method, so one algorithm (one implementation) runs on both engines and the engine is the only change.

vLLM imports :class:`DecodelabProposer` in its worker process and calls ``propose`` after every engine step
with the step's sampled tokens per batch row and every row's tokens so far; it verifies the returned drafts
with its own rejection sampler. The worker sees no request ids and gives no feedback, so only drafters whose
draft is a function of the context alone (``Drafter.context_only``) are served; each batch row keeps one
drafter, which re-indexes when the row's context is not an extension of the one it saw (a new request).
The drafter's config reaches the worker as JSON in ``DRAFTER_ENV``, set before the engine starts (the
worker is spawned with the parent's environment).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Sequence

from decodelab.drafters.base import Drafter
from decodelab.drafters.registry import build_drafter, drafter_config

DRAFTER_ENV = "DECODELAB_VLLM_DRAFTER"


def drafter_json(drafter) -> str:
    """The drafter config as the worker reads it back (:func:`drafter_config` types it again)."""
    return json.dumps(dataclasses.asdict(drafter), sort_keys=True)


class DecodelabProposer:
    """vLLM's custom proposer interface: ``__init__(vllm_config)``, ``load_model`` and ``propose``."""

    def __init__(self, vllm_config: Any):
        self.k = int(vllm_config.speculative_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.cfg = drafter_config(json.loads(os.environ[DRAFTER_ENV]))
        self.rows: Dict[int, Drafter] = {}

    def load_model(self, *_args, **_kwargs) -> None:
        """No model: a context-only drafter."""

    def propose(self, sampled_token_ids: Sequence[Sequence[int]], num_tokens_no_spec, token_ids_cpu,
                slot_mappings: Any = None) -> List[List[int]]:
        """One draft per batch row; none for a row that sampled nothing this step (its prefill is still
        running) or has no room left in ``max_model_len``, as vLLM's own ngram proposer does."""
        drafts: List[List[int]] = []
        for row, sampled in enumerate(sampled_token_ids):
            length = int(num_tokens_no_spec[row])
            room = min(self.k, self.max_model_len - length)
            if not sampled or room <= 0:
                drafts.append([])
                continue
            drafter = self.rows.get(row)
            if drafter is None:
                drafter = self.rows[row] = build_drafter(self.cfg)
            draft = drafter.propose(token_ids_cpu[row, :length].tolist())
            drafts.append([int(token) for token in draft.tokens[:room]])
        return drafts
