"""The schema of ``decodelab train-drafter``: the target (model, backend), the prompt source and the data
(``data``), the head and its optimisation (``train``, one YAML per head kind in conf/train/), and tracking.

A field that changes the training data lives in ``data`` (its hash keys the data cache, so an EAGLE and a Medusa
run on the same data share one generation pass); one that changes only the head lives in ``train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING

from decodelab.config import BackendConfig, ModelConfig, TaskConfig, TrackingConfig, _one_of
from decodelab.errors import check
from decodelab.models.heads import KINDS

ANSWERS = ("greedy", "sample")
MAX_HEADS = 16


@dataclass
class DataConfig:
    """Self-distillation data: prompts (the task, or the target's own), the target's answers, its features."""

    # Prompts the target writes itself when no task is given (Magpie: sampled from the chat template's open user
    # turn); ignored with a task.
    self_prompts: int = 512
    # The longest self-written prompt, in tokens; longer ones are cut.
    prompt_tokens: int = 64
    # Sampling of the self-written prompts.
    prompt_temperature: float = 1.0
    prompt_top_p: float = 0.95
    # The target's answers: greedy (what greedy decoding will verify) or sampled at answer_temperature.
    answers: str = "greedy"
    answer_temperature: float = 0.7
    max_new_tokens: int = 128
    # Sequences per generation / teacher-forcing batch.
    batch_size: int = 32
    # Fraction of the sequences kept out of training for the held-out accuracy.
    held_out: float = 0.05
    seed: int = 0

    def validate(self, key: str = "data") -> None:
        check(self.self_prompts >= 2, f"{key}.self_prompts", f"must be >= 2, got {self.self_prompts}")
        check(self.prompt_tokens >= 4, f"{key}.prompt_tokens", f"must be >= 4, got {self.prompt_tokens}")
        check(self.prompt_temperature > 0, f"{key}.prompt_temperature", f"must be > 0, got {self.prompt_temperature}")
        check(0 < self.prompt_top_p <= 1, f"{key}.prompt_top_p", f"must be in (0, 1], got {self.prompt_top_p}")
        _one_of(f"{key}.answers", self.answers, ANSWERS)
        check(self.answer_temperature > 0, f"{key}.answer_temperature", f"must be > 0, got {self.answer_temperature}")
        check(self.max_new_tokens >= 2, f"{key}.max_new_tokens", f"must be >= 2, got {self.max_new_tokens}")
        check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(0 < self.held_out < 1, f"{key}.held_out", f"must be in (0, 1), got {self.held_out}")


@dataclass
class HeadTrainConfig:
    """The head and how it is optimised (conf/train/<kind>.yaml)."""

    kind: str = MISSING
    # Medusa heads (EAGLE has one layer).
    num_heads: int = 1
    # The drafter-side vocabulary: the most frequent tokens of the training answers (null: the target's whole).
    vocab_size: Optional[int] = None
    steps: int = 400
    # Sequences per optimisation step.
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    # EAGLE's loss: feature_weight x smooth-L1(predicted, real next feature) + token_weight x CE(next-next token).
    feature_weight: float = 1.0
    token_weight: float = 0.1
    # Uniform noise of this half-width added to the input features in training (EAGLE's robustness trick).
    feature_noise: float = 0.0
    # Medusa's loss weight of head k: decay ** (k - 1).
    head_decay: float = 0.8
    checkpoint_every: int = 50
    eval_every: int = 50
    seed: int = 0

    def validate(self, key: str = "train") -> None:
        _one_of(f"{key}.kind", self.kind, KINDS)
        check(1 <= self.num_heads <= MAX_HEADS, f"{key}.num_heads", f"must be in [1, {MAX_HEADS}], got {self.num_heads}")
        if self.kind == "eagle":
            check(self.num_heads == 1, f"{key}.num_heads", f"an EAGLE drafter has one layer (1), got {self.num_heads}")
        if self.vocab_size is not None:
            check(self.vocab_size >= 2, f"{key}.vocab_size", f"must be >= 2 or null (the target's), got {self.vocab_size}")
        for name in ("steps", "batch_size", "checkpoint_every", "eval_every"):
            value = getattr(self, name)
            check(value >= 1, f"{key}.{name}", f"must be >= 1, got {value}")
        check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        check(self.warmup_steps >= 0, f"{key}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.grad_clip > 0, f"{key}.grad_clip", f"must be > 0, got {self.grad_clip}")
        check(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.feature_noise >= 0, f"{key}.feature_noise", f"must be >= 0, got {self.feature_noise}")
        check(0 < self.head_decay <= 1, f"{key}.head_decay", f"must be in (0, 1], got {self.head_decay}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    # The prompt source: a task config (e.g. task=jsonl task.path=my.jsonl); null: the target writes its own.
    task: Optional[TaskConfig] = None
    data: DataConfig = field(default_factory=DataConfig)
    train: HeadTrainConfig = field(default_factory=HeadTrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run_name: Optional[str] = None
    output_dir: str = "${hydra:runtime.output_dir}"
    progress: bool = True
    # Continue an unfinished training of this exact config from its last checkpoint (under resume_dir; null: the
    # folder that holds this run's folder); a finished one is reused.
    resume: bool = True
    resume_dir: Optional[str] = None
    tags: Dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("model", "backend", "data", "train", "tracking"):
            part: Any = getattr(self, name)
            if hasattr(part, "validate"):
                part.validate(name)
        if self.task is not None:
            self.task.validate("task")
