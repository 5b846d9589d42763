"""Losses, batches, held-out accuracy and resumable optimisation of a draft head on self-distillation data.

Indexing (see :mod:`decodelab.models.heads`): f_t is the target's feature at position t, which predicts x_{t+1}.
Only positions that predict answer tokens are trained on (t >= prompt_len - 1): the prompt part is context.

- EAGLE: entry t reads (f_t, x_{t+1}) and predicts f_{t+1} (smooth L1) and, through the LM head rows, x_{t+2} (CE).
- Medusa: head k on f_t predicts x_{t+1+k} (CE, weighted decay^(k-1), as Medusa-1).

Every step's batch and noise are a function of (seed, step) alone, so a run resumed from a checkpoint takes
exactly the steps an uninterrupted one would: a kill loses only the steps since the last checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from decodelab.models.heads import EagleHead, Head, MedusaHeads, trained_state
from decodelab.training.config import HeadTrainConfig
from decodelab.training.data import Example

IGNORE = -100
STATE_FILE = "state.pt"


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] target ids (padding: 0)
    features: torch.Tensor  # [B, T, H] float32
    lengths: torch.Tensor  # [B]
    prompt_lens: torch.Tensor  # [B]

    @property
    def answer_tokens(self) -> int:
        return int((self.lengths - self.prompt_lens).sum())


def collate(examples: List[Example], device: torch.device) -> Batch:
    width = max(len(e.tokens) for e in examples)
    tokens = torch.zeros(len(examples), width, dtype=torch.long)
    features = torch.zeros(len(examples), width, examples[0].features.shape[-1])
    for row, example in enumerate(examples):
        tokens[row, : len(example.tokens)] = torch.tensor(example.tokens)
        features[row, : len(example.tokens)] = example.features.float()
    lengths = torch.tensor([len(e.tokens) for e in examples])
    prompt_lens = torch.tensor([e.prompt_len for e in examples])
    return Batch(tokens.to(device), features.to(device), lengths.to(device), prompt_lens.to(device))


def batch_indices(step: int, count: int, size: int, seed: int) -> List[int]:
    """The examples of optimisation step ``step`` (0-based): consecutive slices of one seeded permutation per epoch."""
    out: List[int] = []
    position = step * size
    while len(out) < size:
        epoch, offset = divmod(position, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = order[offset: offset + size - len(out)]
        out += take
        position += len(take)
    return out


def column_map(vocab: Optional[List[int]], full: int, device: torch.device) -> torch.Tensor:
    """Target id -> head column ([full]); ids outside the drafter vocabulary map to IGNORE."""
    if vocab is None:
        return torch.arange(full, device=device)
    columns = torch.full((full,), IGNORE, dtype=torch.long, device=device)
    columns[torch.tensor(vocab, device=device)] = torch.arange(len(vocab), device=device)
    return columns


def _positions(batch: Batch, ahead: int) -> torch.Tensor:
    """[B, T] mask of positions t that predict an answer token ``ahead`` places on: t >= P-1, t + ahead < L."""
    t = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)[None]
    return (t >= batch.prompt_lens[:, None] - 1) & (t + ahead < batch.lengths[:, None])


def _shifted(tokens: torch.Tensor, ahead: int) -> torch.Tensor:
    """tokens[:, t + ahead] at column t (IGNORE past the end)."""
    out = torch.full_like(tokens, IGNORE)
    if ahead < tokens.shape[1]:
        out[:, : tokens.shape[1] - ahead] = tokens[:, ahead:]
    return out


def _targets(tokens: torch.Tensor, mask: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    ids = columns[tokens.clamp(min=0)]
    return torch.where(mask & (tokens >= 0), ids, torch.full_like(ids, IGNORE))


def eagle_loss(head: EagleHead, batch: Batch, cfg: HeadTrainConfig, columns: torch.Tensor,
               noise: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """EAGLE's teacher-forced loss over entries t = 0..T-2 (entry t reads f_t, x_{t+1})."""
    inputs = batch.features[:, :-1]
    if cfg.feature_noise > 0:
        inputs = inputs + (torch.rand(inputs.shape, generator=noise, device=inputs.device) * 2 - 1) * cfg.feature_noise
    predicted, logits = head(inputs, batch.tokens[:, 1:])
    feature_mask = _positions(batch, 1)[:, :-1]
    token_mask = _positions(batch, 2)[:, :-1]
    targets = _targets(_shifted(batch.tokens, 2)[:, :-1], token_mask, columns)
    feature = nn.functional.smooth_l1_loss(predicted[feature_mask], batch.features[:, 1:][feature_mask])
    token = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    hits = (logits.argmax(-1) == targets) & (targets != IGNORE)
    return {"loss": cfg.feature_weight * feature + cfg.token_weight * token, "feature_loss": feature,
            "token_loss": token, "correct/1": hits.sum(), "positions/1": token_mask.sum()}


def medusa_loss(head: MedusaHeads, batch: Batch, cfg: HeadTrainConfig, columns: torch.Tensor,
                noise: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Medusa-1's loss: head k on f_t against x_{t+1+k}, only on positions that have that token."""
    rows = _positions(batch, 2)  # head 1 needs t + 2 < L
    features = batch.features[rows]
    logits = head(features)  # [N, K, V']
    out: Dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=features.device)
    weights = 0.0
    for k in range(1, head.num_heads + 1):
        mask = _positions(batch, 1 + k)[rows]
        targets = _targets(_shifted(batch.tokens, 1 + k)[rows], mask, columns)
        if (targets != IGNORE).any():
            loss = nn.functional.cross_entropy(logits[:, k - 1], targets, ignore_index=IGNORE)
            total = total + cfg.head_decay ** (k - 1) * loss
            out[f"token_loss/{k}"] = loss
        weights += cfg.head_decay ** (k - 1)
        hits = (logits[:, k - 1].argmax(-1) == targets) & (targets != IGNORE)
        out[f"correct/{k}"], out[f"positions/{k}"] = hits.sum(), mask.sum()
    out["loss"] = total / weights
    return out


def loss_of(head: Head, batch: Batch, cfg: HeadTrainConfig, columns: torch.Tensor,
            noise: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    return (eagle_loss if isinstance(head, EagleHead) else medusa_loss)(head, batch, cfg, columns, noise)


@torch.no_grad()
def evaluate(head: Head, examples: List[Example], cfg: HeadTrainConfig, columns: torch.Tensor,
             device: torch.device) -> Dict[str, float]:
    """Held-out loss and top-1 accuracy per head (EAGLE: its one-step prediction, teacher forced), over every
    position that has the token to predict (a token outside the drafter vocabulary counts as a miss)."""
    was_training = head.training
    head.eval()
    sums: Dict[str, float] = {}
    batches = 0
    for start in range(0, len(examples), cfg.batch_size):
        parts = loss_of(head, collate(examples[start:start + cfg.batch_size], device), cfg, columns)
        batches += 1
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    head.train(was_training)
    out = {key: sums[key] / batches for key in sums if not key.startswith(("correct/", "positions/"))}
    for key in sums:
        if key.startswith("correct/"):
            k = key.split("/")[1]
            out[f"top1/{k}"] = sums[key] / max(1.0, sums[f"positions/{k}"])
    return out


def learning_rate(step: int, cfg: HeadTrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer_for(head: Head, cfg: HeadTrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr,
                             weight_decay=cfg.weight_decay)


def train_step(head: Head, optimizer: torch.optim.Optimizer, batch: Batch, cfg: HeadTrainConfig,
               columns: torch.Tensor, step: int) -> Dict[str, float]:
    """One optimisation step; the noise is seeded by (seed, step) so a resumed run repeats it exactly."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, cfg)
    noise = torch.Generator(device=batch.features.device).manual_seed(cfg.seed * 7_919 + step)
    parts = loss_of(head, batch, cfg, columns, noise)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    nn.utils.clip_grad_norm_([p for p in head.parameters() if p.requires_grad], cfg.grad_clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in parts.items() if "loss" in k}


def save_state(folder: Path, head: Head, optimizer: torch.optim.Optimizer, step: int, extra: dict) -> None:
    """Everything a resumed run needs, in one file replaced atomically (a kill mid-save keeps the last one)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save({"step": step, "head": trained_state(head), "optimizer": optimizer.state_dict(), **extra}, tmp)
    tmp.replace(folder / STATE_FILE)


def load_state(folder: Path, head: Head, optimizer: torch.optim.Optimizer) -> Optional[dict]:
    """The saved state of ``folder`` loaded into head and optimizer; None when there is none (or it is torn)."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
        head.load_state_dict(state["head"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
    except Exception:  # noqa: BLE001 - an unreadable state means starting over, never a crash
        return None
    return state
