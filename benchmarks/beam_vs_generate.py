"""decodelab beam search vs transformers.generate(num_beams=k, do_sample=False) on SmolLM2 over specbench-mini.

Both decode the same input ids, alternating prompt by prompt (the order flips every prompt), in one process:
the figure is how many prompts give identical tokens (the equality the strategy promises) and the throughput
ratio. Both run transformers' forward with a DynamicCache, batched over the beams, so the ratio measures the
search loop around it.

    .venv/bin/python benchmarks/beam_vs_generate.py [--beams 2 4] [--max-new-tokens 64] [--limit 30]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from decodelab.experiment.compose import compose, to_run_config
from decodelab.experiment.fingerprint import environment_fingerprint
from decodelab.experiment.runner import PromptRunner, eos_ids, setup_backend
from decodelab.models.loading import load_model
from decodelab.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--beams", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/beam_vs_generate.json")
    args = parser.parse_args()

    results = {"args": vars(args), "beams": {}}
    for beams in args.beams:
        run = to_run_config(compose([f"model={args.model}", "strategy=beam", f"strategy.num_beams={beams}",
                                     "tracking=none", "output_dir=unused", f"task.max_new_tokens={args.max_new_tokens}",
                                     f"task.limit={args.limit}"]))
        setup_backend(run.backend)
        loaded = load_model(run.model, run.backend)
        runner = PromptRunner(loaded, run)
        eos = eos_ids(loaded)
        rows = []
        for index, prompt in enumerate(load_task(run.task)):
            ids = runner.encode([{"role": "user", "content": prompt.turns[0]}])
            timed = {}
            for who in (("ours", "theirs") if index % 2 == 0 else ("theirs", "ours")):
                start = time.perf_counter()
                if who == "ours":
                    tokens = runner.strategy.generate(runner.target, ids, pipeline=runner.pipeline,
                                                      drafter=runner.drafter, stop=runner.stop,
                                                      generator=runner.generator_for(0)).tokens
                else:
                    x = torch.tensor([ids])
                    out = loaded.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                                num_beams=beams, max_new_tokens=args.max_new_tokens,
                                                eos_token_id=eos, pad_token_id=eos[0])
                    tokens = out[0, len(ids):].tolist()
                timed[who] = (tokens, time.perf_counter() - start)
            same = timed["ours"][0] == timed["theirs"][0]
            rows.append({"id": prompt.id, "category": prompt.category, "identical": same,
                         "tokens": len(timed["ours"][0]), "ours_s": timed["ours"][1], "theirs_s": timed["theirs"][1]})
            print(f"k={beams} prompt {prompt.id:>3} {prompt.category:<15} identical={same} "
                  f"ours {timed['ours'][1]:.2f}s transformers {timed['theirs'][1]:.2f}s", flush=True)
        identical = sum(r["identical"] for r in rows)
        ratio = sum(r["theirs_s"] for r in rows) / sum(r["ours_s"] for r in rows)
        print(f"k={beams}: identical {identical}/{len(rows)}, decodelab {ratio:.2f}x transformers' speed")
        results["beams"][beams] = {"identical": identical, "prompts": len(rows), "speed_ratio": ratio, "rows": rows}
    results["fingerprint"] = environment_fingerprint(seeds={}, threads=torch.get_num_threads())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
