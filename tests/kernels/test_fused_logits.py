"""The fused sampling kernel against its torch reference (the pipeline's own filters): kept sets, probabilities,
draws, over shapes (1..33 rows; vocabularies 1, 5, 1000, 4096, 32000 + 7, 49152), logits families, seeds and
filter values; and its draws against the distribution (chi-square)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from decodelab.decoding.logits import apply_top_k, apply_top_p, exponential_noise  # noqa: E402
from decodelab.kernels.logits import fused_probs  # noqa: E402
from decodelab.kernels.logits_reference import race_sample, reference_probs  # noqa: E402
from tests.helpers.statistics import assert_follows, chi_square_pvalue, token_counts  # noqa: E402

FILTERS = {
    "temperature": dict(temperature=0.7),
    "top_k=1": dict(top_k=1),
    "top_k": dict(temperature=1.3, top_k=50),
    "top_p": dict(top_p=0.9),
    "top_k+top_p": dict(temperature=0.8, top_k=20, top_p=0.5),
    "min_p": dict(min_p=0.05),
    "all": dict(temperature=0.9, top_k=100, top_p=0.95, min_p=0.02),
    "top_k>=V+top_p": dict(top_k=1_000_000, top_p=0.99),
}
SHAPES = [(1, 1), (3, 5), (33, 1000), (2, 4096), (5, 32007), (1, 49152)]


def family_logits(rows: int, vocab: int, seed: int, ties: bool) -> torch.Tensor:
    """Rows cycle through flat, peaked and partly masked (-inf) logits, and integer logits (ties) when ``ties``."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(rows, vocab, generator=g)
    for row in range(rows):
        kind = (row + seed) % (4 if ties else 3)
        if kind == 1:
            out[row] *= 5.0
        elif kind == 2 and vocab > 1:
            out[row][torch.rand(vocab, generator=g) < 0.3] = float("-inf")
            out[row, 0] = 0.0  # at least one finite logit
        elif kind == 3:
            out[row] = torch.randint(-3, 4, (vocab,), generator=g).float()
    return out


def at_rounding_boundary(logits: torch.Tensor, token: int, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, min_p: float = 0.0) -> bool:
    """Whether ``token``'s fate in one row is decided within float rounding: its ascending top-p mass is within
    1e-6 of 1 - top_p, or its min-p ratio p / p_max within 1e-5 of min_p (computed here in float64)."""
    x = logits.float()[None]
    if temperature != 1.0:
        x = x / temperature
    if top_k > 0:
        x = apply_top_k(x, top_k)
    probs = x.double().softmax(-1)[0]
    if top_p < 1.0:
        mass = probs[probs <= probs[token]].sum()
        if abs(float(mass) - (1.0 - top_p)) < 1e-6:
            return True
        probs = apply_top_p(x, top_p).double().softmax(-1)[0]
    return min_p > 0 and abs(float(probs[token] / probs.max()) - min_p) < 1e-5


def assert_matches_reference(logits: torch.Tensor, probs: torch.Tensor, filters: dict) -> torch.Tensor:
    """Kept sets equal the reference's but for rounding-level boundary tokens (at most a tenth of the rows),
    probabilities equal to float tolerance on rows whose kept sets agree. Returns those rows' mask."""
    expected = reference_probs(logits, **filters)
    differ = (probs > 0) != (expected > 0)
    for row, token in differ.nonzero().tolist():
        assert at_rounding_boundary(logits[row], token, **filters), \
            f"row {row} token {token}: kernel p={float(probs[row, token]):.3g}, reference {float(expected[row, token]):.3g}"
    agree = ~differ.any(dim=-1)
    assert agree.float().mean() >= 0.9, f"{int((~agree).sum())} of {len(agree)} rows differ at a boundary"
    torch.testing.assert_close(probs[agree], expected[agree], rtol=1e-5, atol=1e-7)
    return agree


@pytest.mark.parametrize("name", FILTERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_matches_reference(device, shape, name):
    filters = FILTERS[name]
    seed = SHAPES.index(shape) * 31 + list(FILTERS).index(name)
    logits = family_logits(*shape, seed=seed, ties=filters.get("top_p", 1.0) == 1.0)
    noise = torch.empty(shape).exponential_(generator=torch.Generator().manual_seed(seed))
    probs, tokens = fused_probs(logits.to(device), noise=noise.to(device), **filters)
    agree = assert_matches_reference(logits, probs.cpu(), filters)
    expected_tokens = race_sample(reference_probs(logits, **filters), noise)
    assert torch.equal(tokens.cpu()[agree], expected_tokens[agree])


def test_random_filter_values(device):
    """Many seeds and filter values on small rows: every active combination, random strengths."""
    g = torch.Generator().manual_seed(7)
    for trial in range(40):
        use = torch.rand(4, generator=g) < 0.6
        filters = dict(temperature=float(torch.empty(1).uniform_(0.3, 2.0, generator=g)) if use[0] else 1.0,
                       top_k=int(torch.randint(1, 70, (1,), generator=g)) if use[1] else 0,
                       top_p=float(torch.empty(1).uniform_(0.05, 1.0, generator=g)) if use[2] else 1.0,
                       min_p=float(torch.empty(1).uniform_(0.0, 0.5, generator=g)) if use[3] else 0.0)
        logits = family_logits(8, 64, seed=trial, ties=filters["top_p"] == 1.0)
        probs, _ = fused_probs(logits.to(device), **filters)
        assert_matches_reference(logits, probs.cpu(), filters)


@pytest.mark.parametrize("tile,vocab", [((2, 64), 300), ((1, 1024), 2500), ((4, 16), 61)])
def test_multi_program_and_multi_block_sweeps(device, tile, vocab):
    """Tiles smaller than the rows and the vocabulary: every loop carries its state across blocks and programs."""
    logits = family_logits(5, vocab, seed=3, ties=False)
    for filters in (FILTERS["all"], FILTERS["top_k+top_p"], FILTERS["min_p"]):
        noise = torch.empty(5, vocab).exponential_(generator=torch.Generator().manual_seed(4))
        probs, tokens = fused_probs(logits.to(device), noise=noise.to(device), tile=tile, **filters)
        agree = assert_matches_reference(logits, probs.cpu(), filters)
        assert torch.equal(tokens.cpu()[agree], race_sample(reference_probs(logits, **filters), noise)[agree])


def test_top_k_keeps_every_tie_with_the_kth_value(device):
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0, -1.0]])
    probs, _ = fused_probs(logits.to(device), top_k=2)
    assert (probs.cpu()[0] > 0).tolist() == [True, False, True, True, True, False, False]


def test_draw_is_torch_multinomial_for_the_same_generator_state(device):
    """A seed gives the token torch.multinomial gives: the noise is what multinomial itself would draw."""
    logits = family_logits(9, 1000, seed=11, ties=False)
    filters = FILTERS["all"]
    noise = exponential_noise(logits.shape, torch.Generator().manual_seed(5), torch.device("cpu"))
    _, tokens = fused_probs(logits.to(device), noise=noise.to(device), **filters)
    expected = torch.multinomial(reference_probs(logits, **filters), 1, generator=torch.Generator().manual_seed(5))
    assert tokens.cpu().tolist() == expected.squeeze(-1).tolist()


@pytest.mark.parametrize("filters", [dict(temperature=0.7, top_k=6), dict(temperature=1.3, top_p=0.8, min_p=0.1)],
                         ids=["temperature+top_k", "top_p+min_p"])
def test_draws_follow_the_distribution(device, filters):
    draws, vocab = 8000, 12
    logits = (torch.randn(1, vocab, generator=torch.Generator().manual_seed(1)) * 2).expand(draws, vocab)
    noise = torch.empty(draws, vocab).exponential_(generator=torch.Generator().manual_seed(2))
    _, tokens = fused_probs(logits.to(device), noise=noise.to(device), **filters)
    target = reference_probs(logits[:1], **filters)[0]
    assert_follows(tokens.cpu().tolist(), target)
    # Power: the same draws are far from the unfiltered distribution.
    assert chi_square_pvalue(token_counts(tokens.cpu().tolist(), vocab), logits[0].softmax(-1)) < 1e-3


def test_shapes_are_checked(device):
    with pytest.raises(ValueError, match="rows, vocab"):
        fused_probs(torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="noise"):
        fused_probs(torch.zeros(2, 5, device=device), noise=torch.ones(2, 4, device=device))
