"""Verifiers (acceptance rules): given a draft and the target's logits over it, which tokens to keep.

Knows nothing of who drafted. ``logits`` has one row per position: row 0 is the target's prediction
after the committed context (whose last token is the *root*), row ``i + 1`` its prediction after draft
token i (in a chain: after the context plus ``draft[:i + 1]``; in a tree: after the path root -> node i).
A chain of k tokens comes with k + 1 rows, a tree of n nodes with n + 1; the row after the last
accepted token yields the bonus token.

Rules, chosen by :func:`verify` from the pipeline:
- greedy (pipeline.greedy): exact match with the argmax of the processed logits; lossless.
- ``acceptance=lossless``: speculative sampling (Leviathan et al. 2023; Chen et al. 2023), and
  SpecInfer's multi-draft form for trees; the output follows the pipeline's distribution exactly.
- ``acceptance=typical``: Medusa's typical acceptance; lossy, so the verdict says ``lossy=True``.

Every random draw uses the caller's generator, so a seed fixes the output. When the pipeline has a kernel
provider (``backend.kernels=triton``) the chain and tree rules run on it (:func:`kernel_chain`,
:func:`kernel_tree`) with random numbers drawn here exactly as the torch rules draw them, so both give
the same tokens for a seed (up to float rounding at near-ties).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from decodelab.decoding import tree
from decodelab.decoding.logits import ChainContext, Context, LogitsPipeline, exponential_noise
from decodelab.decoding.types import Draft, Kernels, Verdict

# Draws one token from a distribution [vocab]: the generator's multinomial, or a kernel reference's race.
Sampler = Callable[[torch.Tensor], int]


def verify(draft: Draft, logits: torch.Tensor, pipeline: LogitsPipeline, generator: torch.Generator,
           context: Sequence[int]) -> Verdict:
    """Judge ``draft`` against the target ``logits`` [len(draft) + 1, vocab]; ``context`` ends with the root."""
    if draft.parents is not None and len(draft) > 0:
        return verify_tree(draft, logits, pipeline, generator, context)
    return verify_chain(draft, logits, pipeline, generator, context)


# --------------------------------------------------------------------------------------------------
# Chains
# --------------------------------------------------------------------------------------------------

def verify_chain(draft: Draft, logits: torch.Tensor, pipeline: LogitsPipeline, generator: torch.Generator,
                 context: Sequence[int]) -> Verdict:
    seen = chain_context(context, draft.tokens, logits.device) if pipeline.penalty != 1.0 else None
    if pipeline.greedy:
        scores = pipeline.process(logits, seen)
        if pipeline.kernels is not None:
            return kernel_chain(pipeline.kernels, draft.tokens, scores, None, None)
        return verify_greedy(draft.tokens, scores.argmax(dim=-1).tolist())
    if len(draft) == 0:
        # Plain sampling: exactly what autoregressive decoding draws.
        return Verdict(accepted=[], bonus=int(pipeline.sample(logits[:1], generator, seen)[0]))
    p = pipeline.probs(logits, seen)
    if pipeline.cfg.acceptance == "typical":
        return typical_acceptance(draft.tokens, p, pipeline.cfg.typical_epsilon, pipeline.cfg.typical_delta)
    if pipeline.kernels is not None:
        return kernel_chain(pipeline.kernels, draft.tokens, p, draft_probs(draft, p), generator)
    return speculative_sampling(draft.tokens, p, draft_probs(draft, p), generator)


def verify_greedy(draft: Sequence[int], target_choice: Sequence[int]) -> Verdict:
    """Exact match: keep draft tokens while they equal the target's argmax; the first disagreement is the bonus."""
    accepted: List[int] = []
    for proposed, chosen in zip(draft, target_choice):
        if proposed != chosen:
            break
        accepted.append(proposed)
    return Verdict(accepted=accepted, bonus=int(target_choice[len(accepted)]), nodes=list(range(len(accepted))))


def speculative_sampling(tokens: Sequence[int], p: torch.Tensor, q: Optional[torch.Tensor],
                         generator: torch.Generator) -> Verdict:
    """Leviathan/Chen rejection sampling over a chain; every emitted token follows ``p`` exactly.

    Token i is accepted with probability min(1, p_i(x_i) / q_i(x_i)) (``q`` None: one-hot drafts, so
    with probability p_i(x_i)). The first rejected position emits a draw from norm(max(0, p_i - q_i))
    instead; if all k are accepted the bonus is drawn from p_k. One uniform per draft token is drawn
    up front, then one multinomial draw: the generator advances the same way whatever is accepted.
    """
    u = torch.rand(len(tokens), generator=generator, device=p.device)
    return chain_rejection(tokens, p, q, u, lambda dist: draw(dist, generator))


def chain_rejection(tokens: Sequence[int], p: torch.Tensor, q: Optional[torch.Tensor], u: torch.Tensor,
                    sample: Sampler) -> Verdict:
    """:func:`speculative_sampling` given its uniforms ``u`` [k] and the sampler of the one token it draws
    (the kernels' torch reference calls this with the race over given noise)."""
    k = len(tokens)
    ids = torch.tensor(list(tokens), dtype=torch.long, device=p.device)
    rows = torch.arange(k, device=p.device)
    p_x = p[rows, ids]
    q_x = q[rows, ids] if q is not None else torch.ones_like(p_x)
    # u < p/q without dividing (q may be 0 for a token the draft could not have drawn; p = 0 never passes).
    passed = (u * q_x < p_x).tolist()
    n = passed.index(False) if False in passed else k
    dist = p[k] if n == k else residual(p[n], None if q is None else q[n], tokens[n])
    return Verdict(accepted=list(tokens[:n]), bonus=sample(dist), nodes=list(range(n)))


def typical_acceptance(tokens: Sequence[int], p: torch.Tensor, epsilon: float, delta: float) -> Verdict:
    """Medusa's typical acceptance (Cai et al. 2024): lossy, deterministic given the logits.

    Keep x_i while p_i(x_i) > min(epsilon, delta * exp(-H(p_i))): plausible tokens pass, and the bar
    drops where the target is uncertain. The token after the kept prefix is the target's argmax
    (Medusa decodes its first token greedily), so no random draw is made.
    """
    threshold = typical_threshold(p, epsilon, delta)
    rows = torch.arange(len(tokens), device=p.device)
    ids = torch.tensor(list(tokens), dtype=torch.long, device=p.device)
    passed = (p[rows, ids] > threshold[rows]).tolist()
    n = passed.index(False) if False in passed else len(tokens)
    return Verdict(accepted=list(tokens[:n]), bonus=int(p[n].argmax()), nodes=list(range(n)), lossy=True)


# --------------------------------------------------------------------------------------------------
# Trees
# --------------------------------------------------------------------------------------------------

def verify_tree(draft: Draft, logits: torch.Tensor, pipeline: LogitsPipeline, generator: torch.Generator,
                context: Sequence[int]) -> Verdict:
    parents = list(draft.parents or [])
    tree.check_parents(parents)
    if len(parents) != len(draft):
        raise ValueError(f"a tree draft needs one parent per token: {len(draft)} tokens, {len(parents)} parents")
    seen = tree_context(context, draft.tokens, parents, logits.device) if pipeline.penalty != 1.0 else None
    if pipeline.greedy:
        scores = pipeline.process(logits, seen)
        if pipeline.kernels is not None:
            return kernel_tree(pipeline.kernels, draft.tokens, parents, scores, None, None)
        return tree_greedy(draft.tokens, parents, scores.argmax(dim=-1).tolist())
    p = pipeline.probs(logits, seen)
    if pipeline.cfg.acceptance == "typical":
        return tree_typical(draft.tokens, parents, p, pipeline.cfg.typical_epsilon, pipeline.cfg.typical_delta)
    if pipeline.kernels is not None:
        return kernel_tree(pipeline.kernels, draft.tokens, parents, p, draft_probs(draft, p), generator)
    return tree_speculative_sampling(draft.tokens, parents, p, draft_probs(draft, p), generator)


def tree_greedy(tokens: Sequence[int], parents: Sequence[int], target_choice: Sequence[int]) -> Verdict:
    """The longest path whose every token is the target's argmax after its parent; bonus = argmax at its end."""
    passed = [tokens[i] == target_choice[tree.row(parent)] for i, parent in enumerate(parents)]
    path = longest_accepted_path(parents, passed)
    last = path[-1] if path else tree.ROOT
    return Verdict(accepted=[tokens[i] for i in path], bonus=int(target_choice[tree.row(last)]), nodes=path)


def tree_typical(tokens: Sequence[int], parents: Sequence[int], p: torch.Tensor, epsilon: float,
                 delta: float) -> Verdict:
    """Typical acceptance on a tree (Medusa): the longest path whose every token passes; lossy."""
    threshold = typical_threshold(p, epsilon, delta).tolist()
    passed = [float(p[tree.row(parent), tokens[i]]) > threshold[tree.row(parent)] for i, parent in enumerate(parents)]
    path = longest_accepted_path(parents, passed)
    last = path[-1] if path else tree.ROOT
    return Verdict(accepted=[tokens[i] for i in path], bonus=int(p[tree.row(last)].argmax()), nodes=path, lossy=True)


def tree_speculative_sampling(tokens: Sequence[int], parents: Sequence[int], p: torch.Tensor,
                              q: Optional[torch.Tensor], generator: torch.Generator) -> Verdict:
    """SpecInfer's multi-draft rejection sampling: walk down the tree, trying each node's children in order.

    At a node the current distribution starts as the target's; a child x is accepted with probability
    min(1, dist(x) / q(x)) (``q`` None: one-hot drafts, so dist(x)). A rejected child turns dist into
    norm(max(0, dist - q)) (for one-hot drafts: x removed) before the next sibling is tried; when every
    child is rejected, or the node is a leaf, the bonus is drawn from dist. Lossless for deterministic
    siblings and for siblings drawn independently from q. One uniform per node is drawn up front (a
    chain written as a tree advances the generator exactly like :func:`speculative_sampling`).
    """
    u = torch.rand(len(tokens), generator=generator, device=p.device)
    return tree_rejection(tokens, parents, p, q, u, lambda dist: draw(dist, generator))


def tree_rejection(tokens: Sequence[int], parents: Sequence[int], p: torch.Tensor, q: Optional[torch.Tensor],
                   u: torch.Tensor, sample: Sampler) -> Verdict:
    """:func:`tree_speculative_sampling` given its uniforms ``u`` [n] and the sampler of the token it draws."""
    kids = tree.children(parents)
    u = u.tolist()
    node, path = tree.ROOT, []
    dist = p[0]
    while True:
        for child in kids[node]:
            x = tokens[child]
            q_x = 1.0 if q is None else float(q[child, x])
            if u[child] * q_x < float(dist[x]):
                break
            dist = residual(dist, None if q is None else q[child], x)
        else:
            return Verdict(accepted=[tokens[i] for i in path], bonus=sample(dist), nodes=path)
        path.append(child)
        node, dist = child, p[tree.row(child)]


def longest_accepted_path(parents: Sequence[int], passed: Sequence[bool]) -> List[int]:
    """The deepest node whose whole root path passed (the first such in draft order), as a path; [] if none."""
    ok: List[bool] = []
    for node, parent in enumerate(parents):
        ok.append(passed[node] and (parent == tree.ROOT or ok[parent]))
    depth = tree.depths(parents)
    best = max((node for node in range(len(parents)) if ok[node]), key=lambda node: depth[node], default=None)
    return [] if best is None else tree.path_to(parents, best)


# --------------------------------------------------------------------------------------------------
# On a kernel provider (batch of one)
# --------------------------------------------------------------------------------------------------

def kernel_chain(kernels: Kernels, tokens: Sequence[int], target: torch.Tensor, q: Optional[torch.Tensor],
                 generator: Optional[torch.Generator]) -> Verdict:
    """The chain rule on ``kernels``: greedy (argmax match on ``target`` scores) when ``generator`` is None,
    else speculative sampling on probabilities, with the uniforms and then the noise drawn as
    :func:`speculative_sampling` draws them."""
    device, k = target.device, len(tokens)
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    u, noise = _kernel_randoms(generator, k, target.size(-1), device)
    out, accepted = kernels.chain(ids, target[None], None if q is None else q[None], u, noise,
                                  greedy=generator is None)
    n, *emitted = torch.cat([accepted[:1], out[0]]).tolist()  # one device-to-host copy
    return Verdict(accepted=emitted[:n], bonus=emitted[n], nodes=list(range(n)))


def kernel_tree(kernels: Kernels, tokens: Sequence[int], parents: Sequence[int], target: torch.Tensor,
                q: Optional[torch.Tensor], generator: Optional[torch.Generator]) -> Verdict:
    """The tree rule on ``kernels`` (greedy when ``generator`` is None), drawing as :func:`tree_speculative_sampling`."""
    device = target.device
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    par = torch.tensor([list(parents)], dtype=torch.long, device=device)
    u, noise = _kernel_randoms(generator, len(tokens), target.size(-1), device)
    nodes, accepted, bonus = kernels.tree(ids, par, target[None], None if q is None else q[None], u, noise,
                                          greedy=generator is None)
    n, after, *path = torch.cat([accepted[:1], bonus[:1], nodes[0]]).tolist()  # one device-to-host copy
    return Verdict(accepted=[tokens[i] for i in path[:n]], bonus=after, nodes=path[:n])


def _kernel_randoms(generator: Optional[torch.Generator], k: int, vocab: int,
                    device: torch.device) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(uniforms [1, k], noise [1, vocab]) in the torch rules' order, or (None, None) for greedy."""
    if generator is None:
        return None, None
    u = torch.rand(1, k, generator=generator, device=device)
    return u, exponential_noise((1, vocab), generator, device)


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------

def residual(p: torch.Tensor, q: Optional[torch.Tensor], token: int) -> torch.Tensor:
    """norm(max(0, p - q)): what is left of p once the draft's share is taken; q None means one-hot on ``token``.

    If nothing is left (p == q up to rounding, so the rejection itself had ~zero probability) p is returned.
    """
    if q is None:
        left = p.clone()
        left[token] = 0.0
    else:
        left = (p - q).clamp(min=0.0)
    total = left.sum()
    return left / total if total > 0 else p


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token id from a (possibly unnormalised) distribution [vocab]."""
    return int(torch.multinomial(probs, 1, generator=generator))


def draft_probs(draft: Draft, p: torch.Tensor) -> Optional[torch.Tensor]:
    """The draft's distributions on p's device, cut or zero-padded to the target's vocabulary; None if one-hot."""
    if draft.probs is None:
        return None
    q = draft.probs.to(device=p.device, dtype=torch.float32)
    vocab = p.size(-1)
    if q.size(-1) > vocab:
        q = q[:, :vocab]  # ids the target cannot emit (p = 0 there): never accepted
    elif q.size(-1) < vocab:
        q = torch.nn.functional.pad(q, (0, vocab - q.size(-1)))
    return q


def typical_threshold(p: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """Per row min(epsilon, delta * exp(-H(p))) (entropy in nats; removed tokens contribute 0)."""
    entropy = torch.special.entr(p).sum(dim=-1)
    return torch.clamp(delta * torch.exp(-entropy), max=epsilon)


def chain_context(context: Sequence[int], draft: Sequence[int], device: torch.device) -> ChainContext:
    """The ids each logits row follows (repetition penalty needs them): context + draft[:i] for row i."""
    return ChainContext(prefix=torch.tensor(list(context), dtype=torch.long, device=device),
                        draft=torch.tensor(list(draft), dtype=torch.long, device=device))


def tree_context(context: Sequence[int], tokens: Sequence[int], parents: Sequence[int],
                 device: torch.device) -> Context:
    """Per-row ids for a tree: the context for the root row, context + the path's tokens for each node's row."""
    prefix = torch.tensor(list(context), dtype=torch.long, device=device)
    rows = [prefix]
    for node in range(len(parents)):
        path = torch.tensor([tokens[i] for i in tree.path_to(parents, node)], dtype=torch.long, device=device)
        rows.append(torch.cat([prefix, path]))
    return rows
