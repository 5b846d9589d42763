"""drafter=eagle: an EAGLE-1 chain or an EAGLE-2 dynamic tree from a one-layer feature drafter.

Greedy output must equal plain autoregressive decoding (untrained and trained heads, full and trimmed drafter
vocabularies, drafts cut near max_new_tokens, caches that grow); sampled output must follow the target
distribution (chi-square at a fixed context). The draft cache holds exactly the teacher-forced entries of the
committed sequence on the target's real features (a deliberately broken catch-up fails that check), a head
trained on the target's own continuations gets tokens accepted, and bad checkpoints or values fail in one line.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decodelab.config import BackendConfig, StrategyConfig
from decodelab.decoding import tree
from decodelab.decoding.engine import decode, verify_step
from decodelab.decoding.lm import LMAdapter, common_prefix
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.stop import StopCriteria
from decodelab.drafters.eagle import EagleConfig, EagleDrafter
from decodelab.drafters.registry import REGISTRY, build_drafter, draft_length_drafters, drafter_config
from decodelab.errors import ConfigError, UserError
from decodelab.experiment.compose import compose, to_run_config
from decodelab.experiment.runner import eos_ids
from decodelab.models.heads import HeadSpec, build_head, save_head
from tests.helpers.decoding import encode_chat
from tests.helpers.drafters import GREEDY, PROMPTS, ar_tokens, tiny_model
from tests.helpers.statistics import assert_follows

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_TOKENS = 48


@pytest.fixture(scope="module")
def target():
    return tiny_model(num_layers=2, init_seed=0)


def spec_for(loaded, kind="eagle", vocab=None, fingerprint=None):
    return HeadSpec(kind, 3 if kind == "medusa" else 1, loaded.model.config.hidden_size, "tiny-random",
                    fingerprint or loaded.fingerprint, vocab=vocab)


def make_checkpoint(folder, loaded, *, vocab=None, kind="eagle", fingerprint=None):
    """An untrained checkpoint for ``loaded`` (EAGLE: the target's last layer behind a random fc)."""
    spec = spec_for(loaded, kind, vocab, fingerprint)
    return save_head(folder, build_head(spec, loaded.model), spec)


def reference_features(loaded, ids):
    """The target's features of every position of ``ids`` from one fresh teacher-forced pass."""
    with torch.no_grad():
        return loaded.model.model(input_ids=torch.tensor([list(ids)])).last_hidden_state[0]


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    """A head trained (EAGLE's loss, a few Adam steps) on the target's own greedy continuations of PROMPTS."""
    sequences = []
    for text in PROMPTS:
        ids = encode_chat(target.tokenizer, text)
        sequences.append(ids + ar_tokens(target, ids, TRAIN_TOKENS))
    spec = spec_for(target)
    torch.manual_seed(0)
    head = build_head(spec, target.model)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    data = [(torch.tensor([full]), reference_features(target, full)[None]) for full in sequences]
    frozen = [p.requires_grad for p in target.model.parameters()]
    target.model.requires_grad_(False)
    try:
        for _ in range(100):
            optimizer.zero_grad()
            loss = 0.0
            for tokens, features in data:
                predicted, logits = head(features[:, :-1], tokens[:, 1:])  # entry t reads (f_t, x_{t+1})
                loss = loss + F.smooth_l1_loss(predicted, features[:, 1:]) \
                    + 0.1 * F.cross_entropy(logits[0, :-1].float(), tokens[0, 2:])
            loss.backward()
            optimizer.step()
    finally:
        for p, flag in zip(target.model.parameters(), frozen):
            p.requires_grad_(flag)
    return save_head(tmp_path_factory.mktemp("eagle") / "trained", head, spec)


def node(checkpoint, **fields):
    return {"name": "eagle", "checkpoint": str(checkpoint), **fields}


def eagle(loaded, fields, lm=None, pipeline=GREEDY):
    """The drafter and the target adapter it reads features from (the engine must run that same adapter)."""
    lm = lm or LMAdapter(loaded.model)
    cfg = drafter_config(fields)
    cfg.validate("drafter")
    return build_drafter(cfg, target=lm, loaded=loaded, pipeline=pipeline, backend=BackendConfig()), lm


def decode_eagle(loaded, ids, fields, max_new_tokens=40, pipeline=GREEDY, drafter=None):
    if drafter is None:
        drafter, lm = eagle(loaded, fields, pipeline=pipeline)
    else:
        lm = drafter.target
    stop = StopCriteria(loaded.tokenizer, eos_ids(loaded), [], max_new_tokens)
    gen = decode(lm, ids, pipeline=pipeline, drafter=drafter, stop=stop, generator=torch.Generator().manual_seed(0))
    return gen, drafter


def test_registered_and_the_run_level_draft_length():
    assert REGISTRY["eagle"] is EagleDrafter and "eagle" in draft_length_drafters()
    run = to_run_config(compose(["drafter=eagle", "drafter.checkpoint=/tmp", "draft_length=3", "tracking=none",
                                 "output_dir=unused"]))
    assert isinstance(run.drafter, EagleConfig) and run.drafter.draft_length == 3
    assert EagleConfig(checkpoint="x") == drafter_config({"name": "eagle", "checkpoint": "x"})


# --- greedy: lossless ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("trimmed", [False, True])
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_greedy_is_lossless_with_an_untrained_head(target, tmp_path, shape, trimmed):
    vocab = list(range(0, target.model.config.vocab_size, 2)) if trimmed else None
    folder = make_checkpoint(tmp_path / "ckpt", target, vocab=vocab)
    fields = node(folder, tree=shape == "tree", draft_length=4, top_k=3, budget=10)
    drafted = 0
    for text, max_new in zip(PROMPTS, (40, 13)):
        ids = encode_chat(target.tokenizer, text)
        for limit in (max_new, 2):
            gen, drafter = decode_eagle(target, ids, fields, limit)
            assert gen.tokens == ar_tokens(target, ids, limit)
            assert all(s.drafted <= (10 if shape == "tree" else 4) and s.depth <= 4 for s in gen.steps)
            drafted += sum(s.drafted for s in gen.steps)
    assert drafted > 0
    if trimmed:
        assert set(drafter.propose(ids + gen.tokens).tokens) <= set(vocab)


def test_greedy_is_lossless_where_the_caches_grow(target, trained):
    """A long prompt: both static caches pass their first capacity (512 slots) while drafting."""
    ids = encode_chat(target.tokenizer, " ".join([PROMPTS[0]] * 5))
    assert 420 < len(ids) < 500
    for shape in (False, True):
        gen, drafter = decode_eagle(target, ids, node(trained, tree=shape), 60)
        assert gen.tokens == ar_tokens(target, ids, 60)
        assert drafter.lm.static.capacity > 512


# --- the draft cache holds the teacher-forced entries of the real features ----------------------------------

def cache_errors(loaded, drafter, contexts, catch_ups):
    """Largest differences between (a) the draft cache's keys/values of the real entries 0..n-2 of the last
    context and (b) the catch-ups' last logits, and the head's teacher-forced pass over the committed sequence
    with the target's features from a fresh prefill."""
    full = contexts[-1]
    n = len(full)
    features = reference_features(loaded, full)
    head = drafter.head
    with torch.no_grad():
        _, logits = head(features[None, :-1], torch.tensor([full[1:]]))
    fresh = LMAdapter(head.decoder)
    fresh.forward(full[1:], embeds=head.fuse(features[:-1], torch.tensor(full[1:])))
    static = drafter.lm.static
    kv = max(float((static.keys[:, :, :n - 1] - fresh.static.keys[:, :, :n - 1]).abs().max()),
             float((static.values[:, :, :n - 1] - fresh.static.values[:, :, :n - 1]).abs().max()))
    rows = max(float((row - logits[0, len(context) - 2]).abs().max()) for context, row in zip(contexts, catch_ups))
    return kv, rows


def spy_on_catch_ups(drafter):
    """Record every proposal's context and its catch-up's last logits row (the first draft level)."""
    contexts, rows = [], []
    propose, forward = drafter.propose, drafter.lm.forward

    def spy_propose(context):
        contexts.append(list(context))
        return propose(context)

    def spy_forward(ids, last_only=False, embeds=None):
        out = forward(ids, last_only=last_only, embeds=embeds)
        if last_only:
            rows.append(out[-1].clone())
        return out

    drafter.propose, drafter.lm.forward = spy_propose, spy_forward
    return contexts, rows


@pytest.mark.parametrize("shape", [False, True])
def test_the_draft_cache_holds_the_teacher_forced_real_entries(target, trained, shape):
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    drafter, _ = eagle(target, node(trained, tree=shape))
    contexts, rows = spy_on_catch_ups(drafter)
    gen, _ = decode_eagle(target, ids, None, 40, drafter=drafter)
    assert gen.tokens == ar_tokens(target, ids, 40)
    assert max(s.accepted for s in gen.steps) >= 2  # catch-ups ran over several accepted tokens
    assert len(rows) == len(contexts) == len(gen.steps)
    kv, logits = cache_errors(target, drafter, contexts, rows)
    assert kv < 1e-4 and logits < 1e-4, (kv, logits)


def test_a_broken_catch_up_fails_the_cache_check(target, trained):
    """The check above catches an off-by-one: entries after the prompt reading the feature one position early."""
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    drafter, _ = eagle(target, node(trained, tree=False))
    features = drafter.log.features
    drafter.log.features = lambda start, end: features(start - 1, end - 1) if start > 0 else features(start, end)
    contexts, rows = spy_on_catch_ups(drafter)
    gen, _ = decode_eagle(target, ids, None, 40, drafter=drafter)
    assert gen.tokens == ar_tokens(target, ids, 40)  # still lossless: only the proposals suffer
    kv, logits = cache_errors(target, drafter, contexts, rows)
    assert kv > 1e-2 and logits > 1e-2, (kv, logits)


def test_a_second_turn_on_a_kept_cache(target, trained):
    """A new turn whose prefill keeps the target's cached prefix (only a suffix gets feature rows): the log of
    the first turn's real features, completed by its last verification, still covers every entry."""
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    drafter, lm = eagle(target, node(trained))
    first, _ = decode_eagle(target, ids, None, 20, drafter=drafter)
    second = ids + first.tokens + encode_chat(target.tokenizer, PROMPTS[1])[-5:]
    assert common_prefix(lm.tokens, second) > len(ids)  # the second prefill runs only the tokens after that
    contexts, rows = spy_on_catch_ups(drafter)
    gen, _ = decode_eagle(target, second, None, 30, drafter=drafter)
    assert gen.tokens == ar_tokens(target, second, 30)
    assert gen.steps[0].drafted > 0 and sum(s.accepted for s in gen.steps) > 0
    kv, logits = cache_errors(target, drafter, contexts, rows)
    assert kv < 1e-4 and logits < 1e-4, (kv, logits)


# --- a trained head gets tokens accepted ----------------------------------------------------------------------

def accepted_per_step(loaded, fields):
    steps = []
    for text in PROMPTS:
        ids = encode_chat(loaded.tokenizer, text)
        gen, drafter = decode_eagle(loaded, ids, fields, TRAIN_TOKENS)
        assert gen.tokens == ar_tokens(loaded, ids, TRAIN_TOKENS)
        steps += gen.steps
    return sum(s.accepted for s in steps) / len(steps), steps, drafter, ids + gen.tokens


def test_a_trained_head_gets_tokens_accepted(target, trained):
    """Chains and trees accept several tokens a step; a tree beats the chain of the same depth, and a tree of
    top_k=1 is that very chain."""
    chain, chain_steps, drafter, context = accepted_per_step(target, node(trained, tree=False, draft_length=5))
    assert chain > 2.0, chain
    assert all(s.depth <= 5 and s.drafted <= 5 for s in chain_steps)
    draft = drafter.propose(context)
    assert draft.forwards == 5 and draft.probs is None and draft.parents is None and len(draft) == 5
    fields = node(trained, tree=True, draft_length=5, top_k=2, budget=16)
    wide, tree_steps, _, _ = accepted_per_step(target, fields)
    assert wide > max(3.0, chain), (wide, chain)
    assert all(s.depth <= 5 and s.drafted <= 16 for s in tree_steps)
    assert max(s.drafted for s in tree_steps) > 5  # nodes beyond a chain of the same depth
    _, single, _, _ = accepted_per_step(target, node(trained, tree=True, draft_length=5, top_k=1))
    assert [(s.drafted, s.accepted) for s in single] == [(s.drafted, s.accepted) for s in chain_steps]


def test_the_tree_keeps_the_most_confident_nodes(target, trained):
    """EAGLE-2's tree: at most top_k children per node, depth <= draft_length, ``budget`` nodes closed under
    parents, in topological order, one decoder forward per level."""
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    context = ids + ar_tokens(target, ids, 6)
    drafter, lm = eagle(target, node(trained, tree=True, draft_length=4, top_k=3, budget=11))
    lm.prefill(context[:-1])
    drafter.reset(context[:-1])
    draft = drafter.propose(context)
    assert len(draft) == 11 and draft.probs is None and draft.forwards == 4
    tree.check_parents(draft.parents)
    assert max(tree.depths(draft.parents)) <= 4
    assert max(len(kids) for kids in tree.children(draft.parents).values()) <= 3
    # Replayed as chains (each path on the real entries, then the head's own predicted features): every node is
    # one of its parent's top-3, so the tree forwards saw exactly their paths; a node is never more confident
    # than its parent, and the kept nodes are the most confident of the candidates they were drawn from.
    head, features = drafter.head, reference_features(target, context[:-1])
    scores = []
    for i in range(len(draft)):
        chain = LMAdapter(head.decoder)
        logits = chain.forward(context[1:], embeds=head.fuse(features, torch.tensor(context[1:])))[-1]
        score = 0.0
        for n in tree.path_to(draft.parents, i):
            logprobs = torch.log_softmax(logits, -1)
            assert draft.tokens[n] in logprobs.topk(3).indices.tolist()
            score += float(logprobs[draft.tokens[n]])
            feature = chain.features[-1]
            logits = chain.forward([draft.tokens[n]], embeds=head.fuse(feature[None], torch.tensor([draft.tokens[n]])))[-1]
        scores.append(score)
    assert all(p == tree.ROOT or scores[i] <= scores[p] + 1e-5 for i, p in enumerate(draft.parents))
    first = torch.log_softmax(LMAdapter(head.decoder).forward(context[1:], embeds=head.fuse(
        features, torch.tensor(context[1:])))[-1], -1).topk(3)
    roots = [i for i, p in enumerate(draft.parents) if p == tree.ROOT]
    assert [draft.tokens[i] for i in roots] == first.indices.tolist()[:len(roots)]
    if len(roots) < 3:  # a dropped root child was a candidate: every kept node is at least as confident
        assert min(scores) >= float(first.values[len(roots)]) - 1e-5


# --- sampling -------------------------------------------------------------------------------------------------

SAMPLE = StrategyConfig(name="sample", do_sample=True, temperature=0.7, top_k=6, seed=1)
DRAWS = 1000


@pytest.mark.parametrize("shape", [False, True])
def test_sampled_drafts_follow_the_target(target, trained, shape):
    """At a fixed context inside a training continuation the (deterministic) draft is often but not always
    accepted; the first token after the root still follows the target's distribution."""
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    context = ids + ar_tokens(target, ids, 12)
    pipeline = LogitsPipeline(SAMPLE)
    lm = LMAdapter(target.model)
    drafter, _ = eagle(target, node(trained, tree=shape, budget=12), lm=lm, pipeline=pipeline)
    lm.prefill(context[:-1])
    drafter.reset(context[:-1])
    draft = drafter.propose(context)
    again = drafter.propose(context)
    assert draft.tokens == again.tokens and draft.parents == again.parents and draft.probs is None
    generator = torch.Generator().manual_seed(2)
    first, accepted = [], 0
    for _ in range(DRAWS):
        verdict, _ = verify_step(lm, draft, pipeline, generator, context)
        lm.crop(len(context) - 1)
        first.append((verdict.accepted + [verdict.bonus])[0])
        accepted += bool(verdict.accepted)
    with torch.no_grad():
        p = pipeline.probs(target.model(torch.tensor([context])).logits[0, -1].float())
    assert 0 < accepted < DRAWS  # both branches of the rule run
    assert_follows(first, p, max_tv=0.06)


def test_sampled_decoding_is_reproducible(target, trained):
    pipeline = LogitsPipeline(StrategyConfig(name="sample", do_sample=True, temperature=0.8, top_k=50, seed=4))
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    runs = [decode_eagle(target, ids, node(trained), 32, pipeline)[0].tokens for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]


# --- bookkeeping that does not match ---------------------------------------------------------------------------

def test_unmatched_bookkeeping_proposes_nothing(target, trained):
    """A context whose features were never seen (no prefill, a foreign history) gets no draft; a reset resyncs."""
    ids = encode_chat(target.tokenizer, PROMPTS[1])
    drafter, lm = eagle(target, node(trained))
    assert len(drafter.propose(ids)) == 0  # no prefill, no features
    lm.prefill(ids)
    drafter.reset(ids)
    first = 7  # any root: the prefill's features cover the prompt
    assert len(drafter.propose(ids + [first])) == 16
    assert len(drafter.propose([3] + ids[1:] + [first])) == 0  # another history
    lm.reset()
    lm.prefill(ids)
    drafter.reset(ids)
    assert len(drafter.propose(ids + [first])) == 16


# --- errors ---------------------------------------------------------------------------------------------------

def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_checkpoint_is_one_line(target, tmp_path):
    with pytest.raises(UserError) as err:
        eagle(target, node(tmp_path / "nothing"))
    assert _one_line(err).startswith("drafter.checkpoint: ") and "train-drafter" in _one_line(err)


def test_no_checkpoint_is_one_line(target):
    with pytest.raises(ConfigError) as err:
        eagle(target, {"name": "eagle"})
    assert _one_line(err).startswith("drafter.checkpoint: ") and "train-drafter" in _one_line(err)


def test_a_medusa_checkpoint_is_refused(target, tmp_path):
    folder = make_checkpoint(tmp_path / "medusa", target, kind="medusa")
    with pytest.raises(UserError) as err:
        eagle(target, node(folder))
    assert _one_line(err).startswith("drafter.checkpoint: ") and "medusa head" in _one_line(err)


def test_checkpoint_of_another_target_is_one_line(target, tmp_path):
    folder = make_checkpoint(tmp_path / "other", target, fingerprint="tiny_random:other")
    with pytest.raises(UserError) as err:
        eagle(target, node(folder))
    assert _one_line(err).startswith("drafter.checkpoint: ") and "trained for" in _one_line(err)


@pytest.mark.parametrize("field", ["draft_length", "top_k", "budget"])
def test_bad_sizes_are_one_line(target, tmp_path, field):
    folder = make_checkpoint(tmp_path / "ckpt", target)
    with pytest.raises(ConfigError) as err:
        eagle(target, node(folder, **{field: 0}))
    assert _one_line(err).startswith(f"drafter.{field}: ")


def test_dynamic_cache_is_refused(target, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt", target)
    with pytest.raises(ConfigError) as err:
        eagle(target, node(folder), lm=LMAdapter(target.model, cache="dynamic"))
    assert _one_line(err).startswith("backend.kv_cache: ")
