"""drafter=draft_model with top-k branching (``drafter.branching`` > 1): a token tree grown by the draft
model one level per forward and verified in one target forward.

Greedy output must equal plain autoregressive decoding token for token; sampled output must follow the
target distribution (chi-square at a fixed context, with a power check that a known-wrong rule fails).
The draft models are the tiny target with noise added to its weights: they agree with it often, but
not always, so accepted paths run through every branch, not only the first.
"""

from __future__ import annotations

import copy

import pytest
import torch

from decodelab.decoding import tree
from decodelab.decoding.lm import LMAdapter
from decodelab.config import StrategyConfig
from decodelab.drafters.registry import drafter_config
from decodelab.drafters.draft_model import fit_vocab
from decodelab.decoding.engine import verify_step
from decodelab.errors import ConfigError
from decodelab.models.loading import LoadedModel
from decodelab.decoding.logits import LogitsPipeline
from tests.helpers.decoding import encode_chat
from tests.helpers.drafters import PROMPTS, ar_tokens, decode_with, draft_model_node, make_drafter, tiny_model
from tests.helpers.statistics import assert_follows, chi_square_pvalue, token_counts

pytestmark = pytest.mark.usefixtures("one_thread")


def noisy(loaded: LoadedModel, scale: float, seed: int = 0) -> LoadedModel:
    """A copy of ``loaded`` with Gaussian noise (``scale`` x each weight's std) on every weight matrix."""
    model = copy.deepcopy(loaded.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, name=f"noisy-{scale}", fingerprint=f"noisy-{scale}")


@pytest.fixture(scope="module")
def target():
    return tiny_model(num_layers=4, init_seed=0)


@pytest.fixture(scope="module")
def near(target):
    """Often right, often wrong at the first position: where a tree beats a chain."""
    return noisy(target, 0.2)


_AR = {}


def _ar_cached(loaded, ids, max_new_tokens=40):
    """Plain decoding of ``ids``, once per model, prompt and budget."""
    key = (id(loaded), tuple(ids), max_new_tokens)
    if key not in _AR:
        _AR[key] = ar_tokens(loaded, ids, max_new_tokens)
    return _AR[key]


def _tree(branching, k, **fields):
    return draft_model_node(branching=branching, length={"k": k, **fields.pop("length", {})}, **fields)


# --- greedy: lossless, shape, cost, cache ----------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("branching", [2, 4])
@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_tree_is_lossless(target, near, text, branching, k):
    ids = encode_chat(target.tokenizer, text)
    gen = decode_with(target, ids, make_drafter(target, _tree(branching, k), draft=near))
    assert gen.tokens == _ar_cached(target, ids)
    assert all(s.depth <= k and s.depth <= s.drafted <= branching * k for s in gen.steps)
    assert all(s.accepted <= s.depth for s in gen.steps)


def test_greedy_tree_with_an_unrelated_draft_is_lossless(target):
    ids = encode_chat(target.tokenizer, PROMPTS[1])
    other = {"num_layers": 1, "hidden_size": 32, "init_seed": 1}
    gen = decode_with(target, ids, make_drafter(target, draft_model_node(other, branching=3, length={"k": 3})))
    assert gen.tokens == _ar_cached(target, ids)


def test_branches_beat_the_chain_where_the_first_guess_fails(target, near):
    """Same draft model, same prompt: branching=4 accepts far more than the chain (fixed seeds, deterministic)."""
    ids = encode_chat(target.tokenizer, PROMPTS[1])
    accepted = {}
    for branching in (1, 4):
        gen = decode_with(target, ids, make_drafter(target, _tree(branching, 4), draft=near), 60)
        assert gen.tokens == _ar_cached(target, ids, 60)
        accepted[branching] = sum(s.accepted for s in gen.steps)
    assert accepted[4] >= accepted[1] + 10


@pytest.mark.parametrize("branching", [2, 4])
def test_target_as_its_own_draft_accepts_every_level(target, branching):
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    gen = decode_with(target, ids, make_drafter(target, _tree(branching, 4), draft=target))
    assert gen.tokens == _ar_cached(target, ids)
    assert gen.steps and all(s.accepted == s.depth > 0 for s in gen.steps)
    assert all(s.depth == 4 and s.drafted == 4 * branching for s in gen.steps[:-1])
    # One draft forward per level (catch-up + 3 levels), whatever the branching.
    assert gen.draft_forwards == 4 * len(gen.steps)


def test_tree_levels_are_top_k_and_branches_are_plain_greedy_chains(target, near):
    """Every branch equals the draft model's greedy continuation of its first token run without a cache
    (so the draft's tree attention, positions and level-by-level cache are right), branch 0 is the chain."""
    context = encode_chat(target.tokenizer, PROMPTS[1])
    drafter = make_drafter(target, _tree(3, 4), draft=near)
    draft = drafter.propose(context)
    assert draft.parents == [-1, -1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8] and draft.forwards == 4
    with torch.no_grad():
        root = near.model(torch.tensor([context])).logits[0, -1]
    assert [draft.tokens[i] for i in range(3)] == root.topk(3).indices.tolist()
    for leaf in tree.leaves(draft.parents):
        path = [draft.tokens[i] for i in tree.path_to(draft.parents, leaf)]
        with torch.no_grad():
            logits = near.model(torch.tensor([context + path[:-1]])).logits[0, len(context):]
        assert path[1:] == logits.argmax(-1).tolist()
    chain = make_drafter(target, _tree(1, 4), draft=near).propose(context)
    assert chain.tokens == [draft.tokens[i] for i in tree.path_to(draft.parents, 9)]
    assert draft.probs.shape == (12, target.model.config.vocab_size)


def test_draft_cache_keeps_only_the_accepted_path(target, near):
    """After each step the draft cache is the context plus the accepted path (keys/values as a fresh prefill
    would give: the next tree equals a fresh drafter's), and only the bonus (and an accepted leaf) is re-run."""
    ids = encode_chat(target.tokenizer, PROMPTS[1])
    drafter = make_drafter(target, _tree(3, 3), draft=near)
    fed = []
    forward = drafter.lm.forward
    drafter.lm.forward = lambda new, last_only=False: (fed.append(len(new)), forward(new, last_only))[1]
    propose = drafter.propose
    checked = []

    def checked_propose(context):
        draft = propose(context)
        assert drafter.lm.tokens[:len(context)] == list(context)
        if len(checked) < 6:
            fresh = make_drafter(target, _tree(3, 3), draft=near).propose(context)
            assert (fresh.tokens, fresh.parents) == (draft.tokens, draft.parents)
            checked.append(len(context))
        return draft

    drafter.propose = checked_propose
    gen = decode_with(target, ids, drafter, 40)
    assert gen.tokens == _ar_cached(target, ids)
    assert any(s.accepted >= 2 for s in gen.steps)  # paths through the cached tree were kept
    assert fed[0] == len(ids) + 1 and max(fed[1:]) <= 2
    assert len(checked) == 6


def test_heuristic_length_counts_depth_not_nodes(target):
    ids = encode_chat(target.tokenizer, PROMPTS[1])
    drafter = make_drafter(target, _tree(2, 2, length={"policy": "heuristic", "k_max": 8}), draft=target)
    gen = decode_with(target, ids, drafter, 60)
    assert [s.depth for s in gen.steps][:4] == [2, 4, 6, 8]
    assert [s.drafted for s in gen.steps][:4] == [4, 8, 12, 16]


def test_confidence_policy_stops_each_branch(target, near):
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    node = _tree(3, 4, length={"policy": "confidence", "k_max": 5, "threshold": 0.5})
    gen = decode_with(target, ids, make_drafter(target, node, draft=near))
    assert gen.tokens == _ar_cached(target, ids)
    assert all(s.depth <= 5 for s in gen.steps)


# --- sampling -------------------------------------------------------------------------------------

SAMPLE = StrategyConfig(name="sample", do_sample=True, temperature=0.5, top_k=6, seed=1)
DRAWS = 1500


def _emitted(target, draft, context, draws, drafter_hook=None):
    """Tokens emitted by ``draws`` verification steps at one context (drafter and verifier seeded once), the
    target distribution there and the mean accepted count. Trees of 3 branches, 2 deep."""
    pipeline = LogitsPipeline(SAMPLE)
    drafter = make_drafter(target, _tree(3, 2), pipeline=pipeline, draft=draft)
    if drafter_hook:
        drafter_hook(drafter, pipeline)
    drafter.reset(context)
    lm = LMAdapter(target.model)
    lm.prefill(context)
    lm.crop(len(context) - 1)
    generator = torch.Generator().manual_seed(2)
    out, accepted = [], 0
    for _ in range(draws):
        verdict, _ = verify_step(lm, drafter.propose(context), pipeline, generator, context)
        lm.crop(len(context) - 1)
        out.append(verdict.accepted + [verdict.bonus])
        accepted += len(verdict.accepted)
    with torch.no_grad():
        p = pipeline.probs(target.model(torch.tensor([context])).logits[0, -1].float())
    return out, p, accepted / draws, pipeline


@pytest.fixture(scope="module")
def small_pair():
    """One-layer target and a noisy copy: 5 ms per verified tree, and draft/target TV about 0.2 at the context."""
    small = tiny_model(num_layers=1, init_seed=0)
    return small, noisy(small, 0.2)


def test_sampled_tree_follows_the_target(small_pair):
    small, draft = small_pair
    context = encode_chat(small.tokenizer, PROMPTS[1])
    out, p1, accepted, pipeline = _emitted(small, draft, context, DRAWS)
    assert 0.5 < accepted < 1.5  # drafts are accepted and rejected: both branches of the rule run
    assert_follows([tokens[0] for tokens in out], p1, max_tv=0.06)
    # The first two tokens jointly ~ p(y1) p(y2 | y1); a step that emitted one token is completed by a plain draw.
    vocab = p1.numel()
    p2 = torch.zeros(vocab, vocab)
    with torch.no_grad():
        for y1 in p1.nonzero().flatten().tolist():
            p2[y1] = pipeline.probs(small.model(torch.tensor([context + [y1]])).logits[0, -1].float())
    g = torch.Generator().manual_seed(7)
    pairs = [t[0] * vocab + (t[1] if len(t) > 1 else int(torch.multinomial(p2[t[0]], 1, generator=g))) for t in out]
    assert_follows(pairs, p1[:, None] * p2, max_tv=0.12)  # 36 cells from 1.5k draws: the chi-square is the test


def test_statistical_check_catches_draft_probs_on_top_k_candidates(small_pair):
    """Power: giving the top-k candidates the draft distribution as their row (they are not draws from it)
    biases the output, and the same check sees it."""
    small, draft = small_pair

    def wrong_rows(drafter, pipeline):
        honest = drafter._candidates

        def candidates(logits, seen, first):
            q = pipeline.probs(fit_vocab(logits.float(), drafter.vocab))
            return [(token, q, confidence) for token, _, confidence in honest(logits, seen, first)]

        drafter._candidates = candidates

    context = encode_chat(small.tokenizer, PROMPTS[1])
    out, p, _, _ = _emitted(small, draft, context, 1200, wrong_rows)
    assert chi_square_pvalue(token_counts([tokens[0] for tokens in out], p.numel()), p) < 1e-3


def test_sampling_with_an_exact_draft_accepts_everything_and_is_reproducible(target):
    pipeline = LogitsPipeline(StrategyConfig(name="sample", do_sample=True, temperature=0.8, top_k=50, seed=4))
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    runs = []
    for _ in range(2):
        gen = decode_with(target, ids, make_drafter(target, _tree(3, 4), pipeline=pipeline, draft=target), 48, pipeline)
        assert sum(s.accepted for s in gen.steps) >= sum(s.depth for s in gen.steps) - 1
        runs.append(gen.tokens)
    assert runs[0] == runs[1] and (len(runs[0]) == 48 or gen.stop_reason == "eos")


# --- config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("node,message", [
    (draft_model_node(branching=0), r"^drafter.branching: must be in \[1, 64\], got 0$"),
    (draft_model_node(branching=2, retokenize=True), r"^drafter.branching: .*retokenize=true.*must be 1, got 2$"),
])
def test_bad_branching_is_one_line(node, message):
    with pytest.raises(ConfigError, match=message):
        drafter_config(node).validate("drafter")


def test_branching_needs_tree_attention(target):
    flex = tiny_model(num_layers=1, init_seed=3)
    flex.model.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="^drafter.branching: .*draft model.*flex_attention.*branching=1"):
        make_drafter(target, _tree(2, 3), draft=flex)
    make_drafter(target, _tree(1, 3), draft=flex)  # a chain needs no tree mask


def test_composed_config_runs_a_tree(tmp_path, monkeypatch):
    """drafter.branching from the command line, through the runner: samples carry the depth of each step."""
    import json

    from decodelab.experiment.compose import compose
    from decodelab.experiment.runner import run

    monkeypatch.setenv("DECODELAB_CACHE", str(tmp_path / "cache"))
    summary = run(compose(["model=tiny-random", "drafter=draft_model", "model@drafter.model=tiny-random",
                           "drafter.model.init_seed=0", "drafter.branching=3", "drafter.length.k=3", "tracking=none",
                           "task.limit=1", "task.max_new_tokens=12", f"model.cache_dir={tmp_path / 'cache'}"]),
                  output_dir=str(tmp_path / "run"))
    assert summary["lossless_rate"] == 1.0
    steps = [s for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
             for s in json.loads(line)["steps"]]
    assert steps and all(len(s) == 6 and s[5] <= 3 and s[0] <= 9 for s in steps)
    assert any(s[0] == 9 for s in steps) and summary["mean_draft_depth"] <= 3
    assert len(json.loads((tmp_path / "run" / "summary.json").read_text())["per_position_acceptance"]) == 3


# --- real model ------------------------------------------------------------------------------------

def _first_layers(loaded: LoadedModel, layers: int) -> LoadedModel:
    """A copy of ``loaded`` that keeps its first ``layers`` layers (then the final norm and LM head):
    an untrained but real draft model, right often enough to be worth a tree."""
    model = copy.deepcopy(loaded.model)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, name=f"first-{layers}", fingerprint=f"first-{layers}")


def _tau(gen) -> float:
    return (sum(s.accepted for s in gen.steps) + len(gen.steps)) / max(1, len(gen.steps))


@pytest.mark.slow
def test_smollm2_tree_drafts_are_lossless(smollm2_loaded):
    """SmolLM2 drafted by itself (every level accepted) and by its own first 20 of 30 layers, branching=3."""
    ids = encode_chat(smollm2_loaded.tokenizer, PROMPTS[0])
    reference = ar_tokens(smollm2_loaded, ids, 32)
    gen = decode_with(smollm2_loaded, ids, make_drafter(smollm2_loaded, _tree(3, 4), draft=smollm2_loaded), 32)
    assert gen.tokens == reference
    assert sum(s.accepted for s in gen.steps) >= 0.9 * sum(s.depth for s in gen.steps)
    shallow = _first_layers(smollm2_loaded, 20)
    taus = {}
    for branching in (1, 3):
        gen = decode_with(smollm2_loaded, ids, make_drafter(smollm2_loaded, _tree(branching, 4), draft=shallow), 32)
        assert gen.tokens == reference
        taus[branching] = _tau(gen)
    print(f"\nsmollm2 drafted by its first 20 layers: tau branching=1 {taus[1]:.2f}, branching=3 {taus[3]:.2f}")
