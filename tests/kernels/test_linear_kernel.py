"""kernels/linear.cpp (``decodelab::linear``) against its torch reference over many shapes: rows of x (one pass,
several passes), weight sizes with and without a vector-width tail, groups of weights, biases and the residual;
what it refuses; and where its build lives."""

from __future__ import annotations

import pytest
import torch

from decodelab.kernels import linear as kernel
from decodelab.kernels.linear_reference import linear_reference

pytestmark = pytest.mark.skipif(kernel.problem() is not None, reason=f"cannot build here: {kernel.problem()}")
# Relative to the output's largest magnitude: float32 sums of up to 1536 products, in the kernel's order.
TOLERANCE = 2e-6


@pytest.fixture(scope="module", autouse=True)
def built():
    kernel.load()


def _error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("in_features", [1, 7, 16, 17, 63, 64, 65, 112, 576, 1536])
@pytest.mark.parametrize("out_features", [(1,), (5,), (64,), (576,), (33, 17), (960, 64, 64)])
def test_matches_the_reference_over_shapes(in_features, out_features):
    torch.manual_seed(in_features * 31 + sum(out_features))
    weights = [torch.randn(n, in_features) for n in out_features]
    biases = [torch.randn(n) for n in out_features]
    for rows in (1, 2, 3, 4, 5, 8, 9, 16, 17):
        x = torch.randn(1, rows, in_features)
        residual = torch.randn(1, rows, sum(out_features)) * 4
        for bias, res in (((), None), (biases, None), ((), residual), (biases, residual)):
            got = kernel.linear(x, weights, bias, res)
            assert got.shape == (1, rows, sum(out_features)) and got.dtype == torch.float32
            error = _error(got, linear_reference(x, weights, bias, res))
            assert error <= TOLERANCE, (rows, bool(bias), res is not None, error)


def test_each_output_is_the_weights_own_whatever_the_threads():
    """The group is split between threads at arbitrary rows: every column must still be its own weight's."""
    torch.manual_seed(1)
    weights = [torch.randn(n, 96) for n in (200, 3, 77)]
    x = torch.randn(4, 96)
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs.append(kernel.linear(x, weights))
    finally:
        torch.set_num_threads(before)
    assert _error(outputs[0], linear_reference(x, weights)) <= TOLERANCE
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])  # each dot in one order


def test_a_row_does_not_depend_on_the_rows_beside_it():
    """Each output is one dot product summed in one order, however many rows share the call: a verified row is bit
    for bit an AR step's, so greedy speculative decoding over this kernel is exact."""
    torch.manual_seed(2)
    weights = [torch.randn(300, 576), torch.randn(77, 576)]
    x = torch.randn(17, 576)
    for rows in (2, 5, 8, 17):
        together = kernel.linear(x[:rows], weights)
        for row in range(rows):
            assert torch.equal(kernel.linear(x[row:row + 1], weights)[0], together[row])


def test_bad_inputs_are_refused_by_name():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="weight 0 must be contiguous float32"):
        kernel.linear(x, [torch.randn(8, 4).t()])
    with pytest.raises(RuntimeError, match="weight 1 must be contiguous float32"):
        kernel.linear(x, [torch.randn(4, 8), torch.randn(4, 9)])
    with pytest.raises(RuntimeError, match="x must be float32"):
        kernel.linear(x.double(), [torch.randn(4, 8)])
    with pytest.raises(RuntimeError, match="one bias per weight"):
        kernel.linear(x, [torch.randn(4, 8), torch.randn(4, 8)], [torch.randn(4)])
    with pytest.raises(RuntimeError, match="residual must be float32 with 8 elements"):
        kernel.linear(x, [torch.randn(4, 8)], (), torch.randn(3))


def test_the_build_is_named_by_source_flags_torch_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("DECODELAB_CACHE", str(tmp_path))
    folder = kernel.build_dir()
    assert folder.parent == tmp_path / "kernels" and folder.name.startswith("linear-")
    monkeypatch.setattr(kernel, "FLAGS", kernel.FLAGS + ["-DOTHER"])
    assert kernel.build_dir() != folder
    monkeypatch.setattr(kernel, "_cpu_flags", lambda: "another cpu")
    assert kernel.build_dir().name != folder.name


def test_no_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert kernel.problem() == "no C++ compiler ('no-such-compiler-here' is not on PATH; set CXX)"
