"""The LM adapter: the only place that talks to a transformers causal LM during decoding.

It owns one KV cache and the token ids that cache holds, so callers think in tokens, not tensors:
prefill a prompt, run the model over new tokens, crop back to a length.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel


class LMAdapter:
    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)
        # Token ids whose keys/values the cache holds, in order.
        self.tokens: List[int] = []
        self.forwards = 0

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.tokens = []

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Make the cache hold ``ids``; return the logits [vocab] that follow the last id.

        The longest prefix already cached is kept (a second turn re-uses the first turn's cache);
        at least the last id is always run so that its logits exist.
        """
        ids = list(ids)
        keep = _common_prefix(self.tokens, ids)
        keep = min(keep, len(ids) - 1)
        self.crop(keep)
        return self.forward(ids[keep:], last_only=True)[-1]

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], last_only: bool = False) -> torch.Tensor:
        """Run the model over ``ids`` after the cached tokens; returns float32 logits [len(ids) or 1, vocab]."""
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1 if last_only else 0)
        self.cache = out.past_key_values
        self.tokens.extend(ids)
        self.forwards += 1
        return out.logits[0].float()

    def crop(self, length: int) -> None:
        """Forget cached tokens beyond ``length`` (rejected draft tokens, an edited conversation)."""
        if length < len(self.tokens):
            # transformers >= 5 crops by a negative count of tokens to remove.
            self.cache.crop(length - len(self.tokens))
            del self.tokens[length:]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
