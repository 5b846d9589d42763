"""MAUVE (Pillutla et al., 2021): how close the generations' distribution is to human text, in [0, 1].

Overlap metrics (ROUGE, exact match) miss what sampling and search change most: fluency, diversity, degeneration.
MAUVE compares the two *sets* of texts instead: both are embedded, clustered together (k-means on the
PCA-reduced features), and the two cluster histograms compared along a divergence frontier. Features come from
the run's own target model (:func:`hidden_features`: its last hidden states, mean-pooled), so nothing is ever
downloaded; the score is then comparable between runs of the same model on the same references, not across models.

Small sets make MAUVE coarse: the paper uses thousands of texts and ``num_buckets = n / 10``. Below
:data:`MIN_TEXTS` texts per side there is no score (None with the reason); above it the bucket count is
``n // POINTS_PER_BUCKET`` (at least 2), passed explicitly so the clusters always fit the sample count.
MAUVE is taken per category (:func:`category_mauve`), never pooled: both sides of a pool hold the same mix of
categories, and the clusters would split by category and score every run near 1.
Needs the ``mauve-text`` package (which pulls faiss-cpu and scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

# 20 texts per side: two buckets of ~10 texts of each set on average, the coarsest histogram that still says
# something (hundreds make comparisons between runs trustworthy). specbench-mini has 5 prompts per category: no
# MAUVE there; it is meant for tasks with many human-written references per category.
MIN_TEXTS = 20
POINTS_PER_BUCKET = 10  # the paper's heuristic: num_buckets = n / 10
MIN_BUCKETS = 2

# References that are human-written text, by the prompt's scorer: summaries (rouge_l) and scorer-less references
# (specbench-mini's translations). Exact-match and math references are short answers ("18"), HumanEval's are tests.
HUMAN_TEXT_SCORERS = (None, "rouge_l", "chrf")

Features = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class MauveResult:
    """``score`` is None when MAUVE was not computed; ``reason`` then says why."""

    score: Optional[float]
    reason: Optional[str]
    num_texts: int  # texts per side actually used (the smaller side)
    num_buckets: int = 0


def num_buckets_for(num_texts: int) -> int:
    """Clusters for ``num_texts`` per side: n / 10, at least 2 (k-means clusters both sets, 2n points, together)."""
    return max(MIN_BUCKETS, num_texts // POINTS_PER_BUCKET)


def mauve_score(references: Sequence[str], generations: Sequence[str], features: Features,
                min_texts: int = MIN_TEXTS, seed: int = 25, scaling: float = 5.0) -> MauveResult:
    """MAUVE of ``generations`` (P) against human ``references`` (Q), texts embedded by ``features``.

    Empty texts are dropped first (they have no tokens to pool). The two sets need not be equally long (nor
    paired); the smaller one decides ``num_buckets``. ``scaling`` is the paper's constant c (mauve-text's default).
    """
    refs = [t for t in references if t.strip()]
    gens = [t for t in generations if t.strip()]
    n = min(len(refs), len(gens))
    if n < max(min_texts, 1):
        return MauveResult(None, f"too few texts for MAUVE: {len(gens)} generations and {len(refs)} references "
                                 f"(non-empty), needs >= {min_texts} of each", n)
    mauve = _mauve_module()
    buckets = num_buckets_for(n)
    out = mauve.compute_mauve(p_features=_matrix(features(gens)), q_features=_matrix(features(refs)),
                              num_buckets=buckets, mauve_scaling_factor=scaling, seed=seed, verbose=False)
    return MauveResult(min(1.0, max(0.0, float(out.mauve))), None, n, buckets)  # AUC rounding: 1.0000000000000002


def human_reference(reference: Optional[str], scorer: Optional[str]) -> Optional[str]:
    """The reference as human text for MAUVE, or None when it is an answer key (or absent)."""
    return reference if reference and reference.strip() and scorer in HUMAN_TEXT_SCORERS else None


def category_mauve(items: Iterable[Tuple[str, Optional[str], str]], features: Features,
                   min_texts: int = MIN_TEXTS) -> Dict[str, MauveResult]:
    """MAUVE per category from (category, human reference or None, generated text) triples.

    Only categories with at least one human reference appear; their generations are those of the prompts
    that have one, so both sides cover the same prompts.
    """
    refs: Dict[str, List[str]] = {}
    gens: Dict[str, List[str]] = {}
    for category, reference, generation in items:
        if reference is not None:
            refs.setdefault(category, []).append(reference)
            gens.setdefault(category, []).append(generation)
    return {c: mauve_score(refs[c], gens[c], features, min_texts) for c in sorted(refs)}


def hidden_features(model, tokenizer, texts: Sequence[str], device=None, max_tokens: int = 1024) -> np.ndarray:
    """One row per text: the model's last-layer hidden states mean-pooled over the text's tokens, float32.

    Batch 1: no padding to mask, and the sets MAUVE sees here are small. Texts are truncated to ``max_tokens``
    (mauve-text's own default), and to the model's context length.
    """
    import torch

    device = device if device is not None else next(model.parameters()).device
    limit = min(max_tokens, getattr(model.config, "max_position_embeddings", max_tokens) or max_tokens)
    rows = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)["input_ids"]
            if ids.shape[1] == 0:
                raise ValueError(f"text {text[:40]!r} has no tokens; drop empty texts first")
            out = model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False)
            rows.append(out.hidden_states[-1][0].float().mean(dim=0).cpu())
    return torch.stack(rows).numpy() if rows else np.zeros((0, model.config.hidden_size), dtype=np.float32)


def target_features(model, tokenizer, device=None) -> Features:
    """The ``features`` callable for :func:`mauve_score`, bound to a loaded target model."""
    return lambda texts: hidden_features(model, tokenizer, texts, device)


def _matrix(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"features must return a 2-D array (texts x dims), got shape {array.shape}")
    return array


def _mauve_module():
    try:
        import mauve
    except ImportError:
        from decodelab.errors import UserError

        raise UserError("task.mauve: MAUVE needs the mauve-text package: pip install 'decodelab[quality]'") from None
    return mauve


def require_mauve() -> None:
    """Validation of ``task.mauve=true``: the package is there (one line with the install command if not)."""
    _mauve_module()
