"""The LM adapter: the only place that talks to a transformers causal LM during decoding.

It owns one KV cache and the token ids that cache holds, so callers think in tokens, not tensors:
prefill a prompt, run the model over new tokens (a chain, or a token tree under a tree attention
mask), crop back to a length, or keep only chosen positions (the accepted path of a tree).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from decodelab.decoding import tree

# Attention implementations whose custom 4-D additive mask path is tested (flash_attention_2 takes no mask;
# flex_attention would want a BlockMask).
TREE_ATTENTION = ("eager", "sdpa")


class LMAdapter:
    """``layers``: run only these decoder layers (then the final norm and LM head), for early-exit drafting
    with the target's own weights (drafter=layer_skip); the skipped layers' cache entries stay empty."""

    def __init__(self, model: PreTrainedModel, layers: Optional[Sequence[int]] = None):
        self.model = model
        self.layers = list(layers) if layers is not None else None
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
        keep = common_prefix(self.tokens, ids)
        keep = min(keep, len(ids) - 1)
        self.crop(keep)
        return self.forward(ids[keep:], last_only=True)[-1]

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], last_only: bool = False) -> torch.Tensor:
        """Run the model over ``ids`` after the cached tokens; returns float32 logits [len(ids) or 1, vocab]."""
        return self._run(ids, logits_to_keep=1 if last_only else 0)

    @torch.inference_mode()
    def forward_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        """Run the root ``tokens[0]`` and the tree nodes ``tokens[1:]`` in one forward; logits [len(tokens), vocab].

        Node i (row i + 1) attends to the whole cache, the root, its ancestors and itself, at position
        ``cached + depth``, so its logits equal those of running its root-to-node path as a chain. The
        cache then holds every node in draft order: follow with :meth:`keep` (or :meth:`crop`).
        """
        tree.check_parents(parents)
        if len(parents) != len(tokens) - 1:
            raise ValueError(f"forward_tree needs the root plus one token per parent: {len(tokens)} tokens, "
                             f"{len(parents)} parents")
        self.check_tree_support()
        past = len(self.tokens)
        dtype = next(self.model.parameters()).dtype
        return self._run(tokens, attention_mask=tree.attention_mask(parents, past, dtype, self.device),
                         position_ids=tree.position_ids(parents, past, self.device))

    @torch.inference_mode()
    def forward_level(self, tokens: Sequence[int], parents: Sequence[int], base: int, cached: Sequence[int],
                      nodes: Sequence[int]) -> torch.Tensor:
        """Grow a tree one level: run ``nodes`` (their ancestors all cached) in one forward; logits [len(nodes), vocab].

        The cache holds ``base`` context tokens (the last one is the tree's root) and then the tree nodes
        ``cached`` in that order. :meth:`forward_tree` runs a whole tree after a plain cache; a tree grown a
        level per forward needs rows that see the context, their own ancestors among the cached nodes (not
        their cousins) and themselves, at position root + depth, so each row's logits are those of its path
        run as a chain. The nodes are appended to the cache.
        """
        self.check_tree_support()
        nodes = list(nodes)
        past = len(self.tokens)
        if past != base + len(cached):
            raise RuntimeError(f"the cache holds {past} tokens, the growing tree expects {base} + {len(cached)}")
        lineage = tree.ancestry(parents)
        rows = torch.tensor([tree.row(n) for n in nodes])
        cols = torch.tensor([tree.row(n) for n in list(cached) + nodes])
        allowed = torch.ones(len(nodes), past + len(nodes), dtype=torch.bool)
        allowed[:, base:] = lineage[rows][:, cols]
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        depths = tree.depths(parents)
        return self._run([tokens[n] for n in nodes], attention_mask=mask[None, None].to(self.device),
                         position_ids=torch.tensor([[base - 1 + depths[n] for n in nodes]], device=self.device))

    def _run(self, ids: Sequence[int], **inputs) -> torch.Tensor:
        """One model call over ``ids`` after the cached tokens (``inputs``: mask, positions, logits kept); the
        cache, the token list and the forward count follow it. Float32 logits [rows, vocab]."""
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        if self.layers is None:
            out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, **inputs)
            self.cache, logits = out.past_key_values, out.logits
        else:
            logits = self._run_layers(input_ids, **inputs)
        self.tokens.extend(ids)
        self.forwards += 1
        return logits[0].float()

    def _run_layers(self, input_ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """The model's own submodules for ``self.layers`` only (llama/qwen2 layout: embed_tokens, rotary_emb,
        layers, norm, lm_head); nothing is copied. Chains only: a tree mask is not passed through."""
        from transformers.masking_utils import create_causal_mask

        base = self.model.model
        hidden = base.embed_tokens(input_ids)
        start = len(self.tokens)
        position_ids = torch.arange(start, start + input_ids.size(1), device=self.device).unsqueeze(0)
        # Sized against the first layer run: the skipped layers' cache entries stay empty.
        mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=self.cache, position_ids=position_ids, layer_idx=self.layers[0])
        position_embeddings = base.rotary_emb(hidden, position_ids)
        for i in self.layers:
            hidden = base.layers[i](hidden, attention_mask=mask, position_embeddings=position_embeddings,
                                    position_ids=position_ids, past_key_values=self.cache, use_cache=True)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.model.lm_head(base.norm(hidden))

    @torch.inference_mode()
    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the cached positions ``indices`` (ascending), in that order; drop the rest.

        After a tree forward this compacts the accepted path into a plain sequence. Positions before
        the first gap stay where they are; the tail is moved down in place, then the cache is cropped,
        so the cost is the kept tail, not the whole cache.
        """
        indices = list(indices)
        ascending = all(a < b for a, b in zip(indices, indices[1:]))
        if not ascending or (indices and not 0 <= indices[0] <= indices[-1] < len(self.tokens)):
            raise ValueError(f"keep needs ascending positions below {len(self.tokens)}, got {indices}")
        start = common_prefix(indices, range(len(indices)))
        if start < len(indices):
            src = torch.tensor(indices[start:], dtype=torch.long, device=self.device)
            for layer in self.cache.layers:
                if layer.is_initialized and layer.keys.numel():
                    layer.keys[..., start:len(indices), :] = layer.keys.index_select(-2, src)
                    layer.values[..., start:len(indices), :] = layer.values.index_select(-2, src)
        kept = [self.tokens[i] for i in indices]
        self.crop(len(indices))
        self.tokens = kept

    def check_tree_support(self) -> None:
        """Tree masks need a 4-D-mask attention and a cache whose positions are all the sequence's positions."""
        if self.layers is not None:
            raise NotImplementedError("token trees need the full model; an early-exit adapter drafts chains")
        impl = getattr(self.model.config, "_attn_implementation", "eager")
        if impl not in TREE_ATTENTION:
            raise NotImplementedError(f"token trees need attn_implementation in {TREE_ATTENTION}, got {impl!r}")
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise NotImplementedError("token trees are not supported on models with sliding-window layers")

    def crop(self, length: int) -> None:
        """Forget cached tokens beyond ``length`` (rejected draft tokens, an edited conversation)."""
        if length < len(self.tokens):
            # transformers >= 5 crops by a negative count of tokens to remove.
            self.cache.crop(length - len(self.tokens))
            del self.tokens[length:]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
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
