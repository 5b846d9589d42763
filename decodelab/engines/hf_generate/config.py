"""engine=hf_generate: transformers' ``generate`` with our drafter and strategy configs mapped onto its options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from decodelab.engines.base import EngineConfig, check_served, refuse

DRAFTERS = ("none", "prompt_lookup", "draft_model", "layer_skip")
# Our draft-length policies that transformers' assisted generation has: a constant number of candidates.
LENGTH_POLICIES = ("fixed",)
# Sampling fields with the same meaning in transformers' GenerationConfig (logits processors in the same order).
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "eta_cutoff", "epsilon_cutoff",
                   "repetition_penalty")


@dataclass
class HFGenerateConfig(EngineConfig):
    name: str = "hf_generate"


def check_run(run) -> None:
    """What transformers' generate cannot serve of ``run``, refused in one line naming the option."""
    engine = "hf_generate"
    drafter, backend = run.drafter, run.backend
    check_served(run, engine, DRAFTERS)
    if backend.compile:
        raise refuse("backend.compile", engine, "compile=true (decodelab's compiled static steps)", ("false",))
    if drafter.name == "prompt_lookup" and drafter.min_ngram_size != 1:
        raise refuse("drafter.min_ngram_size", engine, f"min_ngram_size={drafter.min_ngram_size} "
                     "(transformers tries every n-gram size down to 1)", ("1",))
    if drafter.name in ("draft_model", "layer_skip") and drafter.length.policy not in LENGTH_POLICIES:
        raise refuse("drafter.length.policy", engine, f"policy={drafter.length.policy}", LENGTH_POLICIES)
    if drafter.name == "draft_model":
        if drafter.retokenize:
            raise refuse("drafter.retokenize", engine, "retokenize=true", ("false",))
        if drafter.branching != 1:
            raise refuse("drafter.branching", engine, f"branching={drafter.branching} (a token tree)", ("1",))
    if drafter.name == "layer_skip" and drafter.skip_layers:
        raise refuse("drafter.skip_layers", engine, "skip_layers (transformers exits early, at one layer)",
                     ("exit_layer",))


def generate_options(run, num_layers: int) -> Dict[str, Any]:
    """``generate`` keyword arguments for the run's strategy and drafter (the draft model itself, and the
    assistant's constant schedule, are set by the engine)."""
    strategy, drafter = run.strategy, run.drafter
    options: Dict[str, Any] = {"do_sample": bool(strategy.do_sample)}
    if strategy.do_sample:
        options.update({name: getattr(strategy, name) for name in SAMPLING_FIELDS})
        options["top_k"] = strategy.top_k or None  # 0 disables in our schema; transformers wants None
    else:
        options.update(temperature=None, top_k=None, top_p=None)  # no sampling warnings from the model's defaults
        options["repetition_penalty"] = strategy.repetition_penalty
    if drafter.name == "prompt_lookup":
        options.update(prompt_lookup_num_tokens=drafter.num_speculative_tokens,
                       max_matching_ngram_size=drafter.max_ngram_size)
    if drafter.name == "layer_skip":
        options["assistant_early_exit"] = drafter.layer_ids(num_layers)[-1] + 1
    return options
