"""The one logits pipeline: plain sampling and both sides of speculative verification go through it.

Lossless speculative sampling is only lossless if the target and draft distributions are built by
exactly the code that plain sampling uses, so every token choice in decodelab comes from
:class:`LogitsPipeline`. The filters reproduce the semantics of transformers' warpers (the same
-inf masks, tie handling and ``min_tokens_to_keep=1``), so a run is comparable with ``generate``,
and are applied in the order ``GenerationMixin._get_logits_processor`` uses (:data:`ORDER`).

Every function takes 2-D logits ``[rows, vocab]``; a row is a batch element or, in verification,
one position of the draft. 1-D logits are treated as one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Protocol, Sequence, Tuple, Union

import torch

from decodelab.decoding.types import Kernels


NEG_INF = float("-inf")
# generate() keeps at least this many tokens when not doing beam search; every filter honours it.
MIN_TOKENS_TO_KEEP = 1

# The order in which transformers' generate() applies these steps; tests assert it stays so.
ORDER: Tuple[str, ...] = (
    "repetition_penalty", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
)
# What a pipeline with a Kernels provider can run: the provider fuses temperature .. min_p (a prefix of ORDER
# after the penalty), and the repetition penalty, an elementwise step before them, stays in torch.
KERNEL_STEPS: Tuple[str, ...] = ORDER[:5]


@dataclass(frozen=True)
class ChainContext:
    """Contexts of rows that are consecutive positions: row ``i`` has seen ``prefix`` plus ``draft[:i]``.

    This is the verification case (rows = draft positions, the last one the bonus position). It is
    cheaper than one tensor per row: the prefix is scattered once and the draft tokens as a triangle.
    """

    prefix: torch.Tensor  # 1-D ids: prompt plus everything committed so far
    draft: torch.Tensor   # 1-D ids of the draft tokens, at least rows - 1 of them


# None: no context (only allowed when repetition_penalty == 1). A 1-D tensor: one context shared by
# every row. A 2-D tensor or a sequence of 1-D tensors: one context per row (ragged is fine, e.g. the
# root-to-node paths of a token tree). A ChainContext: consecutive positions of one chain.
Context = Union[None, torch.Tensor, Sequence[torch.Tensor], ChainContext]


# --------------------------------------------------------------------------------------------------
# The filters, one per function, in pipeline order. Each maps float logits [rows, vocab] to new
# logits [rows, vocab] with removed entries set to -inf and never changes its input in place.
# --------------------------------------------------------------------------------------------------

def seen_mask(context: Context, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[rows, vocab]``: which tokens each row has already seen (a set: counts do not matter).

    Ids at or above ``vocab`` (an embedding larger than the LM head) are dropped, as transformers does.
    """
    if context is None:
        raise ValueError("repetition_penalty != 1 needs context_ids (the prompt plus the tokens generated so far)")
    seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device)  # last column absorbs ids >= vocab
    if isinstance(context, ChainContext):
        seen[:, context.prefix.to(device).clamp(max=vocab)] = True
        draft = context.draft.to(device).clamp(max=vocab)
        if rows > 1:
            if draft.numel() < rows - 1:
                raise ValueError(f"ChainContext has {draft.numel()} draft tokens; {rows} rows need at least {rows - 1}")
            row, col = torch.tril_indices(rows, rows - 1, offset=-1, device=device)  # col < row
            seen[row, draft[col]] = True
    elif isinstance(context, torch.Tensor) and context.dim() == 1:
        seen[:, context.to(device).clamp(max=vocab)] = True
    else:
        if len(context) != rows:
            raise ValueError(f"got {len(context)} per-row contexts for {rows} rows of logits")
        ids = [c.reshape(-1).to(device) for c in context]
        row = torch.repeat_interleave(torch.arange(rows, device=device),
                                      torch.tensor([len(c) for c in ids], device=device))
        seen[row, torch.cat(ids).clamp(max=vocab)] = True
    return seen[:, :vocab]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: seen tokens' logits move towards -inf (divide if positive, multiply if negative)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen (t < 1) or flatten (t > 1) the distribution."""
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int, min_keep: int = MIN_TOKENS_TO_KEEP) -> torch.Tensor:
    """Keep tokens whose logit is at least the k-th largest; ties with the k-th are all kept."""
    k = min(max(k, min_keep), logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: float, min_keep: int = MIN_TOKENS_TO_KEEP) -> torch.Tensor:
    """Nucleus: drop the least likely tokens while their total mass stays <= 1 - top_p.

    Works from the bottom of an ascending sort (as transformers does) so that the kept set is the
    smallest one whose mass reaches top_p; the ``min_keep`` most likely tokens always survive.
    """
    ascending, order = torch.sort(logits, dim=-1, descending=False)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_below <= 1 - top_p
    drop_sorted[..., -min_keep:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: float, min_keep: int = MIN_TOKENS_TO_KEEP) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the most likely one (a confidence-scaled floor)."""
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_keep, probs.size(-1)), dim=-1).indices
    drop = drop.scatter(-1, keep, False)
    return logits.masked_fill(drop, NEG_INF)


def apply_typical(logits: torch.Tensor, mass: float, min_keep: int = MIN_TOKENS_TO_KEEP) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, up to ``mass``."""
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)  # nansum: -inf * 0 for removed tokens
    atypicality = (-logp - entropy).abs()
    sorted_atyp, order = torch.sort(atypicality, dim=-1, descending=False)
    mass_so_far = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (mass_so_far < mass).sum(dim=-1, keepdim=True).clamp(max=logits.size(-1) - 1)
    drop_sorted = sorted_atyp > sorted_atyp.gather(-1, last)
    drop_sorted[..., :min_keep] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def _drop_below(logits: torch.Tensor, probs: torch.Tensor, cutoff: torch.Tensor | float, min_keep: int) -> torch.Tensor:
    """Drop tokens with probability below ``cutoff``, except those tied with the ``min_keep``-th best logit."""
    kth = torch.topk(logits, min(min_keep, logits.size(-1)), dim=-1).values[..., -1:]
    drop = (probs < cutoff) & (logits < kth)
    return logits.masked_fill(drop, NEG_INF)


def apply_epsilon(logits: torch.Tensor, epsilon: float, min_keep: int = MIN_TOKENS_TO_KEEP) -> torch.Tensor:
    """Epsilon sampling: a fixed probability floor (Hewitt et al., truncation as desmoothing)."""
    return _drop_below(logits, logits.softmax(dim=-1), epsilon, min_keep)


def apply_eta(logits: torch.Tensor, epsilon: float, min_keep: int = MIN_TOKENS_TO_KEEP) -> torch.Tensor:
    """Eta sampling: floor ``min(eps, sqrt(eps) * exp(-entropy))``, i.e. looser when the row is uncertain.

    The entropy is computed as ``torch.distributions.Categorical`` does (what transformers calls) and
    ``eps`` is a float32 tensor as there, so the floor matches to the bit.
    """
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    entropy = -(logp.clamp(min=torch.finfo(logp.dtype).min) * logp.softmax(dim=-1)).sum(dim=-1, keepdim=True)
    eps = torch.tensor(epsilon, dtype=logits.dtype, device=logits.device)
    eta = torch.minimum(eps, eps.sqrt() * torch.exp(-entropy))
    return _drop_below(logits, logits.softmax(dim=-1), eta, min_keep)


# --------------------------------------------------------------------------------------------------

Step = Callable[[torch.Tensor], torch.Tensor]


class Settings(Protocol):
    """The fields of a strategy the pipeline reads (decodelab.config.StrategyConfig has them); the decoding
    core takes any object with them, so it depends on no schema."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    eta_cutoff: float
    epsilon_cutoff: float
    repetition_penalty: float
    seed: Optional[int]
    acceptance: str
    typical_epsilon: float
    typical_delta: float


class LogitsPipeline:
    """Turns raw logits into the distribution a strategy samples from.

    Built once per strategy; only active steps are kept, so a disabled filter costs nothing. In greedy
    mode only the repetition penalty applies (as in ``generate`` with ``do_sample=False``: warpers are
    sampling-only), then argmax.

    With ``kernels`` (a provider, see :class:`~decodelab.decoding.types.Kernels`) :meth:`probs` and
    :meth:`sample` run the filters as one fused kernel after the penalty, which stays in torch, and the
    verifier runs its rejection samplers on the provider; :meth:`process` (masked logits, for drafters that
    rank candidates) stays torch. A strategy with a step the kernels do not fuse (typical, epsilon, eta) or
    with typical acceptance is refused here (and, for runs, at validation) rather than silently mixed.
    """

    def __init__(self, cfg: Settings, kernels: Optional[Kernels] = None):
        self.cfg = cfg
        self.kernels = kernels
        self._greedy = (not cfg.do_sample) or cfg.temperature == 0
        self.penalty = float(cfg.repetition_penalty)
        # Values are bound now (partial), so later edits to cfg cannot make two users of one pipeline differ.
        warpers: List[Tuple[str, Step]] = []
        if not self.greedy:
            if cfg.temperature != 1.0:
                warpers.append(("temperature", partial(apply_temperature, temperature=float(cfg.temperature))))
            if cfg.top_k > 0:
                warpers.append(("top_k", partial(apply_top_k, k=int(cfg.top_k))))
            if cfg.top_p < 1.0:
                warpers.append(("top_p", partial(apply_top_p, top_p=float(cfg.top_p))))
            if cfg.min_p > 0.0:
                warpers.append(("min_p", partial(apply_min_p, min_p=float(cfg.min_p))))
            if cfg.typical_p < 1.0:
                warpers.append(("typical_p", partial(apply_typical, mass=float(cfg.typical_p))))
            if cfg.epsilon_cutoff > 0.0:
                warpers.append(("epsilon_cutoff", partial(apply_epsilon, epsilon=float(cfg.epsilon_cutoff))))
            if cfg.eta_cutoff > 0.0:
                warpers.append(("eta_cutoff", partial(apply_eta, epsilon=float(cfg.eta_cutoff))))
        self._warpers = warpers
        if kernels is not None:
            problem = kernel_problem(self)
            if problem:
                raise ValueError(f"kernels={kernels.name}: strategy.{problem[0]}: {problem[1]}")
            # Disabled values (1, 0, 1, 0) switch a filter off inside the kernel exactly as above.
            self._fused = dict(temperature=float(cfg.temperature), top_k=int(cfg.top_k), top_p=float(cfg.top_p),
                               min_p=float(cfg.min_p))

    @property
    def greedy(self) -> bool:
        """Argmax decoding: sampling is off, or a zero temperature asks for the limit of it."""
        return self._greedy

    @property
    def steps(self) -> Tuple[str, ...]:
        """Names of the active steps in the order they run (a subsequence of :data:`ORDER`)."""
        head = ("repetition_penalty",) if self.penalty != 1.0 else ()
        return head + tuple(name for name, _ in self._warpers)

    def process(self, logits: torch.Tensor, context_ids: Context = None) -> torch.Tensor:
        """Processed float32 logits, same shape as ``logits`` ([vocab] or [rows, vocab]); removed tokens are -inf.

        ``context_ids`` is only read when repetition_penalty != 1; see :data:`Context` for the forms
        (for verification rows use :class:`ChainContext`, or one tensor per row for trees). The result
        may share memory with ``logits`` when no step is active; it is never modified in place.
        """
        x, squeeze = self._penalized(logits, context_ids)
        for _, step in self._warpers:
            x = step(x)
        return x.squeeze(0) if squeeze else x

    def _penalized(self, logits: torch.Tensor, context_ids: Context) -> Tuple[torch.Tensor, bool]:
        """Float32 [rows, vocab] logits after the repetition penalty, and whether ``logits`` was 1-D."""
        if logits.dim() not in (1, 2):
            raise ValueError(f"logits must be [vocab] or [rows, vocab], got shape {tuple(logits.shape)}")
        x = logits.float()
        squeeze = x.dim() == 1
        if squeeze:
            x = x.unsqueeze(0)
        if self.penalty != 1.0:
            seen = seen_mask(context_ids, x.size(0), x.size(1), x.device)
            x = apply_repetition_penalty(x, seen, self.penalty)
        return x, squeeze

    def probs(self, logits: torch.Tensor, context_ids: Context = None) -> torch.Tensor:
        """The distribution tokens are drawn from: softmax of :meth:`process`, one-hot argmax when greedy.

        Verification compares these, so greedy returning a one-hot makes greedy exact-match a special
        case of speculative sampling.
        """
        if self.kernels is not None and not self.greedy:
            return self._fused_call(logits, context_ids)[0]
        x = self.process(logits, context_ids)
        if self.greedy:
            return torch.nn.functional.one_hot(x.argmax(dim=-1), x.size(-1)).to(torch.float32)
        return x.softmax(dim=-1)

    def sample(self, logits: torch.Tensor, generator: torch.Generator, context_ids: Context = None) -> torch.Tensor:
        """Token ids of shape ``logits.shape[:-1]``; reproducible given the generator's state.

        Uses ``torch.multinomial`` (as ``generate`` does) with the caller's generator so that a seed
        fixes the whole token sequence and no other code's use of the global RNG can shift it.
        """
        if self.kernels is not None and not self.greedy:
            return self._fused_call(logits, context_ids, generator)[1]
        x = self.process(logits, context_ids)
        if self.greedy:
            return x.argmax(dim=-1)
        probs = x.softmax(dim=-1)
        flat = probs.reshape(-1, probs.size(-1))
        return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])

    def _fused_call(self, logits: torch.Tensor, context_ids: Context,
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The provider's fused filters after the torch penalty: (probs, tokens drawn with ``generator`` or None),
        shaped like :meth:`probs` and :meth:`sample`. The noise is what ``torch.multinomial`` would draw."""
        x, squeeze = self._penalized(logits, context_ids)
        noise = None if generator is None else exponential_noise(x.shape, generator, x.device)
        probs, tokens = self.kernels.warp(x, noise=noise, **self._fused)
        if squeeze:
            return probs[0], None if tokens is None else tokens[0]
        return probs, tokens


def kernel_problem(pipeline: LogitsPipeline) -> Optional[Tuple[str, str]]:
    """(strategy field, reason) when a kernel provider cannot run ``pipeline``'s strategy exactly, else None."""
    extra = [step for step in pipeline.steps if step not in KERNEL_STEPS]
    if extra:
        return extra[0], f"not fused by the kernels (they fuse {', '.join(KERNEL_STEPS[1:])})"
    if not pipeline.greedy and pipeline.cfg.acceptance != "lossless":
        return "acceptance", f"{pipeline.cfg.acceptance} has no kernel (they implement lossless rejection sampling)"
    return None


def exponential_noise(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Exp(1) noise for the exponential race: ``argmax(probs / noise)`` over a row is a draw from it.

    ``torch.multinomial(probs, 1, generator=g)`` is this very race (its one-sample path fills
    ``empty_like(probs).exponential_(generator=g)`` and takes the argmax of the ratio), so noise of the same
    numel from the same generator state gives the same token: kernels and the torch path draw alike.
    """
    return torch.empty(tuple(shape), dtype=torch.float32, device=device).exponential_(generator=generator)
