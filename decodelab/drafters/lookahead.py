"""drafter=lookahead: Lookahead Decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference").

Training-free and deterministic. Two branches share every target forward:

- the *lookahead branch* runs Jacobi iteration over a 2-D window: ``N - 1`` levels of ``window`` tokens,
  level ``l``, column ``j`` guessing the token ``l + j + 1`` positions ahead of the root. Each window token
  sees the root and its diagonal history, which is a path, so the branch is a token tree: level 0 is a
  chain hanging from the root, and level ``l`` token ``j`` is a child of level ``l - 1`` token ``j``. The
  target's greedy prediction after each last-level token is the next level; every column then yields an
  n-gram ``(level0[j], ..., level{N-2}[j], prediction[j])`` for the pool, the oldest level is dropped and
  the new one appended (the first ``N - 2`` steps only fill the window).
- the *verification branch* drafts up to ``guess_set_size`` pool n-grams whose first token is the root
  (the last committed token): their other ``N - 1`` tokens, merged into a trie (shared prefixes once).

The pool maps a first token to its continuations, most recent first, at most ``guess_set_size`` each (a
continuation seen again moves to the front), and is emptied for every new prompt, as in the reference
implementation. ``pool_from_prompt`` also seeds it with the prompt's n-grams (its POOL_FROM_PROMPT).

How the lookahead branch is run, chosen at run time:
- *fused* (the paper's design, no extra forward): the lookahead tree is merged into the draft tree (same
  trie, so nodes equal to a guess are run once), the engine verifies the whole tree in its one forward, and
  hands the logits back through :meth:`LookaheadDrafter.observe`. A lookahead path the target agrees with
  is accepted like any other path (that is plain Jacobi decoding); the verdict stays exact, because every
  node is checked against the target after its own path. ``drafted`` counts the lookahead nodes too.
- *own forward* (when the engine does not call ``observe``: detected when a fused draft is followed by the
  next ``propose`` without it): before drafting, the drafter runs the lookahead tree itself through the
  target adapter (``forward_tree`` at the root, then ``crop`` back: the cache is exactly as before) and
  reports it in ``Draft.forwards``. Twice the forwards; correct but slower.

Jacobi predictions are the argmax of the raw target logits under every strategy, so drafts never depend on
the sampler's random state and the engine's verifier keeps the output exact (greedy) or distributed as the
target's (speculative sampling with deterministic drafts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from decodelab.config import DrafterConfig
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter
from decodelab.errors import check
from decodelab.decoding.tree import ROOT


@dataclass
class LookaheadConfig(DrafterConfig):
    name: str = "lookahead"
    # W: Jacobi window, the number of columns (future positions) the lookahead branch guesses at once.
    window: int = 5
    # N: n-gram size; the lookahead branch keeps N - 1 levels, and a verified guess drafts N - 1 tokens.
    ngram_size: int = 3
    # G: most n-grams kept per first token in the pool and drafted per step.
    guess_set_size: int = 5
    # Also seed the pool with the prompt's n-grams (the reference implementation's POOL_FROM_PROMPT).
    pool_from_prompt: bool = False

    def set_draft_length(self, length: int) -> None:
        self.ngram_size = length + 1  # a verified n-gram drafts N - 1 tokens

    def validate(self, key: str = "drafter") -> None:
        check(1 <= self.window <= 64, f"{key}.window", f"must be in [1, 64], got {self.window}")
        check(2 <= self.ngram_size <= 16, f"{key}.ngram_size", f"must be in [2, 16], got {self.ngram_size}")
        check(1 <= self.guess_set_size <= 64, f"{key}.guess_set_size",
              f"must be in [1, 64], got {self.guess_set_size}")


class NgramPool:
    """First token -> up to ``size`` continuations (tuples of n - 1 tokens), most recent first."""

    def __init__(self, size: int):
        self.size = size
        self.table: Dict[int, List[Tuple[int, ...]]] = {}

    def add(self, ngram: Sequence[int]) -> None:
        first, rest = int(ngram[0]), tuple(int(t) for t in ngram[1:])
        entries = self.table.setdefault(first, [])
        if rest in entries:
            entries.remove(rest)
        entries.insert(0, rest)
        del entries[self.size:]

    def get(self, first: int) -> List[Tuple[int, ...]]:
        return self.table.get(first, [])

    def __len__(self) -> int:
        return sum(len(v) for v in self.table.values())


class Trie:
    """A token tree built from root paths, each (parent, token) once, in insertion (topological) order."""

    def __init__(self):
        self.tokens: List[int] = []
        self.parents: List[int] = []
        self._index: Dict[Tuple[int, int], int] = {}

    def child(self, parent: int, token: int) -> int:
        key = (parent, token)
        node = self._index.get(key)
        if node is None:
            node = len(self.tokens)
            self._index[key] = node
            self.tokens.append(token)
            self.parents.append(parent)
        return node

    def insert(self, path: Sequence[int]) -> List[int]:
        nodes, parent = [], ROOT
        for token in path:
            parent = self.child(parent, int(token))
            nodes.append(parent)
        return nodes

    def __len__(self) -> int:
        return len(self.tokens)


class LookaheadDrafter(Drafter):
    name = "lookahead"
    config_class = LookaheadConfig

    def __init__(self, cfg: LookaheadConfig, target=None, loaded=None, **_parts):
        cfg.validate("drafter")
        self.cfg = cfg
        self.target = target
        # Fused until the engine shows it does not call observe (then the drafter runs its own forward).
        self.fused = True
        self.pool = NgramPool(cfg.guess_set_size)
        self.levels: List[List[int]] = []
        # The last fused draft awaiting its logits: (root + draft tokens, trie nodes of the last level).
        self._pending: Optional[Tuple[List[int], List[int]]] = None

    # -- window and pool --------------------------------------------------------------------------

    def reset(self, prompt_ids: Sequence[int]) -> None:
        prompt = [int(t) for t in prompt_ids]
        self.pool = NgramPool(self.cfg.guess_set_size)
        self._pending = None
        w = self.cfg.window
        # Level 0 starts as the prompt's last W tokens (the reference draws random prompt tokens); the
        # other levels fill in over the first N - 2 steps.
        seed = prompt[-w:] if prompt else [0]
        self.levels = [(seed * w)[-w:] if len(seed) < w else list(seed)]
        if self.cfg.pool_from_prompt:
            n = self.cfg.ngram_size
            for start in range(len(prompt) - n + 1):
                self.pool.add(prompt[start:start + n])

    def _lookahead_paths(self) -> List[List[int]]:
        """Each window token's root path; the last level's paths come last, one per column."""
        paths = []
        for level in range(len(self.levels)):
            for j in range(self.cfg.window):
                paths.append(self.levels[0][:j + 1] + [self.levels[l][j] for l in range(1, level + 1)])
        return paths

    def _advance(self, predictions: Sequence[int]) -> None:
        """The target's predictions after the last level's tokens: new n-grams, then the window moves."""
        predictions = [int(t) for t in predictions]
        if len(self.levels) == self.cfg.ngram_size - 1:
            for j in range(self.cfg.window):
                self.pool.add([level[j] for level in self.levels] + [predictions[j]])
            self.levels = self.levels[1:]
        self.levels.append(predictions)

    # -- drafting ---------------------------------------------------------------------------------

    def propose(self, context: Sequence[int]) -> Draft:
        root = int(context[-1])
        forwards = 0
        if self._pending is not None:  # the engine never handed back the last fused draft's logits
            self._pending = None
            if self.target is not None:
                self.fused = False
        if not self.fused and self._target_at(context):
            self._run_lookahead(root)
            forwards = 1
        trie = Trie()
        for guess in self.pool.get(root):
            trie.insert(guess)
        if self.fused:
            last = [trie.insert(path)[-1] for path in self._lookahead_paths()][-self.cfg.window:]
            self._pending = ([root] + list(trie.tokens), last)
        if not trie.tokens:
            return Draft(tokens=[], parents=None, forwards=forwards)
        return Draft(tokens=list(trie.tokens), parents=list(trie.parents), forwards=forwards)

    @torch.no_grad()
    def observe(self, tokens: Sequence[int], logits: torch.Tensor) -> None:
        """The verification forward of the last fused draft: ``tokens`` = root + draft, ``logits`` one row each.

        Anything else (a prefill, a forward this drafter did not draft) is ignored.
        """
        pending, self._pending = self._pending, None
        if pending is None or list(tokens) != pending[0] or logits.size(0) != len(tokens):
            return
        rows = torch.tensor([node + 1 for node in pending[1]], device=logits.device)
        self._advance(logits.index_select(0, rows).argmax(dim=-1).tolist())

    def _target_at(self, context: Sequence[int]) -> bool:
        """The target cache holds the context but its last token, as the engine leaves it between steps."""
        cached = self.target.tokens
        return len(cached) == len(context) - 1 and list(context[:-1]) == cached

    def _run_lookahead(self, root: int) -> None:
        """Run the lookahead tree at the root through the target, restore its cache, advance the window."""
        trie = Trie()
        last = [trie.insert(path)[-1] for path in self._lookahead_paths()][-self.cfg.window:]
        cached = len(self.target.tokens)
        try:
            logits = self.target.forward_tree([root] + trie.tokens, trie.parents)
        finally:
            self.target.crop(cached)
        rows = torch.tensor([node + 1 for node in last], device=logits.device)
        self._advance(logits.index_select(0, rows).argmax(dim=-1).tolist())
