"""decodelab speculative decoding vs transformers.generate's own, on the same prompts, in one process.

Three contestants per prompt, order rotated prompt by prompt: decodelab with the drafter,
transformers.generate with its equivalent (prompt_lookup_num_tokens=... or assistant_model=...), and
decodelab autoregressive (the AR baseline). Prints tokens/s of each, the ratios, and checks that all
three produced the same tokens (greedy). Examples:

    .venv/bin/python benchmarks/spec_vs_generate.py --drafter prompt_lookup --categories summarization rag
    .venv/bin/python benchmarks/spec_vs_generate.py --drafter draft_model --model qwen2.5-coder-1.5b \\
        --draft-model qwen2.5-coder-0.5b --task humaneval --prompts 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from decodelab.experiment.compose import compose
from decodelab.config import DrafterConfig
from decodelab.experiment.compose import to_run_config
from decodelab.drafters.none import NoDrafter
from decodelab.decoding.engine import decode
from decodelab.experiment.fingerprint import environment_fingerprint
from decodelab.models.loading import load_model
from decodelab.experiment.runner import PromptRunner, eos_ids, setup_backend
from decodelab.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", choices=["prompt_lookup", "draft_model"], default="prompt_lookup")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--draft-model", default=None, help="model option for drafter=draft_model")
    parser.add_argument("--task", default="specbench-mini")
    parser.add_argument("--categories", nargs="*", default=None)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--k", type=int, default=10, help="tokens proposed per step (prompt lookup)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for decodelab")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    overrides = [f"model={args.model}", f"drafter={args.drafter}", f"task={args.task}", "tracking=none",
                 "output_dir=unused", f"task.limit={args.prompts}", f"task.max_new_tokens={args.max_new_tokens}"]
    if args.categories:
        overrides.append(f"task.categories=[{','.join(args.categories)}]")
    if args.drafter == "prompt_lookup":
        overrides.append(f"drafter.num_speculative_tokens={args.k}")
    elif args.draft_model:
        overrides.append(f"model@drafter.model={args.draft_model}")
    run = to_run_config(compose(overrides + args.extra))
    setup_backend(run.backend)
    loaded = load_model(run.model, run.backend)
    runner = PromptRunner(loaded, run)
    prompts = [runner.encode([{"role": "user", "content": p.turns[0]}]) for p in load_task(run.task)]
    eos = eos_ids(loaded)
    hf_kwargs = ({"prompt_lookup_num_tokens": args.k, "max_matching_ngram_size": run.drafter.max_ngram_size}
                 if args.drafter == "prompt_lookup" else {"assistant_model": runner.drafter.draft.model})

    def ours(ids, drafter):
        runner.target.reset()
        return decode(runner.target, ids, pipeline=runner.pipeline, drafter=drafter, stop=runner.stop,
                      generator=torch.Generator()).tokens

    def transformers_generate(ids):
        input_ids = torch.tensor([ids])
        out = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                    max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=eos[0],
                                    **hf_kwargs)
        return out[0, len(ids):].tolist()

    contestants = {
        f"decodelab {args.drafter}": lambda ids: ours(ids, runner.drafter),
        f"transformers {args.drafter}": transformers_generate,
        "decodelab AR": lambda ids: ours(ids, NoDrafter(DrafterConfig())),
    }
    for fn in contestants.values():  # warm-up
        fn(prompts[0][:64])
    totals = {name: [0, 0.0] for name in contestants}
    agree = 0
    names = list(contestants)
    for i, ids in enumerate(prompts):
        produced = {}
        for name in names[i % 3:] + names[:i % 3]:
            start = time.perf_counter()
            produced[name] = contestants[name](ids)
            totals[name][1] += time.perf_counter() - start
            totals[name][0] += len(produced[name])
        agree += len({tuple(v) for v in produced.values()}) == 1
    rates = {name: t / s for name, (t, s) in totals.items()}
    ours_spec, theirs, ar = (rates[n] for n in names)
    print(f"target={args.model} drafter={args.drafter} draft={args.draft_model} task={args.task} "
          f"prompts={len(prompts)} max_new_tokens={args.max_new_tokens} threads={torch.get_num_threads()}")
    for name, (tokens, seconds) in totals.items():
        print(f"  {name:30s} {tokens:6d} tokens in {seconds:7.2f} s = {rates[name]:6.2f} tok/s")
    print(f"  decodelab {args.drafter} / transformers {args.drafter} = {ours_spec / theirs:.3f}x")
    print(f"  decodelab {args.drafter} / decodelab AR = {ours_spec / ar:.3f}x;  transformers {args.drafter} / "
          f"decodelab AR = {theirs / ar:.3f}x")
    print(f"  all three identical on {agree}/{len(prompts)} prompts")
    out = Path(args.out or f"benchmarks/results/spec_vs_generate_{args.drafter}_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "tok_s": rates, "agree": agree,
                               "fingerprint": environment_fingerprint(seeds={}, threads=torch.get_num_threads())},
                              indent=2, default=str))


if __name__ == "__main__":
    main()
