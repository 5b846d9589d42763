"""drafter=eagle: an EAGLE feature drafter (Li et al. 2024): a chain (EAGLE-1) or a dynamic tree (EAGLE-2).

The head (:class:`decodelab.models.heads.EagleHead`) is one decoder layer of the target's family over
``fc([f_t ; embed(x_{t+1})])``: the entry that reads (f_t, x_{t+1}) sits at position and cache slot t, and its
output predicts the feature f_{t+1} and (through the target's frozen LM head rows) the token x_{t+2}. The
drafter runs ``head.decoder`` on its own static :class:`LMAdapter` with input vectors (``embeds``).

Real-feature invariant: with a context x_0..x_{n-1} (x_{n-1} the root, not yet run by the target), the draft
cache holds entries 0..n-2 computed from the target's *real* features f_t, exactly the teacher-forced pass the
head was trained on. The features come from the target's forwards: the prefill rows (:meth:`reset`), then the
verification rows ([root] + draft) of the accepted path, found by walking the tokens appended since the last
proposal down the draft as the engine ran it (as drafter=medusa does), kept in a log of the committed sequence.
Each :meth:`propose` crops the draft cache to its real entries (the entries run on *predicted* features while
drafting are thrown away), runs every pending entry (f_t, x_{t+1}) in one catch-up forward (after a prefill: the
whole prompt, so that cost is draft time, not hidden in reset), and drafts from its last row, which reads the
last real feature and the root: its logits give the first draft level, its output the first predicted feature.

- chain (``tree: false``): the argmax token at each step, fed back with the predicted feature it came from;
  ``draft_length`` tokens, as many decoder forwards (the catch-up included).
- tree (EAGLE-2): at each depth the ``top_k`` nodes of the newest level with the highest path confidence (the
  product of the head's softmax probabilities along the path) are expanded, each with its ``top_k`` most likely
  children, one decoder forward per level under a tree mask (:meth:`LMAdapter.forward_level`; a child's input is
  fuse(its parent's predicted feature, its token)); after ``draft_length`` levels every grown node is reranked
  by path confidence and the best ``budget`` are kept. A probability never exceeds 1, so a child never beats its
  parent: the kept set is closed under parents (ties: shallower first); it is emitted in growth order.

Lossless: the proposals are deterministic (``Draft.probs`` None, one-hot for the verifier), greedy or sampled,
verified by the engine's chain or tree verification. Whenever the bookkeeping does not match what the engine did
(no features, an unexpected draft or context), the drafter proposes nothing (plain decoding) until a reset or a
matching state gives it the real features again.

Checkpoints: a folder with ``head.json`` + ``head.safetensors`` of kind ``eagle`` trained for this very target
(named by its weights fingerprint), or a training run folder holding a ``checkpoint/`` subfolder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from decodelab.config import DrafterConfig
from decodelab.decoding import tree
from decodelab.decoding.lm import LMAdapter, common_prefix
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter
from decodelab.drafters.feature_heads import load_feature_head, verified
from decodelab.errors import check

HOW_TO_TRAIN = "train one with decodelab train-drafter train=eagle"
MAX_DEPTH = 64


@dataclass
class EagleConfig(DrafterConfig):
    name: str = "eagle"
    # An EAGLE checkpoint folder (head.json + head.safetensors), or a training run folder with a checkpoint/ inside.
    checkpoint: Optional[str] = None
    # Draft depth: the chain's length, or the tree's deepest level (one decoder forward per token or level).
    draft_length: int = 5
    # EAGLE-2's dynamic tree; false: an EAGLE-1 chain.
    tree: bool = True
    # Tree: nodes expanded per level, and children per expanded node.
    top_k: int = 4
    # Tree: nodes kept after reranking by path confidence (the most tokens drafted per step).
    budget: int = 16

    def set_draft_length(self, length: int) -> None:
        self.draft_length = length

    def validate(self, key: str = "drafter") -> None:
        check(bool(self.checkpoint), f"{key}.checkpoint",
              f"drafter=eagle needs a trained EAGLE checkpoint folder; {HOW_TO_TRAIN} and pass "
              f"{key}.checkpoint=<folder>")
        check(1 <= self.draft_length <= MAX_DEPTH, f"{key}.draft_length",
              f"must be in [1, {MAX_DEPTH}], got {self.draft_length}")
        check(1 <= self.top_k <= 64, f"{key}.top_k", f"must be in [1, 64], got {self.top_k}")
        check(1 <= self.budget <= 1024, f"{key}.budget", f"must be in [1, 1024], got {self.budget}")


class FeatureLog:
    """The target's real features f_0..f_{m-1} of the committed tokens x_0..x_{m-1} (a growing buffer)."""

    def __init__(self) -> None:
        self.tokens: List[int] = []
        self.rows = torch.empty(0)

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        del self.tokens[length:]

    def extend(self, tokens: Sequence[int], rows: torch.Tensor) -> None:
        start, end = len(self.tokens), len(self.tokens) + len(tokens)
        if self.rows.ndim != 2 or self.rows.shape[1:] != rows.shape[1:] or self.rows.dtype != rows.dtype \
                or self.rows.device != rows.device:
            self.rows = rows.new_empty((0, *rows.shape[1:]))
            if start:  # rows unlike the logged ones: the log cannot continue, it starts again at a prefill
                self.tokens = []
                return
        if end > self.rows.shape[0]:
            grown = rows.new_empty((max(end, 2 * self.rows.shape[0], 64), *rows.shape[1:]))
            grown[:start] = self.rows[:start]
            self.rows = grown
        self.rows[start:end] = rows
        self.tokens.extend(int(t) for t in tokens)

    def features(self, start: int, end: int) -> torch.Tensor:
        return self.rows[start:end]


def prefix(a: List[int], b: List[int]) -> int:
    """Common prefix length, with a fast path for the usual case (``a`` a prefix of ``b``)."""
    if len(a) <= len(b) and a == b[:len(a)]:
        return len(a)
    return common_prefix(a, b)


class EagleDrafter(Drafter):
    name = "eagle"
    config_class = EagleConfig
    draft_length_key = "draft_length"

    def __init__(self, cfg: EagleConfig, *, target=None, loaded=None, **_parts):
        cfg.validate("drafter")
        self.cfg = cfg
        self.target = target
        self.head, self.spec = load_feature_head("eagle", cfg.checkpoint, target, loaded,
                                                 tree="drafter.tree=false" if cfg.tree and cfg.top_k > 1 else None)
        spec = self.spec
        # Input vectors run on the static forward only, and never on its compiled steps: no compile here.
        self.lm = LMAdapter(self.head.decoder, cache="static")
        self.vocab: Optional[torch.Tensor] = None if spec.vocab is None else torch.tensor(spec.vocab, dtype=torch.long)
        self.log = FeatureLog()
        self._real = 0  # draft-cache entries computed from real features (a prefix of the cache)
        self._x0: Optional[int] = None  # the first token those entries were computed for
        self._pending: Optional[Tuple[List[int], Draft]] = None  # the last proposal, waiting for its observe
        self._verified: Optional[Tuple[List[int], Draft, torch.Tensor]] = None  # its context, draft as run, rows

    def prepare(self, slots: int) -> float:
        return self.lm.reserve(slots)

    # --- the real features: the prefill, then the verified rows of each accepted path -------------------

    @torch.inference_mode()
    def reset(self, prompt_ids: Sequence[int]) -> None:
        """Right after the target's prefill of ``prompt_ids``: log its feature rows (the rows of the tokens it ran;
        a kept prefix must already be in the log)."""
        prompt = [int(t) for t in prompt_ids]
        self._pending = None
        verified = self._verified
        if verified is not None and prompt[:len(verified[0])] == verified[0]:
            self._fold(prompt[len(verified[0]):])  # a new turn that continues the last one
        self._verified = None
        try:
            features = self.target.features
        except NotImplementedError:
            features = None
        if features is None or features.ndim != 2 or not 0 < features.shape[0] <= len(prompt):
            self.log.truncate(0)
            return
        keep = len(prompt) - features.shape[0]
        if prefix(self.log.tokens, prompt) < keep:
            self.log.truncate(0)  # the prefill kept tokens whose features were never logged: nothing to draft from
            return
        self.log.truncate(keep)
        self.log.extend(prompt[keep:], features.detach())

    def _fold(self, tokens: Sequence[int]) -> None:
        """Log the root's feature and those of the verified nodes ``tokens`` (appended after the proposal's context)
        runs through, down the draft as the engine ran it."""
        verified, self._verified = self._verified, None
        if verified is None:
            return
        base, draft, rows = verified
        if len(self.log) != len(base) - 1 or self.log.tokens != base[:-1]:
            return
        kids = tree.children(draft.parents if draft.parents is not None else tree.chain_parents(len(draft)))
        node, path = tree.ROOT, []
        for token in tokens:
            node = next((child for child in kids[node] if draft.tokens[child] == token), None)
            if node is None:
                break
            path.append(node)
        index = torch.tensor([0] + [tree.row(n) for n in path], device=rows.device)
        self.log.extend(base[-1:] + [draft.tokens[n] for n in path], rows[index])

    @torch.inference_mode()
    def observe(self, tokens: Sequence[int], logits: torch.Tensor) -> None:
        """The verification forward over [root] + draft ran: keep its feature rows and the draft as run."""
        pending, self._pending = self._pending, None
        self._verified = None
        if pending is None:
            return
        context, draft = pending
        found = verified(context, draft, tokens, self.target)
        if found is not None:
            self._verified = (context, *found)

    # --- drafting ----------------------------------------------------------------------------------------

    def _catch_up(self, context: List[int]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Crop the draft cache to its real entries that still hold for ``context``, run the pending ones
        (f_t, x_{t+1}) up to the one reading the root; that entry's logits [V'] and predicted feature [hidden].
        None when the log lacks a real feature the entries need."""
        n = len(context)
        valid = prefix(self.log.tokens, context[:-1])
        self.log.truncate(valid)
        if n < 2 or valid < n - 1:
            return None
        keep = 0
        if self._x0 == context[0]:
            real = self.lm.tokens[:self._real]
            keep = min(prefix(real, context[1:]), n - 2)  # the root's entry always runs: its output is needed
        self.lm.crop(keep)
        self._real = min(self._real, keep)
        ids = context[keep + 1:]
        vectors = self.head.fuse(self.log.features(keep, n - 1),
                                 torch.tensor(ids, dtype=torch.long, device=self.lm.device))
        logits = self.lm.forward(ids, last_only=True, embeds=vectors)
        self._real, self._x0 = n - 1, context[0]
        return logits[-1], self.lm.features[-1]

    def _ids(self, columns: List[int]) -> List[int]:
        """Target ids of head columns."""
        return columns if self.vocab is None else self.vocab[columns].tolist()

    @torch.inference_mode()
    def propose(self, context: Sequence[int]) -> Draft:
        context = [int(t) for t in context]
        verified = self._verified
        if verified is not None and len(context) > len(verified[0]) and context[:len(verified[0])] == verified[0]:
            self._fold(context[len(verified[0]):-1])
        self._verified = None
        before = self.lm.forwards
        start = self._catch_up(context)
        draft = Draft(tokens=[], parents=None)
        if start is not None:
            logits, feature = start
            draft = self._tree(logits, feature) if self.cfg.tree else self._chain(logits, feature)
            draft.forwards = self.lm.forwards - before
        self._pending = (context, draft)
        return draft

    def _chain(self, logits: torch.Tensor, feature: torch.Tensor) -> Draft:
        tokens: List[int] = []
        for step in range(self.cfg.draft_length):
            token = self._ids([int(logits.argmax())])[0]
            tokens.append(token)
            if step == self.cfg.draft_length - 1:
                break
            ids = torch.tensor([token], dtype=torch.long, device=self.lm.device)
            logits = self.lm.forward([token], embeds=self.head.fuse(feature[None], ids))[-1]
            feature = self.lm.features[-1]
        return Draft(tokens=tokens, parents=None)

    def _tree(self, logits: torch.Tensor, feature: torch.Tensor) -> Draft:
        k = min(self.cfg.top_k, logits.shape[-1])
        tokens: List[int] = []
        parents: List[int] = []
        scores: List[float] = []
        inputs: List[torch.Tensor] = []  # each node's input feature: its parent's predicted feature
        cached: List[int] = []
        base = len(self.lm.tokens)

        def grow(rows: torch.Tensor, outputs: torch.Tensor, of: List[int]) -> List[int]:
            top = torch.log_softmax(rows.float(), dim=-1).topk(k, dim=-1)
            values, columns = top.values.tolist(), top.indices.tolist()
            level = []
            for i, parent in enumerate(of):
                above = 0.0 if parent == tree.ROOT else scores[parent]
                for value, token in zip(values[i], self._ids(columns[i])):
                    level.append(len(tokens))
                    tokens.append(token)
                    parents.append(parent)
                    scores.append(above + value)
                    inputs.append(outputs[i])
            return level

        level = grow(logits[None], feature[None], [tree.ROOT])
        for _ in range(self.cfg.draft_length - 1):
            expand = sorted(level, key=lambda n: (-scores[n], n))[:k]
            vectors = self.head.fuse(torch.stack([inputs[n] for n in expand]),
                                     torch.tensor([tokens[n] for n in expand], dtype=torch.long, device=self.lm.device))
            rows = self.lm.forward_level(tokens, parents, base, cached, expand, embeds=vectors)
            cached.extend(expand)
            level = grow(rows, self.lm.features, expand)
        depths = tree.depths(parents)
        best = sorted(range(len(tokens)), key=lambda n: (-scores[n], depths[n], n))[:self.cfg.budget]
        kept, index = set(best), {}
        for n in range(len(tokens)):  # growth order: parents first; a node whose parent is gone cannot be kept
            if n in kept and (parents[n] == tree.ROOT or parents[n] in index):
                index[n] = len(index)
        chosen = list(index)
        out_parents = [tree.ROOT if parents[n] == tree.ROOT else index[parents[n]] for n in chosen]
        chain = all(p == i - 1 for i, p in enumerate(out_parents))
        return Draft(tokens=[tokens[n] for n in chosen], parents=None if chain else out_parents)
