"""backend.linear (decoding/linear.py): oneDNN-packed weights against F.linear over many shapes, the static forward
over them and over decodelab's gemv kernel against transformers' forward, and what is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decodelab import config
from decodelab.decoding import linear
from decodelab.decoding.lm import LMAdapter
from decodelab.decoding.linear import Linears, packed, resolve
from decodelab.drafters.none import NoDrafter
from decodelab.config import DrafterConfig
from decodelab.errors import ConfigError
from tests.helpers.decoding import assert_bad_value_is_named
from decodelab.kernels import linear as kernel
from tests.helpers.drafters import PROMPTS, decode_with, tiny_model

pytestmark = pytest.mark.skipif(linear.onednn_problem(torch.device("cpu"), torch.float32) is not None,
                                reason="this torch build has no oneDNN")
# Relative to the output's largest magnitude: float32 sums in another order; bfloat16 rounds its inputs the same
# way in both, its accumulations differ.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2}
# The fast kinds this machine can run (gemv needs a C++ compiler; its own tests: tests/kernels/test_linear.py).
FAST = ["onednn"] + (["gemv"] if kernel.problem() is None else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (37, 53), (64, 32), (192, 576), (576, 1536),
                                                      (1000, 64), (4099, 96)])
def test_packed_matches_f_linear_over_shapes(out_features, in_features, dtype):
    torch.manual_seed(out_features * 7 + in_features)
    for bias in (False, True):
        module = torch.nn.Linear(in_features, out_features, bias=bias).to(dtype)
        for rows in (1, 2, 3, 8, 9, 17, 64):
            for shape in ((rows, in_features), (1, rows, in_features)):
                x = torch.randn(shape).to(dtype)
                got = Linears("onednn")(module, x)
                reference = F.linear(x.float(), module.weight.float(),
                                     None if module.bias is None else module.bias.float())
                assert got.shape == reference.shape and got.dtype == dtype
                error = (got.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-6)
                assert error <= TOLERANCE[dtype], (shape, bias, float(error))


@pytest.mark.parametrize("bias", [False, True])
def test_a_group_is_one_matmul_with_each_modules_output(bias):
    """q/k/v and gate/up run as one matmul over stacked weights: each output as the module alone gives it."""
    torch.manual_seed(3)
    modules = [torch.nn.Linear(48, n, bias=bias) for n in (48, 16, 16)]
    x = torch.randn(1, 5, 48)
    outputs = Linears("onednn").group(modules, x)
    for module, out in zip(modules, outputs):
        torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)
    assert Linears("onednn").group(modules, x)[1].shape == (1, 5, 16)
    mixed = [torch.nn.Linear(48, 8), torch.nn.Linear(48, 8, bias=False)]  # one bias only: each alone
    for module, out in zip(mixed, Linears("onednn").group(mixed, x)):
        torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["torch"] + FAST)
def test_stacked_outputs_sit_side_by_side_as_the_group_gives_them(kind):
    torch.manual_seed(4)
    modules = [torch.nn.Linear(48, n, bias=True) for n in (48, 16, 16)]
    x = torch.randn(1, 5, 48)
    stacked = Linears(kind).stacked(modules, x)
    assert stacked.shape == (1, 5, 80)
    assert torch.equal(stacked, torch.cat(Linears(kind).group(modules, x), dim=-1))
    torch.testing.assert_close(stacked, torch.cat([module(x) for module in modules], dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_the_residual_add_inside_the_matmul_is_the_same_sum(bias, dtype):
    """float32: oneDNN's add post-op gives residual + module(x) bit for bit; bfloat16 adds after the product's
    rounding, as the model does."""
    torch.manual_seed(5)
    module = torch.nn.Linear(96, 64, bias=bias).to(dtype)
    for rows in (1, 3, 9):
        x, residual = torch.randn(1, rows, 96).to(dtype), (torch.randn(1, rows, 64) * 10).to(dtype)
        onednn = Linears("onednn")
        assert torch.equal(onednn.residual(module, x, residual), residual + onednn(module, x))
        assert torch.equal(Linears("torch").residual(module, x, residual), residual + module(x))


def test_a_changed_weight_is_repacked_and_a_custom_module_computes_itself():
    module = torch.nn.Linear(8, 4)
    first = packed((module,))[0]
    assert packed((module,))[0] is first  # one packed copy per module
    x = torch.randn(2, 8)
    with torch.no_grad():
        module.weight.mul_(3)  # a head trained in place
    torch.testing.assert_close(Linears("onednn")(module, x), module(x), rtol=1e-5, atol=1e-5)
    assert packed((module,))[0] is not first

    class Scaled(torch.nn.Linear):  # not a plain Linear: its own forward decides
        def forward(self, x):
            return 2 * super().forward(x)

    scaled = Scaled(8, 4)
    torch.testing.assert_close(Linears("onednn")(scaled, x), scaled(x))


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v with biases
def loaded(request):
    return tiny_model(architecture=request.param, init_seed=5)


@pytest.mark.parametrize("kind", FAST)
def test_static_forward_over_fast_linears_matches_transformers(loaded, kind):
    dynamic = LMAdapter(loaded.model, cache="dynamic")
    packed_path = LMAdapter(loaded.model, cache="static", linear=kind)
    assert (packed_path.kind, packed_path.linear, dynamic.linear) == ("static", kind, "torch")
    ids = loaded.tokenizer(PROMPTS[0])["input_ids"]

    def same(a, b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    same(dynamic.prefill(ids), packed_path.prefill(ids))
    for step in ([7, 8, 9], [10], [11, 12]):
        same(dynamic.forward(step), packed_path.forward(step))
    tokens, parents = [20, 21, 22, 23, 24], [-1, -1, 0, 2]
    same(dynamic.forward_tree(tokens, parents), packed_path.forward_tree(tokens, parents))
    long = list(range(30, 30 + 2 * linear.GEMV_ROWS))  # longer than gemv's kernel takes: the packed weights
    same(dynamic.forward(long), packed_path.forward(long))


def test_weights_are_packed_before_the_first_forward():
    """Packing is paid when the adapter is built, never inside a timed prompt."""
    from decodelab.decoding.linear import _PACKED

    fresh = tiny_model(architecture="llama", init_seed=9)  # no adapter has packed its weights yet
    assert not any(module in _PACKED for module in fresh.model.modules())
    adapter = LMAdapter(fresh.model, cache="static", linear="onednn")
    assert adapter.tokens == [] and adapter.static.length == 0
    for layer in fresh.model.model.layers:
        assert layer.self_attn.q_proj in _PACKED and layer.self_attn.o_proj in _PACKED
        assert layer.mlp.gate_proj in _PACKED and layer.mlp.down_proj in _PACKED
    assert fresh.model.lm_head in _PACKED


@pytest.mark.parametrize("kind", FAST)
def test_greedy_decode_over_fast_linears_is_token_identical(loaded, kind):
    ids = loaded.tokenizer(PROMPTS[1])["input_ids"]
    torch_path = decode_with(loaded, ids, NoDrafter(DrafterConfig()), max_new_tokens=30).tokens
    fast = decode_with(loaded, ids, NoDrafter(DrafterConfig()), max_new_tokens=30, linear=kind).tokens
    assert fast == torch_path and len(fast) == 30


@pytest.mark.skipif("gemv" not in FAST, reason="no C++ compiler")
def test_gemv_takes_a_few_rows_and_hands_longer_calls_to_the_packed_weights(monkeypatch):
    torch.manual_seed(6)
    module = torch.nn.Linear(96, 64)
    gemv = Linears("gemv")
    calls = []
    kernel_linear = gemv._kernel
    monkeypatch.setattr(gemv, "_kernel", lambda *args: calls.append(args[0].shape[-2]) or kernel_linear(*args))
    for rows in (1, linear.GEMV_ROWS, linear.GEMV_ROWS + 1, 40):
        x, residual = torch.randn(1, rows, 96), torch.randn(1, rows, 64) * 10
        torch.testing.assert_close(gemv(module, x), module(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gemv.residual(module, x, residual), residual + module(x), rtol=1e-5, atol=1e-5)
    assert calls == [1, 1, linear.GEMV_ROWS, linear.GEMV_ROWS]  # the kernel ran only the short calls


@pytest.mark.skipif("gemv" not in FAST, reason="no C++ compiler")
def test_gemv_packs_for_its_long_calls_before_the_first_forward():
    from decodelab.decoding.linear import _PACKED

    fresh = tiny_model(architecture="llama", init_seed=13)  # no other test's adapter has seen it
    assert not any(module in _PACKED for module in fresh.model.modules())
    LMAdapter(fresh.model, cache="static", linear="gemv")
    assert fresh.model.model.layers[0].mlp.down_proj in _PACKED and fresh.model.lm_head in _PACKED


def test_auto_resolves_by_device_and_dtype_and_onednn_is_refused_where_it_cannot_serve():
    cpu = torch.device("cpu")
    assert resolve("auto", cpu, torch.float32) == ("gemv" if "gemv" in FAST else "onednn")
    assert resolve("auto", cpu, torch.bfloat16) == "onednn"
    assert resolve("auto", cpu, torch.float16) == "torch"
    assert resolve("auto", torch.device("meta"), torch.float32) == "torch"
    assert resolve("torch", cpu, torch.float32) == "torch"
    with pytest.raises(ConfigError, match=r"^backend\.linear: onednn cannot serve dtype float16"):
        resolve("onednn", cpu, torch.float16)
    with pytest.raises(ConfigError, match=r"^backend\.linear: got 'mkl', allowed: auto, torch, onednn"):
        resolve("mkl", cpu, torch.float32)
    # A compiled step keeps the modules' own linears (inductor packs them); the dynamic path has none to pack.
    model = tiny_model().model
    assert LMAdapter(model, cache="static", compile=True, linear="onednn").linear == "inductor"
    assert LMAdapter(model, cache="dynamic", linear="auto").linear == "torch"
    with pytest.raises(ConfigError, match=r"^backend\.linear: onednn runs .* \(backend\.kv_cache=dynamic\)"):
        LMAdapter(model, cache="dynamic", linear="onednn")
    with pytest.raises(ConfigError, match=r"^backend\.linear: gemv runs .* \(backend\.kv_cache=dynamic\)"):
        LMAdapter(model, cache="dynamic", linear="gemv")


def test_gemv_is_refused_where_it_cannot_serve_or_build(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^backend\.linear: gemv cannot serve dtype bfloat16 \(gemv is float32\)"):
        resolve("gemv", cpu, torch.bfloat16)
    with pytest.raises(ConfigError, match=r"^backend\.linear: gemv cannot serve device meta"):
        resolve("gemv", torch.device("meta"), torch.float32)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(ConfigError, match=r"^backend\.linear: gemv cannot serve no C\+\+ compiler"):
        resolve("gemv", cpu, torch.float32)
    monkeypatch.delenv("CXX")

    def broken() -> float:
        raise RuntimeError("Error building extension 'decodelab_linear'\n[1/2] c++ ... error")

    monkeypatch.setattr(kernel, "load", broken)
    if kernel.problem() is None:
        with pytest.raises(ConfigError, match=r"^backend\.linear: gemv's kernel did not build in .*\(Error building "
                                              r"extension 'decodelab_linear'\); use backend\.linear=onednn"):
            resolve("gemv", cpu, torch.float32)


def test_auto_without_a_compiler_or_a_build_takes_onednn_and_says_why(monkeypatch, capsys):
    cpu = torch.device("cpu")
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert resolve("auto", cpu, torch.float32) == "onednn"  # no compiler: onednn, silently (nothing failed)
    monkeypatch.delenv("CXX")
    if kernel.problem() is None:
        monkeypatch.setattr(kernel, "load", lambda: (_ for _ in ()).throw(RuntimeError("Error building extension")))
        capsys.readouterr()
        assert resolve("auto", cpu, torch.float32) == "onednn"
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "backend.linear=auto takes onednn" in err and "did not build" in err


def test_config_names_a_bad_linear():
    assert config.LINEARS == linear.LINEARS and config.ONEDNN_DTYPES == tuple(
        str(d).removeprefix("torch.") for d in linear.ONEDNN_DTYPES)
    assert_bad_value_is_named("cpu", "backend.linear=mkl", "backend.linear", group="backend")
    assert_bad_value_is_named("cpu", "backend.linear=onednn", "backend.linear", extra=["backend.dtype=float16"],
                              group="backend")
    assert_bad_value_is_named("cuda", "backend.linear=onednn", "backend.linear", group="backend")
    assert_bad_value_is_named("cpu", "backend.linear=gemv", "backend.linear", extra=["backend.dtype=bfloat16"],
                              group="backend")


def test_a_first_use_build_is_said_once(monkeypatch, capsys):
    import functools

    from decodelab.decoding.linear import _load_gemv

    @functools.lru_cache(maxsize=None)
    def build() -> float:  # as kernel.load: cached, the seconds its first call took
        return 23.0

    monkeypatch.setattr(kernel, "load", build)
    monkeypatch.setattr(linear, "_said_build", False)  # a real first build earlier in this process said it
    capsys.readouterr()
    for _ in range(3):  # the target's adapter, a draft's, a baseline's
        _load_gemv()
    err = capsys.readouterr().err
    assert err.count("backend.linear=gemv: built its kernel in 23 s (first use on this machine") == 1, err
