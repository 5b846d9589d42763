"""decodelab's autoregressive greedy loop vs transformers.generate on the same SmolLM2 prompts.

One process, one model, the two alternating prompt by prompt (order flipped every prompt) so that
drift in machine load hits both alike. Prints tokens/s of each and the ratio; checks that both
produced the same tokens. Usage:

    .venv/bin/python benchmarks/ar_vs_generate.py [--prompts 12] [--max-new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from decodelab.decoding.lm import LMAdapter
from decodelab.experiment.compose import compose
from decodelab.config import DrafterConfig, StrategyConfig
from decodelab.experiment.compose import to_run_config
from decodelab.drafters.none import NoDrafter
from decodelab.decoding.engine import decode
from decodelab.decoding.stop import StopCriteria
from decodelab.experiment.fingerprint import environment_fingerprint
from decodelab.models.loading import load_model
from decodelab.experiment.runner import PromptRunner, eos_ids, setup_backend
from decodelab.decoding.logits import LogitsPipeline
from decodelab.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/ar_vs_generate.json")
    args = parser.parse_args()

    run = to_run_config(compose([f"model={args.model}", "tracking=none", "output_dir=unused",
                                 "task.shuffle_seed=0", f"task.limit={args.prompts}"]))
    setup_backend(run.backend)
    loaded = load_model(run.model, run.backend)
    encoder = PromptRunner(loaded, run)
    prompts = [encoder.encode([{"role": "user", "content": p.turns[0]}]) for p in load_task(run.task)]
    eos = eos_ids(loaded)

    def ours(ids):
        stop = StopCriteria(loaded.tokenizer, eos, [], args.max_new_tokens)
        gen = decode(LMAdapter(loaded.model), ids, pipeline=LogitsPipeline(StrategyConfig()),
                     drafter=NoDrafter(DrafterConfig()), stop=stop, generator=torch.Generator())
        return gen.tokens

    def reference(ids):
        input_ids = torch.tensor([ids])
        out = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                    max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=eos[0])
        return out[0, len(ids):].tolist()

    ours(prompts[0]), reference(prompts[0])  # warm-up both paths
    totals = {"decodelab": [0, 0.0], "transformers": [0, 0.0]}
    mismatches = 0
    for repeat in range(args.repeats):
        for i, ids in enumerate(prompts):
            order = [("decodelab", ours), ("transformers", reference)]
            if (i + repeat) % 2:
                order.reverse()
            produced = {}
            for name, fn in order:
                start = time.perf_counter()
                tokens = fn(ids)
                totals[name][1] += time.perf_counter() - start
                totals[name][0] += len(tokens)
                produced[name] = tokens
            mismatches += produced["decodelab"] != produced["transformers"]

    rates = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    ratio = rates["decodelab"] / rates["transformers"]
    print(f"model={args.model} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} repeats={args.repeats} "
          f"threads={torch.get_num_threads()}")
    for name, (tokens, seconds) in totals.items():
        print(f"  {name:13s} {tokens:6d} tokens in {seconds:7.2f} s = {rates[name]:6.2f} tok/s")
    print(f"  ratio decodelab / transformers.generate = {ratio:.3f}x   (greedy outputs identical on "
          f"{len(prompts) * args.repeats - mismatches}/{len(prompts) * args.repeats} prompts)")
    result = {"args": vars(args), "tok_s": rates, "ratio": ratio, "mismatches": mismatches,
              "fingerprint": environment_fingerprint(seeds={"backend": run.backend.seed}, threads=torch.get_num_threads())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
