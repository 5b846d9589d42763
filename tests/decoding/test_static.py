"""The static-cache forward (decoding/static.py) against transformers' DynamicCache forward: the same logits
for chains, trees, crops, kept paths, layer subsets and cache growth, on llama and qwen2; refusal elsewhere."""

from __future__ import annotations

import pytest
import torch

from decodelab.decoding.lm import LMAdapter
from decodelab.decoding.static import MIN_SLOTS
from decodelab.errors import ConfigError
from tests.helpers.drafters import PROMPTS, ar_tokens, decode_with, tiny_model
from decodelab.drafters.none import NoDrafter
from decodelab.config import DrafterConfig


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def loaded(request):
    return tiny_model(architecture=request.param, init_seed=5)


def _pair(loaded, **kwargs):
    return LMAdapter(loaded.model, cache="dynamic", **kwargs), LMAdapter(loaded.model, cache="static", **kwargs)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_chain_tree_crop_keep_match_the_dynamic_cache(loaded):
    dynamic, static = _pair(loaded)
    assert (dynamic.kind, static.kind) == ("dynamic", "static")
    ids = loaded.tokenizer(PROMPTS[0])["input_ids"]
    _same(dynamic.prefill(ids), static.prefill(ids))
    for step in ([7, 8, 9], [10], [11, 12]):
        _same(dynamic.forward(step), static.forward(step))
    for adapter in (dynamic, static):
        adapter.crop(len(ids) + 2)
    _same(dynamic.forward([13]), static.forward([13]))
    tokens, parents = [20, 21, 22, 23, 24], [-1, -1, 0, 2]
    _same(dynamic.forward_tree(tokens, parents), static.forward_tree(tokens, parents))
    n = len(dynamic.tokens)
    kept = list(range(n - 5)) + [n - 5, n - 4, n - 2]  # root, node 0, node 2
    for adapter in (dynamic, static):
        adapter.keep(kept)
    assert dynamic.tokens == static.tokens
    _same(dynamic.forward([30, 31]), static.forward([30, 31]))
    # A second prompt re-uses the common prefix of the cache.
    _same(dynamic.prefill(ids + [1, 2, 3]), static.prefill(ids + [1, 2, 3]))


def test_growth_past_the_first_allocation_keeps_the_cache(loaded):
    dynamic, static = _pair(loaded)
    start = static.static.capacity
    ids = [(i * 7) % 200 + 40 for i in range(start - 3)]
    _same(dynamic.prefill(ids), static.prefill(ids))
    _same(dynamic.forward(list(range(50, 60))), static.forward(list(range(50, 60))))  # crosses the capacity
    assert static.static.capacity >= start + MIN_SLOTS


def test_layer_subset_matches(loaded):
    dynamic, static = _pair(loaded, layers=[0])
    ids = loaded.tokenizer(PROMPTS[1])["input_ids"]
    _same(dynamic.prefill(ids), static.prefill(ids))
    _same(dynamic.forward([5, 6]), static.forward([5, 6]))


def test_greedy_decode_is_token_identical(loaded):
    ids = loaded.tokenizer(PROMPTS[0])["input_ids"]
    dynamic = decode_with(loaded, ids, NoDrafter(DrafterConfig()), max_new_tokens=30, cache="dynamic").tokens
    assert dynamic == ar_tokens(loaded, ids, max_new_tokens=30)  # the default (auto) is the static path
    assert len(dynamic) == 30


def test_models_without_a_static_path_are_refused_or_fall_back():
    loaded = tiny_model(architecture="qwen2")
    loaded.model.config.use_sliding_window, loaded.model.config.sliding_window = True, 16
    with pytest.raises(ConfigError, match=r"backend.kv_cache: no static KV cache for sliding-window attention"):
        LMAdapter(loaded.model, cache="static")
    assert LMAdapter(loaded.model, cache="auto").kind == "dynamic"
    with pytest.raises(ConfigError, match=r"backend.kv_cache: got 'paged'"):
        LMAdapter(loaded.model, cache="paged")


@pytest.mark.slow
def test_compiled_buckets_match_eager():
    """The compiled step (token counts padded to warm buckets) gives the eager logits, for chains and a tree; a
    count with no warm bucket (the prompt) runs eagerly, so a compile never lands inside a step."""
    loaded = tiny_model(init_seed=5)
    eager = LMAdapter(loaded.model, cache="static")
    compiled = LMAdapter(loaded.model, cache="static", compile=True)
    assert compiled.warmup((1, 3)) > 0 and compiled.tokens == []
    assert compiled.static.warm == {1, 4}
    ids = [(i * 11) % 250 + 30 for i in range(70)]  # no bucket holds 70: eager
    _same(eager.prefill(ids), compiled.prefill(ids))
    for step in ([7], [8, 9, 10], [11, 12, 13, 14], [15]):  # buckets 1, 4 (padded), 4, 1
        _same(eager.forward(step), compiled.forward(step))
    tokens, parents = [20, 21, 22, 23], [-1, -1, 0]
    _same(eager.forward_tree(tokens, parents), compiled.forward_tree(tokens, parents))
    # Growing the cache invalidates the graphs (they are specialised to the capacity): reserve compiles again.
    capacity = compiled.static.capacity
    assert compiled.reserve(capacity + 1) > 0 and compiled.static.warm == {1, 4}
    assert compiled.static.capacity > capacity
    _same(eager.forward([16]), compiled.forward([16]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_rms_norm_is_bit_identical_to_the_models_own(family, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from decodelab.decoding.static import _norm

    torch.manual_seed(1)
    norm = (LlamaRMSNorm if family == "llama" else Qwen2RMSNorm)(96, eps=1e-6)
    norm.weight.data = torch.randn(96)
    norm = norm.to(dtype)
    for rows in (1, 3, 17):
        x = (torch.randn(1, rows, 96) * 4).to(dtype)
        assert torch.equal(_norm(norm, x), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_bit_identical_to_transformers(dtype):
    """q and k rotate together, as ``x * cos + roll(x) * signed sin``: exactly transformers' rotate_half form."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from decodelab.decoding.static import _rotate, _signed

    torch.manual_seed(2)
    for rows, heads, kv_heads, head_dim in ((1, 9, 3, 64), (5, 4, 4, 32), (17, 2, 1, 8)):
        q = (torch.randn(1, heads, rows, head_dim) * 3).to(dtype)
        k = (torch.randn(1, kv_heads, rows, head_dim) * 3).to(dtype)
        angles = torch.randn(1, rows, head_dim // 2) * 5
        cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
        together = _rotate(torch.cat((q, k), dim=1).transpose(1, 2), cos[:, :, None], _signed(sin)[:, :, None])
        assert torch.equal(together[:, :, :heads].transpose(1, 2), want_q)
        assert torch.equal(together[:, :, heads:].transpose(1, 2), want_k)


def test_a_prompt_runs_only_its_last_row_through_the_lm_head(loaded):
    """Prefill keeps one row of logits, so only that row pays the vocabulary GEMM; features keep every row."""
    static = LMAdapter(loaded.model, cache="static")
    rows = []
    handle = loaded.model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    try:
        ids = loaded.tokenizer(PROMPTS[0])["input_ids"]
        static.prefill(ids)
        static.forward([5, 6, 7])
    finally:
        handle.remove()
    assert rows == [1, 3]
    assert static.static.features.shape[0] == 3
