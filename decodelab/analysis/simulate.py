"""``decodelab simulate RUN_DIR``: the acceptance of model-free drafters over a grid, from a finished greedy run.

Greedy decoding is deterministic: a greedy run's recorded outputs are exactly what its target chooses
after each prefix it decoded, whatever drafted. So the real engine loop (:func:`decodelab.decoding.engine.decode`),
the real verifier and the real drafter classes can be replayed against a stand-in target
(:class:`ReplayTarget`) whose logits are one-hot on the recorded token, without running the model. The
drafter object persists across prompts and turns, which are replayed in record order, as in
:class:`decodelab.experiment.runner.PromptRunner` (the suffix drafter learns from earlier outputs).

Exact for ``prompt_lookup`` and ``suffix`` (deterministic functions of the token sequence) with one limit:
past the end of a recorded output the target's choice is unknown. A draft that matches the output up to
its end and goes on past it is counted as rejected there; the row says how many steps did that
(``unresolved_steps``). Engines that never draft past the token budget only meet this at EOS or a stop
string.

``token_recycling`` is an approximation: it learns from the target's full logits, which are not recorded.
The replay feeds it one-hot logits on the tokens the target actually chose where they are known (the root
and the accepted path, each predicting the next recorded token); rows after rejected draft tokens are
withheld, and the other top-k candidates of each row are arbitrary.

Token ids are renumbered densely (first appearance) so the one-hot rows are short; the drafters compare
ids only for equality, so this changes nothing they do.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from decodelab.decoding import tree
from decodelab.config import DrafterConfig, StrategyConfig
from decodelab.drafters.registry import REGISTRY, build_drafter, drafter_config
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter
from decodelab.decoding.engine import decode
from decodelab.decoding.stop import StopCriteria
from decodelab.errors import UserError
from decodelab.tracking.run_folder import CONFIG_FILE, SAMPLES_FILE, FolderError, RunFolder
from decodelab.tracking.sweep_folder import run_dirs
from decodelab.decoding.logits import LogitsPipeline
from decodelab.experiment.telemetry import acceptance_stats



def model_free() -> List[str]:
    """Drafters that replay without a model: each says so with a default grid (Drafter.simulation_grid). Read
    from the registry at call time, so a drafter discovered later is included."""
    return [name for name, cls in REGISTRY.items() if cls.simulation_grid]


def exact_replays() -> List[str]:
    """Model-free drafters whose replay reproduces a real run's steps exactly: the default set to simulate."""
    return [name for name in model_free() if REGISTRY[name].replay_exact]

# Rows of the best drafter whose values span the suggested confirmation multirun.
CONFIRM_TOP = 3


# --------------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------------

class DenseIds:
    """Token ids renumbered 0..n-1 by first appearance; ``unknown`` (= n) stands for an unrecorded choice."""

    def __init__(self, records: Sequence[dict]):
        self.ids: Dict[int, int] = {}
        for record in records:
            for seq in list(record["prompt_tokens"]) + list(record["output_tokens"]):
                for token in seq:
                    self.ids.setdefault(int(token), len(self.ids))
        self.unknown = len(self.ids)

    def encode(self, tokens: Sequence[int]) -> List[int]:
        return [self.ids[int(t)] for t in tokens]


class ReplayTarget:
    """Stands in for :class:`decodelab.decoding.lm.LMAdapter` inside ``engine.decode`` for one recorded output.

    Cache bookkeeping is the adapter's (``tokens``, ``crop``, ``keep``); a forward over the root and a
    draft returns one-hot logits: the row after a prefix of the recorded output is hot on the output's next
    token, every other row (off the recorded path, or past its end) on ``unknown``, which no draft holds.
    """

    device = torch.device("cpu")
    aux_forwards = 0  # no second model behind the replayed scores

    def __init__(self, unknown: int):
        self.unknown = unknown
        self.vocab = unknown + 1
        self.tokens: List[int] = []
        self.forwards = 0
        # Steps whose draft matched the recorded output to its end and went on: judged as rejected there.
        self.unresolved = 0
        self._prompt_len = 0
        self._output: List[int] = []

    def start(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        self._prompt_len = len(prompt)
        self._output = list(output)
        self.tokens = []

    def reset(self) -> None:
        self.tokens = []

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        self.tokens = list(ids)
        self.forwards += 1
        return self._one_hot([self._at(0)])[0]

    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        """``ids`` = [root] + a chain draft, as the engine feeds them."""
        logits = self._one_hot(self._choices(ids[1:], tree.chain_parents(len(ids) - 1)))
        self.tokens.extend(ids)
        self.forwards += 1
        return logits

    def forward_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        logits = self._one_hot(self._choices(tokens[1:], parents))
        self.tokens.extend(tokens)
        self.forwards += 1
        return logits

    def crop(self, length: int) -> None:
        del self.tokens[length:]

    def keep(self, indices: Sequence[int]) -> None:
        self.tokens = [self.tokens[i] for i in indices]

    def _at(self, position: int) -> int:
        return self._output[position] if position < len(self._output) else self.unknown

    def _choices(self, nodes: Sequence[int], parents: Sequence[int]) -> List[int]:
        """The target's choice per row: row 0 after the root, row i + 1 after the path root -> node i."""
        # The cache holds the prompt and every committed token but the root, so the root row predicts:
        first = len(self.tokens) + 1 - self._prompt_len
        depth = tree.depths(parents)
        on_path: List[bool] = []
        choices = [self._at(first)]
        past_end = False
        for node, (token, parent) in enumerate(zip(nodes, parents)):
            position = first + depth[node] - 1
            reached = parent == tree.ROOT or on_path[parent]
            past_end = past_end or (reached and position >= len(self._output))
            on_path.append(reached and position < len(self._output) and token == self._output[position])
            choices.append(self._at(position + 1) if on_path[-1] else self.unknown)
        self.unresolved += past_end
        return choices

    def _one_hot(self, choices: Sequence[int]) -> torch.Tensor:
        logits = torch.zeros(len(choices), self.vocab)
        logits[torch.arange(len(choices)), torch.tensor(choices, dtype=torch.long)] = 1.0
        return logits


class ReplayStop(StopCriteria):
    """Ends a decode where its recorded output ends; ``max_new_tokens`` is the run's budget."""

    def __init__(self, max_new_tokens: int):
        super().__init__(tokenizer=None, eos_ids=(), stop_strings=(), max_new_tokens=max_new_tokens)  # type: ignore[arg-type]
        self.length = 0

    def check(self, tokens: List[int], new: int) -> Optional[tuple]:
        return (self.length, "recorded_end") if len(tokens) >= self.length else None


class KnownRowsOnly(Drafter):
    """Wraps a drafter so ``observe`` sees only the logits rows the replay knows (for token recycling).

    The ``unknown`` column is cut off so no row can make a drafter propose it.
    """

    def __init__(self, inner: Drafter, unknown: int):
        self.inner = inner
        self.unknown = unknown
        self.name = inner.name

    def reset(self, prompt_ids: Sequence[int]) -> None:
        self.inner.reset(prompt_ids)

    def propose(self, context: Sequence[int]) -> Draft:
        return self.inner.propose(context)

    def observe(self, tokens: Sequence[int], logits: torch.Tensor) -> None:
        rows = (logits.argmax(dim=-1) != self.unknown).nonzero().flatten().tolist()
        if rows:
            self.inner.observe([tokens[i] for i in rows], logits[rows, :self.unknown])

    def update(self, drafted: int, accepted: int) -> None:
        self.inner.update(drafted, accepted)


def typed_drafter(drafter_cfg: Any) -> DrafterConfig:
    """A typed, validated model-free drafter config from a DrafterConfig, dict or DictConfig."""
    cfg = drafter_config(drafter_cfg)
    if cfg.name not in model_free():
        raise UserError(f"--drafter: {cfg.name!r} cannot be simulated (it needs a model); "
                        f"allowed: {', '.join(model_free())}")
    cfg.validate("drafter")
    return cfg


def simulate(records: Sequence[dict], drafter_cfg: Any, max_new_tokens: Optional[int] = None) -> Dict[str, Any]:
    """Replay ``records`` (samples.jsonl of a greedy run, in order) with one drafter config.

    ``max_new_tokens``: the run's token budget (default: the longest recorded output). Returns the
    telemetry of :func:`decodelab.experiment.telemetry.acceptance_stats` over all steps, plus ``drafter``,
    ``config``, ``unresolved_steps``, ``exact``, per-category alpha/tau (``by_category``) and each
    sample's steps ``[drafted, accepted, bonus, draft_s, 0.0, depth]`` (``samples``).
    """
    cfg = typed_drafter(drafter_cfg)
    ids = DenseIds(records)
    target = ReplayTarget(ids.unknown)
    drafter = KnownRowsOnly(build_drafter(cfg), ids.unknown)
    budget = max_new_tokens or max((len(o) for r in records for o in r["output_tokens"]), default=1)
    stop = ReplayStop(budget)
    pipeline = LogitsPipeline(StrategyConfig())
    generator = torch.Generator()
    samples: List[Dict[str, Any]] = []
    for record in records:
        steps: List[list] = []
        for prompt, output in zip(record["prompt_tokens"], record["output_tokens"]):
            prompt, output = ids.encode(prompt), ids.encode(output)
            target.start(prompt, output)
            stop.length = len(output)
            generation = decode(target, prompt, pipeline=pipeline, drafter=drafter, stop=stop, generator=generator)
            if generation.tokens != output:
                raise RuntimeError(f"replay of sample {record.get('id')!r} left its recorded output; a bug")
            steps += [dataclasses.replace(s, verify_s=0.0).to_list(digits=None) for s in generation.steps]
        samples.append({"id": record.get("id"), "category": record.get("category"), "steps": steps})
    stats = acceptance_stats(step for sample in samples for step in sample["steps"])
    by_category: Dict[str, Dict[str, float]] = {}
    for category in sorted({str(s["category"]) for s in samples}):
        part = acceptance_stats(step for s in samples if str(s["category"]) == category for step in s["steps"])
        by_category[category] = {"mean_accepted_length": part["mean_accepted_length"],
                                 "acceptance_rate": part.get("acceptance_rate", 0.0)}
    return {"drafter": cfg.name, "config": dataclasses.asdict(cfg), **stats,
            "acceptance_rate": stats.get("acceptance_rate", 0.0), "unresolved_steps": target.unresolved,
            "exact": cfg.name in exact_replays(), "by_category": by_category, "samples": samples}


# --------------------------------------------------------------------------------------------------
# The recorded run
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RecordedRun:
    path: Path
    cfg: Dict[str, Any]
    records: List[dict]
    summary: Dict[str, Any]

    @property
    def max_new_tokens(self) -> Optional[int]:
        return (self.cfg.get("task") or {}).get("max_new_tokens")

    def drafter(self) -> DrafterConfig:
        """The run's typed drafter config, the run-level ``draft_length`` applied as the run did."""
        typed = drafter_config(self.cfg.get("drafter") or {"name": "none"})
        if self.cfg.get("draft_length") is not None:
            typed.set_draft_length(int(self.cfg["draft_length"]))
        return typed


def load_run(run_dir: str) -> RecordedRun:
    """Config, samples and summary of a finished run folder; UserError unless it is a greedy run with tokens."""
    folder = RunFolder(run_dir)
    path = folder.path
    if not folder.has(SAMPLES_FILE) or not folder.has(CONFIG_FILE):
        raise UserError(f"RUN_DIR: {path} is not a run folder (no {SAMPLES_FILE} and {CONFIG_FILE}){_sweep_hint(path)}")
    try:
        cfg = folder.config()
        samples = folder.samples(strict=True)
        summary = folder.summary() or {}
    except FolderError as err:
        raise UserError(f"RUN_DIR: {path}/{err.detail}") from None
    strategy = cfg.get("strategy") or {}
    if strategy.get("do_sample") and strategy.get("temperature", 1.0) != 0:
        raise UserError(f"RUN_DIR: {path} was decoded with strategy={strategy.get('name')} (do_sample=true); "
                        "simulate replays greedy runs only (strategy=greedy), whose outputs are the target's argmax")
    for number, record in enumerate(samples, start=1):
        if not record.get("prompt_tokens") or "output_tokens" not in record:
            raise UserError(f"RUN_DIR: {path}/{SAMPLES_FILE} sample {number} has no prompt_tokens/output_tokens "
                            "(recorded by an older decodelab); re-run it")
    if not samples:
        raise UserError(f"RUN_DIR: {path}/{SAMPLES_FILE} holds no samples")
    return RecordedRun(path, cfg, samples, summary)


def _sweep_hint(path: Path) -> str:
    try:
        runs = run_dirs(path) if path.is_dir() else []
    except (OSError, ValueError, KeyError):
        runs = []
    return f"; a sweep folder? pass one of its runs, e.g. {runs[0]}" if runs else ""


def step_costs(run: RecordedRun) -> Optional[Dict[str, Any]]:
    """Seconds per AR step and the verification cost per step (AR-step units) this run measured, if any.

    The AR step time comes from the run's AR baseline (as metrics.summarize computes it) or, for a
    drafter=none run, from its own decoding. The verification cost is the run's measured
    ``verify_cost_per_step`` (at its own draft length) or 1 (Leviathan et al.'s model).
    """
    base = [r["baseline"] for r in run.records if r.get("baseline")]
    if base:
        tokens = sum(b["new_tokens"] - b["turns"] for b in base)
        seconds = sum(b["wall_s"] - b["ttft_s_total"] for b in base)
    elif (run.cfg.get("drafter") or {}).get("name") == "none":
        tokens = sum(r["new_tokens"] - len(r["output_tokens"]) for r in run.records)
        seconds = sum(r["wall_s"] - r["ttft_s"] * len(r["output_tokens"]) for r in run.records)
    else:
        return None
    if tokens <= 0 or seconds <= 0:
        return None
    measured = run.summary.get("verify_cost_per_step")
    return {"ar_step_s": seconds / tokens, "verify_cost_per_step": float(measured) if measured else 1.0,
            "verify_cost_source": "measured by the run" if measured else "assumed 1 AR step"}


# --------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------

def parse_grid(items: Sequence[str]) -> Dict[str, List[Any]]:
    """``KEY=v1,v2,...`` (KEY with or without ``drafter.``) -> {KEY: [values]}; values read as YAML scalars."""
    import yaml

    grid: Dict[str, List[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        key = key[len("drafter."):] if key.startswith("drafter.") else key
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts):
            raise UserError(f"--grid {item!r}: expected KEY=v1,v2,... (e.g. --grid num_speculative_tokens=4,8)")
        if key == "name":
            raise UserError(f"--grid {item!r}: choose drafters with --drafter, not a grid over drafter.name")
        grid[key] = [yaml.safe_load(v) for v in parts]
    return grid


def grid_points(drafters: Sequence[str], grid: Dict[str, List[Any]], run: RecordedRun
                ) -> Tuple[List[Tuple[DrafterConfig, Dict[str, Any]]], List[str]]:
    """Typed configs (with the settings varied) of every grid point of every drafter, and notes on skipped points.

    Each drafter starts from its defaults, or from the run's own drafter config (draft_length applied)
    when it is the same drafter; the user's grid replaces the default grid key by key. A bad value fails
    in one line (a value no grid point can use); other invalid combinations (e.g. min_ngram_size >
    max_ngram_size) are skipped with a note.
    """
    fields = {name: [f.name for f in dataclasses.fields(REGISTRY[name].config_class) if f.name != "name"]
              for name in drafters}
    for key in grid:
        if not any(key in fields[name] for name in drafters):
            allowed = sorted({f for name in drafters for f in fields[name]})
            raise UserError(f"--grid {key}: unknown key for drafter={','.join(drafters)}; allowed: {', '.join(allowed)}")
    points: List[Tuple[DrafterConfig, Dict[str, Any]]] = []
    notes: List[str] = []
    for name in drafters:
        base = _base_config(name, run)
        axes = {**REGISTRY[name].simulation_grid, **{k: v for k, v in grid.items() if k in fields[name]}}
        tried: List[Tuple[Dict[str, Any], str]] = []  # (settings, error message or "")
        for combo in itertools.product(*axes.values()):
            settings = dict(zip(axes, combo))
            try:
                points.append((typed_drafter({**base, **settings}), settings))
                tried.append((settings, ""))
            except UserError as err:
                tried.append((settings, str(err)))
        for key in (k for k in grid if k in fields[name]):
            for value in grid[key]:
                with_value = [message for settings, message in tried if settings[key] == value]
                if all(with_value):
                    raise UserError(with_value[0])
        errors = [message for _, message in tried if message]
        if errors:
            notes.append(f"{name}: skipped {len(errors)} grid point(s) invalid together, e.g. {errors[0]}")
    return points, notes


def _base_config(name: str, run: RecordedRun) -> Dict[str, Any]:
    if (run.cfg.get("drafter") or {}).get("name") != name:
        return {"name": name}
    return dataclasses.asdict(run.drafter())


def overrides(cfg: DrafterConfig, settings: Dict[str, Any]) -> List[str]:
    """The run overrides that select this config: the grid's keys and whatever differs from the defaults."""
    default = dataclasses.asdict(type(cfg)())
    values = dataclasses.asdict(cfg)
    keys = [k for k in values if k != "name" and (k in settings or values[k] != default.get(k))]
    return [f"drafter={cfg.name}"] + [f"drafter.{k}={yaml_value(values[k])}" for k in keys]


def yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(yaml_value(v) for v in value) + "]"
    return str(value)


def progress(points: List[Tuple[DrafterConfig, Dict[str, Any]]]) -> Iterable[Tuple[DrafterConfig, Dict[str, Any]]]:
    from tqdm import tqdm

    return tqdm(points, desc="simulating", unit="setting", file=sys.stderr, disable=None, leave=False)


def _row(cfg: DrafterConfig, settings: Dict[str, Any], result: Dict[str, Any],
         costs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    row = {"drafter": result["drafter"], "settings": settings, "overrides": " ".join(overrides(cfg, settings))}
    keys = ("mean_accepted_length", "acceptance_rate", "mean_draft_length", "verify_steps", "drafted_tokens",
            "accepted_tokens", "draft_s", "unresolved_steps", "exact", "per_position_acceptance", "by_category")
    row.update({k: result[k] for k in keys})
    steps = result["verify_steps"]
    if costs and steps:
        draft_cost = result["draft_s"] / steps / costs["ar_step_s"]
        # tau is simulated directly, so no i.i.d.-acceptance formula is needed for tokens per step.
        row["draft_cost_per_step"] = draft_cost
        row["predicted_speedup"] = result["mean_accepted_length"] / (draft_cost + costs["verify_cost_per_step"])
    return row


def _best_per_drafter(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    seen: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        seen.setdefault(row["drafter"], row)
    return list(seen.values())


def recorded_summary(run: RecordedRun) -> Dict[str, Any]:
    keys = ("mean_accepted_length", "acceptance_rate", "speedup", "predicted_speedup")
    return {"drafter": (run.cfg.get("drafter") or {}).get("name"), **{k: run.summary[k] for k in keys if k in run.summary}}


def confirm_command(run: RecordedRun, top: List[Dict[str, Any]]) -> str:
    """``decodelab run -m`` over the values of the top rows (one drafter), on the run's model and prompts."""
    values: Dict[str, List[str]] = {}
    for row in top:
        for item in row["overrides"].split():
            key, _, value = item.partition("=")
            if value not in values.setdefault(key, []):
                values[key].append(value)
    args = [f"{key}={','.join(vals)}" for key, vals in values.items()] + run_overrides(run.cfg)
    return "decodelab run -m " + " ".join(shlex.quote(a) for a in args)


def run_overrides(cfg: Dict[str, Any]) -> List[str]:
    """The overrides that reproduce the run's model, backend, prompts and greedy strategy."""
    model, backend, task = cfg.get("model") or {}, cfg.get("backend") or {}, cfg.get("task") or {}
    strategy = cfg.get("strategy") or {}
    out = [f"model={model.get('name')}"]
    if model.get("name") == "hf" and model.get("path"):
        out.append(f"model.path={model['path']}")
    if backend.get("name") not in (None, "cpu"):
        out.append(f"backend={backend['name']}")
    if strategy.get("repetition_penalty", 1.0) != 1.0:
        out.append(f"strategy.repetition_penalty={strategy['repetition_penalty']}")
    out.append(f"task={task.get('name')}")
    for key in ("path", "categories", "limit", "shuffle_seed", "max_turns", "max_new_tokens"):
        if task.get(key) is not None:
            out.append(f"task.{key}={yaml_value(task[key])}")
    if task.get("stop_strings"):
        out.append(f"task.stop_strings={json.dumps(task['stop_strings'])}")
    return out


def search(run: RecordedRun, drafters: Sequence[str], grid: Dict[str, List[Any]], out: Optional[str]
           ) -> Tuple[Dict[str, Any], List[Dict[str, Any]], Path]:
    """Replay every grid point, rank the settings by tau, and write simulate.json (to ``out``: a folder or
    a .json path; default the run folder). Returns the result, the best row per drafter and the file."""
    points, notes = grid_points(drafters, grid, run)
    costs = step_costs(run)
    rows = [_row(cfg, settings, simulate(run.records, cfg, run.max_new_tokens), costs)
            for cfg, settings in progress(points)]
    rows.sort(key=lambda r: (-r["mean_accepted_length"], -r["acceptance_rate"], r["mean_draft_length"]))
    best = _best_per_drafter(rows)
    confirm = confirm_command(run, [r for r in rows if r["drafter"] == rows[0]["drafter"]][:CONFIRM_TOP])
    result = {"run_dir": str(run.path), "recorded": recorded_summary(run), "costs": costs, "notes": notes,
              "best": [r["overrides"] for r in best], "confirm_command": confirm, "rows": rows}
    path = Path(out).expanduser() if out else run.path
    path = path if path.suffix == ".json" else path / "simulate.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result, best, path
