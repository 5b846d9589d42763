"""Trained draft heads over a frozen target: Medusa-1 heads and an EAGLE-style feature drafter.

Both read the target's *features*: the final normed hidden state of a position, the vector its LM head turns
into the next token's logits (:attr:`decodelab.decoding.lm.LMAdapter.features`). Both share the target's
frozen LM head, restricted to a drafter-side vocabulary (FR-Spec / VocabTrim): ``vocab`` lists the target ids
the head can propose (None: all), so a head's logits have ``len(vocab)`` columns and column i is target id
``vocab[i]``. On SmolLM2-135M the head is a fifth of the weights, which a drafter pays at every draft step.

- **Medusa** (Cai et al. 2024): head k (1..K) maps the feature f_t of position t to the logits of token t+1+k
  (the LM head itself gives t+1) through one residual block, ``f + SiLU(W_k f + b_k)``, then the LM head.
- **EAGLE** (Li et al. 2024): one decoder layer of the target's family over ``fc([f_t ; embed(x_{t+1})])``
  predicts f_{t+1}; its LM head logits predict x_{t+2}. It runs autoregressively on its own predicted
  features. The layer is a one-layer causal LM of the target's own architecture (its ``model.layers[0]``, a
  trained final norm, the LM head rows of ``vocab``), so drafting runs on the static forward with input
  vectors (``LMAdapter.forward(..., embeds=...)``), tree masks and crop-by-length included. The entry that
  reads (f_t, x_{t+1}) sits at position (and cache slot) t, in training and drafting alike.

A checkpoint is a folder: ``head.safetensors`` (the trained tensors only: never the target's embedding or LM
head) and ``head.json`` (:class:`HeadSpec`, naming the target by its weights fingerprint).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from decodelab.errors import UserError

KINDS = ("medusa", "eagle")
SPEC_FILE = "head.json"
WEIGHTS_FILE = "head.safetensors"


@dataclass
class HeadSpec:
    """What a checkpoint holds and which target it was trained for."""

    kind: str  # one of KINDS
    num_heads: int  # Medusa heads (EAGLE: 1)
    hidden_size: int
    target_name: str
    target_fingerprint: str  # LoadedModel.fingerprint of the target: its weights hash
    vocab: Optional[List[int]] = None  # drafter-side vocabulary (target ids); None: the target's whole head
    training: Dict[str, Any] = field(default_factory=dict)  # steps, tokens seen, data, held-out accuracy

    @property
    def vocab_size(self) -> Optional[int]:
        return None if self.vocab is None else len(self.vocab)


def head_rows(target, vocab: Optional[List[int]]) -> torch.Tensor:
    """The target's LM head weight [len(vocab) or vocab, hidden], detached (frozen, shared, never saved)."""
    weight = target.get_output_embeddings().weight.detach()
    if vocab is None:
        return weight
    return weight[torch.tensor(vocab, dtype=torch.long, device=weight.device)]


class MedusaHeads(nn.Module):
    """K residual blocks on the last feature; logits through the shared frozen LM head rows."""

    def __init__(self, hidden_size: int, num_heads: int, head: torch.Tensor):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        for block in self.blocks:  # zero init: every head starts as the LM head itself (Medusa's init)
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)
        self.register_buffer("head", head, persistent=False)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [..., K, len(vocab)]: head k's prediction for the token k + 1 places after the LM head's."""
        states = torch.stack([features + nn.functional.silu(block(features)) for block in self.blocks], dim=-2)
        return states @ self.head.T


class EagleHead(nn.Module):
    """fc over [feature ; token embedding] into one decoder layer of the target's family, with a trained norm and
    the frozen LM head rows. ``decoder`` is a one-layer causal LM that the static forward runs."""

    def __init__(self, target, head: torch.Tensor):
        super().__init__()
        config = copy.deepcopy(target.config)
        hidden = config.hidden_size
        config.num_hidden_layers = 1
        config.vocab_size = head.shape[0]
        config.tie_word_embeddings = False
        config.pad_token_id = None  # the target's pad id may lie outside the trimmed vocabulary
        config.layer_types = ["full_attention"] if getattr(config, "layer_types", None) else None
        from transformers import AutoModelForCausalLM

        decoder = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                   dtype=target.get_output_embeddings().weight.dtype)
        self.fc = nn.Linear(2 * hidden, hidden)
        self.decoder = decoder.to(head.device)
        # Initialised from the target's last layer and final norm: a start that already maps features to features.
        self.decoder.model.layers[0].load_state_dict(target.model.layers[-1].state_dict())
        self.decoder.model.norm.load_state_dict(target.model.norm.state_dict())
        with torch.no_grad():
            self.decoder.lm_head.weight.copy_(head)
            self.decoder.model.embed_tokens.weight.zero_()  # never read: the layer takes input vectors
        self.decoder.lm_head.weight.requires_grad_(False)
        self.decoder.model.embed_tokens.weight.requires_grad_(False)
        self._embed = [target.get_input_embeddings()]  # the target's (frozen, not a submodule: never saved)

    def fuse(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's input vectors [..., hidden] from features f_t and the ids x_{t+1} [...]."""
        embedded = self._embed[0](tokens).to(features.dtype)
        return self.fc(torch.cat([features, embedded], dim=-1))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced training pass over [batch, T] rows (row t reads f_t and x_{t+1}; padded rows are 0 in
        ``mask``): predicted features f_{t+1} [batch, T, hidden] and their logits [batch, T, len(vocab)]."""
        inputs = self.fuse(features, tokens)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None].expand(tokens.shape[0], -1)
        out = self.decoder.model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions)
        predicted = out.last_hidden_state
        return predicted, self.decoder.lm_head(predicted)


Head = Union[MedusaHeads, EagleHead]


def build_head(spec: HeadSpec, target) -> Head:
    """A fresh (untrained) head of ``spec`` on ``target``'s frozen LM head rows."""
    head = head_rows(target, spec.vocab)
    if spec.kind == "medusa":
        return MedusaHeads(spec.hidden_size, spec.num_heads, head)
    return EagleHead(target, head)


def trained_state(head: Head) -> Dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: those that train (the target's embedding and LM head rows never do)."""
    return {name: p.detach().contiguous() for name, p in head.named_parameters() if p.requires_grad}


def save_head(folder: Union[str, Path], head: Head, spec: HeadSpec) -> Path:
    """Write the checkpoint folder atomically enough for a kill mid-save: tensors first, the spec last."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.cpu() for k, v in trained_state(head).items()}, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    spec_tmp = folder / (SPEC_FILE + ".tmp")
    spec_tmp.write_text(json.dumps(asdict(spec), indent=1), encoding="utf-8")
    spec_tmp.replace(folder / SPEC_FILE)
    return folder


def read_spec(folder: Union[str, Path], key: str = "drafter.checkpoint") -> HeadSpec:
    """The spec of a checkpoint folder, or one UserError naming ``key`` when it is missing or corrupt."""
    folder = Path(folder)
    path = folder / SPEC_FILE
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{key}: no draft-head checkpoint at {folder} (needs {SPEC_FILE} and {WEIGHTS_FILE}; "
                        "train one with decodelab train-drafter)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        spec = HeadSpec(**data)
    except (ValueError, TypeError) as err:
        raise UserError(f"{key}: corrupt checkpoint {path}: {str(err).splitlines()[0]}") from None
    if spec.kind not in KINDS:
        raise UserError(f"{key}: corrupt checkpoint {path}: kind {spec.kind!r}, allowed: {', '.join(KINDS)}")
    return spec


def load_head(folder: Union[str, Path], target, fingerprint: str, target_name: str = "the target",
              kind: Optional[str] = None, key: str = "drafter.checkpoint") -> Tuple[Head, HeadSpec]:
    """The trained head of a checkpoint folder on ``target``. Refused in one line: a missing or corrupt
    checkpoint, a head of another kind than ``kind``, a head trained for another target (by fingerprint)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = read_spec(folder, key)
    if kind is not None and spec.kind != kind:
        raise UserError(f"{key}: {folder} holds a {spec.kind} head, drafter={kind} needs a {kind} one")
    if spec.target_fingerprint != fingerprint:
        raise UserError(f"{key}: the head in {folder} was trained for {spec.target_name} ({spec.target_fingerprint}), "
                        f"not for {target_name} ({fingerprint}); train one for this target with decodelab train-drafter")
    if spec.hidden_size != target.config.hidden_size:
        raise UserError(f"{key}: corrupt checkpoint {folder}: hidden size {spec.hidden_size}, the target has "
                        f"{target.config.hidden_size}")
    head = build_head(spec, target)
    try:
        state = load_file(str(folder / WEIGHTS_FILE), device=str(head_rows(target, None).device))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise UserError(f"{key}: corrupt checkpoint {folder / WEIGHTS_FILE}: {str(err).splitlines()[0]}") from None
    expected = trained_state(head)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
        missing = sorted(set(expected) ^ set(state)) or [k for k in expected if shapes[k] != tuple(expected[k].shape)]
        raise UserError(f"{key}: corrupt checkpoint {folder / WEIGHTS_FILE}: tensors do not match a {spec.kind} "
                        f"head ({', '.join(missing[:3])})")
    head.load_state_dict(state, strict=False)
    head.eval().requires_grad_(False)
    return head, spec
