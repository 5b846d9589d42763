"""engine=vllm on a real vLLM (the .venv-vllm of ``make vllm``; skipped where vLLM is not installed): the same
composition served by vLLM's CPU build on tiny-random, greedy tokens equal to decodelab's AR, prompt lookup's
steps equal to decodelab's engine step for step, the counters adding up to vLLM's own, batches, the draft
model mapping, a clean shutdown, and one-line refusals.

tiny-random runs here with 2 heads (head size 32): vLLM's CPU attention has no kernel for the default 16.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="engine=vllm runs in the vllm venv: make test-vllm")

from decodelab.drafters.prompt_lookup import PromptLookupConfig, PromptLookupDrafter  # noqa: E402
from decodelab.engines.vllm import engine as vllm_engine  # noqa: E402
from tests.helpers.engines import decode  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EXE = str(Path(sys.executable).with_name("decodelab"))
TINY = ["model=tiny-random", "model.num_heads=2", "model.num_kv_heads=1"]
BASE = [*TINY, "task.limit=3", "task.max_new_tokens=40", "tracking=none", "baseline=fresh", "progress=false",
        "print_table=false"]


def step_pairs(samples):
    return Counter((s[0], s[1]) for sample in samples for s in sample["steps"])


def accepted_per_step(samples):
    return Counter(s[1] for sample in samples for s in sample["steps"])


def test_ngram_drafts_what_vllms_proposer_drafts():
    """drafter=ngram is vLLM's ngram algorithm: the same draft on random contexts as vLLM's own function."""
    from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens as vllm_ngram
    import numpy as np

    rng = random.Random(7)
    for sizes in [(1, 3), (2, 4), (1, 1)]:
        cfg = PromptLookupConfig(occurrence="earliest", num_speculative_tokens=5, min_ngram_size=sizes[0],
                                 max_ngram_size=sizes[1])
        for _ in range(400):
            vocab = rng.choice([2, 3, 5, 12])
            context = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
            ours = PromptLookupDrafter(cfg).propose(context).tokens
            theirs = vllm_ngram(np.array(context, dtype=np.int32), sizes[0], sizes[1], 4096, 5).tolist()
            assert ours == theirs, context


def test_ngram_steps_equal_decodelabs_engine_and_batches_reuse_the_engine(tmp_path):
    native, native_samples = decode(tmp_path, BASE, "drafter=ngram")
    served, samples = decode(tmp_path, BASE, "engine=vllm", "drafter=ngram")
    llm = vllm_engine._HELD[0][1]
    assert served["lossless_rate"] == 1.0  # token for token against decodelab's AR
    assert served["engine_start_s"] > 0
    # The same algorithm on the same tokens: the same steps accept the same tokens, so tau agrees exactly.
    # vLLM drafts k even where decodelab's engine cuts a draft to the budget's room (it verifies them), so
    # it may draft more, never less.
    assert accepted_per_step(samples) == accepted_per_step(native_samples)
    for key in ("mean_accepted_length", "verify_steps", "accepted_tokens"):
        assert served[key] == pytest.approx(native[key]), key
    assert served["drafted_tokens"] >= native["drafted_tokens"]
    assert served["acceptance_rate"] == pytest.approx(native["acceptance_rate"], rel=0.1)
    for sample in samples:
        assert len(sample["turns"]) + sum(s[1] + s[2] for s in sample["steps"]) >= sample["new_tokens"]
        assert sample["target_forwards"] == len(sample["steps"]) + len(sample["turns"])
        assert sample["batch_size"] == 1

    # vLLM's own global counters: one draft per drafted step, across all requests of a batch of 3.
    before = vllm_engine.counters(llm)
    batched, batch_samples = decode(tmp_path, BASE, "engine=vllm", "drafter=ngram", "task.concurrency=3")
    after = vllm_engine.counters(llm)
    assert vllm_engine._HELD[0][1] is llm and batched["engine_start_s"] == 0.0  # the held engine, reused
    assert batched["mean_batch_size"] == 3 and {s["batch"] for s in batch_samples} == {0}
    assert batched["lossless_rate"] == 1.0
    drafted_steps = sum(1 for sample in batch_samples for s in sample["steps"] if s[0] > 0)
    assert after["vllm:spec_decode_num_drafts"] - before["vllm:spec_decode_num_drafts"] == drafted_steps
    assert step_pairs(batch_samples) == step_pairs(samples)  # greedy batches decode the same tokens, same steps
    assert batched["batch_throughput_tok_s"] > 0


def test_decodelabs_own_prompt_lookup_inside_vllm_takes_decodelabs_steps(tmp_path):
    """engine.proposer=decodelab: decodelab's prompt lookup (its default latest-occurrence rule, which vLLM's
    ngram lacks) drafts inside vLLM's worker; vLLM verifies. Same algorithm, same code: the same steps accept
    the same tokens as on decodelab's engine, one request at a time and in a batch of 3 (one drafter per row)."""
    native, native_samples = decode(tmp_path, BASE, "drafter=prompt_lookup")
    served, samples = decode(tmp_path, BASE, "engine=vllm", "engine.proposer=decodelab", "drafter=prompt_lookup")
    assert served["lossless_rate"] == 1.0
    assert accepted_per_step(samples) == accepted_per_step(native_samples)
    for key in ("mean_accepted_length", "verify_steps", "accepted_tokens"):
        assert served[key] == pytest.approx(native[key]), key
    assert served["drafted_tokens"] >= native["drafted_tokens"] > 0
    batched, batch_samples = decode(tmp_path, BASE, "engine=vllm", "engine.proposer=decodelab",
                                    "drafter=prompt_lookup", "task.concurrency=3")
    assert batched["engine_start_s"] == 0.0 and batched["mean_batch_size"] == 3
    assert step_pairs(batch_samples) == step_pairs(samples)


@pytest.mark.slow
def test_smollm2_through_vllm_is_lossless_with_decodelabs_steps(tmp_path):
    """The real model (fp32): vLLM's greedy tokens are decodelab's AR's, and its ngram steps accept what
    decodelab's do."""
    real = ["model=smollm2-135m", "task.limit=2", "task.max_new_tokens=32", "tracking=none", "baseline=fresh",
            "progress=false", "print_table=false"]
    native, native_samples = decode(tmp_path, real, "drafter=ngram")
    served, samples = decode(tmp_path, real, "engine=vllm", "drafter=ngram")
    assert native["lossless_rate"] == served["lossless_rate"] == 1.0
    assert accepted_per_step(samples) == accepted_per_step(native_samples)
    assert served["mean_accepted_length"] == pytest.approx(native["mean_accepted_length"])


def sampling_runner(tmp_path, *overrides):
    """(loaded target, a runner on engine=vllm, the prompt's ids, the EOS id) for drawing many seeded requests."""
    from decodelab.experiment.compose import compose, to_run_config
    from decodelab.experiment.runner import PromptRunner
    from decodelab.models.loading import load_model

    run = to_run_config(compose([*BASE, "engine=vllm", *overrides, f"output_dir={tmp_path}"]))
    loaded = load_model(run.model, run.backend)
    runner = PromptRunner(loaded, run)
    ids = runner.encode([{"role": "user", "content": "Name three colours."}])
    return loaded, runner, ids, sorted(runner.stop.eos_ids)[0]


def test_sampling_fields_map_onto_vllms_sampler(tmp_path):
    """temperature, top-k and top-p through vLLM: 4000 first tokens, one per seed, follow decodelab's own
    filtered distribution of the target (chi-square and total variation, tests/helpers/statistics)."""
    import torch

    from decodelab.engines.base import Request
    from tests.helpers.statistics import assert_follows

    loaded, runner, ids, eos = sampling_runner(tmp_path, "strategy=top_p", "strategy.temperature=0.8",
                                               "strategy.top_k=16", "strategy.top_p=0.9", "task.max_new_tokens=1")
    generations = runner.engine.generate([Request(ids, seed) for seed in range(4000)])
    firsts = [g.tokens[0] if g.tokens else eos for g in generations]  # an EOS first token is cut by the stop rule
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits[0, -1].float()
    probs = runner.pipeline.probs(logits[None])[0]
    assert (probs > 0).sum() > 4  # a real choice among several tokens
    assert_follows(firsts, probs, max_tv=0.06)
    again = runner.engine.generate([Request(ids, seed) for seed in range(20)])
    assert [g.tokens for g in again] == [g.tokens for g in generations[:20]]  # a seed per request reproduces


def test_speculative_sampling_through_vllm_keeps_the_targets_distribution(tmp_path):
    """strategy=top_p with drafter=ngram: after the first token, n-gram drafts are verified by vLLM's rejection
    sampler, over 4000 requests (a seed each). The pairs (first, second token) follow the target's own filtered
    joint distribution. A low temperature keeps the joint support small enough for 4000 draws. On tiny-random
    the drafts fall outside the target's support, so this checks rejection and the recovered token (no draft
    is accepted); drafter=draft_model with sampling is refused on vLLM's CPU build (it emitted pairs outside
    the support, even with the target as its own draft: README, Engines)."""
    import torch

    from decodelab.engines.base import Request
    from tests.helpers.statistics import assert_follows

    draft = ["drafter=ngram", "drafter.min_ngram_size=1", "drafter.max_ngram_size=1", "drafter.num_speculative_tokens=2"]
    loaded, runner, ids, eos = sampling_runner(tmp_path, *draft, "strategy=top_p", "strategy.temperature=0.03",
                                               "strategy.top_p=0.8", "task.max_new_tokens=3")
    generations = runner.engine.generate([Request(ids, seed) for seed in range(4000)])
    # An EOS is cut by the stop rule: a missing token is the EOS that ended the answer.
    pairs = [(list(g.tokens) + [eos, eos])[:2] for g in generations]
    with torch.no_grad():
        first = runner.pipeline.probs(loaded.model(torch.tensor([ids])).logits[0, -1:].float())[0]
        joint = torch.zeros(first.numel(), first.numel(), dtype=torch.float64)
        for token in first.nonzero().flatten().tolist():
            if token == eos:
                joint[eos, eos] = first[eos]
                continue
            logits = loaded.model(torch.tensor([ids + [token]])).logits[0, -1:].float()
            joint[token] = first[token] * runner.pipeline.probs(logits)[0].double()
    assert 8 < (joint > 0).sum() <= 64  # a real choice of pairs, few enough cells for the test
    assert_follows([a * first.numel() + b for a, b in pairs], joint, max_tv=0.06)
    second = [g.steps[0] for g in generations if g.steps]  # the step that verified the second position
    assert sum(s.drafted for s in second) > 200  # the verifier saw drafts there (and rejected them)


def test_draft_model_that_is_the_target_accepts_every_token(tmp_path):
    summary, samples = decode(tmp_path, BASE, "engine=vllm", "drafter=draft_model", "model@drafter.model=tiny-random",
                              "drafter.model.num_heads=2", "drafter.model.num_kv_heads=1", "drafter.length.k=4")
    assert summary["lossless_rate"] == 1.0 and summary["acceptance_rate"] == 1.0
    for sample in samples:  # every step verified k = 4 and accepted them all, but the last of each turn (the budget)
        steps = [(s[0], s[1]) for s in sample["steps"]]
        assert all(d == a for d, a in steps) and steps.count((4, 4)) >= len(steps) - len(sample["turns"]) > 0
    assert all(sample["draft_forwards"] == sum(s[0] for s in sample["steps"]) for sample in samples)


def _processes_tagged(tag: str) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"DECODELAB_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_run_from_the_command_line_shuts_vllm_down(tmp_path):
    """drafter=none: plain vLLM equals decodelab's AR; at exit no process of the run (vLLM's engine core and
    its worker are children) is left."""
    tag = uuid.uuid4().hex
    out = tmp_path / "run"
    done = subprocess.run([EXE, "run", *BASE, "task.limit=2", "engine=vllm", f"output_dir={out}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "DECODELAB_TEST_TAG": tag})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lossless_rate"] == 1.0 and summary["engine_start_s"] > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(sample["target_forwards"] == sample["new_tokens"] for sample in samples)
    assert _processes_tagged(tag) == []
    assert not list(Path("/tmp").glob(f"*{tag}*"))


def test_sigterm_while_vllm_starts_leaves_no_process(tmp_path):
    """A run cancelled with SIGTERM (a scheduler's cancel) in the middle of vLLM's start-up takes its engine-core
    and worker processes with it."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen([EXE, "run", *BASE, "task.limit=1", "engine=vllm", f"output_dir={tmp_path}/run"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DECODELAB_TEST_TAG": tag})
    for line in proc.stderr:
        if "starting vLLM" in line:
            break
    deadline = time.monotonic() + 120
    while len(_processes_tagged(tag)) < 2 and time.monotonic() < deadline:  # the engine core has been spawned
        time.sleep(0.5)
    assert len(_processes_tagged(tag)) >= 2
    time.sleep(5)
    proc.terminate()
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    deadline = time.monotonic() + 60
    while _processes_tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_tagged(tag) == []


@pytest.mark.parametrize("overrides, words", [
    (["drafter=prompt_lookup"], ["drafter.occurrence", "engine=vllm", "occurrence=latest", "earliest",
                                 "engine.proposer=decodelab"]),
    (["engine.proposer=decodelab", "drafter=suffix"],
     ["drafter", "engine=vllm engine.proposer=decodelab", "drafter=suffix", "none, prompt_lookup"]),
    (["strategy=sample", "drafter=draft_model", "model@drafter.model=tiny-random"],
     ["strategy", "engine=vllm", "drafter=draft_model", "greedy"]),
    (["strategy=sample", "strategy.top_k=4", "drafter=ngram"],
     ["strategy.top_k", "engine=vllm", "drafter=prompt_lookup", "top_k=0", "drafter=none"]),
    (["engine.proposer=ngram"], ["engine.proposer", "vllm, decodelab", "'ngram'"]),
    (["drafter=token_recycling"], ["drafter", "engine=vllm", "drafter=token_recycling", "suffix", "draft_model"]),
    (["strategy=beam"], ["strategy", "engine=vllm", "strategy=beam", "greedy"]),
    (["strategy=sample", "strategy.typical_p=0.9"], ["strategy.typical_p", "engine=vllm"]),
    (["backend.kv_cache=static"], ["backend.kv_cache", "engine=vllm", "auto"]),
    (["strategy=min_p", "drafter=ngram"], ["strategy.min_p", "engine=vllm", "drafter=prompt_lookup", "min_p=0"]),
    (["drafter=draft_model", "model@drafter.model=tiny-random", "drafter.length.policy=ucb"],
     ["drafter.length.policy", "engine=vllm", "fixed"]),
    (["model.num_heads=4", "model.num_kv_heads=2"], ["model", "engine=vllm", "head size 16", "32, 64"]),
])
def test_what_vllm_cannot_serve_is_one_line_and_exit_2(tmp_path, overrides, words):
    done = subprocess.run([EXE, "run", *BASE, "engine=vllm", *overrides, f"output_dir={tmp_path}/r"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("decodelab: error: ") and all(w in line for w in words), line
    assert "Traceback" not in done.stderr
