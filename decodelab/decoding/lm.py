"""The LM adapter: the only place that talks to a transformers causal LM during decoding.

It owns one KV cache and the token ids that cache holds, so callers think in tokens, not tensors:
prefill a prompt, run the model over new tokens (a chain, or a token tree under a tree attention
mask), crop back to a length, or keep only chosen positions (the accepted path of a tree).

Two caches: ``static`` (decoding/static.py: preallocated, written by position, the model's weights through a
compact forward; llama/qwen2 families) and ``dynamic`` (transformers' DynamicCache through the model's own
forward, for every other model). ``auto`` takes static where the model allows it.
"""

from __future__ import annotations

import inspect
import time
from typing import List, Optional, Sequence

import torch
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedModel

from decodelab.decoding import tree
from decodelab.decoding.static import BUCKETS, StaticForward, unsupported
from decodelab.errors import check

CACHES = ("auto", "static", "dynamic")
# transformers >= 5.2x names the cache argument ``cache`` (and warns on every call for ``past_key_values``).
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

# Attention implementations whose custom 4-D additive mask path is tested (flash_attention_2 takes no mask;
# flex_attention would want a BlockMask).
TREE_ATTENTION = ("eager", "sdpa")


class LMAdapter:
    """``layers``: run only these decoder layers (then the final norm and LM head), for early-exit drafting
    with the target's own weights (drafter=layer_skip). ``cache``: one of CACHES (see the module docstring).
    ``linear``: how the static forward multiplies by weights (decoding/linear.py; the dynamic path is
    transformers' own forward)."""

    def __init__(self, model: PreTrainedModel, layers: Optional[Sequence[int]] = None, cache: str = "auto",
                 compile: bool = False, hidden_states: bool = False, linear: str = "torch"):
        check(cache in CACHES, "backend.kv_cache", f"got {cache!r}, allowed: {', '.join(CACHES)}")
        reason = unsupported(model)
        check(cache != "static" or reason is None, "backend.kv_cache",
              f"no static KV cache for {reason}; use backend.kv_cache=dynamic (or auto)")
        check(not hidden_states or (reason is None and cache != "dynamic"), "backend.kv_cache",
              f"hidden states are read from the static forward, which this run cannot use "
              f"({reason or 'backend.kv_cache=dynamic'}); use a llama/qwen2-family model with backend.kv_cache=auto")
        check(linear not in ("onednn", "gemv") or (reason is None and cache != "dynamic"), "backend.linear",
              f"{linear} runs the static forward's weights, which this run cannot use "
              f"({reason or 'backend.kv_cache=dynamic'}); use backend.linear=auto or torch")
        self.model = model
        self.layers = list(layers) if layers is not None else None
        self.device = next(model.parameters()).device
        self.static: Optional[StaticForward] = StaticForward(model, self.layers, compile=compile, linear=linear) \
            if cache != "dynamic" and reason is None else None
        # The dynamic path compiles transformers' own forward (shapes vary: dynamic).
        self._model_call = torch.compile(model, dynamic=True) if compile and self.static is None else model
        self.compiled = compile
        if self.static is not None:
            self.static.capture = hidden_states
        self._warm_sizes: tuple = ()
        self.cache = DynamicCache(config=model.config)
        # Token ids whose keys/values the cache holds, in order.
        self.tokens: List[int] = []
        self.forwards = 0

    @property
    def kind(self) -> str:
        """The cache in use: static or dynamic."""
        return "static" if self.static is not None else "dynamic"

    @property
    def linear(self) -> str:
        """How weights multiply, resolved (backend.linear=auto): onednn, gemv or torch; inductor where the static step
        is compiled (its weight freezing packs them); torch on the dynamic path."""
        if self.static is None:
            return "torch"
        return "inductor" if self.compiled else self.static.linears.kind

    def reserve(self, length: int) -> float:
        """Room for ``length`` tokens before timing starts (the static cache grows by copying otherwise). A
        compiled step is specialised to the capacity, so growing it compiles the warm sizes again, here; returns
        the seconds that took."""
        if self.static is None or length <= self.static.capacity:
            return 0.0
        self.static.reserve(length)
        return self.warmup(self._warm_sizes) if self._warm_sizes else 0.0

    def warmup(self, sizes: Sequence[int] = BUCKETS) -> float:
        """Compile the step for every token count in ``sizes`` before anything is timed; returns the seconds it
        took (0 when nothing is compiled). The cache holds what it held."""
        if not self.compiled or self.static is None:
            return 0.0
        self._warm_sizes = tuple(sizes)
        start = time.perf_counter()
        self.static.warmup(sizes)
        synchronize(self.device)
        return time.perf_counter() - start

    @property
    def aux_forwards(self) -> int:
        """Forwards of a second model or pass behind the same scores (a contrast scorer's); none here."""
        return 0

    @property
    def hidden_states(self) -> List[torch.Tensor]:
        """The residual stream of the last forward (``hidden_states=True``): the embeddings, then each layer's
        output, each [rows, hidden] (before the final norm)."""
        return self.static.hidden if self.static is not None else []

    @property
    def features(self) -> torch.Tensor:
        """The final normed hidden states of the last forward's rows ([rows, hidden], what the LM head reads), for
        feature-level drafters (EAGLE, Medusa); static path only (:meth:`check_features`)."""
        self.check_features()
        return self.static.features

    def check_features(self) -> None:
        if self.static is None:
            raise NotImplementedError("features are read from the static forward (llama/qwen2 family, "
                                      "backend.kv_cache=auto or static)")

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        if self.static is not None:
            self.static.length = 0
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
    def forward(self, ids: Sequence[int], last_only: bool = False, embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the model over ``ids`` after the cached tokens; returns float32 logits [len(ids) or 1, vocab].
        ``embeds [len(ids), hidden]``: input vectors instead of the ids' embeddings (static path only)."""
        return self._run(ids, logits_to_keep=1 if last_only else 0, embeds=embeds)

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
                      nodes: Sequence[int], embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Grow a tree one level: run ``nodes`` (their ancestors all cached) in one forward; logits [len(nodes), vocab].

        The cache holds ``base`` context tokens (the last one is the tree's root) and then the tree nodes
        ``cached`` in that order. :meth:`forward_tree` runs a whole tree after a plain cache; a tree grown a
        level per forward needs rows that see the context, their own ancestors among the cached nodes (not
        their cousins) and themselves, at position root + depth, so each row's logits are those of its path
        run as a chain. The nodes are appended to the cache. ``embeds [len(nodes), hidden]``: as in :meth:`forward`.
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
                         position_ids=torch.tensor([[base - 1 + depths[n] for n in nodes]], device=self.device),
                         embeds=embeds)

    def _run(self, ids: Sequence[int], embeds: Optional[torch.Tensor] = None, **inputs) -> torch.Tensor:
        """One model call over ``ids`` after the cached tokens (``inputs``: mask, positions, logits kept); the
        cache, the token list and the forward count follow it. Float32 logits [rows, vocab]."""
        if self.static is not None:
            logits = self.static.run(ids, embeds=embeds, **inputs)
        elif embeds is not None:
            raise NotImplementedError("input vectors (embeds) run on the static forward only")
        else:
            input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            if self.layers is None:
                out = self._model_call(input_ids=input_ids, **{CACHE_KWARG: self.cache}, use_cache=True, **inputs)
                logits = out.logits  # the cache object is updated in place
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
                                  position_ids=position_ids, layer_idx=self.layers[0], **{CACHE_KWARG: self.cache})
        position_embeddings = base.rotary_emb(hidden, position_ids)
        for i in self.layers:
            hidden = base.layers[i](hidden, attention_mask=mask, position_embeddings=position_embeddings,
                                    position_ids=position_ids, use_cache=True, **{CACHE_KWARG: self.cache})
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
        if self.static is not None:
            self.static.keep(indices, start)
            self.tokens = [self.tokens[i] for i in indices]
            return
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
        if self.static is not None:
            return  # the static forward takes any additive mask
        impl = getattr(self.model.config, "_attn_implementation", "eager")
        if impl not in TREE_ATTENTION:
            raise NotImplementedError(f"token trees need attn_implementation in {TREE_ATTENTION}, got {impl!r}")
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise NotImplementedError("token trees are not supported on models with sliding-window layers")

    def crop(self, length: int) -> None:
        """Forget cached tokens beyond ``length`` (rejected draft tokens, an edited conversation)."""
        if length < len(self.tokens):
            if self.static is not None:
                self.static.crop(length)
            else:
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
