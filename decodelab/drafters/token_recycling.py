"""drafter=token_recycling: Token Recycling (Luo et al. 2024, "Turning Trash into Treasure").

Training-free and deterministic. Every target forward scores whole vocabularies at every position it
runs, and plain decoding throws all but one token away. Token Recycling keeps the top-k of each of those
distributions in an adjacency matrix ``M[vocab, topk]``: row ``t`` holds the k most likely successors
of token ``t`` the last time the target ran ``t`` (the *candidate tokens*; "trash"). To draft, a static
tree template is filled breadth-first from the last committed token: a template node with rank path
``(r1, r2, ...)`` gets ``M[root][r1]``, its child ``(r1, r2)`` gets ``M[M[root][r1]][r2]``, and so on.
The target checks the whole tree in one forward under tree attention, and the logits of that forward
(root and every draft node, accepted or not) overwrite the rows of the tokens it ran ("recycling").

The matrix is learned only from the target's own verification logits, so the drafter needs them: the
engine calls :meth:`TokenRecyclingDrafter.observe` with the root + draft tokens and the logits of the
verification forward. Without that call the matrix stays empty and every draft is empty (plain
decoding). The matrix lives for the whole run, across prompts (the paper's "hot start").

Tree template: the paper uses a fixed 80-node, 6-level template tuned by hand ("2.2.2"). Here the
template is built from ``tree_size`` and ``depth``: the ``tree_size`` rank paths with the highest prior
score ``prod_i w(r_i)``, ``w(r) = 0.6 / (r + 1)`` (a node's parent and its lower-ranked siblings always
score higher, so the result is a tree); with topk=8, depth=6, tree_size=80 this gives 8/23/25/17/6/1
nodes per level against the paper's 8/21/25/15/8/3.

Memory: ``vocab x topk`` int32 on the CPU (SmolLM2: 49152 x 8 = 1.5 MiB; Qwen2.5: 151936 x 8 = 4.6 MiB).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from decodelab.config import DrafterConfig
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter
from decodelab.errors import check

EMPTY = -1  # an adjacency entry never filled


@dataclass
class TokenRecyclingConfig(DrafterConfig):
    name: str = "token_recycling"
    # Candidate successors kept per token (columns of the adjacency matrix) = most children a node can have.
    topk: int = 8
    # Deepest level of the draft tree (longest draft path).
    depth: int = 5
    # Nodes in the static tree template (the most tokens drafted per step).
    tree_size: int = 30

    def set_draft_length(self, length: int) -> None:
        self.depth = length  # the draft tree's depth: the longest chain it can accept

    def validate(self, key: str = "drafter") -> None:
        check(1 <= self.topk <= 256, f"{key}.topk", f"must be in [1, 256], got {self.topk}")
        check(1 <= self.depth <= 64, f"{key}.depth", f"must be in [1, 64], got {self.depth}")
        check(1 <= self.tree_size <= 1024, f"{key}.tree_size", f"must be in [1, 1024], got {self.tree_size}")
        most = sum(self.topk ** d for d in range(1, self.depth + 1))
        check(self.tree_size <= most, f"{key}.tree_size",
              f"a tree of depth {self.depth} with at most {self.topk} children per node has at most {most} nodes, "
              f"got {self.tree_size}")


def rank_prior(rank: int) -> float:
    """Prior score of a node holding its parent's rank-th candidate."""
    return 0.6 / (rank + 1)


def tree_template(topk: int, depth: int, size: int) -> List[Tuple[int, ...]]:
    """The ``size`` rank paths of highest prior score (ties: lexicographic), ordered by depth then path.

    Ordered so that every path's parent (its prefix) comes first: a topological order.
    """
    heap: List[Tuple[float, Tuple[int, ...]]] = [(-rank_prior(r), (r,)) for r in range(topk)]
    heapq.heapify(heap)
    chosen: List[Tuple[int, ...]] = []
    while heap and len(chosen) < size:
        score, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < depth:
            for r in range(topk):
                heapq.heappush(heap, (score * rank_prior(r), path + (r,)))
    return sorted(chosen, key=lambda p: (len(p), p))


class Template:
    """A template flattened for vectorised filling: per node its parent node (-1: the root) and its rank."""

    def __init__(self, paths: Sequence[Tuple[int, ...]]):
        index = {path: i for i, path in enumerate(paths)}
        self.paths = list(paths)
        self.parents = np.array([index[p[:-1]] if len(p) > 1 else -1 for p in paths], dtype=np.int64)
        self.ranks = np.array([p[-1] for p in paths], dtype=np.int64)
        depth = np.array([len(p) for p in paths], dtype=np.int64)
        # Nodes of each depth: contiguous, since paths are sorted by depth.
        self.levels = [np.nonzero(depth == d)[0] for d in range(1, int(depth.max(initial=0)) + 1)]

    def __len__(self) -> int:
        return len(self.paths)


class TokenRecyclingDrafter(Drafter):
    name = "token_recycling"
    config_class = TokenRecyclingConfig
    draft_length_key = "depth"
    # Approximate: its matrix learns from target logits a run does not record.
    simulation_grid = {"topk": [4, 8], "depth": [3, 5, 7], "tree_size": [15, 30, 60]}

    def __init__(self, cfg: TokenRecyclingConfig, target=None, loaded=None, **_parts):
        cfg.validate("drafter")
        self.cfg = cfg
        self.template = Template(tree_template(cfg.topk, cfg.depth, cfg.tree_size))
        vocab = _vocab_size(target, loaded)
        # Allocated on the first observe when the vocabulary is not known up front (unit tests).
        self.matrix: Optional[np.ndarray] = None if vocab is None else self._empty(vocab)

    def _empty(self, vocab: int) -> np.ndarray:
        return np.full((vocab, self.cfg.topk), EMPTY, dtype=np.int32)

    # The matrix is kept across prompts on purpose; nothing to reset.
    def reset(self, prompt_ids: Sequence[int]) -> None:
        pass

    def propose(self, context: Sequence[int]) -> Draft:
        matrix = self.matrix
        root = int(context[-1])
        if matrix is None or not 0 <= root < matrix.shape[0]:
            return Draft(tokens=[], parents=None)
        t = self.template
        tokens = np.full(len(t), EMPTY, dtype=np.int64)
        for level in t.levels:
            parent = t.parents[level]
            parent_token = np.where(parent < 0, root, tokens[np.maximum(parent, 0)])
            alive = parent_token >= 0
            filled = np.full(len(level), EMPTY, dtype=np.int64)
            filled[alive] = matrix[parent_token[alive], t.ranks[level][alive]]
            tokens[level] = filled
        keep = np.nonzero(tokens >= 0)[0]  # a node is dropped with its subtree (its children see EMPTY)
        if len(keep) == 0:
            return Draft(tokens=[], parents=None)
        new_index = np.full(len(t), -1, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        old_parents = t.parents[keep]
        parents = np.where(old_parents < 0, -1, new_index[np.maximum(old_parents, 0)])
        return Draft(tokens=tokens[keep].tolist(), parents=parents.tolist())

    @torch.no_grad()
    def observe(self, tokens: Sequence[int], logits: torch.Tensor) -> None:
        """Recycle a target forward: ``logits[i]`` is the target's prediction after ``tokens[i]`` (on its path).

        Row ``tokens[i]`` of the matrix becomes the top-k of ``logits[i]``. A token that occurs more than
        once takes its first occurrence (the root, then the shallowest nodes: the closest to the real context).
        """
        if len(tokens) == 0:
            return
        if self.matrix is None:
            self.matrix = self._empty(int(logits.size(-1)))
        k = min(self.cfg.topk, int(logits.size(-1)))
        first = {}
        for i, token in enumerate(tokens):
            first.setdefault(int(token), i)
        ids = [t for t in first if 0 <= t < self.matrix.shape[0]]
        rows = [first[t] for t in ids]
        if not rows:
            return
        top = logits[rows].topk(k, dim=-1).indices.to("cpu", torch.int32).numpy()
        self.matrix[ids, :k] = top


def _vocab_size(target, loaded) -> Optional[int]:
    model = getattr(target, "model", None)
    if model is None:
        model = getattr(loaded, "model", None)
    if model is None:
        return None
    from decodelab.drafters.draft_model import output_vocab

    return output_vocab(model)
