"""A compact decoder forward with a static KV cache, over a transformers model's own weights (gpt-fast style).

transformers' eager path grows a DynamicCache by concatenation every step and routes each call through
layers of generic code; this forward preallocates the cache and writes keys and values by slot, so a crop is
a length change and keeping a tree's accepted path is one index copy. The weights are the model's own
tensors (nothing is copied or converted), and the model's own modules compute rotary tables and the MLP
activation (its RMSNorms one fused kernel, bit for bit theirs), so the two paths agree token for token
(tests/decoding/test_static.py). How weights multiply is decoding/linear.py's (backend.linear).

Families: llama and qwen2 (SmolLM2, Qwen2.5, Llama 2/3, Mistral without a sliding window). Everything else,
and models with sliding-window layers (Gemma 3, Qwen2 with use_sliding_window), stays on transformers'
DynamicCache: :func:`unsupported` says why.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from decodelab.decoding.linear import GEMV_ROWS, Linears, resolve

FAMILIES = ("llama", "qwen2")
# Attention implementations the static path stands in for (it computes attention with torch's SDPA).
ATTENTION = ("sdpa", "eager")
# Compiled steps pad their token count up to one of these, so a handful of graphs serves every step. Only
# buckets compiled by warmup() are used; any other count (a prompt, a step past the largest) runs eagerly, so a
# compile never lands inside a timed step.
BUCKETS = (1, 2, 4, 8, 16, 32)
# The cache grows by doubling from this many slots (rounded up to a multiple): rarely, and never inside a step's
# timing when the runner sizes it up front with reserve().
MIN_SLOTS = 512


def layout_problem(model) -> Optional[str]:
    """Why ``model`` lacks the llama/qwen2 decoder layout that a forward over its own submodules needs (this
    module's, and the adapter's layer subsets), or None when it has it."""
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    if family not in FAMILIES:
        return f"model family {family!r} (static path: {', '.join(FAMILIES)})"
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "layers other than full attention"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, p) for p in ("embed_tokens", "rotary_emb", "layers", "norm")) \
            or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} lacks the llama module layout (model.embed_tokens/layers/norm/rotary_emb)"
    return None


def unsupported(model) -> Optional[str]:
    """Why ``model`` cannot take the static path, or None when it can."""
    problem = layout_problem(model)
    if problem is not None:
        return problem
    config = model.config
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return "sliding-window attention"
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    if attention not in ATTENTION:
        return f"attn_implementation {attention!r} (the static path computes {' / '.join(ATTENTION)} attention)"
    return None


class StaticForward:
    """The decoder of ``model`` (optionally only ``layers``) over a preallocated KV cache of ``slots`` positions.

    The cache holds slots ``[0, length)``. :meth:`run` writes ``T`` new tokens at slots ``[length, length + T)``
    with their own rotary positions (a tree node's position is its depth, not its slot) under an additive mask
    ``[1, 1, T, length + T]`` (None: causal), and returns their logits.
    """

    def __init__(self, model, layers: Optional[Sequence[int]] = None, slots: int = MIN_SLOTS, compile: bool = False,
                 linear: str = "torch"):
        reason = unsupported(model)
        if reason is not None:
            raise NotImplementedError(f"no static KV cache for {reason}")
        self.model = model
        self.base = model.model
        config = model.config
        self.layer_ids: List[int] = list(layers) if layers is not None else list(range(config.num_hidden_layers))
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        weight = self.base.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        # How weights multiply (decoding/linear.py). Compiled steps keep the modules' own: inductor's weight
        # freezing packs them itself.
        self.linears = Linears("torch" if compile else resolve(linear, self.device, self.dtype))
        self.length = 0
        # capture: keep the residual stream of the last eager run (embeddings, then every layer's output, each
        # [T, hidden]) in ``hidden``, for strategies that read layers (DoLa) or hidden states (contrastive search).
        self.capture = False
        self.hidden: List[torch.Tensor] = []
        # The final normed hidden state of every row of the last run ([T, hidden], what the LM head reads): the
        # features that feature-level drafters (EAGLE, Medusa) draft from. Kept always: it is a reference.
        self.features = torch.empty(0)
        self.warm: set = set()  # buckets compiled for the current capacity
        self.keys = self.values = torch.empty(0)
        self.cos = self.signed_sin = torch.empty(0)
        self._allocate(slots)
        # Compiled: one graph per (bucket, capacity), attention over the whole capacity under a mask.
        self._compiled = _compile(self) if compile else None
        if self.linears.kind != "torch":
            self._pack()

    def _pack(self) -> None:
        """Pack every weight the step multiplies by now, with one dummy step: packed on first use, the first
        prompt's time would pay for it (about 1 s per 0.5 GB of weights here). More rows than gemv's kernel
        takes, so that kind packs too. The cache holds what it held."""
        self.run([0] * (GEMV_ROWS + 1))
        self.length = 0
        self.features = torch.empty(0)

    # ------------------------------------------------------------------ cache bookkeeping

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def reserve(self, slots: int) -> None:
        """Make room for ``slots`` positions (kept slots are copied once; a run calls this before timing)."""
        if slots > self.capacity:
            self._allocate(max(slots, 2 * self.capacity))

    def _allocate(self, slots: int) -> None:
        slots = -(-slots // MIN_SLOTS) * MIN_SLOTS
        shape = (len(self.layer_ids), self.kv_heads, slots, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.length:
            keys[:, :, :self.length] = self.keys[:, :, :self.length]
            values[:, :, :self.length] = self.values[:, :, :self.length]
        self.keys, self.values = keys, values
        self.warm = set()  # compiled graphs are specialised to the capacity: none is warm for the new one
        positions = torch.arange(slots, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.base.rotary_emb(probe, positions)  # the model's own rotary tables (and its scaling)
        self.cos, self.signed_sin = cos[0], _signed(sin[0])

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def keep(self, indices: Sequence[int], start: int) -> None:
        """Slots ``indices[start:]`` move down to ``start..``; the cache then holds ``len(indices)`` slots."""
        if start < len(indices):
            src = torch.tensor(list(indices[start:]), dtype=torch.long, device=self.device)
            end = len(indices)
            self.keys[:, :, start:end] = self.keys[:, :, src]
            self.values[:, :, start:end] = self.values[:, :, src]
        self.length = len(indices)

    # ------------------------------------------------------------------ the forward

    @torch.inference_mode()
    def run(self, ids: Sequence[int], position_ids: Optional[torch.Tensor] = None,
            attention_mask: Optional[torch.Tensor] = None, logits_to_keep: int = 0,
            embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[1, rows, vocab]`` of ``ids`` appended after the cached slots (rows: all, or the last
        ``logits_to_keep``). ``embeds [T, hidden]``: the input vectors instead of the embeddings of ``ids``
        (an EAGLE drafter feeds fused features; ``ids`` then only name the positions)."""
        count = len(ids)
        start = self.length
        bucket = next((b for b in BUCKETS if b >= count), None)
        # Room first: growing the cache drops the warm graphs, so whether this step is compiled is decided after.
        self.reserve(start + (bucket if self.warm and bucket is not None else count))
        compiled = self._compiled is not None and bucket in self.warm and not self.capture and embeds is None
        positions = position_ids[0] if position_ids is not None else torch.arange(start, start + count,
                                                                                   device=self.device)
        mask = attention_mask
        if mask is None and (compiled or count > 1):  # eager: one new row sees everything, no mask needed
            mask = _causal(start, count, self.dtype, self.device)
        ids_tensor = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        if not compiled:
            slots = torch.arange(start, start + count, device=self.device)
            inputs = ids_tensor[None] if embeds is None else embeds.to(self.dtype)[None]
            logits, features = self._forward(inputs, positions, slots, mask, start + count, logits_to_keep)
        else:
            logits, features = self._run_compiled(ids_tensor, positions, mask, start, bucket)
        self.features = features[0]
        self.length = start + count
        return logits[:, -logits_to_keep:] if logits_to_keep else logits

    def warmup(self, sizes: Sequence[int]) -> None:
        """Compile the buckets that hold ``sizes`` (one dummy step each, written past the cached slots and then
        forgotten): the cache holds what it held."""
        if self._compiled is None:
            return
        length = self.length
        buckets = sorted({b for b in (next((b for b in BUCKETS if b >= s), None) for s in sizes) if b is not None})
        if buckets:
            self.reserve(length + buckets[-1])  # before compiling: growing would drop the graphs again
        for bucket in buckets:
            if bucket in self.warm:
                continue
            self.warm.add(bucket)
            self.run([0] * bucket)
            self.length = length

    def _run_compiled(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, start: int,
                      bucket: int):
        """Padded up to ``bucket``: padded rows write slots past the new length (masked for every later row,
        overwritten later) and their logits are dropped. Attention spans the whole capacity, under the mask."""
        count = ids.numel()
        pad = bucket - count
        padded_ids = F.pad(ids, (0, pad))[None]
        padded_positions = F.pad(positions, (0, pad), value=int(positions[-1]))
        slots = torch.arange(start, start + bucket, device=self.device)
        full = torch.full((bucket, self.capacity), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        full[:count, :start + count] = mask[0, 0]
        full[count:, 0] = 0  # padded rows attend somewhere: no NaN
        logits, features = self._compiled(padded_ids, padded_positions, slots, full[None, None], self.capacity)
        return logits[:, :count], features[:, :count]

    def _forward(self, inputs: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 mask: Optional[torch.Tensor], span: int, keep: int = 0):
        """Tokens ``inputs [1, T]`` (ids, or input vectors ``[1, T, hidden]``) written at ``slots`` with rotary
        ``positions``, attending to the first ``span`` slots under the additive ``mask [1, 1, T, span]``; logits
        of the last ``keep`` rows (0: all) ``[1, rows, vocab]`` and the final normed hidden states of every row
        ``[1, T, hidden]``. Only kept rows go through the LM head: a prompt's other rows would cost a GEMM over
        the whole vocabulary each."""
        hidden = self.base.embed_tokens(inputs) if inputs.dtype == torch.long else inputs
        stream = [hidden[0]] if self.capture else None
        cos, sin = self.cos[positions][None, :, None], self.signed_sin[positions][None, :, None]  # [1, T, 1, head_dim]
        for slot, index in enumerate(self.layer_ids):
            hidden = self._layer(self.base.layers[index], slot, hidden, cos, sin, mask, slots, span)
            if stream is not None:
                stream.append(hidden[0])
        if stream is not None:
            self.hidden = stream
        features = _norm(self.base.norm, hidden)
        return self.linears(self.model.lm_head, features[:, -keep:] if keep else features), features

    def _layer(self, layer, slot: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: Optional[torch.Tensor], slots: torch.Tensor, span: int) -> torch.Tensor:
        """One decoder layer. q/k/v come out of one matmul as ``[1, T, heads + 2 kv_heads, head_dim]``, and q and k
        are rotated together: a handful of eager ops a layer, which is what a step spends beside its weights."""
        attention = layer.self_attn
        count = hidden.shape[1]
        heads, rotated_heads = self.heads, self.heads + self.kv_heads
        qkv = self.linears.stacked((attention.q_proj, attention.k_proj, attention.v_proj),
                                   _norm(layer.input_layernorm, hidden))
        qkv = qkv.view(1, count, rotated_heads + self.kv_heads, self.head_dim)
        qk = _rotate(qkv[:, :, :rotated_heads], cos, sin)
        q, k, v = qk[:, :, :heads].transpose(1, 2), qk[0, :, heads:].transpose(0, 1), qkv[0, :, rotated_heads:]
        self.keys[slot].index_copy_(1, slots, k)
        self.values[slot].index_copy_(1, slots, v.transpose(0, 1))
        keys, values = self.keys[slot, :, :span][None], self.values[slot, :, :span][None]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attention.scaling,
                                             enable_gqa=self.kv_heads != self.heads)
        out = out.transpose(1, 2).reshape(1, count, heads * self.head_dim)
        hidden = self.linears.residual(attention.o_proj, out, hidden)
        return self.linears.mlp(layer.mlp, _norm(layer.post_attention_layernorm, hidden), hidden)


class _Step(torch.nn.Module):
    """The forward as a module that owns the model, so the compiler sees its weights as parameters (freezing)."""

    def __init__(self, static: "StaticForward"):
        super().__init__()
        self.model = static.model
        self.static = [static]  # a list: not a submodule

    def forward(self, input_ids, positions, slots, mask, span: int):
        return self.static[0]._forward(input_ids, positions, slots, mask, span)


def _compile(static: "StaticForward"):
    """torch.compile of the step. CPU: inductor with weight freezing and autotuned GEMMs (its C++ micro-GEMM beats
    MKL's small-M GEMM: benchmarks/forward_roofline.py); CUDA: CUDA graphs (reduce-overhead)."""
    import torch._inductor.config as inductor

    step = _Step(static).eval()
    if static.device.type == "cpu":
        inductor.freezing = True
        return torch.compile(step, mode="max-autotune-no-cudagraphs", dynamic=False)
    return torch.compile(step, mode="reduce-overhead", dynamic=False)


# RMSNorm classes whose forward is ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)``: F.rms_norm gives their
# output bit for bit (float32 and bfloat16, tests/decoding/test_static.py) in one kernel instead of seven.
RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm")


def _norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(norm).__name__ not in RMS_NORMS:
        return norm(x)
    if x.dtype == norm.weight.dtype == torch.float32:  # the weight inside the kernel: the same product, one op less
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    return F.rms_norm(x.float(), (x.shape[-1],), None, norm.variance_epsilon).to(x.dtype) * norm.weight


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with rotate_half's signs folded in (its first half negated), for :func:`_rotate`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin``, bit for bit: ``rotate_half(x)`` is ``x`` rolled by half
    a head with its first half negated, and the negation moves exactly onto ``sin`` (:func:`_signed`)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _causal(start: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask ``[1, 1, count, start + count]``: every new row sees the cache and the rows up to itself."""
    allowed = torch.ones(count, start + count, dtype=torch.bool, device=device)
    allowed[:, start:] = torch.ones(count, count, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
