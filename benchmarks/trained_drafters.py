"""Trained drafters (EAGLE chain and tree, Medusa) beside the training-free ones on SmolLM2, specbench-mini.

One process, one loaded target; every contestant (AR first among them) decodes each prompt in turn, the order
rotating from prompt to prompt, so machine noise falls on all alike. Per contestant and category: speedup over the
AR decode of the same prompt (bootstrap 95% interval over prompts), tau (tokens per target forward, the bonus
counted once), alpha, losslessness (tokens equal to AR's). Then the draft cost in target-forward units: one EAGLE
decoder step and one Medusa heads call against one target step, with the trained (trimmed) vocabulary and with
the target's whole one. The memory bandwidth and the fingerprint are measured in the same run.

    .venv/bin/python benchmarks/trained_drafters.py --eagle runs/train/<eagle run> [<another>] --medusa runs/train/<medusa run>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_roofline import bandwidth_gb_s, weight_bytes  # noqa: E402

from decodelab.decoding.lm import LMAdapter  # noqa: E402
from decodelab.drafters.feature_heads import checkpoint_folder  # noqa: E402
from decodelab.experiment.compose import compose, to_run_config  # noqa: E402
from decodelab.experiment.fingerprint import environment_fingerprint  # noqa: E402
from decodelab.experiment.metrics import summarize  # noqa: E402
from decodelab.experiment.runner import PromptRunner, setup_backend  # noqa: E402
from decodelab.models.heads import HeadSpec, build_head, load_head  # noqa: E402
from decodelab.models.loading import load_model  # noqa: E402
from decodelab.tasks import load_task  # noqa: E402

CATEGORIES = ["conversation", "translation", "summarization", "qa", "math_reasoning", "rag"]


def contestants(eagles: list, medusa: str) -> dict:
    table = {"ar": ["drafter=none"]}
    for i, eagle in enumerate(eagles):
        name = "eagle" if i == 0 else f"eagle{i + 1}"
        table[f"{name}_chain"] = ["drafter=eagle", f"drafter.checkpoint={eagle}", "drafter.tree=false"]
        table[f"{name}_tree"] = ["drafter=eagle", f"drafter.checkpoint={eagle}"]
    table["medusa"] = ["drafter=medusa", f"drafter.checkpoint={medusa}"]
    table.update({"prompt_lookup": ["drafter=prompt_lookup"], "suffix": ["drafter=suffix"],
                  "token_recycling": ["drafter=token_recycling"]})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eagle", required=True, nargs="+", help="EAGLE training run folders or checkpoints")
    parser.add_argument("--medusa", required=True, help="Medusa training run folder or checkpoint")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-category", type=int, default=3, help="prompts per category (specbench-mini has 5)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--only", nargs="*", default=None, help="a subset of the contestants (ar always runs)")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for one contestant: NAME:key=value")
    parser.add_argument("--out", default="benchmarks/results/trained_drafters.json")
    args = parser.parse_args()

    common = [f"model={args.model}", "strategy=greedy", "tracking=none", "baseline=none", "progress=false",
              f"task.max_new_tokens={args.max_new_tokens}", "output_dir=unused"]
    table = contestants(args.eagle, args.medusa)
    names = ["ar"] + [n for n in table if n != "ar" and (args.only is None or n in args.only)]
    extra = {}
    for item in args.extra:
        name, override = item.split(":", 1)
        extra.setdefault(name, []).append(override)
    runs = {n: to_run_config(compose(common + table[n] + extra.get(n, []))) for n in names}
    setup_backend(runs["ar"].backend)
    loaded = load_model(runs["ar"].model, runs["ar"].backend)
    gb_s = bandwidth_gb_s(torch.device("cpu"))
    runners = {n: PromptRunner(loaded, runs[n]) for n in names}
    prompts = [p for c in CATEGORIES for p in load_task(runs["ar"].task) if p.category == c]
    prompts = [p for c in CATEGORIES for p in [q for q in prompts if q.category == c][: args.per_category]]
    records = {n: [] for n in names}
    for i, prompt in enumerate(prompts):
        order = names[i % len(names):] + names[: i % len(names)]
        done = {n: runners[n].run_prompt(i, prompt) for n in order}
        ar = done["ar"]
        for n in names:
            record = done[n]
            if n != "ar":
                record["baseline"] = {"new_tokens": ar["new_tokens"], "wall_s": ar["wall_s"],
                                      "ttft_s_total": ar["ttft_s"], "turns": 1, "cached": False}
                record["lossless"] = record["output_tokens"] == ar["output_tokens"]
            records[n].append(record)
        print(f"[{i + 1}/{len(prompts)}] {prompt.category}: " + ", ".join(
            f"{n} {done[n]['tok_s']:.1f}" for n in names) + " tok/s", flush=True)
    gb_s_after = bandwidth_gb_s(torch.device("cpu"))
    summaries = {n: summarize(records[n]) for n in names}
    costs = draft_costs(loaded, args.eagle[0], args.medusa)
    floor_ms = weight_bytes(loaded.model) / (max(gb_s, gb_s_after) * 1e9) * 1e3
    fingerprint = environment_fingerprint(seeds={"backend": runs["ar"].backend.seed}, threads=torch.get_num_threads())
    print_results(summaries, names[1:], costs, gb_s, gb_s_after, floor_ms, fingerprint)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "bandwidth_gb_s": [gb_s, gb_s_after],
                                          "floor_ms": floor_ms, "draft_costs": costs, "summaries": summaries,
                                          "fingerprint": fingerprint}, indent=1, default=str))


def _median_ms(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def draft_costs(loaded, eagle: str, medusa: str, context: int = 256) -> dict:
    """One draft step of each head, in one-token target steps (both at ``context`` cached tokens)."""
    ids = [(100 + i) % loaded.model.config.vocab_size for i in range(context)]
    target = LMAdapter(loaded.model, cache="static")
    target.reserve(context + 64)

    def target_step():
        target.crop(context)
        target.forward([42])

    target.forward(ids)
    step_ms = _median_ms(target_step)
    out = {"target_step_ms": step_ms}
    feature = target.features[-1:]
    for kind, path in (("eagle", eagle), ("medusa", medusa)):
        trained, spec = load_head(checkpoint_folder(path), loaded.model, loaded.fingerprint, kind=kind)
        whole = build_head(HeadSpec(**{**spec.__dict__, "vocab": None}), loaded.model).eval()
        for label, head in (("trimmed", trained), ("full", whole)):
            if kind == "eagle":
                lm = LMAdapter(head.decoder, cache="static")
                lm.reserve(context + 64)
                lm.forward(ids, embeds=head.fuse(target.features.expand(context, -1), torch.tensor(ids)))
                vector = head.fuse(feature, torch.tensor([42]))

                def draft_step(lm=lm, vector=vector):
                    lm.crop(context)
                    lm.forward([42], embeds=vector)
            else:
                def draft_step(head=head):
                    head(feature)
            ms = _median_ms(draft_step)
            vocab = len(spec.vocab) if label == "trimmed" and spec.vocab else loaded.model.config.vocab_size
            out[f"{kind}/{label}"] = {"vocab": vocab, "ms": ms, "target_steps": ms / step_ms}
    return out


def print_results(summaries, names, costs, gb_s, gb_s_after, floor_ms, fingerprint) -> None:
    print(f"\nmachine: {fingerprint.get('cpu_model')}, {fingerprint.get('cpu_affinity')} cores, torch "
          f"{fingerprint.get('torch_version') or torch.__version__}, git {str(fingerprint.get('git_commit'))[:10]}")
    print(f"bandwidth {gb_s:.1f} GB/s (after: {gb_s_after:.1f}); weight floor of one step {floor_ms:.1f} ms; "
          f"measured target step {costs['target_step_ms']:.1f} ms ({costs['target_step_ms'] / floor_ms:.2f}x the floor)")
    ar = summaries["ar"]
    print(f"AR: {ar.get('throughput_tok_s', float('nan')):.2f} tok/s overall")
    for n in names:
        s = summaries[n]
        print(f"\n== {n}")
        print(f"  {'category':15s} {'speedup':>8s} {'95% CI':>15s} {'tau':>6s} {'alpha':>6s} {'lossless':>8s} {'tok/s':>7s}")
        for label, suffix in [(c, f"/{c}") for c in CATEGORIES] + [("overall", "")]:
            get = lambda key: s.get(key + suffix, float("nan"))  # noqa: E731
            print(f"  {label:15s} {get('speedup'):8.2f} [{get('speedup_ci_low'):5.2f}, {get('speedup_ci_high'):5.2f}] "
                  f"{get('mean_accepted_length'):6.2f} {get('acceptance_rate'):6.2f} {get('lossless_rate'):8.2f} "
                  f"{get('throughput_tok_s'):7.2f}")
        print(f"  draft cost per step {s.get('draft_cost_per_step', float('nan')):.2f}, verify cost per step "
              f"{s.get('verify_cost_per_step', float('nan')):.2f} (AR steps); one draft forward "
              f"{s.get('draft_target_cost_ratio', float('nan')):.3f} AR steps")
    print("\ndraft step cost (one call, 256 cached tokens), in one-token target steps:")
    for key, value in costs.items():
        if isinstance(value, dict):
            print(f"  {key:16s} vocab {value['vocab']:6d}: {value['ms']:6.2f} ms = {value['target_steps']:.3f} target steps")


if __name__ == "__main__":
    main()
