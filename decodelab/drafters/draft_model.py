"""drafter=draft_model: a smaller model drafts token by token (speculative decoding, Leviathan et al. /
Chen et al.), or any model through text when tokenizers differ (universal assisted generation).

Same tokenizer (the default): the draft model has its own LMAdapter and KV cache, kept in step with
the target. Each ``propose(context)`` crops the draft cache to its longest common prefix with the
context, forwards the delta (usually the bonus token, or the last accepted draft token plus the bonus)
and drafts autoregressively. The last drafted token is never forwarded: the next step's delta does it.
``Draft.probs`` is the strategy's own LogitsPipeline over the draft logits (what lossless speculative
sampling needs); tokens are drawn from those rows. The draft-length controller
(decodelab/drafters/length.py) decides how many tokens to draft; the confidence rule sees the draft
model's probability of its own token.

Different tokenizers (``retokenize: true``; our simpler take on transformers'
AssistedCandidateGeneratorDifferentTokenizers): the target context is decoded to text and encoded
with the draft tokenizer (the draft cache again keeps its longest common prefix), the draft model
drafts greedily, its continuation is decoded to text and encoded with the target tokenizer together
with a window of the last target tokens so that tokens merged across the join line up. The last
re-encoded token is dropped (it may be the head of a longer token) unless the draft ended with EOS.
The result is a deterministic chain (probs=None), lossless for greedy decoding only.

Top-k branching (``branching: k > 1``, same tokenizer only): a static token tree of the SpecInfer /
EAGLE / Sequoia family, in its simplest shape: k candidates at the first draft position, each grown
into a branch by the draft model for the rest of the draft length (k x length nodes at most). The
candidates are the token the chain would draft (argmax, or drawn from the draft distribution when
sampling) followed by the k - 1 most likely other draft tokens; every deeper token is chosen as the
chain chooses it. So branch 0 is exactly the chain, and the other branches cover the draft model's
next guesses where a chain fails most: its first token. The tree is grown one level per draft
forward (all branches at once under a tree attention mask, :func:`forward_tree_level`), so a tree
costs as many draft forwards as a chain of the same length. The draft cache keeps every grown node;
the next ``propose`` keeps only the path the target accepted (:meth:`LMAdapter.keep`), found by
walking the new context down the tree (a node's keys/values depend only on its path's tokens).

Sampling stays lossless: ``Draft.probs`` holds the draft distribution for every drawn token (branch
0's first token and all deeper ones, each node drawn alone from its parent's distribution: ordinary
speculative sampling) and a one-hot row for the k - 1 deterministic candidates. Verification
(SpecInfer's sibling rule in :func:`decodelab.decoding.verify.tree_speculative_sampling`) then treats those as
deterministic proposals: accepted with the current probability of the token, which is removed from
the distribution when rejected; exact given any proposed token. Passing the draft distribution for
top-k candidates instead (they are not independent draws from it) would bias the output.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Set

import torch

from decodelab.decoding import tree
from decodelab.decoding.lm import LMAdapter, common_prefix
from decodelab.decoding.static import BUCKETS
from decodelab.config import BackendConfig, DrafterConfig, ModelConfig, StrategyConfig
from decodelab.drafters.length import DraftLengthConfig, LengthController, build_controller
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter
from decodelab.errors import ConfigError, UserError, check
from decodelab.decoding.logits import LogitsPipeline

# Most candidates at the first draft position (each also grows a branch: the tree has up to branching x length nodes).
MAX_BRANCHING = 64
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
    # How many tokens to draft per step: decodelab/drafters/length.py.
    length: DraftLengthConfig = field(default_factory=DraftLengthConfig)
    # Candidates at the first draft position (a top-k token tree, see the module docstring); 1 drafts a chain.
    branching: int = 1

    def set_draft_length(self, length: int) -> None:
        self.length.set_length(length)

    def validate(self, key: str = "drafter") -> None:
        self.model.validate(f"{key}.model")
        self.length.validate(f"{key}.length")
        check(self.retokenize_window >= 1, f"{key}.retokenize_window", f"must be >= 1, got {self.retokenize_window}")
        check(1 <= self.branching <= MAX_BRANCHING, f"{key}.branching",
              f"must be in [1, {MAX_BRANCHING}], got {self.branching}")
        check(self.branching == 1 or not self.retokenize, f"{key}.branching",
              f"drafting through text (retokenize=true) drafts chains only: must be 1, got {self.branching}")
        from decodelab.models.loading import check_model_available

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

    def prepare(self, slots: int) -> float:
        """Reserve the draft cache like the target's and compile every bucket a draft or a catch-up after a
        verification runs (warm buckets are skipped), so no compile lands inside a timed step."""
        return self.lm.reserve(slots) + self.lm.warmup(BUCKETS)

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
# Token trees grown one level per forward
# --------------------------------------------------------------------------------------------------

@dataclass
class GrowingTree:
    """A draft tree rooted at the last of ``base`` context tokens (the draft cache holds the context).

    ``cached`` lists the nodes run through the draft model, in cache order after the context: every
    node but the deepest ones (like a chain's last token, a leaf is only run once it is accepted).
    """

    base: int
    tokens: List[int] = field(default_factory=list)
    parents: List[int] = field(default_factory=list)
    cached: List[int] = field(default_factory=list)

    def add(self, token: int, parent: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        return len(self.tokens) - 1

    def path_tokens(self, node: int) -> List[int]:
        return [self.tokens[i] for i in tree.path_to(self.parents, node)]

    def depth_of(self, nodes: int) -> int:
        """Depth of the tree cut to its first ``nodes`` nodes (engine.fit_draft cuts whole levels)."""
        levels = tree.depths(self.parents)
        ends = [sum(1 for d in levels if d <= depth) for depth in range(1, max(levels, default=0) + 1)]
        return bisect.bisect_right(ends, nodes)

    def followed(self, context: Sequence[int]) -> List[int]:
        """The cached nodes ``context`` runs through after the base: the longest such path from the root."""
        slots = set(self.cached)
        kids = tree.children(self.parents)
        path: List[int] = []
        node = tree.ROOT
        for token in context[self.base:]:
            node = next((c for c in kids[node] if c in slots and self.tokens[c] == token), None)
            if node is None:
                break
            path.append(node)
        return path


@torch.inference_mode()
def forward_tree_level(lm: LMAdapter, grown: GrowingTree, nodes: Sequence[int]) -> torch.Tensor:
    """Run the next level ``nodes`` of ``grown`` through the draft model; logits [len(nodes), vocab]."""
    logits = lm.forward_level(grown.tokens, grown.parents, grown.base, grown.cached, nodes)
    grown.cached.extend(nodes)
    return logits


# --------------------------------------------------------------------------------------------------

class DraftModelDrafter(ChainDrafter):
    name = "draft_model"
    config_class = DraftModelConfig
    draft_length_key = "length.k"

    def __init__(self, cfg: DraftModelConfig, *, target: LMAdapter, loaded, pipeline: Optional[LogitsPipeline] = None,
                 strategy: Optional[StrategyConfig] = None, backend: Optional[BackendConfig] = None, draft=None,
                 **_parts):
        """``draft``: an already loaded draft model (LoadedModel), instead of loading ``cfg.model``."""
        from decodelab.models.loading import load_model

        self.cfg = cfg
        pipeline = resolve_pipeline(pipeline, strategy, self.name)
        backend = backend or backend_like(target)
        self.draft = draft if draft is not None else load_model(cfg.model, backend)
        self.target_tokenizer = loaded.tokenizer
        self.draft_tokenizer = self.draft.tokenizer
        self.vocab = output_vocab(loaded.model)
        seed = pipeline.cfg.seed if pipeline.cfg.seed is not None else backend.seed
        self._init_common(cfg, pipeline, seed, self.draft.model.device)
        self.lm = LMAdapter(self.draft.model, cache=backend.kv_cache, compile=backend.compile, linear=backend.linear)
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
        # The tree drafted last (branching > 1): its nodes stay in the draft cache until the next propose.
        self.grown: Optional[GrowingTree] = None
        if cfg.branching > 1:
            check_tree_support(target, "target")
            check_tree_support(self.lm, "draft model")

    def propose(self, context: Sequence[int]) -> Draft:
        n = self.controller.next_length()
        if self.cfg.retokenize:
            return self._propose_retokenized(context, n)
        if self.cfg.branching > 1:
            return self._draft_tree(context, n)
        return self._draft_chain(context, n)

    def update(self, drafted: int, accepted: int) -> None:
        # Length controllers think in draft lengths: a tree's is its depth, not its node count.
        if self.grown is not None:
            drafted = self.grown.depth_of(drafted)
        self.controller.update(drafted, accepted)

    # --- top-k branching -----------------------------------------------------------------------

    def _draft_tree(self, context: Sequence[int], n: int) -> Draft:
        context = list(context)
        before = self.lm.forwards
        self._settle(context)
        logits = self._catch_up(context)
        grown = GrowingTree(base=len(context))
        rows: List[torch.Tensor] = []
        first = self._choose(logits, context)
        frontier: List[int] = []
        for token, row, confidence in [first] + self._candidates(logits, context, first[0]):
            node = grown.add(token, tree.ROOT)
            rows.append(row)
            if self._extends(token, 0, n, confidence):
                frontier.append(node)
        for position in range(1, n):
            if not frontier:
                break
            level = forward_tree_level(self.lm, grown, frontier)
            self.tokens_fed += len(frontier)
            grows: List[int] = []
            for parent, parent_logits in zip(frontier, level):
                token, row, confidence = self._choose(parent_logits, context + grown.path_tokens(parent))
                node = grown.add(token, parent)
                rows.append(row)
                if self._extends(token, position, n, confidence):
                    grows.append(node)
            frontier = grows
        self.grown = grown
        return Draft(tokens=list(grown.tokens), probs=torch.stack(rows), forwards=self.lm.forwards - before,
                     parents=list(grown.parents))

    def _settle(self, context: List[int]) -> None:
        """Compact the draft cache to the context plus the last tree's path that ``context`` follows."""
        grown, self.grown = self.grown, None
        if grown is None or len(self.lm.tokens) != grown.base + len(grown.cached):
            return
        path = grown.followed(context) if self.lm.tokens[:grown.base] == context[:grown.base] else []
        slot = {node: i for i, node in enumerate(grown.cached)}
        self.lm.keep(list(range(grown.base)) + [grown.base + slot[node] for node in path])

    def _candidates(self, logits: torch.Tensor, seen_ids: List[int], first: int):
        """The other first-position candidates: (token, one-hot row, confidence) for the k - 1 most likely
        draft tokens besides ``first`` that the strategy's filters keep."""
        x = fit_vocab(logits.float(), self.vocab)
        seen = torch.tensor(seen_ids, dtype=torch.long, device=x.device) if self.pipeline.penalty != 1.0 else None
        scores = self.pipeline.process(x, seen)
        k = self.cfg.branching
        top = scores.topk(min(k, scores.numel()))
        likely = scores.softmax(-1) if self._wants_confidence else None
        out = []
        for score, token in zip(top.values.tolist(), top.indices.tolist()):
            if token != first and score != float("-inf") and len(out) < k - 1:
                row = torch.zeros_like(x)
                row[token] = 1.0
                out.append((token, row, float(likely[token]) if likely is not None else 1.0))
        return out

    def _extends(self, token: int, position: int, n: int, confidence: float) -> bool:
        """Whether the branch ending in ``token`` (at draft ``position``) grows further; as the chain stops."""
        return token not in self.eos_ids and position < n - 1 and self.controller.keep_drafting(position, confidence)

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


def check_tree_support(lm: LMAdapter, who: str) -> None:
    """drafter.branching > 1 needs tree attention in both models (4-D masks, no sliding-window layers)."""
    try:
        lm.check_tree_support()
    except NotImplementedError as err:
        raise ConfigError("drafter.branching", f"a token tree needs tree attention in the {who}: {err}; "
                          "use drafter.branching=1 (a chain)") from None


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

