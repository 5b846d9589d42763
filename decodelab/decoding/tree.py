"""Token trees: the shape helpers that tree drafting, the tree forward and tree verification share.

A tree draft is ``tokens`` plus ``parents``: ``parents[i]`` is the index of node i's parent draft
token, or :data:`ROOT` (-1) for a child of the root, which is the last committed token. Nodes are in
topological order (``parents[i] < i``), so one pass from left to right sees every parent first.

The target runs the root and all nodes in one forward. Its logits have one *row* per tree position:
row 0 is the root, row ``i + 1`` is node i (:func:`row`). Row r predicts the token that follows the
path root -> r, so a node is checked against the row of its parent.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

ROOT = -1


def check_parents(parents: Sequence[int]) -> None:
    """Raise if ``parents`` is not a topologically ordered forest under the root."""
    for i, parent in enumerate(parents):
        if not ROOT <= parent < i:
            raise ValueError(f"parents[{i}] = {parent}: must be -1 (the root) or the index of an earlier node")


def row(node: int) -> int:
    """The logits row of a node (the root, -1, is row 0)."""
    return node + 1


def chain_parents(length: int) -> List[int]:
    """The parents of a chain of ``length`` tokens: a tree with one branch."""
    return list(range(-1, length - 1))


def depths(parents: Sequence[int]) -> List[int]:
    """Depth of every node; children of the root have depth 1 (the root itself has depth 0)."""
    out: List[int] = []
    for parent in parents:
        out.append(1 if parent == ROOT else out[parent] + 1)
    return out


def children(parents: Sequence[int]) -> Dict[int, List[int]]:
    """Children of every node and of the root (key -1), each list in draft order; leaves map to []."""
    out: Dict[int, List[int]] = {node: [] for node in range(ROOT, len(parents))}
    for node, parent in enumerate(parents):
        out[parent].append(node)
    return out


def path_to(parents: Sequence[int], node: int) -> List[int]:
    """Nodes from the root's child down to ``node`` (inclusive); [] for the root."""
    path: List[int] = []
    while node != ROOT:
        path.append(node)
        node = parents[node]
    return path[::-1]


def leaves(parents: Sequence[int]) -> List[int]:
    """Nodes without children, in draft order."""
    has_child = set(parents)
    return [node for node in range(len(parents)) if node not in has_child]


def paths(parents: Sequence[int]) -> List[List[int]]:
    """Every root-to-leaf path (as node indices), one per leaf."""
    return [path_to(parents, leaf) for leaf in leaves(parents)]


def ancestry(parents: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[n + 1, n + 1]`` over rows: ``[r, c]`` is true when row c is row r or one of its ancestors.

    Row 0 (the root) is an ancestor of every row. This is the tree part of the attention mask.
    """
    n = len(parents)
    seen = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    seen[0, 0] = True
    for node, parent in enumerate(parents):
        seen[row(node)] = seen[row(parent)]
        seen[row(node), row(node)] = True
    return seen.to(device)


def attention_mask(parents: Sequence[int], past: int, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive float mask ``[1, 1, n + 1, past + n + 1]``: 0 where a row may attend, the dtype's min elsewhere.

    Every row sees the whole cache (``past`` tokens) plus its own ancestry. Additive float rather than
    boolean because eager attention adds the mask to the scores; sdpa and flex take either.
    """
    n = len(parents)
    allowed = torch.ones(n + 1, past + n + 1, dtype=torch.bool, device=device)
    allowed[:, past:] = ancestry(parents, device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def position_ids(parents: Sequence[int], past: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions ``[1, n + 1]``: the root at ``past``, each node at ``past + depth`` (as if its path were a chain)."""
    return torch.tensor([[past] + [past + d for d in depths(parents)]], dtype=torch.long, device=device)
