"""When a generation ends: an EOS id, a stop string, or the token budget."""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

from transformers import PreTrainedTokenizerBase


class StopCriteria:
    """EOS ids, stop strings and the token budget; returns how many tokens to keep once one fires."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: Iterable[int], stop_strings: Sequence[str],
                 max_new_tokens: int):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.stop_strings = list(stop_strings)
        self.max_new_tokens = max_new_tokens
        # Decoding only a tail keeps the check cheap; a stop string is never longer than this many tokens.
        self._tail = max((len(s) for s in self.stop_strings), default=0) + 8

    def check(self, tokens: List[int], new: int) -> Optional[tuple]:
        """(keep, reason) if generation must stop given that the last ``new`` tokens were just committed."""
        for i in range(len(tokens) - new, len(tokens)):
            if tokens[i] in self.eos_ids:
                return min(i + 1, self.max_new_tokens), "eos"
            if self.stop_strings and self._stop_string_ends_at(tokens, i):
                return min(i + 1, self.max_new_tokens), "stop_string"
        if len(tokens) >= self.max_new_tokens:
            return self.max_new_tokens, "max_new_tokens"
        return None

    def _stop_string_ends_at(self, tokens: List[int], i: int) -> bool:
        text = self.tokenizer.decode(tokens[max(0, i + 1 - self._tail): i + 1], skip_special_tokens=False)
        prev = self.tokenizer.decode(tokens[max(0, i + 1 - self._tail): i], skip_special_tokens=False)
        return any(s in text and s not in prev for s in self.stop_strings)

