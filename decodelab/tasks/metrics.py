"""Text overlap of an answer with a reference (ROUGE-L, chrF): what task scorers report and what MBR decoding
maximises, so both use one definition."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _rouge_scorer():
    from absl import logging as absl_logging
    from rouge_score import rouge_scorer  # imported lazily: it pulls in nltk

    absl_logging.set_verbosity(absl_logging.WARNING)  # not "Using default tokenizer" on every run

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, answer: str) -> float:
    """ROUGE-L F-measure, the usual summary-overlap score."""
    return float(_rouge_scorer().score(reference, answer)["rougeL"].fmeasure)


def chrf(reference: str, answer: str) -> float:
    """sacrebleu's sentence chrF (character n-gram F-score, the usual translation score), in [0, 1]."""
    import sacrebleu  # imported lazily: the one use of it

    return float(sacrebleu.sentence_chrf(answer, [reference]).score) / 100.0
