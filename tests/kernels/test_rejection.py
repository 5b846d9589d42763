"""The rejection-sampling kernels against their torch reference (the verifier's own rules): identical tokens for
the same random inputs over batch sizes, draft lengths, vocabularies, seeds, ragged rows, tiles, with and
without draft probabilities, greedy and stochastic; and the emitted tokens against the target distribution."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from decodelab.config import StrategyConfig  # noqa: E402
from decodelab.decoding.logits import LogitsPipeline  # noqa: E402
from decodelab.kernels.logits_reference import reference_probs  # noqa: E402
from decodelab.kernels.rejection import chain_rejection_sample, tree_rejection_sample  # noqa: E402
from decodelab.kernels.rejection_reference import chain_reference, tree_reference  # noqa: E402
from tests.helpers.statistics import assert_follows, chi_square_pvalue, token_counts  # noqa: E402


def _probs(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Peaked distributions, a top-k cut on every other row so that zeros (filtered tokens) occur too."""
    logits = torch.randn(*shape, generator=g) * 3
    cut = reference_probs(logits.reshape(-1, shape[-1]), top_k=max(shape[-1] // 3, 1)).reshape(shape)
    full = logits.softmax(-1)
    rows = torch.arange(cut.numel() // shape[-1]).reshape(shape[:-1]) % 2 == 0
    return torch.where(rows[..., None], cut, full)


def _near(g: torch.Generator, target: torch.Tensor) -> torch.Tensor:
    """Draft distributions that overlap the target's, as a useful drafter's do (so tokens get accepted)."""
    return 0.6 * target + 0.4 * _probs(g, *target.shape)


def _draft(g: torch.Generator, rows: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from ``rows`` [..., V], a fifth replaced by random tokens (often rejected)."""
    flat = rows.reshape(-1, rows.size(-1))
    ids = torch.multinomial(flat, 1, generator=g).flatten()
    noise = torch.randint(0, rows.size(-1), ids.shape, generator=g)
    return torch.where(torch.rand(ids.shape, generator=g) < 0.2, noise, ids).reshape(rows.shape[:-1])


def _same(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


# batch, draft length, vocab, draft probabilities, ragged lengths, tile override
CHAINS = [
    (1, 0, 1000, True, False, None),
    (1, 1, 7, False, False, None),
    (4, 3, 1000, True, False, None),
    (4, 3, 1000, False, False, None),
    (9, 5, 50, True, True, None),
    (9, 5, 50, False, True, None),
    (3, 8, 32007, True, False, None),
    (2, 4, 49152, False, False, None),
    (33, 2, 321, True, True, (4, 64)),
    (5, 6, 1000, False, False, (1, 128)),
]


def _case_id(size: str, case) -> str:
    """B<batch>-<size><draft tokens or nodes>-V<vocab>-q|onehot[-ragged][-tile<rows,block>]."""
    batch, count, vocab, with_q, ragged, tile = case
    return (f"B{batch}-{size}{count}-V{vocab}-{'q' if with_q else 'onehot'}{'-ragged' if ragged else ''}"
            f"{f'-tile{tile}' if tile else ''}")


@pytest.mark.parametrize("greedy", [False, True], ids=["stochastic", "greedy"])
@pytest.mark.parametrize("case", CHAINS, ids=lambda c: _case_id("K", c))
def test_chain_kernel_matches_reference(device, case, greedy):
    batch, k, vocab, with_q, ragged, tile = case
    for seed in range(2):
        g = torch.Generator().manual_seed(seed * 100 + k)
        target = _probs(g, batch, k + 1, vocab)
        q = _near(g, target[:, :k]) if with_q else None
        ids = _draft(g, q if with_q else target[:, :k]) if k else torch.zeros(batch, 0, dtype=torch.long)
        if greedy:  # scores: let drafts often be the argmax, so that chains get long
            target = torch.log(target + 1e-9)
            ids = torch.where(torch.rand(batch, k, generator=g) < 0.7, target[:, :k].argmax(-1), ids)
        u, noise = torch.rand(batch, k, generator=g), torch.empty(batch, vocab).exponential_(generator=g)
        lengths = torch.randint(0, k + 1, (batch,), generator=g) if ragged else None
        args = (ids, target, q, u, noise)
        out = chain_rejection_sample(*(None if a is None else a.to(device) for a in args), greedy=greedy,
                                     num_draft=None if lengths is None else lengths.to(device), tile=tile)
        assert _same(out, chain_reference(*args, greedy=greedy, num_draft=lengths)), (seed, out)


def _random_parents(g: torch.Generator, batch: int, nodes: int) -> torch.Tensor:
    """Random forests, plus a chain and a star when the batch has room: every shape a drafter makes."""
    rows = [[-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, nodes)] for _ in range(batch)]
    if batch > 2:
        rows[1], rows[2] = list(range(-1, nodes - 1)), [-1] * nodes
    return torch.tensor(rows)


# batch, nodes, vocab, draft probabilities, ragged node counts, tile override
TREES = [
    (1, 1, 50, True, False, None),
    (2, 4, 1000, True, False, None),
    (2, 4, 1000, False, False, None),
    (5, 7, 50, True, True, None),
    (5, 7, 50, False, True, None),
    (3, 12, 321, True, False, (2, 32)),
    (2, 6, 32007, True, False, None),
    (4, 16, 100, False, False, (1, 64)),
]


@pytest.mark.parametrize("greedy", [False, True], ids=["stochastic", "greedy"])
@pytest.mark.parametrize("case", TREES, ids=lambda c: _case_id("N", c))
def test_tree_kernel_matches_reference(device, case, greedy):
    batch, nodes, vocab, with_q, ragged, tile = case
    for seed in range(2):
        g = torch.Generator().manual_seed(seed * 100 + nodes)
        parents = _random_parents(g, batch, nodes)
        target = _probs(g, batch, nodes + 1, vocab)
        parent_rows = torch.gather(target, 1, (parents + 1)[..., None].expand(batch, nodes, vocab))
        q = _near(g, parent_rows) if with_q else None
        ids = _draft(g, q if with_q else parent_rows)
        if greedy:  # many nodes are their parent row's argmax; duplicate siblings test the deepest-first rule
            target = torch.log(target + 1e-9)
            choice = torch.gather(target.argmax(-1), 1, parents + 1)
            ids = torch.where(torch.rand(batch, nodes, generator=g) < 0.6, choice, ids)
        u, noise = torch.rand(batch, nodes, generator=g), torch.empty(batch, vocab).exponential_(generator=g)
        counts = torch.randint(1, nodes + 1, (batch,), generator=g) if ragged else None
        args = (ids, parents, target, q, u, noise)
        out = tree_rejection_sample(*(None if a is None else a.to(device) for a in args), greedy=greedy,
                                    num_nodes=None if counts is None else counts.to(device), tile=tile)
        assert _same(out, tree_reference(*args, greedy=greedy, num_nodes=counts)), (seed, parents.tolist(), out)


@pytest.mark.parametrize("with_q", [True, False])
def test_a_chain_written_as_a_tree_verifies_as_the_chain(device, with_q):
    g = torch.Generator().manual_seed(5)
    batch, k, vocab = 6, 5, 40
    target, q = _probs(g, batch, k + 1, vocab), (_probs(g, batch, k, vocab) if with_q else None)
    ids = _draft(g, q if with_q else target[:, :k])
    u, noise = torch.rand(batch, k, generator=g), torch.empty(batch, vocab).exponential_(generator=g)
    parents = torch.arange(-1, k - 1).expand(batch, k)
    on = [None if a is None else a.to(device) for a in (ids, parents, target, q, u, noise)]
    chain = chain_rejection_sample(on[0], *on[2:], greedy=False)
    tree = tree_rejection_sample(*on, greedy=False)
    assert torch.equal(chain.num_accepted, tree.num_accepted)
    for b in range(batch):
        n = int(chain.num_accepted[b])
        assert chain.tokens[b, :n].tolist() == ids[b, :n].tolist() and tree.nodes[b, :n].tolist() == list(range(n))
        assert int(chain.tokens[b, n]) == int(tree.bonus[b])


# ------------------------------------------------------------------------------------------------
# The emitted tokens follow the target (many draws in one batched call: one row per draw)
# ------------------------------------------------------------------------------------------------

DRAWS = 8000
PIPELINE = LogitsPipeline(StrategyConfig(name="s", do_sample=True, temperature=1.3, top_p=0.8, min_p=0.1))


def _pipeline_probs(seed: int, rows: int, vocab: int = 12) -> torch.Tensor:
    return PIPELINE.probs(torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2)


def _randoms(g: torch.Generator, k: int, vocab: int):
    return torch.rand(DRAWS, k, generator=g), torch.empty(DRAWS, vocab).exponential_(generator=g)


@pytest.mark.parametrize("with_q", [True, False])
def test_chain_first_token_follows_the_target(device, with_q):
    p, q = _pipeline_probs(1, 2), _pipeline_probs(2, 1)
    g = torch.Generator().manual_seed(3)
    if with_q:
        ids = torch.multinomial(q[0], DRAWS, replacement=True, generator=g)[:, None]
    else:  # a deterministic drafter may propose any token, also ones the target removed
        ids = (torch.arange(DRAWS) % p.size(-1))[:, None]
    u, noise = _randoms(g, 1, p.size(-1))
    draft_probs = q.expand(DRAWS, 1, -1).to(device) if with_q else None
    out = chain_rejection_sample(ids.to(device), p.expand(DRAWS, 2, -1).to(device), draft_probs, u.to(device),
                                 noise.to(device), greedy=False)
    assert_follows(out.tokens[:, 0].cpu().tolist(), p[0])


def test_chain_joint_of_two_tokens_follows_the_target(device):
    """(y1, y2) ~ p(y1) p(y2 | y1): the second row depends on the first draft token, and a step that emits only
    one token has its second drawn from p(. | y1) as the next step would."""
    vocab = 8
    p1, p2 = _pipeline_probs(10, 1, vocab)[0], _pipeline_probs(11, vocab, vocab)
    q1, q2 = _pipeline_probs(12, 1, vocab)[0], _pipeline_probs(13, vocab, vocab)
    g = torch.Generator().manual_seed(14)
    x1 = torch.multinomial(q1, DRAWS, replacement=True, generator=g)
    x2 = torch.multinomial(q2[x1], 1, generator=g).flatten()
    target = torch.stack([p1.expand(DRAWS, -1), p2[x1], torch.full((DRAWS, vocab), 1.0 / vocab)], dim=1)
    draft_probs = torch.stack([q1.expand(DRAWS, -1), q2[x1]], dim=1)
    u, noise = _randoms(g, 2, vocab)
    out = chain_rejection_sample(torch.stack([x1, x2], 1).to(device), target.to(device), draft_probs.to(device),
                                 u.to(device), noise.to(device), greedy=False)
    y1, y2 = out.tokens[:, 0].cpu(), out.tokens[:, 1].cpu()
    next_step = torch.multinomial(p2[y1], 1, generator=g).flatten()
    y2 = torch.where(out.num_accepted.cpu() >= 1, y2, next_step)
    joint = p1[:, None] * p2
    assert_follows((y1 * vocab + y2).tolist(), joint, max_tv=0.07)


@pytest.mark.parametrize("draft_kind", ["one_hot", "iid_siblings"])
def test_tree_first_token_follows_the_target(device, draft_kind):
    """Sibling rejection (SpecInfer): 3 candidates at the root, one with a child; the first token ~ p."""
    parents = torch.tensor([-1, -1, 1, -1]).expand(DRAWS, 4)
    p = _pipeline_probs(6, 5)
    q_root, q_child = _pipeline_probs(7, 1)[0], _pipeline_probs(8, 1)[0]
    q = torch.stack([q_root, q_root, q_child, q_root])
    g = torch.Generator().manual_seed(9)
    vocab = p.size(-1)
    if draft_kind == "one_hot":
        i = torch.arange(DRAWS)
        ids, draft_probs = torch.stack([i % vocab, (i + 3) % vocab, (i * 7) % vocab, (i + 3 * (i % 2)) % vocab], 1), None
    else:
        ids = torch.multinomial(q, DRAWS, replacement=True, generator=g).T
        draft_probs = q.expand(DRAWS, 4, -1).to(device)
    u, noise = _randoms(g, 4, vocab)
    out = tree_rejection_sample(ids.to(device), parents.to(device), p.expand(DRAWS, 5, -1).to(device), draft_probs,
                                u.to(device), noise.to(device), greedy=False)
    accepted = out.num_accepted.cpu() > 0
    first = torch.where(accepted, ids.gather(1, out.nodes.cpu()[:, :1].clamp(min=0)).flatten(), out.bonus.cpu())
    assert_follows(first.tolist(), p[0])


def test_the_check_has_power_on_kernel_output(device):
    """Drafts drawn from q but verified against a wrong claimed q (uniform) must fail the same check."""
    flat = LogitsPipeline(StrategyConfig(name="s", do_sample=True, temperature=1.5))
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(1)) * 2
    p, q = flat.probs(logits[:2]), flat.probs(logits[2:])
    g = torch.Generator().manual_seed(3)
    ids = torch.multinomial(q[0], 4000, replacement=True, generator=g)[:, None]
    u, noise = torch.rand(4000, 1, generator=g), torch.empty(4000, 12).exponential_(generator=g)
    claimed = torch.full((4000, 1, 12), 1.0 / 12)
    out = chain_rejection_sample(ids.to(device), p.expand(4000, 2, -1).to(device), claimed.to(device),
                                 u.to(device), noise.to(device), greedy=False)
    assert chi_square_pvalue(token_counts(out.tokens[:, 0].cpu().tolist(), 12), p[0]) < 1e-3
    honest = chain_rejection_sample(ids.to(device), p.expand(4000, 2, -1).to(device),
                                    q.expand(4000, 1, -1).to(device), u.to(device), noise.to(device), greedy=False)
    assert_follows(honest.tokens[:, 0].cpu().tolist(), p[0])


def test_shapes_are_checked(device):
    ids, target = torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 4, 10)
    with pytest.raises(ValueError, match="target"):
        chain_rejection_sample(ids.to(device), target[:, :3].to(device), None, None, None, greedy=True)
    with pytest.raises(ValueError, match="uniforms"):
        chain_rejection_sample(ids.to(device), target.to(device), None, None, None, greedy=False)
