"""drafter=prompt_lookup: Prompt Lookup Decoding (Saxena, 2023; transformers' PromptLookupCandidateGenerator).

Training-free and deterministic. The last n tokens of the context (n from ``max_ngram_size`` down to
``min_ngram_size``) are looked up in the prompt and the text generated so far; the tokens that followed
their most recent earlier occurrence are the draft (a chain, at most ``num_speculative_tokens`` long).
``occurrence=earliest`` takes the first occurrence instead: the rule of transformers' prompt lookup and of
vLLM's ``ngram`` proposer, so the same algorithm can run on every engine.

Unlike transformers (which rescans the whole context with ``unfold`` every step and takes the first,
i.e. earliest, occurrence), this keeps an incremental index: one dict per n from n-gram to the start of
its latest occurrence that is followed by at least one token. Each step only indexes the tokens
committed since the previous call, so a step costs O(new tokens x n_sizes x max_ngram_size) plus
O(n_sizes x max_ngram_size) for the lookups, independent of the context length (apart from the
O(context) prefix check that detects a context which is not an extension of the indexed one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from decodelab.config import DrafterConfig
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter
from decodelab.errors import check


OCCURRENCES = ("latest", "earliest")


@dataclass
class PromptLookupConfig(DrafterConfig):
    name: str = "prompt_lookup"
    # Longest draft proposed per step.
    num_speculative_tokens: int = 10
    # The n-gram sizes matched against the context, longest first.
    max_ngram_size: int = 3
    min_ngram_size: int = 1
    # Which earlier occurrence of the matched n-gram drafts: "latest" (the most recent) or "earliest" (the
    # first; transformers' and vLLM's rule).
    occurrence: str = "latest"

    def set_draft_length(self, length: int) -> None:
        self.num_speculative_tokens = length

    def validate(self, key: str = "drafter") -> None:
        check(self.num_speculative_tokens >= 1, f"{key}.num_speculative_tokens",
              f"must be >= 1, got {self.num_speculative_tokens}")
        check(self.max_ngram_size >= 1, f"{key}.max_ngram_size", f"must be >= 1, got {self.max_ngram_size}")
        check(self.min_ngram_size >= 1, f"{key}.min_ngram_size", f"must be >= 1, got {self.min_ngram_size}")
        check(self.min_ngram_size <= self.max_ngram_size, f"{key}.min_ngram_size",
              f"must be <= drafter.max_ngram_size={self.max_ngram_size}, got {self.min_ngram_size}")
        check(self.occurrence in OCCURRENCES, f"{key}.occurrence",
              f"must be one of {', '.join(OCCURRENCES)}, got '{self.occurrence}'")


class NgramIndex:
    """For each n in ``sizes``: n-gram -> start of its latest (``earliest``: first) occurrence followed by at
    least one token.

    ``extend`` indexes the n-grams that end before the last token of ``tokens``; the n-gram ending at
    the very end has no continuation yet and is indexed once a token follows it.
    """

    def __init__(self, sizes: Sequence[int], earliest: bool = False):
        self.sizes = list(sizes)
        self.earliest = earliest
        self.tables: Dict[int, Dict[Tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.tokens: List[int] = []

    def extend(self, new: Sequence[int]) -> None:
        tokens = self.tokens
        old_len = len(tokens)
        tokens.extend(new)
        # An n-gram tokens[s:s+n] becomes indexable once tokens[s+n] exists: ends e = s+n in [old_len-1, len-1).
        for end in range(max(old_len, 1), len(tokens)):
            for n in self.sizes:
                start = end - n
                if start < 0:
                    break  # sizes are ascending
                key = tuple(tokens[start:end])
                if not (self.earliest and key in self.tables[n]):
                    self.tables[n][key] = start

    def lookup(self, n: int, key: Tuple[int, ...]) -> int:
        return self.tables[n].get(key, -1)


class PromptLookupDrafter(Drafter):
    name = "prompt_lookup"
    config_class = PromptLookupConfig
    draft_length_key = "num_speculative_tokens"
    simulation_grid = {"num_speculative_tokens": [2, 3, 4, 5, 6, 8, 10, 12], "max_ngram_size": [1, 2, 3, 4]}
    replay_exact = True
    context_only = True  # the index is rebuilt from the context whenever it is not an extension

    def __init__(self, cfg: PromptLookupConfig, **_parts):
        self.cfg = cfg
        self._index = NgramIndex(range(cfg.min_ngram_size, cfg.max_ngram_size + 1), cfg.occurrence == "earliest")

    def reset(self, prompt_ids: Sequence[int]) -> None:
        self._index = NgramIndex(self._index.sizes, self._index.earliest)

    def _sync(self, context: List[int]) -> None:
        """Index the tokens added since the last call; rebuild when the context is not an extension."""
        indexed = self._index.tokens
        if len(context) < len(indexed) or context[:len(indexed)] != indexed:
            self._index = NgramIndex(self._index.sizes, self._index.earliest)
            indexed = self._index.tokens
        if len(context) > len(indexed):
            self._index.extend(context[len(indexed):])

    def propose(self, context: Sequence[int]) -> Draft:
        context = context if isinstance(context, list) else list(context)
        self._sync(context)
        length = len(context)
        for n in reversed(self._index.sizes):
            if n >= length:
                continue
            start = self._index.lookup(n, tuple(context[length - n:]))
            if start >= 0:
                follow = start + n
                return Draft(tokens=context[follow:follow + self.cfg.num_speculative_tokens])
        return Draft(tokens=[])
