"""drafter=suffix: SuffixDecoding (Oliaro et al., 2024), training-free and deterministic.

Two suffix tries of bounded depth ``max_depth`` hold every substring of at most ``max_depth`` tokens
with its frequency: a per-request trie over the prompt and the text generated so far, and a global trie
over the outputs of earlier requests in the same run (the drafter lives for the whole run; ``reset`` is
called per prompt/turn and moves the finished output into the global trie).

Drafting: for every suffix of the context that occurs in a trie (matched length m < max_depth), walk
down greedily, taking at each node its most frequent child; a child's probability is
count(child) / count(node), where count(node) counts only the occurrences of the node's string that are
followed by a token (so the occurrence at the very end of the context, which has no continuation yet,
does not dilute the estimate). The walk stops when the path probability (product of the child
probabilities) falls below ``min_score``, or at the adaptive length min(max_spec_tokens,
floor(alpha * m), max_depth - m). The draft's score is the sum of its path probabilities (the expected
number of accepted tokens under the trie's statistics); the best-scoring draft over all matched lengths
and both tries wins, the longer match and the per-request trie winning ties. Scanning all matched
lengths (as SuffixDecoding and its ArcticInference implementation do) matters under a depth cap: the
longest match of a repeated passage is max_depth - 1 deep and could continue by one token only.

Costs per step: committing k new tokens is O(k * max_depth) (each trie keeps the nodes of the
context's suffixes, the "active" nodes, so an appended token extends each of them by one child);
drafting is O(max_depth * max_spec_tokens) at most per trie. Memory: at most max_depth nodes per token
of the current request, and per token of the ``max_cached_requests`` most recent outputs in the global
trie (older outputs are removed again by decrementing their counts).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, List, Optional, Sequence, Tuple

from decodelab.config import DrafterConfig
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter
from decodelab.errors import check


@dataclass
class SuffixConfig(DrafterConfig):
    name: str = "suffix"
    # Depth cap of the suffix tries: the longest pattern match plus draft held, and the memory bound
    # (at most this many trie nodes per indexed token).
    max_depth: int = 24
    # Longest draft proposed per step.
    max_spec_tokens: int = 16
    # Adaptive speculation length: at most floor(alpha * matched length) tokens.
    alpha: float = 1.0
    # Stop extending a draft once its path probability falls below this.
    min_score: float = 0.1
    # Also draft from the outputs of earlier prompts of the run (global trie).
    use_global_tree: bool = True
    # How many earlier outputs the global trie keeps (oldest removed first).
    max_cached_requests: int = 256

    def set_draft_length(self, length: int) -> None:
        self.max_spec_tokens = length

    def validate(self, key: str = "drafter") -> None:
        check(self.max_depth >= 2, f"{key}.max_depth", f"must be >= 2, got {self.max_depth}")
        check(self.max_spec_tokens >= 1, f"{key}.max_spec_tokens", f"must be >= 1, got {self.max_spec_tokens}")
        check(self.alpha > 0, f"{key}.alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.min_score <= 1, f"{key}.min_score", f"must be in [0, 1], got {self.min_score}")
        check(self.max_cached_requests >= 1, f"{key}.max_cached_requests",
              f"must be >= 1 (use drafter.use_global_tree=false to disable the global trie), "
              f"got {self.max_cached_requests}")


class _Node:
    __slots__ = ("token", "children", "count", "cont", "best")

    def __init__(self, token: int):
        self.token = token
        self.children: Optional[dict] = None
        # Occurrences of this node's string; ``cont``: those followed by a token (= sum of children's counts).
        self.count = 0
        self.cont = 0
        # The child with the highest count (the most recently incremented one on ties).
        self.best: Optional[_Node] = None


class SuffixTrie:
    """Every substring of at most ``max_depth`` tokens of the inserted sequences, with frequencies.

    A matching state is the list of nodes of the context's suffixes that occur in the trie, by length:
    ``state[0]`` is the root, ``state[m]`` the node of the last m tokens (at most max_depth - 1).
    """

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.root = _Node(-1)
        self.nodes = 1

    # -- building ---------------------------------------------------------------------------------
    def append(self, active: List[_Node], token: int) -> List[_Node]:
        """Count ``token`` after each active node (the suffixes of an inserted sequence); the new active list."""
        new = [self.root]
        last = self.max_depth - 1
        for depth, node in enumerate(active):
            children = node.children
            if children is None:
                children = node.children = {}
            child = children.get(token)
            if child is None:
                child = children[token] = _Node(token)
                self.nodes += 1
            child.count += 1
            node.cont += 1
            best = node.best
            if best is None or child.count >= best.count:
                node.best = child
            if depth + 1 <= last:
                new.append(child)
        return new

    def insert(self, tokens: Sequence[int], active: Optional[List[_Node]] = None) -> List[_Node]:
        active = [self.root] if active is None else active
        for token in tokens:
            active = self.append(active, token)
        return active

    def remove(self, tokens: Sequence[int]) -> None:
        """Undo ``insert(tokens)`` (of a sequence inserted from an empty state); drops nodes left at zero."""
        active = [self.root]
        last = self.max_depth - 1
        for token in tokens:
            new = [self.root]
            for depth, node in enumerate(active):
                child = node.children[token]
                child.count -= 1
                node.cont -= 1
                if child.count == 0:
                    # Every node of a removed subtree reaches zero within this walk, each exactly once.
                    del node.children[token]
                    self.nodes -= 1
                if node.best is child:
                    node.best = max(node.children.values(), key=lambda c: c.count) if node.children else None
                if depth + 1 <= last:
                    new.append(child)
            active = new

    # -- matching and drafting --------------------------------------------------------------------
    def advance(self, state: List[_Node], token: int) -> List[_Node]:
        """The matching state after ``token`` is appended to the context (nothing is inserted)."""
        new = [self.root]
        last = self.max_depth - 1
        for node in state[:last]:
            child = node.children.get(token) if node.children else None
            if child is None:
                break  # a longer suffix cannot occur when this one does not
            new.append(child)
        return new

    def match(self, context: Sequence[int]) -> List[_Node]:
        state = [self.root]
        for token in context[max(0, len(context) - (self.max_depth - 1)):]:
            state = self.advance(state, token)
        return state


def speculate(state: List[_Node], *, max_depth: int, max_spec_tokens: int, alpha: float, min_score: float,
              beat: float = 0.0) -> Tuple[List[int], float, int]:
    """The best greedy chain over the matched lengths of ``state``: (tokens, score, matched length).

    Only a chain whose score exceeds ``beat`` is returned (else ([], beat, 0)).
    """
    best_tokens: List[int] = []
    best_score, best_len = beat, 0
    for matched in range(len(state) - 1, 0, -1):  # longest first: it wins ties
        limit = min(max_spec_tokens, int(alpha * matched + 1e-9), max_depth - matched)
        if limit <= best_score:
            continue  # every path probability is <= 1, so the score is at most the length
        node = state[matched]
        tokens: List[int] = []
        prob, score = 1.0, 0.0
        while len(tokens) < limit:
            child = node.best
            if child is None or node.cont == 0:
                break
            prob *= child.count / node.cont
            if prob < min_score:
                break
            tokens.append(child.token)
            score += prob
            node = child
        if score > best_score:
            best_tokens, best_score, best_len = tokens, score, matched
    return best_tokens, best_score, best_len


class SuffixDrafter(Drafter):
    name = "suffix"
    config_class = SuffixConfig
    draft_length_key = "max_spec_tokens"
    simulation_grid = {"max_spec_tokens": [4, 8, 16, 24], "alpha": [1.0, 2.0, 4.0], "min_score": [0.0, 0.1, 0.3]}
    replay_exact = True

    def __init__(self, cfg: SuffixConfig, **_parts):
        self.cfg = cfg
        self.global_trie = SuffixTrie(cfg.max_depth)
        self._cached: Deque[List[int]] = deque()
        self._start_request([])
        self._started = False
        # Diagnostics of the last proposal: which trie it came from and the matched length.
        self.last_source = ""
        self.last_matched = 0

    # -- request lifecycle ------------------------------------------------------------------------
    def _start_request(self, prompt: Sequence[int]) -> None:
        self.local = SuffixTrie(self.cfg.max_depth)
        self._seq: List[int] = list(prompt)
        self._prompt_len = len(self._seq)
        self._active = self.local.insert(self._seq)
        self._global_state = self.global_trie.match(self._seq) if self.cfg.use_global_tree else []
        self._last_draft: List[int] = []
        self._pending: List[int] = []
        self._started = True

    def _finish_request(self) -> None:
        """Move the output of the request that just ended into the global trie."""
        if not (self.cfg.use_global_tree and self._started):
            return
        output = self._seq[self._prompt_len:] + self._pending
        if not output:
            return
        self.global_trie.insert(output)
        self._cached.append(output)
        while len(self._cached) > self.cfg.max_cached_requests:
            self.global_trie.remove(self._cached.popleft())

    def reset(self, prompt_ids: Sequence[int]) -> None:
        self._finish_request()
        self._start_request(prompt_ids)

    def _sync(self, context: List[int]) -> None:
        seq = self._seq
        if not self._started or len(context) < len(seq) or context[:len(seq)] != seq:
            # Not a continuation of the indexed sequence: a new request without reset().
            self.reset(context)
            return
        for token in context[len(seq):]:
            self._active = self.local.append(self._active, token)
            if self.cfg.use_global_tree:
                self._global_state = self.global_trie.advance(self._global_state, token)
        seq.extend(context[len(seq):])
        self._pending = []

    # -- drafting ---------------------------------------------------------------------------------
    def propose(self, context: Sequence[int]) -> Draft:
        context = context if isinstance(context, list) else list(context)
        self._sync(context)
        cfg = self.cfg
        args = dict(max_depth=cfg.max_depth, max_spec_tokens=cfg.max_spec_tokens, alpha=cfg.alpha,
                    min_score=cfg.min_score)
        tokens, score, matched = speculate(self._active, **args)
        source = "request" if tokens else ""
        if cfg.use_global_tree and self._cached:
            g_tokens, g_score, g_matched = speculate(self._global_state, beat=score, **args)
            if g_tokens:
                tokens, matched, source = g_tokens, g_matched, "global"
        self.last_source, self.last_matched = source, matched
        self._last_draft = tokens
        return Draft(tokens=list(tokens))

    def update(self, drafted: int, accepted: int) -> None:
        # The accepted draft tokens are committed; the next propose() sees them in its context anyway,
        # but after the last step of a request only this tells which tokens ended its output.
        self._pending = self._last_draft[:accepted]
