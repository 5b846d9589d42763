"""One run: build the parts named by the config, decode every prompt of the task, record everything."""

from __future__ import annotations

import resource
import sys
import time
import zlib
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from decodelab.config import BackendConfig, ModelConfig, TrackingConfig, RunConfig
from decodelab.decoding.lm import LMAdapter
from decodelab.decoding.static import BUCKETS
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.stop import StopCriteria
from decodelab.decoding.types import Generation
from decodelab.drafters.registry import build_drafter, drafter_config
from decodelab.engines.base import Request
from decodelab.engines.native import NativeEngine
from decodelab.engines.registry import build_engine
from decodelab.experiment.baseline import BaselineCache, Baseline, divergence
from decodelab.experiment.compose import to_run_config
from decodelab.experiment.metrics import list_metrics, sample_timing, summarize
from decodelab.experiment.plots import acceptance_plots
from decodelab.kernels.provider import build_kernels
from decodelab.models.loading import LoadedModel, load_model, resolve_device
from decodelab.tasks import load_task
from decodelab.strategies.registry import REGISTRY, build_strategy
from decodelab.tasks.base import Prompt, without_context
from decodelab.tracking.sweep_folder import SWEEP_DIR_ENV
from decodelab.errors import notice, warn
from decodelab.experiment.quality import code_execution, score
from decodelab.experiment.sandbox import ISOLATED


NATIVE = NativeEngine.name
# Cache slots beyond prompt + max_new_tokens: the longest draft a step may verify past the last token.
RESERVE_SLACK = 64
# Cache slots made up front: most prompts + answers fit, so a compiled step is compiled once per run.
RESERVED_SLOTS = 1024


def setup_backend(backend: BackendConfig) -> None:
    """Threads, seeds and determinism flags, applied before any model is built."""
    resolve_device(backend)
    if backend.threads is not None:
        torch.set_num_threads(backend.threads)
    torch.manual_seed(backend.seed)
    if backend.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


class PromptRunner:
    """Decodes prompts (all turns, each answered after the model's own previous answers) with one model."""

    def __init__(self, loaded: LoadedModel, run: RunConfig, execution: Optional[str] = None):
        self.loaded = loaded
        self.run = run
        self.execution = execution  # how generated code is run (see code_execution); None: it is not
        self.tokenizer = loaded.tokenizer
        self.strategy = build_strategy(run.strategy, loaded=loaded, backend=run.backend)
        # Contrast strategies score through a wrapper of the target; the drafter, the baseline and the verifier
        # all see those scores, so a drafter accelerates the strategy's own distribution.
        self.target = self.strategy.wrap(LMAdapter(loaded.model, cache=run.backend.kv_cache,
                                                   compile=run.backend.compile, linear=run.backend.linear,
                                                   hidden_states=self.strategy.hidden_states))
        self.target.reserve(RESERVED_SLOTS)
        # Compile time (backend.compile) is paid here, before any prompt is timed, and reported apart.
        self.compile_s = self.target.warmup((1,) if run.drafter.name == "none" else BUCKETS)
        self.pipeline = LogitsPipeline(run.strategy, kernels=build_kernels(run.backend, run.strategy))
        self.stop = StopCriteria(self.tokenizer, eos_ids(loaded), run.task.stop_strings, run.task.max_new_tokens)
        native = run.engine.name == NATIVE
        # Another engine drafts for itself: our target then serves only the AR baseline and the divergence check.
        self.drafter = build_drafter(run.drafter if native else drafter_config({"name": "none"}), target=self.target,
                                     loaded=loaded, pipeline=self.pipeline, backend=run.backend)
        self.engine = build_engine(run.engine, run=run, loaded=loaded, stop=self.stop, target=self.target,
                                   strategy=self.strategy, pipeline=self.pipeline, drafter=self.drafter)
        self.compile_s += self.drafter.prepare(RESERVED_SLOTS)  # a draft model's cache and compiled steps
        self.compile_s += self.strategy.prepare(RESERVED_SLOTS)  # e.g. MBR's utility, warmed up
        self.seed = run.strategy.seed if run.strategy.seed is not None else run.backend.seed
        # Another engine is checked against decodelab's AR even without a drafter: losslessness across engines.
        needed = run.drafter.name != "none" or not native
        self.baseline = self._baseline_cache() if needed and run.baseline != "none" else None

    def _baseline_cache(self) -> BaselineCache:
        """The AR baseline of this exact config, cached per everything that changes its tokens or timings.

        Inside a sweep the cache lives in the sweep folder: the baseline is decoded once, by the first job
        that needs it, and every other job of the sweep reuses it, so all speedups of a sweep share one
        baseline measured under the same conditions (not one on record from another day's machine load).
        """
        import os
        from dataclasses import asdict

        run = self.run
        key = {"model": self.loaded.fingerprint, "backend": asdict(run.backend), "strategy": asdict(run.strategy),
               "max_new_tokens": run.task.max_new_tokens, "stop": list(run.task.stop_strings),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu_model()}
        cache_dir = os.environ.get(SWEEP_DIR_ENV) or run.model.cache_dir
        return BaselineCache(self.target, self.pipeline, self.stop, cache_dir, key,
                             use_cache=run.baseline == "cached", generate=self.strategy.generate)

    def encode(self, messages: List[dict]) -> List[int]:
        return encode_messages(self.tokenizer, self.run.model, messages)

    def _without_context(self, prompt: Prompt, messages: List[dict]) -> Optional[List[int]]:
        """The conversation's ids with the prompt's context cut out of its first turn, for strategies that
        contrast the two (CAD); None when the strategy does not or the prompt has no context."""
        if not self.strategy.uses_context or not prompt.context:
            return None
        first = dict(messages[0], content=without_context(messages[0]["content"], prompt.context))
        return self.encode([first] + messages[1:])

    def seed_for(self, prompt: Prompt, turn: int) -> int:
        """Seeded per prompt id and turn, so a sample does not change with task order, limit or shuffle."""
        return self.seed * 1_000_003 + zlib.crc32(prompt.id.encode()) + turn

    def generator_for(self, seed: int) -> torch.Generator:
        generator = torch.Generator(device=self.target.device)
        generator.manual_seed(seed)
        return generator

    def run_prompt(self, index: int, prompt: Prompt) -> dict:
        return self.run_batch([(index, prompt)])[0]

    def run_batch(self, batch: List[Tuple[int, Prompt]]) -> List[dict]:
        """Decode prompts together (the engine gets every prompt's turn t at once; task.concurrency of them), each
        turn answered after the model's own previous answers; one record per prompt."""
        _reset_peak_memory(self.target.device)
        states = [_Conversation() for _ in batch]
        engine_s = 0.0
        for turn_index in range(max(len(prompt.turns) for _, prompt in batch)):
            live = [(state, prompt) for state, (_, prompt) in zip(states, batch) if turn_index < len(prompt.turns)]
            requests = []
            for state, prompt in live:
                state.messages.append({"role": "user", "content": prompt.turns[turn_index]})
                input_ids = self.encode(state.messages)
                state.prompt_tokens.append(list(input_ids))
                slots = len(input_ids) + self.run.task.max_new_tokens + RESERVE_SLACK
                self.compile_s += self.target.reserve(slots) + self.drafter.prepare(slots) + self.strategy.prepare(slots)
                self.strategy.begin(input_ids, self._without_context(prompt, state.messages))
                seed = self.seed_for(prompt, turn_index)
                if self.baseline is not None:
                    state.baselines.append(self.baseline.get(input_ids, seed))
                requests.append(Request(list(input_ids), seed))
            start = time.perf_counter()
            generations = self.engine.generate(requests)
            engine_s += time.perf_counter() - start
            for (state, _), request, generation in zip(live, requests, generations):
                if state.baselines and self.pipeline.greedy:
                    state.divergences.append(divergence(self.target, request.ids, state.baselines[-1].tokens,
                                                        generation.tokens))
                text = self.tokenizer.decode(generation.tokens, skip_special_tokens=True)
                text = _cut_at_stop_string(text, self.run.task.stop_strings)
                state.messages.append({"role": "assistant", "content": text})
                state.turns.append(generation)
                state.outputs.append(text)
        # The batch's own wall time (its engine calls, all turns): the serving throughput at task.concurrency.
        together = {"batch": batch[0][0], "batch_size": len(batch), "batch_engine_s": engine_s}
        return [{**self._record(index, prompt, state), **together} for (index, prompt), state in zip(batch, states)]

    def _record(self, index: int, prompt: Prompt, state: "_Conversation") -> dict:
        turns, baselines, divergences = state.turns, state.baselines, state.divergences
        record = {
            "index": index, "id": prompt.id, "category": prompt.category, "turns": prompt.turns,
            "outputs": state.outputs, "reference": prompt.reference,
            "prompt_tokens": state.prompt_tokens, "output_tokens": [g.tokens for g in turns],
            "stop_reasons": [g.stop_reason for g in turns],
            **sample_timing(turns),
            "peak_mem_mb": _peak_memory_mb(self.target.device),
            "quality": score(prompt, "\n".join(state.outputs), self.execution or ISOLATED),
            "steps": [s.to_list() for g in turns for s in g.steps],
            "lossy": any(getattr(g, "lossy", False) for g in turns),
        }
        if baselines:
            record["baseline"] = {"new_tokens": sum(len(r.tokens) for r in baselines),
                                  "wall_s": sum(r.wall_s for r in baselines),
                                  "ttft_s_total": sum(r.ttft_s for r in baselines), "turns": len(baselines),
                                  "cached": all(r.cached for r in baselines)}
        if self.execution is not None:
            record["code_execution"] = self.execution
        if divergences:
            record["lossless"] = all(d is None for d in divergences)
            record["divergences"] = [dict(turn=i, **d) for i, d in enumerate(divergences) if d is not None]
        return record


@dataclass
class _Conversation:
    """One prompt's turns so far, while a batch is decoded."""

    messages: List[dict] = field(default_factory=list)
    prompt_tokens: List[List[int]] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)
    turns: List[Generation] = field(default_factory=list)
    baselines: List[Baseline] = field(default_factory=list)
    divergences: List[Optional[dict]] = field(default_factory=list)


def encode_messages(tokenizer: PreTrainedTokenizerBase, model: ModelConfig, messages: List[dict]) -> List[int]:
    """The ids a conversation is decoded from: the model's system prompt, then its chat template (or the raw
    turns joined when it has none or ``model.chat_template`` is off)."""
    if model.system_prompt:
        messages = [{"role": "system", "content": model.system_prompt}] + messages
    if model.chat_template and getattr(tokenizer, "chat_template", None):
        return chat_template_ids(tokenizer, messages)
    text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text)["input_ids"]


def chat_template_ids(tokenizer: PreTrainedTokenizerBase, messages: List[dict]) -> List[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, ready for the assistant's answer."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _cpu_model() -> str:
    from decodelab.experiment.fingerprint import cpu_model

    return cpu_model() or "unknown"


def eos_ids(loaded: LoadedModel) -> List[int]:
    ids = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(ids)


def _cut_at_stop_string(text: str, stop_strings: List[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak device memory of this sample on CUDA; on CPU the process's peak resident set (it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# What a front end shows at the end of a run: (summary, run folder, tracking config, remote trackers that failed).
Show = Callable[[Dict[str, float], Path, TrackingConfig, List[str]], None]


def run(cfg: DictConfig, output_dir: Optional[str] = None, show: Optional[Show] = None) -> Dict[str, float]:
    """Run one composition; returns the summary (with ``status``). Raises UserError on bad input before
    anything is recorded. With ``resume``, a config that already finished is not run again (its summary is
    returned) and an unfinished one continues from the samples it recorded. ``show`` is called when the run
    finished and ``print_table`` is on (the CLI prints its table)."""
    from decodelab.experiment.fingerprint import environment_fingerprint
    from decodelab.experiment.resume import config_hash, find_previous
    from decodelab.tracking.tracker import Tracker

    if output_dir is not None:
        cfg = OmegaConf.merge(cfg, {"output_dir": output_dir})
    run_cfg = to_run_config(cfg)
    run_dir = Path(run_cfg.output_dir)
    digest = config_hash(run_cfg)
    previous = None
    if run_cfg.resume:
        resume_dir = Path(run_cfg.resume_dir).expanduser() if run_cfg.resume_dir else run_dir.resolve().parent
        previous = find_previous(resume_dir, digest, exclude=run_dir)
        if previous is not None and previous.finished:
            return _reuse(previous, run_dir, digest)
    setup_backend(run_cfg.backend)
    prompts = load_task(run_cfg.task)
    REGISTRY[run_cfg.strategy.name].check_prompts(run_cfg.strategy, prompts)
    execution = code_execution(run_cfg.task, prompts)
    if getattr(run_cfg.drafter, "checkpoint", None):
        from decodelab.experiment.checkpoints import resolve_checkpoint

        run_cfg.drafter.checkpoint = resolve_checkpoint(run_cfg.drafter.checkpoint, run_cfg.tracking,
                                                        run_cfg.model.cache_dir)
    loaded = load_model(run_cfg.model, run_cfg.backend)
    runner = PromptRunner(loaded, run_cfg, execution)
    run_name = run_cfg.run_name or f"{run_cfg.model.name}|{run_cfg.drafter.name}|{run_cfg.strategy.name}|{run_cfg.task.name}"
    tags = {**run_cfg.tags, "model_fingerprint": loaded.fingerprint, "config_hash": digest,
            "kv_cache": runner.target.kind, "linear": runner.target.linear}
    if execution is not None:
        tags["code_execution"] = execution
    if previous is not None:
        tags["resumed_from"] = str(previous.run_dir)
    tracker = Tracker(run_dir, run_cfg.tracking, run_name, tags=tags)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tracker.start(resolved, environment_fingerprint(seeds={"backend": run_cfg.backend.seed, "strategy": runner.seed},
                                                    threads=torch.get_num_threads()))
    done = {record["id"]: record for record in previous.samples} if previous is not None else {}
    records: List[dict] = []
    try:
        for record in _progress(prompts, runner, run_cfg.progress, done):
            tracker.log_sample(record)
            records.append(record)
    except BaseException as err:
        tracker.finish(summarize(records), status="FAILED", error=f"{type(err).__name__}: {err}")
        err.decodelab_recorded = True  # type: ignore[attr-defined]  # the job wrapper must not record it twice
        raise
    summary = summarize(records)
    if run_cfg.task.mauve:
        summary.update(mauve_summary(prompts, records, loaded))
    if run_cfg.backend.compile:
        summary["compile_s"] = runner.compile_s  # warm-up before the first prompt: never inside a sample's time
    if run_cfg.engine.name != NATIVE:
        summary["engine_start_s"] = runner.engine.start_s  # 0 when a sweep's earlier job started it
    lists = list_metrics(records)
    plots = acceptance_plots(lists["accepted_histogram"], lists["per_position_acceptance"], run_dir, run_name)
    tracker.finish({**summary, **lists} if plots else summary, artifacts=plots)
    if run_cfg.print_table and show is not None:
        show(summary, run_dir, run_cfg.tracking, tracker.remote_failures)
    return {**summary, "status": "FINISHED"}


def mauve_summary(prompts: List[Prompt], records: List[dict], loaded: LoadedModel) -> Dict[str, float]:
    """``mauve/<category>`` for every category with enough human references, after decoding (never timed); a
    category with too few gets one warning that says how many it has."""
    from decodelab.experiment.mauve import category_mauve, human_reference, target_features

    by_id = {p.id: p for p in prompts}
    items = [(r["category"], human_reference(by_id[r["id"]].reference, by_id[r["id"]].scorer), "\n".join(r["outputs"]))
             for r in records if r["id"] in by_id]
    out: Dict[str, float] = {}
    results = category_mauve(items, target_features(loaded.model, loaded.tokenizer))
    for category, result in results.items():
        if result.score is None:
            warn(f"task.mauve: no MAUVE for category {category}: {result.reason}")
        else:
            out[f"mauve/{category}"] = result.score
    if not results:
        warn("task.mauve: no prompt of this task has a human-written reference; MAUVE needs one per prompt")
    return out


def _reuse(previous, run_dir: Path, digest: str) -> Dict[str, float]:
    """This config already finished: point this run folder at that run instead of decoding again."""
    from decodelab.tracking.sweep_folder import REUSED_FILE
    from decodelab.tracking.run_folder import write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / REUSED_FILE, {"run_dir": str(previous.run_dir), "config_hash": digest})
    notice(f"config {digest} already finished in {previous.run_dir}; reusing it (resume=false to re-run)")
    return {**previous.summary, "status": "FINISHED", "reused_from": str(previous.run_dir)}


def record_failure(cfg: DictConfig, output_dir: str, error: str) -> None:
    """A job that failed before its run started (bad combination, model load): a FAILED run folder and
    remote run, so a sweep's summary and MLflow show it with its error."""
    from decodelab.tracking.tracker import Tracker

    try:
        tracking: Optional[TrackingConfig] = OmegaConf.to_object(cfg.tracking)  # type: ignore[assignment]
    except Exception:  # noqa: BLE001 - the tracking config itself may be what is broken
        tracking = None
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001
        config = OmegaConf.to_container(cfg, resolve=False)
    name = "|".join(str(OmegaConf.select(cfg, f"{k}.name", default="?")) for k in ("model", "drafter", "strategy", "task"))
    tracker = Tracker(output_dir, tracking or TrackingConfig(), name, tags={"failed_before_start": "true"})
    tracker.start(config, {})
    tracker.finish({}, status="FAILED", error=error)


def _progress(prompts: List[Prompt], runner: PromptRunner, enabled: bool, done: Dict[str, dict]):
    """Records in prompt order (task.concurrency prompts decoded together); a prompt already in ``done``
    (recorded by an interrupted run of this config) is taken from there instead of being decoded again."""
    from tqdm import tqdm

    size = runner.run.task.concurrency
    tokens = 0
    wall = 0.0
    bar = tqdm(total=len(prompts), desc="decoding", unit="prompt", disable=not enabled, file=sys.stderr,
               dynamic_ncols=True)
    pending: List[Tuple[int, Prompt]] = []
    for index, prompt in enumerate(prompts):
        if prompt.id in done:
            bar.update(1)
            yield {**done[prompt.id], "index": index, "resumed": True}
            continue
        pending.append((index, prompt))
        if len(pending) < size and index < len(prompts) - 1:
            continue
        records = [runner.run_prompt(*pending[0])] if size == 1 else runner.run_batch(pending)
        pending = []
        for record in records:
            tokens += record["new_tokens"]
            wall += record["wall_s"]
            bar.update(1)
            bar.set_postfix_str(f"{tokens / wall:.1f} tok/s" if wall > 0 else "")
            yield record
    if pending:
        yield from runner.run_batch(pending)
    bar.close()
