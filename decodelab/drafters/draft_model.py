"""drafter=draft_model: a smaller model drafts token by token (speculative decoding, Leviathan et al. /
Chen et al.), or any model through text when tokenizers differ (universal assisted generation).

Same tokenizer (the default): the draft model has its own LMAdapter and KV cache, kept in step with
the target. Each ``propose(context)`` crops the draft cache to its longest common prefix with the
context, forwards the delta (usually the bonus token, or the last accepted draft token plus the bonus)
and drafts autoregressively. The last drafted token is never forwarded: the next step's delta does it.
``Draft.probs`` is the strategy's own LogitsPipeline over the draft logits (what lossless speculative
sampling needs); tokens are drawn from those rows. The draft-length controller
(decodelab/draft_length.py) decides how many tokens to draft; the confidence rule sees the draft
model's probability of its own token.

Different tokenizers (``retokenize: true``; our simpler take on transformers'
AssistedCandidateGeneratorDifferentTokenizers): the target context is decoded to text and encoded
with the draft tokenizer (the draft cache again keeps its longest common prefix), the draft model
drafts greedily, its continuation is decoded to text and encoded with the target tokenizer together
with a window of the last target tokens so that tokens merged across the join line up. The last
re-encoded token is dropped (it may be the head of a longer token) unless the draft ended with EOS.
The result is a deterministic chain (probs=None), lossless for greedy decoding only.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Set

import torch

from decodelab.adapter import LMAdapter, common_prefix
from decodelab.config import BackendConfig, DrafterConfig, ModelConfig, StrategyConfig
from decodelab.draft_length import DraftLengthConfig, LengthController, build_controller
from decodelab.drafters.base import Draft, Drafter
from decodelab.errors import ConfigError, UserError, check
from decodelab.sampling import LogitsPipeline

PROBE_TEXT = "Hello, world! def f(x):\n    return x * 2  # 42 caf\u00e9 \u4f60\u597d <tag> 3.14"


@dataclass
class DraftModelConfig(DrafterConfig):
    name: str = "draft_model"
    # The draft model: any model config (conf/model/*.yaml), chosen with model@drafter.model=<option>.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Draft through text when the draft tokenizer differs from the target's (greedy only).
    retokenize: bool = False
    # retokenize: how many trailing target tokens are re-encoded with the draft text at the join.
    retokenize_window: int = 8
    # How many tokens to draft per step: decodelab/draft_length.py.
    length: DraftLengthConfig = field(default_factory=DraftLengthConfig)

    def set_draft_length(self, length: int) -> None:
        self.length.set_length(length)

    def validate(self, key: str = "drafter") -> None:
        self.model.validate(f"{key}.model")
        self.length.validate(f"{key}.length")
        check(self.retokenize_window >= 1, f"{key}.retokenize_window", f"must be >= 1, got {self.retokenize_window}")
        from decodelab.models import check_model_available

        check_model_available(self.model)


# --------------------------------------------------------------------------------------------------
# Shared by the token-by-token drafters (draft_model, layer_skip)
# --------------------------------------------------------------------------------------------------

def resolve_pipeline(pipeline: Optional[LogitsPipeline], strategy: Optional[StrategyConfig], who: str) -> LogitsPipeline:
    """The strategy's logits pipeline: draft distributions must come from the target's own pipeline."""
    if pipeline is not None:
        return pipeline
    if strategy is not None:
        return LogitsPipeline(strategy)
    raise TypeError(f"drafter={who} needs the strategy's logits pipeline: build_drafter(..., pipeline=<LogitsPipeline>)")


def output_vocab(model) -> int:
    """Rows of the LM head: the ids a model can emit (may exceed the tokenizer's size)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def model_eos_ids(model, tokenizer) -> Set[int]:
    ids: Set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return ids


def fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits [.., vocab]: cut the ids the target cannot emit, or pad the missing ones with -inf."""
    size = logits.size(-1)
    if size == vocab:
        return logits
    if size > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - size), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


class ChainDrafter(Drafter):
    """Drafts a chain token by token from an LM-like object ``self.lm`` (prefill / forward / crop /
    tokens / forwards, as LMAdapter), keeping its cache in step with the context it is given."""

    lm: LMAdapter
    pipeline: LogitsPipeline
    controller: LengthController
    vocab: int
    eos_ids: Set[int]
    seed: int = 0

    def _init_common(self, cfg, pipeline: LogitsPipeline, seed: int, device: torch.device) -> None:
        self.controller = build_controller(cfg.length)
        self.pipeline = pipeline
        self.seed = int(seed)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        # Tokens run through the drafter's model (prefills included): shows the cache is kept, not rebuilt.
        self.tokens_fed = 0

    def reset(self, prompt_ids: Sequence[int]) -> None:
        # Seeded per prompt (as the runner seeds the target's generator) so a sample does not depend on order.
        ids = ",".join(map(str, list(prompt_ids)[:4096])).encode()
        self.generator.manual_seed(self.seed * 1_000_003 + zlib.crc32(ids))

    def update(self, drafted: int, accepted: int) -> None:
        self.controller.update(drafted, accepted)

    def _catch_up(self, context: Sequence[int]) -> torch.Tensor:
        """Crop the cache to its common prefix with ``context``, run the rest; logits after the context."""
        context = list(context)
        keep = min(common_prefix(self.lm.tokens, context), len(context) - 1)
        self.tokens_fed += len(context) - keep
        return self.lm.prefill(context)

    def _choose(self, logits: torch.Tensor, seen_ids: List[int]):
        """(token, probs row, the drafter's probability of the token) from draft logits [vocab]."""
        x = fit_vocab(logits.float(), self.vocab)
        seen = torch.tensor(seen_ids, dtype=torch.long, device=x.device) if self.pipeline.penalty != 1.0 else None
        row = self.pipeline.probs(x, seen)
        if self.pipeline.greedy:
            token = int(row.argmax())
            confidence = float(self.pipeline.process(x, seen).softmax(-1)[token]) if self._wants_confidence else 1.0
        else:
            token = int(torch.multinomial(row, 1, generator=self.generator)[0])
            confidence = float(row[token])
        return token, row, confidence

    @property
    def _wants_confidence(self) -> bool:
        return self.controller.cfg.policy == "confidence"

    def _draft_chain(self, context: Sequence[int], n: int) -> Draft:
        before = self.lm.forwards
        logits = self._catch_up(context)
        tokens: List[int] = []
        rows: List[torch.Tensor] = []
        seen = list(context)
        for position in range(n):
            token, row, confidence = self._choose(logits, seen)
            tokens.append(token)
            rows.append(row)
            seen.append(token)
            if token in self.eos_ids or position == n - 1 or not self.controller.keep_drafting(position, confidence):
                break
            logits = self.lm.forward([token], last_only=True)[-1]
            self.tokens_fed += 1
        probs = torch.stack(rows) if rows else None
        return Draft(tokens=tokens, probs=probs, forwards=self.lm.forwards - before)


# --------------------------------------------------------------------------------------------------

class DraftModelDrafter(ChainDrafter):
    name = "draft_model"
    config_class = DraftModelConfig

    def __init__(self, cfg: DraftModelConfig, *, target: LMAdapter, loaded, pipeline: Optional[LogitsPipeline] = None,
                 strategy: Optional[StrategyConfig] = None, backend: Optional[BackendConfig] = None, draft=None,
                 **_parts):
        """``draft``: an already loaded draft model (LoadedModel), instead of loading ``cfg.model``."""
        from decodelab.models import load_model

        self.cfg = cfg
        pipeline = resolve_pipeline(pipeline, strategy, self.name)
        backend = backend or backend_like(target)
        self.draft = draft if draft is not None else load_model(cfg.model, backend)
        self.target_tokenizer = loaded.tokenizer
        self.draft_tokenizer = self.draft.tokenizer
        self.vocab = output_vocab(loaded.model)
        seed = pipeline.cfg.seed if pipeline.cfg.seed is not None else backend.seed
        self._init_common(cfg, pipeline, seed, self.draft.model.device)
        self.lm = LMAdapter(self.draft.model)
        if cfg.retokenize:
            if not pipeline.greedy:
                raise ConfigError("drafter.retokenize", "drafting through text (retokenize=true) is lossless for greedy "
                                  "decoding only; use strategy=greedy, or a draft model with the target's tokenizer "
                                  "and drafter.retokenize=false")
            self.draft_vocab = min(output_vocab(self.draft.model), len(self.draft_tokenizer))
            self.draft_eos = model_eos_ids(self.draft.model, self.draft_tokenizer)
            target_eos = self.target_tokenizer.eos_token_id
            self.target_eos = int(target_eos) if target_eos is not None else None
            self.eos_ids = set()
        else:
            reason = tokenizer_mismatch(self.target_tokenizer, self.draft_tokenizer)
            if reason:
                raise UserError(f"drafter.model: the draft model {self.draft.name!r} does not share the target "
                                f"{loaded.name!r}'s tokenizer ({reason}); set drafter.retokenize=true to draft "
                                "through text (greedy only) or choose a draft model with the same tokenizer")
            self.eos_ids = model_eos_ids(loaded.model, self.target_tokenizer)

    def propose(self, context: Sequence[int]) -> Draft:
        n = self.controller.next_length()
        if self.cfg.retokenize:
            return self._propose_retokenized(context, n)
        return self._draft_chain(context, n)

    # --- different tokenizers ------------------------------------------------------------------

    def _propose_retokenized(self, context: Sequence[int], n: int) -> Draft:
        context = list(context)
        before = self.lm.forwards
        text = self.target_tokenizer.decode(context, skip_special_tokens=False)
        draft_context = self.draft_tokenizer.encode(text, add_special_tokens=True)
        if not draft_context:
            return Draft(tokens=[])
        logits = self._catch_up(draft_context)
        drafted: List[int] = []
        ended = False
        seen = list(draft_context)
        for position in range(n):
            x = logits.float()[: self.draft_vocab]
            ctx = torch.tensor(seen, dtype=torch.long, device=x.device) if self.pipeline.penalty != 1.0 else None
            processed = self.pipeline.process(x, ctx)
            token = int(processed.argmax())
            if token in self.draft_eos:
                ended = True
                break
            drafted.append(token)
            seen.append(token)
            confidence = float(processed.softmax(-1)[token]) if self._wants_confidence else 1.0
            if position == n - 1 or not self.controller.keep_drafting(position, confidence):
                break
            logits = self.lm.forward([token], last_only=True)[-1]
            self.tokens_fed += 1
        forwards = self.lm.forwards - before
        tokens = self._to_target(context, draft_context, drafted, ended)[:n]
        return Draft(tokens=tokens, probs=None, forwards=forwards)

    def _to_target(self, context: List[int], draft_context: List[int], drafted: List[int], ended: bool) -> List[int]:
        """Target-tokenizer ids that continue ``context`` with the text of ``drafted`` (draft ids)."""
        dtok, ttok = self.draft_tokenizer, self.target_tokenizer
        window = draft_context[-self.cfg.retokenize_window:]
        head = dtok.decode(window, skip_special_tokens=False)
        full = dtok.decode(window + drafted, skip_special_tokens=False)
        continuation = full[len(head):] if full.startswith(head) else dtok.decode(drafted, skip_special_tokens=False)
        continuation = continuation.rstrip("\ufffd")  # bytes of a character the draft has not finished
        tokens: List[int] = []
        if continuation:
            ctx_window = context[-self.cfg.retokenize_window:]
            joined = ttok.encode(ttok.decode(ctx_window, skip_special_tokens=False) + continuation,
                                 add_special_tokens=False)
            if joined[: len(ctx_window)] == ctx_window:
                tokens = joined[len(ctx_window):]
            else:  # the join merged characters into a context token: encode the continuation on its own
                tokens = ttok.encode(continuation, add_special_tokens=False)
            if not ended:
                tokens = tokens[:-1]  # may be the head of a longer token
        if ended and self.target_eos is not None:
            tokens = tokens + [self.target_eos]
        cut = next((i for i, t in enumerate(tokens) if not 0 <= t < self.vocab), len(tokens))
        return tokens[:cut]


def backend_like(target: LMAdapter) -> BackendConfig:
    """A BackendConfig matching the target's device, dtype and attention (when the runner passes none)."""
    dtype = next(target.model.parameters()).dtype
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    attn = getattr(target.model.config, "_attn_implementation", None) or "sdpa"
    return BackendConfig(device=str(target.device), dtype=name, attn_implementation=attn)


def tokenizer_mismatch(target, draft) -> Optional[str]:
    """None when the two tokenizers give the same ids, else a short reason (vocab, specials, probe text)."""
    if target.get_vocab() == draft.get_vocab():
        return None
    for tid in sorted(set(target.all_special_ids)):
        token = target.convert_ids_to_tokens(tid)
        other = draft.convert_tokens_to_ids(token)
        if other != tid:
            return f"special token {token!r} is id {tid} for the target but {other} for the draft"
    t_ids = target.encode(PROBE_TEXT, add_special_tokens=False)
    d_ids = draft.encode(PROBE_TEXT, add_special_tokens=False)
    if t_ids != d_ids:
        return f"a probe text encodes to {len(t_ids)} target ids and {len(d_ids)} different draft ids"
    return None

