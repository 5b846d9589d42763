"""Self-distillation data for draft heads: prompts, the target's own answers, and its features over them.

A head is trained to predict what *this* target says next, so the answers come from the target itself (greedy:
exactly what greedy decoding verifies). The prompts are a task's (``task=...``, e.g. a user's jsonl) or, without
one, written by the target itself, Magpie-style (Xu et al. 2024): the chat template up to the open user turn is
sampled, and what the model writes there is a user prompt from its own chat distribution. No PyPI package on
this machine ships an instruction dataset that is not also an evaluation set, and the built-in tasks' prompts
are what the heads are evaluated on, so they are refused as training data (:func:`check_disjoint`).

Features are recorded by teacher forcing over prompt + answer in batches (the final normed hidden state, what
the LM head reads and what :attr:`LMAdapter.features` gives the drafters), kept in float16. The data is cached
under ``model.cache_dir`` by a hash of everything that changes it, so heads of either kind on the same data share
one generation pass.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from decodelab.config import ModelConfig, TaskConfig
from decodelab.errors import UserError, notice
from decodelab.models.loading import LoadedModel
from decodelab.training.config import DataConfig

SELF_PREFIX = "self/"
_MARK = "\u2063DECODELAB_USER_TURN\u2063"  # a sentinel no template rewrites


@dataclass
class Example:
    """One training sequence: prompt ids then the target's answer ids, and the target's feature of every position."""

    id: str
    tokens: List[int]
    prompt_len: int
    features: torch.Tensor  # [len(tokens), hidden] float16

    @property
    def answer(self) -> List[int]:
        return self.tokens[self.prompt_len:]


@dataclass
class Dataset:
    train: List[Example]
    held_out: List[Example]
    source: str  # "self" or the task's name
    generation_s: float

    def vocabulary(self, size: Optional[int], eos: Sequence[int], full: int) -> Optional[List[int]]:
        """The drafter-side vocabulary: the ``size`` most frequent answer tokens of the training split (EOS
        always in; the lowest unseen ids when fewer distinct tokens were seen), sorted by id; None keeps the
        target's whole head. ``size`` was checked against ``full`` before the data was made (trainer.train)."""
        if size is None:
            return None
        counts = Counter(t for example in self.train for t in example.answer)
        keep = [t for t in eos if 0 <= t < full][:size]
        for token, _ in counts.most_common():
            if len(keep) >= size:
                break
            if token not in keep:
                keep.append(token)
        chosen = set(keep)
        keep += [t for t in range(full) if t not in chosen][: size - len(keep)]  # fewer distinct tokens than size
        return sorted(keep)

    def tokens(self) -> int:
        return sum(len(e.answer) for e in self.train)


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def evaluation_prompts() -> Dict[str, Tuple[str, Dict[str, str], Dict[str, str]]]:
    """Every built-in task (conf/task/*.yaml with no required path): name -> (name, {id: task}, {text: id})."""
    from omegaconf import OmegaConf

    from decodelab.experiment.compose import conf_dir
    from decodelab.tasks import load_task

    out = {}
    for path in sorted((conf_dir() / "task").glob("*.yaml")):
        raw = OmegaConf.load(path)
        if OmegaConf.is_missing(raw, "path"):
            continue  # a template (task=jsonl) needs a user's file: not an evaluation set of its own
        node = OmegaConf.merge(OmegaConf.structured(TaskConfig), raw)
        cfg: TaskConfig = OmegaConf.to_object(node)  # type: ignore[assignment]
        cfg.limit = cfg.categories = cfg.max_turns = None
        prompts = load_task(cfg)
        out[cfg.name] = (cfg.name, {p.id: cfg.name for p in prompts},
                         {normalized(turn): p.id for p in prompts for turn in p.turns})
    return out


def check_disjoint(prompts: Sequence[Tuple[str, str]], source: str) -> None:
    """Refuse (one line) a training prompt whose id or text is an evaluation prompt of a built-in task."""
    tasks = evaluation_prompts()
    for prompt_id, text in prompts:
        key = normalized(text)
        for name, ids, texts in tasks.values():
            if not prompt_id.startswith(SELF_PREFIX) and prompt_id in ids:
                raise UserError(f"task: training prompt id {prompt_id!r} of {source} is also a prompt id of the "
                                f"evaluation task {name}; training prompts must be disjoint from every built-in task's "
                                "(rename the ids, or drop those prompts)")
            if key and key in texts:
                raise UserError(f"task: training prompt {prompt_id!r} of {source} has the text of prompt "
                                f"{texts[key]!r} of the evaluation task {name}; training prompts must be disjoint "
                                "from every built-in task's")


def data_key(data: DataConfig, task: Optional[TaskConfig], model: ModelConfig, fingerprint: str) -> str:
    """What changes the data: the target's weights, the prompt source, the template settings, the data config."""
    import transformers

    fields = {"fingerprint": fingerprint, "data": asdict(data), "task": asdict(task) if task else None,
              "chat_template": model.chat_template, "system_prompt": model.system_prompt,
              "torch": torch.__version__, "transformers": transformers.__version__, "version": 1}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_dataset(data: DataConfig, task: Optional[TaskConfig], model: ModelConfig, loaded: LoadedModel,
                  eos: Sequence[int], progress: bool = True) -> Dataset:
    """The cached dataset for this config, or generate it (prompts, answers, features) and cache it."""
    key = data_key(data, task, model, loaded.fingerprint)
    path = Path(model.cache_dir).expanduser() / "train_data" / f"{key}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, weights_only=False)
            notice(f"training data {key}: reusing {path}")
            return stored
        except Exception as err:  # noqa: BLE001 - a torn cache file is regenerated, never trusted
            notice(f"training data {key}: {path} unreadable ({type(err).__name__}); generating it again")
    import time

    start = time.perf_counter()
    prompts = _prompts(data, task, model, loaded, eos, progress)
    examples = _answers(prompts, data, model, loaded, eos, progress)
    generator = torch.Generator().manual_seed(data.seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    held = max(1, round(len(examples) * data.held_out))
    if len(examples) - held < 1:
        raise UserError(f"data: {len(examples)} usable training sequences, too few to hold {held} out; give more "
                        "prompts (data.self_prompts, or a larger task)")
    dataset = Dataset(train=[examples[i] for i in order[held:]], held_out=[examples[i] for i in order[:held]],
                      source=task.name if task else "self", generation_s=time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dataset, tmp)
    tmp.replace(path)
    return dataset


def _prompts(data: DataConfig, task: Optional[TaskConfig], model: ModelConfig, loaded: LoadedModel,
             eos: Sequence[int], progress: bool) -> List[Tuple[str, List[int]]]:
    """(id, prompt ids) of every training prompt, checked disjoint from the evaluation prompts."""
    from decodelab.experiment.runner import encode_messages

    if task is not None:
        from decodelab.tasks import load_task

        items = [(p.id, p.turns[0]) for p in load_task(task)]
        source = f"task={task.name}"
    else:
        items = self_prompts(data, model, loaded, eos, progress)
        source = "the self-written prompts"
    check_disjoint(items, source)
    return [(pid, encode_messages(loaded.tokenizer, model, [{"role": "user", "content": text}])) for pid, text in items]


def user_header(tokenizer, model: ModelConfig) -> List[int]:
    """The chat template rendered up to the content of an open user turn (Magpie's pre-query template)."""
    if not (model.chat_template and getattr(tokenizer, "chat_template", None)):
        raise UserError(f"data: model {model.name} has no chat template to write its own prompts in; give a prompt "
                        "source instead (task=jsonl task.path=<your prompts.jsonl>)")
    messages = [{"role": "user", "content": _MARK}]
    if model.system_prompt:
        messages.insert(0, {"role": "system", "content": model.system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return tokenizer(text.split(_MARK)[0], add_special_tokens=False)["input_ids"]


def self_prompts(data: DataConfig, model: ModelConfig, loaded: LoadedModel, eos: Sequence[int],
                 progress: bool) -> List[Tuple[str, str]]:
    """``data.self_prompts`` distinct user prompts sampled from the target's open user turn."""
    from tqdm import tqdm

    tokenizer, lm = loaded.tokenizer, loaded.model
    header = torch.tensor([user_header(tokenizer, model)], device=lm.device)
    generator_seed = data.seed
    seen, out = set(), []
    bar = tqdm(total=data.self_prompts, desc="writing prompts", unit="prompt", disable=not progress, dynamic_ncols=True)
    for attempt in range(1 + 4 * data.self_prompts // data.batch_size):
        torch.manual_seed(generator_seed + attempt)
        batch = header.expand(data.batch_size, -1)
        with torch.inference_mode():
            written = lm.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                  temperature=data.prompt_temperature, top_p=data.prompt_top_p, top_k=0,
                                  max_new_tokens=data.prompt_tokens, eos_token_id=list(eos),
                                  pad_token_id=list(eos)[0])
        for row in written[:, header.shape[1]:].tolist():
            text = tokenizer.decode(_until(row, eos), skip_special_tokens=True).strip()
            key = normalized(text)
            if len(key.split()) < 3 or key in seen:
                continue
            seen.add(key)
            out.append((f"{SELF_PREFIX}{len(out):05d}", text))
            bar.update(1)
            if len(out) >= data.self_prompts:
                bar.close()
                return out
    bar.close()
    if len(out) < 2:
        raise UserError(f"data: model {model.name} wrote {len(out)} usable prompts of its own; give a prompt source "
                        "(task=jsonl task.path=...)")
    notice(f"data.self_prompts: the target wrote {len(out)} distinct prompts of {data.self_prompts} asked")
    return out


def _until(row: List[int], eos: Sequence[int]) -> List[int]:
    """``row`` cut after its first EOS (kept: a head learns when the target stops)."""
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


def _answers(prompts: List[Tuple[str, List[int]]], data: DataConfig, model: ModelConfig, loaded: LoadedModel,
             eos: Sequence[int], progress: bool) -> List[Example]:
    """The target's answers (batched, left padded) and its features over prompt + answer (teacher forcing)."""
    from tqdm import tqdm

    lm, pad = loaded.model, list(eos)[0]
    examples: List[Example] = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][1]))  # similar lengths: little padding
    bar = tqdm(total=len(prompts), desc="answering", unit="prompt", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(order), data.batch_size):
        batch = [prompts[i] for i in order[start:start + data.batch_size]]
        width = max(len(ids) for _, ids in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (_, prompt) in enumerate(batch):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        torch.manual_seed(data.seed + start)
        sampling = dict(do_sample=True, temperature=data.answer_temperature, top_k=0, top_p=1.0) \
            if data.answers == "sample" else dict(do_sample=False)
        with torch.inference_mode():
            out = lm.generate(ids.to(lm.device), attention_mask=mask.to(lm.device), max_new_tokens=data.max_new_tokens,
                              eos_token_id=list(eos), pad_token_id=pad, **sampling)
        answers = [_until(row, eos) for row in out[:, width:].tolist()]
        sequences = [(pid, prompt + answer, len(prompt)) for (pid, prompt), answer in zip(batch, answers) if answer]
        for (pid, tokens, prompt_len), features in zip(sequences, teacher_features(lm, [s[1] for s in sequences], pad)):
            examples.append(Example(pid, tokens, prompt_len, features))
        bar.update(len(batch))
    bar.close()
    return examples


def teacher_features(lm, sequences: List[List[int]], pad: int) -> List[torch.Tensor]:
    """The target's final normed hidden state of every position of each sequence (one right-padded batch)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    with torch.inference_mode():
        hidden = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).last_hidden_state
    return [hidden[row, : len(tokens)].to(torch.float16).cpu() for row, tokens in enumerate(sequences)]
