"""One training run of a draft head: data, head, optimisation, checkpoints, tracking; resumable.

The run folder is a decodelab run folder (config.yaml, fingerprint.json with the environment, summary.json,
tracking.json) plus ``metrics.jsonl`` (the loss curves and held-out accuracy, also sent to MLflow/W&B as step
series) and ``checkpoint/``: the head (``head.json`` + ``head.safetensors``, what ``drafter.checkpoint`` reads)
and ``state.pt`` (head, optimiser and step, what a resumed run reads). A run of the same config (same hash)
that was killed is continued from its last checkpoint in the new run folder; one that finished is reused.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from decodelab.errors import UserError, notice, one_line
from decodelab.models.heads import HeadSpec, build_head, save_head
from decodelab.training.config import TrainConfig
from decodelab.training.data import build_dataset, check_disjoint
from decodelab.training.fit import (STATE_FILE, batch_indices, collate, column_map, evaluate, load_state,
                                    optimizer_for, save_state, train_step)

CHECKPOINT_DIR = "checkpoint"
NOT_HASHED = ("tracking", "output_dir", "progress", "run_name", "tags", "resume", "resume_dir")


def to_train_config(cfg: DictConfig) -> TrainConfig:
    try:
        train: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise UserError(one_line(err)) from None
    train.validate()
    return train


def preflight(train: TrainConfig) -> None:
    """What can be refused before anything loads or is recorded: the model's availability, a task source whose
    prompts overlap an evaluation task."""
    from decodelab.models.loading import check_model_available, resolve_device

    resolve_device(train.backend)
    check_model_available(train.model)
    if train.task is not None:
        from decodelab.tasks import load_task

        check_disjoint([(p.id, p.turns[0]) for p in load_task(train.task)], f"task={train.task.name}")


def train_hash(train: TrainConfig) -> str:
    data = asdict(train)
    for key in NOT_HASHED:
        data.pop(key, None)
    data["model"].pop("cache_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _checkpointed_steps(previous) -> int:
    path = previous.run_dir / CHECKPOINT_DIR / STATE_FILE
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, weights_only=False, map_location="cpu")["step"])
    except Exception:  # noqa: BLE001 - a torn state is no progress
        return 0


def train(cfg: DictConfig, output_dir: Optional[str] = None) -> Dict[str, float]:
    """Train one head; returns the summary (with ``status``). Bad input raises UserError before anything is
    recorded (except a vocabulary or data problem found once the target is loaded, recorded as FAILED)."""
    from decodelab.experiment.fingerprint import environment_fingerprint
    from decodelab.experiment.resume import find_previous
    from decodelab.experiment.runner import eos_ids, setup_backend
    from decodelab.models.loading import load_model
    from decodelab.tracking.tracker import Tracker

    if output_dir is not None:
        cfg = OmegaConf.merge(cfg, {"output_dir": output_dir})
    run = to_train_config(cfg)
    preflight(run)
    run_dir = Path(run.output_dir).resolve()
    digest = train_hash(run)
    previous = None
    if run.resume:
        resume_dir = Path(run.resume_dir).expanduser() if run.resume_dir else run_dir.parent
        previous = find_previous(resume_dir, digest, exclude=run_dir, progress=_checkpointed_steps)
        if previous is not None and previous.finished:
            notice(f"training {digest} already finished in {previous.run_dir}; reusing it (resume=false to re-train)")
            return {**previous.summary, "status": "FINISHED", "reused_from": str(previous.run_dir)}
    setup_backend(run.backend)
    loaded = load_model(run.model, run.backend)
    target = loaded.model.requires_grad_(False)
    full = target.get_output_embeddings().weight.shape[0]
    if run.train.vocab_size is not None and run.train.vocab_size > full:
        raise UserError(f"train.vocab_size: {run.train.vocab_size} is larger than the vocabulary of {run.model.name} "
                        f"({full}); allowed: 2..{full} or null (the whole vocabulary)")
    name = run.run_name or f"train|{run.model.name}|{run.train.kind}"
    tags = {**run.tags, "model_fingerprint": loaded.fingerprint, "config_hash": digest, "kind": "train-drafter"}
    if previous is not None:
        tags["resumed_from"] = str(previous.run_dir)
    tracker = Tracker(run_dir, run.tracking, name, tags=tags)
    tracker.start(OmegaConf.to_container(cfg, resolve=True),
                  environment_fingerprint(seeds={"train": run.train.seed, "data": run.data.seed},
                                          threads=torch.get_num_threads()))
    try:
        summary = _fit(run, loaded, eos_ids(loaded), full, tracker, previous)
    except BaseException as err:
        tracker.finish({}, status="FAILED", error=f"{type(err).__name__}: {err}")
        raise
    checkpoint = run_dir / CHECKPOINT_DIR
    tracker.finish(summary, artifacts=[checkpoint / "head.json", checkpoint / "head.safetensors"])
    return {**summary, "status": "FINISHED"}


def _fit(run: TrainConfig, loaded, eos, full: int, tracker, previous) -> Dict[str, float]:
    from tqdm import tqdm

    cfg = run.train
    device = loaded.model.device
    dataset = build_dataset(run.data, run.task, run.model, loaded, eos, progress=run.progress)
    vocab = dataset.vocabulary(cfg.vocab_size, eos, full)
    spec = HeadSpec(kind=cfg.kind, num_heads=cfg.num_heads, hidden_size=loaded.model.config.hidden_size,
                    target_name=run.model.name, target_fingerprint=loaded.fingerprint, vocab=vocab)
    torch.manual_seed(cfg.seed)
    head = build_head(spec, loaded.model).train()
    optimizer = optimizer_for(head, cfg)
    columns = column_map(vocab, full, device)
    folder = tracker.run_dir / CHECKPOINT_DIR
    step, tokens_seen, train_s = 0, 0, 0.0
    if previous is not None:
        state = load_state(previous.run_dir / CHECKPOINT_DIR, head, optimizer)
        if state is not None:
            step, tokens_seen, train_s = state["step"], state["tokens_seen"], state["train_s"]
            _replay_metrics(previous.run_dir, step, tracker)
            notice(f"resuming training from step {step} of {previous.run_dir}")
    data_info = {"source": dataset.source, "sequences": len(dataset.train), "held_out": len(dataset.held_out),
                 "answer_tokens": dataset.tokens(), "generation_s": round(dataset.generation_s, 1)}
    bar = tqdm(total=cfg.steps, initial=step, desc=f"training {cfg.kind}", unit="step", disable=not run.progress,
               file=sys.stderr, dynamic_ncols=True)
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "s": 0.0}
    held: Dict[str, float] = {}
    while step < cfg.steps:
        batch = collate([dataset.train[i] for i in batch_indices(step, len(dataset.train), cfg.batch_size, cfg.seed)],
                        device)
        start = time.perf_counter()
        losses = train_step(head, optimizer, batch, cfg, columns, step)
        elapsed = time.perf_counter() - start
        step += 1
        tokens_seen += batch.answer_tokens
        train_s += elapsed
        for key, value in (("loss", losses["loss"]), ("steps", 1), ("tokens", batch.answer_tokens), ("s", elapsed)):
            window[key] += value
        bar.update(1)
        bar.set_postfix_str(f"loss {losses['loss']:.4f}, {window['tokens'] / max(window['s'], 1e-9):.0f} tok/s")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            held = evaluate(head, dataset.held_out, cfg, columns, device)
            tracker.log_metrics(step, {"train/loss": window["loss"] / window["steps"],
                                       "train/tok_s": window["tokens"] / max(window["s"], 1e-9),
                                       "tokens_seen": tokens_seen, "train_s": train_s,
                                       **{f"held_out/{k}": v for k, v in held.items()}})
            window = {"loss": 0.0, "steps": 0, "tokens": 0, "s": 0.0}
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            spec.training = {"steps": step, "tokens_seen": tokens_seen, "train_s": round(train_s, 1),
                             "data": data_info, "held_out": held, "lr": cfg.lr}
            save_head(folder, head, spec)
            save_state(folder, head, optimizer, step, {"tokens_seen": tokens_seen, "train_s": train_s})
    bar.close()
    trainable = sum(p.numel() for p in head.parameters() if p.requires_grad)
    return {"steps": step, "tokens_seen": tokens_seen, "train_s": train_s, "data/sequences": len(dataset.train),
            "data/held_out": len(dataset.held_out), "data/answer_tokens": dataset.tokens(),
            "data/generation_s": dataset.generation_s, "vocab_size": len(vocab) if vocab else full,
            "trainable_params": trainable, **{f"held_out/{k}": v for k, v in held.items()}}


def _replay_metrics(previous_dir: Path, step: int, tracker) -> None:
    """The killed run's curve up to its checkpoint, so the resumed run holds one whole curve."""
    from decodelab.tracking.run_folder import RunFolder

    for row in RunFolder(previous_dir).metrics():
        at = int(row.pop("step", 0))
        if at <= step:
            tracker.log_metrics(at, row)
