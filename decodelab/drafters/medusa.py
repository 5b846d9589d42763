"""drafter=medusa: a token tree proposed by trained Medusa-1 heads (Cai et al. 2024) over the target's features.

The target's feature f_t (its final normed hidden state at position t, :attr:`LMAdapter.features`) predicts
token t+1 through the LM head; Medusa head k (k = 1..K) on the same f_t predicts token t+1+k
(:class:`decodelab.models.heads.MedusaHeads`). At :meth:`MedusaDrafter.propose` the root (the last committed
token, the bonus) has not run yet, so the heads read the feature of the position before it: the row of the last
accepted token in the last verification forward (rows are [root, d1, d2, ...]; in a tree, the row of the deepest
accepted node, found by walking the tokens appended since the last proposal down the tree proposed then), or,
right after :meth:`reset` (which the engine calls just after the prefill), the prefill's last row. Head 1's
prediction is then the token after the root, head k's the k-th token after it.

Tree: the root's children are head 1's ``top_k`` tokens, a node at depth d gets head d+1's ``top_k`` tokens as
children (the Cartesian product of the per-head top-k), and the ``budget`` nodes with the highest product of the
heads' probabilities along their path are kept, best first (ties: shallow first). A product only decreases along
a path, so the kept set is closed under parents and the emission order is topological.

Lossless: the proposals are deterministic (``Draft.probs`` None: one-hot for the verifier), verified by the
engine's tree verification, greedy or sampled. Whenever the drafter's bookkeeping does not match what the engine
did, it proposes nothing for one step (plain decoding), which is still lossless.

Checkpoints: ``decodelab train-drafter train=medusa`` writes one (``head.json`` + ``head.safetensors``, naming the
target by its weights fingerprint); ``drafter.checkpoint`` is that folder or a training run folder holding a
``checkpoint/`` subfolder.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from decodelab.config import DrafterConfig
from decodelab.decoding import tree
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter
from decodelab.drafters.feature_heads import load_feature_head, verified
from decodelab.errors import check

HOW_TO_TRAIN = "train one with decodelab train-drafter train=medusa"


@dataclass
class MedusaConfig(DrafterConfig):
    name: str = "medusa"
    # A Medusa checkpoint folder (head.json + head.safetensors), or a training run folder with a checkpoint/ inside.
    checkpoint: Optional[str] = None
    # Candidate tokens per head: the most children a node of the tree can have.
    top_k: int = 4
    # Nodes in the draft tree (the most tokens drafted per step).
    budget: int = 16
    # Use only the first ``heads`` heads (the tree's deepest level); None: every head of the checkpoint.
    heads: Optional[int] = None

    def validate(self, key: str = "drafter") -> None:
        check(bool(self.checkpoint), f"{key}.checkpoint",
              f"drafter=medusa needs a trained Medusa checkpoint folder; {HOW_TO_TRAIN} and pass "
              f"{key}.checkpoint=<folder>")
        check(1 <= self.top_k <= 256, f"{key}.top_k", f"must be in [1, 256], got {self.top_k}")
        check(1 <= self.budget <= 1024, f"{key}.budget", f"must be in [1, 1024], got {self.budget}")
        check(self.heads is None or 1 <= self.heads <= 64, f"{key}.heads",
              f"must be in [1, 64] (or null: all), got {self.heads}")


def medusa_tree(logprobs: torch.Tensor, top_k: int, budget: int) -> Tuple[List[int], List[int]]:
    """The best ``budget`` nodes of the per-head top-k product tree: (columns, parents), topological.

    ``logprobs [K, V]``: head k's log-probabilities over the head's columns. Node scores are sums of log-probs
    along the path; best-first expansion (ties: shallower first, then earlier) emits parents before children.
    """
    heads = logprobs.shape[0]
    if heads == 0 or budget <= 0:
        return [], []
    k = min(top_k, logprobs.shape[-1])
    top = logprobs.float().topk(k, dim=-1)
    scores = top.values.cpu().tolist()
    columns = top.indices.cpu().tolist()
    counter = 0
    heap: List[Tuple[float, int, int, int, int, int]] = []  # (-score, depth, order, parent, rank, head)
    for r in range(k):
        heap.append((-scores[0][r], 1, counter, -1, r, 0))
        counter += 1
    heapq.heapify(heap)
    chosen: List[int] = []
    parents: List[int] = []
    while heap and len(chosen) < budget:
        neg, depth, _, parent, rank, head = heapq.heappop(heap)
        node = len(chosen)
        chosen.append(columns[head][rank])
        parents.append(parent)
        if head + 1 < heads:
            for r in range(k):
                heapq.heappush(heap, (neg - scores[head + 1][r], depth + 1, counter, node, r, head + 1))
                counter += 1
    return chosen, parents


class MedusaDrafter(Drafter):
    name = "medusa"
    config_class = MedusaConfig
    draft_length_key = None  # the tree is shaped by top_k, budget and heads; no single draft length

    def __init__(self, cfg: MedusaConfig, *, target=None, loaded=None, pipeline=None, backend=None, **_parts):
        cfg.validate("drafter")
        self.cfg = cfg
        self.target = target
        self.heads, self.spec = load_feature_head("medusa", cfg.checkpoint, target, loaded,
                                                  tree="drafter.top_k=1" if cfg.top_k > 1 else None)
        spec = self.spec
        used = spec.num_heads if cfg.heads is None else cfg.heads
        check(used <= spec.num_heads, "drafter.heads",
              f"the checkpoint has {spec.num_heads} heads, got drafter.heads={cfg.heads}")
        self.num_heads = used
        self.vocab: Optional[torch.Tensor] = None if spec.vocab is None else torch.tensor(spec.vocab, dtype=torch.long)
        self._clear()

    # --- bookkeeping: which feature the next proposal reads ------------------------------------------

    def _clear(self) -> None:
        # The verified state: the context of the proposal it answered, the feature rows of its forward
        # ([root] + draft), and that draft (as the engine ran it). None: nothing usable (propose nothing once).
        self._base: Optional[List[int]] = None
        self._rows: Optional[torch.Tensor] = None
        self._draft = Draft(tokens=[], parents=None)
        # The last proposal, waiting for its observe.
        self._pending: Optional[Tuple[List[int], Draft, Optional[torch.Tensor]]] = None

    def reset(self, prompt_ids: Sequence[int]) -> None:
        """Right after the target's prefill of ``prompt_ids``: its last feature row predicts the root."""
        self._clear()
        try:
            features = self.target.features
        except NotImplementedError:
            return
        if features.ndim != 2 or features.shape[0] == 0 or len(prompt_ids) == 0:
            return
        self._base = list(prompt_ids)
        self._rows = features[-1:].detach().clone()

    def _feature(self, context: List[int]) -> Optional[torch.Tensor]:
        """The feature row of the position before ``context[-1]``, from the last verification (or prefill)."""
        if self._pending is not None and self._pending[0] == context:
            return self._pending[2]  # proposed again at the same context without a verification in between
        base, rows = self._base, self._rows
        if base is None or rows is None or len(context) <= len(base) or context[:len(base)] != base:
            return None
        draft = self._draft
        kids = tree.children(draft.parents if draft.parents is not None else tree.chain_parents(len(draft)))
        node = tree.ROOT
        for token in context[len(base):-1]:  # the accepted tokens, down the draft as the engine ran it
            node = next((child for child in kids[node] if draft.tokens[child] == token), None)
            if node is None:
                return None
        row = tree.row(node)
        if row >= rows.shape[0]:
            return None
        return rows[row]

    @torch.no_grad()
    def propose(self, context: Sequence[int]) -> Draft:
        context = list(context)
        feature = self._feature(context)
        draft = Draft(tokens=[], parents=None)
        if feature is not None:
            logits = self.heads(feature.to(self.heads.head.dtype))[: self.num_heads]  # [K, V']
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            columns, parents = medusa_tree(logprobs, self.cfg.top_k, self.cfg.budget)
            tokens = columns if self.vocab is None else self.vocab[columns].tolist()
            if tokens:
                chain = all(p == i - 1 for i, p in enumerate(parents))
                draft = Draft(tokens=list(tokens), parents=None if chain else list(parents))
        self._pending = (context, draft, feature)
        return draft

    def observe(self, tokens: Sequence[int], logits: torch.Tensor) -> None:
        """The verification forward over [root] + draft ran: keep its feature rows and the draft as run."""
        pending, self._pending = self._pending, None
        self._base, self._rows, self._draft = None, None, Draft(tokens=[], parents=None)
        if pending is None:
            return
        context, draft, _ = pending
        found = verified(context, draft, tokens, self.target)
        if found is not None:
            self._base = context
            self._draft, self._rows = found
