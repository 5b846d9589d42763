"""What the trained-head drafters (medusa, eagle) share: finding and loading a checkpoint for this target, the
checks that the target can give them its features (and tree attention), and the draft as the engine ran it."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from decodelab.decoding.types import Draft
from decodelab.errors import ConfigError


def checkpoint_folder(path: str) -> Path:
    """The checkpoint folder itself, or the ``checkpoint/`` subfolder of a training run folder."""
    from decodelab.models.heads import SPEC_FILE

    folder = Path(path).expanduser()
    inner = folder / "checkpoint"
    if not (folder / SPEC_FILE).is_file() and (inner / SPEC_FILE).is_file():
        return inner
    return folder


def load_feature_head(kind: str, checkpoint: str, target, loaded, tree: Optional[str]) -> Tuple[object, object]:
    """The ``kind`` head of ``checkpoint`` for ``loaded`` on the target's device and dtype, and its spec. Refused in
    one line: a target that cannot give features (the dynamic cache), a tree on a target without tree attention
    (``tree`` names the setting that avoids it; None: no tree), and every refusal of ``load_head``."""
    from decodelab.models.heads import load_head

    if target is None or loaded is None:
        raise ConfigError("drafter", f"drafter={kind} needs the target model")
    try:
        target.check_features()
    except NotImplementedError as err:
        raise ConfigError("backend.kv_cache", f"drafter={kind} reads the target's features: {err}") from None
    if tree is not None:
        try:
            target.check_tree_support()
        except NotImplementedError as err:
            raise ConfigError("backend.kv_cache", f"drafter={kind} drafts a token tree, which needs tree attention "
                              f"in the target: {err}; or use {tree} (a chain)") from None
    head, spec = load_head(checkpoint_folder(checkpoint), loaded.model, loaded.fingerprint,
                           getattr(loaded, "name", "the target"), kind=kind)
    weight = loaded.model.get_output_embeddings().weight
    return head.to(device=weight.device, dtype=weight.dtype), spec


def verified(context: List[int], draft: Draft, tokens: Sequence[int], target) -> Optional[Tuple[Draft, object]]:
    """After the verification forward over ``tokens`` = [root] + draft: the draft as the engine ran it and a copy of
    the target's feature rows of that forward; None when they do not answer the proposal made at ``context``."""
    if len(tokens) == 0 or int(tokens[0]) != context[-1]:
        return None
    ran = as_run(draft, [int(t) for t in tokens[1:]])
    if ran is None:
        return None
    try:
        features = target.features
    except NotImplementedError:
        return None
    if features.ndim != 2 or features.shape[0] != len(tokens):
        return None
    return ran, features.detach().clone()


def as_run(draft: Draft, tokens: List[int]) -> Optional[Draft]:
    """``draft`` as the engine ran it (``tokens``): itself, or its cut by depth (engine.fit_draft); None: no match."""
    if draft.tokens == tokens:
        return draft
    if len(tokens) > len(draft):
        return None
    from decodelab.decoding.engine import draft_depth, fit_draft

    for depth in range(draft_depth(draft), -1, -1):
        cut = fit_draft(draft, depth)
        if cut.tokens == tokens:
            return cut
    return None
