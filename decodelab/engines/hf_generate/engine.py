"""engine=hf_generate: the run's prompts through ``transformers.generate`` on the very model decodelab loaded.

Config mapping (refusals in :func:`config.check_run`): drafter=none is plain ``generate``; prompt_lookup is
``prompt_lookup_num_tokens`` / ``max_matching_ngram_size``; draft_model is ``assistant_model`` with a constant
schedule of ``length.k`` candidates (transformers' confidence stop off); layer_skip is ``assistant_early_exit``
at ``exit_layer``. Sampling fields map one to one; the seed seeds torch's global generator before each call.

Metric mapping. transformers reports no steps, so they are observed: a forward pre-hook on the target sees
every forward's input length, and a streamer sees every commit (its ``put`` after each forward).
- A verification step is one target forward after the first: ``drafted`` = its input length - 1 (the root
  and the candidates), ``accepted`` = tokens committed by the next ``put`` - 1, bonus 1. Assisted generation
  has no separate prefill: its first forward runs the prompt *and* the first candidates, so that forward is
  a step too (drafted = its length - prompt length); plain generate's first forward is the prefill (no step).
  tau = (accepted + bonus) / steps is then decodelab's definition.
- TTFT is the time to the first commit; ``verify_s`` a step's forward-to-commit time; ``draft_s`` the time
  between the previous commit and the forward (candidate generation and transformers' overhead).
- ``draft_forwards``: forwards inside the candidate generator (the assistant model's, or the target's own
  early-exit passes).
"""

from __future__ import annotations

import copy
import time
from typing import List, Optional, Sequence

import torch

from decodelab.decoding.lm import synchronize
from decodelab.decoding.types import Generation, StepRecord
from decodelab.engines.base import Engine, Request, cut
from decodelab.engines.hf_generate.config import HFGenerateConfig, check_run, generate_options


class Probe:
    """Events of one ``generate`` call: target forwards (input length), commits (token count), draft forwards."""

    def __init__(self, model, assistant=None):
        self.model = model
        self.events: List[tuple] = []
        self.draft_forwards = 0
        self.drafting = False  # inside the candidate generator's get_candidates: forwards there are drafts
        self.prompt_seen = False
        self.hooks = [model.register_forward_pre_hook(self._target, with_kwargs=True)]
        if assistant is not None:
            self.hooks.append(assistant.register_forward_pre_hook(self._draft, with_kwargs=True))
        # The candidate generator is wrapped on this instance only (removed in close): early exit drafts with
        # the target module itself, so only the phase tells a draft forward from a verification.
        original = model._get_candidate_generator

        def candidate_generator(*args, **kwargs):
            generator = original(*args, **kwargs)
            get_candidates = generator.get_candidates

            def observed(*a, **k):
                self.drafting = True
                try:
                    return get_candidates(*a, **k)
                finally:
                    self.drafting = False

            generator.get_candidates = observed
            return generator

        model._get_candidate_generator = candidate_generator

    def _target(self, _module, args, kwargs):
        if self.drafting:  # early exit (layer_skip): the target's own shallow pass drafts
            self.draft_forwards += 1
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.events.append(("forward", int(ids.shape[-1]), time.perf_counter()))

    def _draft(self, _module, _args, _kwargs):
        self.draft_forwards += 1

    # the streamer interface (transformers.generation.streamers.BaseStreamer)
    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True  # generate puts the prompt first
            return
        synchronize(value.device)
        self.events.append(("commit", int(value.numel()), time.perf_counter()))

    def end(self) -> None:
        pass

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        del self.model._get_candidate_generator  # the class's method again

    def records(self, prompt_len: int, start: float) -> tuple:
        """(TTFT, steps, target forwards) from the events (module docstring)."""
        steps: List[StepRecord] = []
        forward: Optional[tuple] = None
        forwards = 0
        first_commit: Optional[float] = None
        last = start
        for kind, count, at in self.events:
            if kind == "forward":
                forward, forwards = (count, at), forwards + 1
                continue
            if forward is None:
                continue
            length, forward_at = forward
            first = first_commit is None
            drafted = length - prompt_len if first else length - 1
            if first:
                first_commit = at
            if not first or drafted > 0:  # plain generate's first forward is the prefill, not a step
                steps.append(StepRecord(max(drafted, 0), count - 1, 1, forward_at - last, at - forward_at,
                                        max(drafted, 0)))
            last, forward = at, None
        return (first_commit or last) - start, steps, forwards


class HFGenerateEngine(Engine):
    name = "hf_generate"
    config_class = HFGenerateConfig

    @classmethod
    def check(cls, run) -> None:
        super().check(run)
        check_run(run)

    def __init__(self, cfg: HFGenerateConfig, *, run, loaded, stop, **_parts):
        super().__init__(cfg, run=run, loaded=loaded, stop=stop)
        start = time.perf_counter()
        self.model = loaded.model
        self.assistant = None
        drafter = run.drafter
        if drafter.name == "draft_model":
            from decodelab.models.loading import load_model

            self.assistant = load_model(drafter.model, run.backend).model
        self.options = generate_options(run, int(self.model.config.num_hidden_layers))
        self.start_s = time.perf_counter() - start

    def _assistant_config(self):
        """The generation config the assistant reads its schedule from (the target's own for early exit)."""
        drafter = self.run.drafter
        if drafter.name not in ("draft_model", "layer_skip"):
            return None, None
        owner = self.assistant if self.assistant is not None else self.model
        saved = owner.generation_config
        config = copy.deepcopy(saved)
        config.num_assistant_tokens = drafter.length.k
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
        owner.generation_config = config
        return owner, saved

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request]) -> List[Generation]:
        out = []
        eos = sorted(self.stop.eos_ids)
        for request in requests:
            ids = torch.tensor([request.ids], dtype=torch.long, device=self.model.device)
            probe = Probe(self.model, self.assistant)
            owner, saved = self._assistant_config()
            torch.manual_seed(request.seed)
            extra = {"assistant_model": self.assistant} if self.assistant is not None else {}
            if self.stop.stop_strings:
                extra.update(stop_strings=self.stop.stop_strings, tokenizer=self.loaded.tokenizer)
            try:
                synchronize(self.model.device)
                start = time.perf_counter()
                sequences = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                                max_new_tokens=self.stop.max_new_tokens, eos_token_id=eos,
                                                pad_token_id=eos[0] if eos else None, streamer=probe,
                                                **self.options, **extra)
                synchronize(self.model.device)
                wall = time.perf_counter() - start
            finally:
                probe.close()
                if owner is not None:
                    owner.generation_config = saved
            tokens, reason = cut(sequences[0, ids.shape[1]:].tolist(), self.stop)
            ttft, steps, forwards = probe.records(len(request.ids), start)
            out.append(Generation(tokens=tokens, stop_reason=reason, ttft_s=ttft, wall_s=wall, steps=steps,
                                  target_forwards=forwards, draft_forwards=probe.draft_forwards))
        return out
