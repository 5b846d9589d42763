"""drafter=medusa: a token tree from trained Medusa-1 heads, verified by the engine's tree verification.

Greedy output must equal plain autoregressive decoding; sampled output must follow the target distribution
(chi-square at a fixed context). The heads read the right feature (the row before the root, found by walking the
accepted path down the proposed tree), the tree is the best ``budget`` nodes of the per-head top-k product, and a
missing, foreign or badly configured checkpoint fails in one line.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from decodelab.config import BackendConfig, StrategyConfig
from decodelab.decoding import tree
from decodelab.decoding.engine import decode, verify_step
from decodelab.decoding.lm import LMAdapter
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.stop import StopCriteria
from decodelab.drafters.medusa import MedusaDrafter, medusa_tree
from decodelab.drafters.registry import REGISTRY, build_drafter, drafter_config
from decodelab.errors import ConfigError, UserError
from decodelab.experiment.runner import eos_ids
from decodelab.models.heads import HeadSpec, build_head, save_head
from tests.helpers.decoding import encode_chat
from tests.helpers.drafters import GREEDY, PROMPTS, ar_tokens, tiny_model
from tests.helpers.statistics import assert_follows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_model(num_layers=2, init_seed=0)


def make_checkpoint(folder, loaded, *, heads=3, vocab=None, scale=0.5, seed=0, fingerprint=None):
    """A Medusa checkpoint for ``loaded``: zero-init heads (every head = the LM head), plus noise of ``scale``."""
    hidden = loaded.model.config.hidden_size
    spec = HeadSpec("medusa", heads, hidden, "tiny-random", fingerprint or loaded.fingerprint, vocab=vocab)
    head = build_head(spec, loaded.model)
    if scale:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return save_head(folder, head, spec)


def node(checkpoint, **fields):
    return {"name": "medusa", "checkpoint": str(checkpoint), **fields}


def medusa(loaded, fields, lm=None, pipeline=GREEDY):
    """The drafter and the target adapter it reads features from (the engine must run that same adapter)."""
    lm = lm or LMAdapter(loaded.model)
    cfg = drafter_config(fields)
    cfg.validate("drafter")
    return build_drafter(cfg, target=lm, loaded=loaded, pipeline=pipeline, backend=BackendConfig()), lm


def decode_medusa(loaded, ids, fields, max_new_tokens=40, pipeline=GREEDY):
    drafter, lm = medusa(loaded, fields, pipeline=pipeline)
    stop = StopCriteria(loaded.tokenizer, eos_ids(loaded), [], max_new_tokens)
    gen = decode(lm, ids, pipeline=pipeline, drafter=drafter, stop=stop, generator=torch.Generator().manual_seed(0))
    return gen, drafter


def reference_feature(loaded, context):
    """The feature of the position before ``context[-1]``, from a fresh prefill."""
    lm = LMAdapter(loaded.model)
    lm.prefill(context[:-1])
    return lm.features[-1].clone()


def test_registered():
    assert REGISTRY["medusa"] is MedusaDrafter


# --- greedy: lossless, and the heads read the right feature -------------------------------------------------

@pytest.mark.parametrize("trimmed", [False, True])
@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_is_lossless_and_reads_the_right_feature(target, tmp_path, text, trimmed):
    vocab = list(range(0, target.model.config.vocab_size, 2)) if trimmed else None
    folder = make_checkpoint(tmp_path / "ckpt", target, vocab=vocab)
    ids = encode_chat(target.tokenizer, text)
    drafter, lm = medusa(target, node(folder, top_k=3, budget=10))
    used = []
    feature = drafter._feature

    def spy(context):
        f = feature(context)
        used.append((list(context), None if f is None else f.clone()))
        return f

    drafter._feature = spy
    stop = StopCriteria(target.tokenizer, eos_ids(target), [], 40)
    gen = decode(lm, ids, pipeline=GREEDY, drafter=drafter, stop=stop, generator=torch.Generator().manual_seed(0))
    assert gen.tokens == ar_tokens(target, ids)
    assert all(s.drafted <= 10 and s.depth <= 3 for s in gen.steps)
    assert sum(s.drafted for s in gen.steps) > 0
    # Every step found its feature (after a prefill, chain steps, tree steps and the cut near max_new_tokens) ...
    assert used and all(f is not None for _, f in used)
    # ... and it is the target's feature of the position before the root.
    for context, f in used[:: max(1, len(used) // 6)] + used[-1:]:
        assert torch.allclose(f, reference_feature(target, context), atol=1e-4)
    if trimmed:
        allowed = set(vocab)
        assert all(set(drafter.propose(c).tokens) <= allowed for c, _ in used[:3])


def test_heads_copying_the_lm_head_get_tokens_accepted(target, tmp_path):
    """Zero-init heads predict the LM head's own next token at every depth: repeats get accepted."""
    folder = make_checkpoint(tmp_path / "zero", target, scale=0.0)
    for text in PROMPTS:
        ids = encode_chat(target.tokenizer, text)
        gen, _ = decode_medusa(target, ids, node(folder, top_k=4, budget=16), 48)
        assert gen.tokens == ar_tokens(target, ids, 48)
        assert sum(s.drafted for s in gen.steps) > 0
        assert len(gen.steps) <= 48


def test_chain_and_run_folder(target, tmp_path):
    """top_k=1 drafts a chain (no tree attention needed); a run folder's checkpoint/ is found; heads=2 caps depth."""
    make_checkpoint(tmp_path / "run" / "checkpoint", target)
    ids = encode_chat(target.tokenizer, PROMPTS[1])
    gen, drafter = decode_medusa(target, ids, node(tmp_path / "run", top_k=1, heads=2))
    assert gen.tokens == ar_tokens(target, ids)
    assert all(s.depth <= 2 and s.drafted <= 2 for s in gen.steps)
    assert drafter.propose(ids + [gen.tokens[0]]).parents is None


# --- the tree ---------------------------------------------------------------------------------------------

def test_tree_is_the_best_budget_nodes_of_the_top_k_product(target, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt", target)
    context = encode_chat(target.tokenizer, PROMPTS[0])
    drafter, lm = medusa(target, node(folder, top_k=3, budget=11))
    lm.prefill(context[:-1])
    drafter.reset(context[:-1])
    draft = drafter.propose(context)
    assert len(draft) == 11 and draft.probs is None and draft.forwards == 0
    tree.check_parents(draft.parents)
    assert all(p < i for i, p in enumerate(draft.parents))
    children = [sum(1 for p in draft.parents if p == n) for n in range(-1, len(draft))]
    assert max(children) <= 3
    depths = tree.depths(draft.parents)
    assert max(depths) <= 3
    with torch.no_grad():
        logprobs = torch.log_softmax(drafter.heads(reference_feature(target, context)).float(), -1)
    top = logprobs.topk(3, -1)
    # Each node at depth d is one of head d's top-3 tokens.
    for i, d in enumerate(depths):
        assert draft.tokens[i] in top.indices[d - 1].tolist()
    # The kept scores are the 11 best of all 3 + 9 + 27 paths of the Cartesian product.
    every = []
    for depth in range(1, 4):
        for ranks in itertools.product(range(3), repeat=depth):
            every.append(sum(float(top.values[k, r]) for k, r in enumerate(ranks)))
    kept = []
    for i in range(len(draft)):
        path = tree.path_to(draft.parents, i)
        kept.append(sum(float(logprobs[k, draft.tokens[n]]) for k, n in enumerate(path)))
    assert sorted(kept, reverse=True) == pytest.approx(sorted(every, reverse=True)[:11], abs=1e-5)


def test_medusa_tree_order_and_ties():
    """Uniform heads: every score ties, shallow nodes come first; parents always before children."""
    logprobs = torch.full((3, 5), -math.log(5.0))
    columns, parents = medusa_tree(logprobs, 2, 5)
    assert parents == [-1, -1, 0, 0, 1]
    assert len(columns) == 5
    columns, parents = medusa_tree(torch.log_softmax(torch.randn(3, 7), -1), 3, 60)
    assert len(columns) == 3 + 9 + 27 and all(p < i for i, p in enumerate(parents))  # capped by the whole tree


# --- sampling ---------------------------------------------------------------------------------------------

SAMPLE = StrategyConfig(name="sample", do_sample=True, temperature=0.5, top_k=6, seed=1)
DRAWS = 1200


def test_sampled_tree_follows_the_target(tmp_path):
    small = tiny_model(num_layers=1, init_seed=0)
    folder = make_checkpoint(tmp_path / "zero", small, scale=0.0)
    context = encode_chat(small.tokenizer, PROMPTS[1])
    pipeline = LogitsPipeline(SAMPLE)
    lm = LMAdapter(small.model)
    drafter, _ = medusa(small, node(folder, top_k=4, budget=12), lm=lm, pipeline=pipeline)
    lm.prefill(context[:-1])
    drafter.reset(context[:-1])
    generator = torch.Generator().manual_seed(2)
    out, accepted = [], 0
    for _ in range(DRAWS):
        draft = drafter.propose(context)
        assert len(draft) == 12
        verdict, _ = verify_step(lm, draft, pipeline, generator, context)
        lm.crop(len(context) - 1)
        out.append(verdict.accepted + [verdict.bonus])
        accepted += len(verdict.accepted)
    with torch.no_grad():
        p = pipeline.probs(small.model(torch.tensor([context])).logits[0, -1].float())
    assert accepted > 0  # some drafts are accepted, some rejected: both branches of the rule run
    assert_follows([tokens[0] for tokens in out], p, max_tv=0.07)


def test_sampled_decoding_is_reproducible(target, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt", target, scale=0.0)
    pipeline = LogitsPipeline(StrategyConfig(name="sample", do_sample=True, temperature=0.8, top_k=50, seed=4))
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    runs = [decode_medusa(target, ids, node(folder), 32, pipeline)[0].tokens for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]


# --- errors -----------------------------------------------------------------------------------------------

def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_checkpoint_is_one_line(target, tmp_path):
    with pytest.raises(UserError) as err:
        medusa(target, node(tmp_path / "nothing"))
    assert _one_line(err).startswith("drafter.checkpoint: ") and "train-drafter" in _one_line(err)


def test_no_checkpoint_is_one_line(target):
    with pytest.raises(ConfigError) as err:
        medusa(target, {"name": "medusa"})
    assert _one_line(err).startswith("drafter.checkpoint: ") and "train-drafter" in _one_line(err)


def test_checkpoint_of_another_target_is_one_line(target, tmp_path):
    folder = make_checkpoint(tmp_path / "other", target, fingerprint="tiny_random:other")
    with pytest.raises(UserError) as err:
        medusa(target, node(folder))
    assert _one_line(err).startswith("drafter.checkpoint: ") and "trained for" in _one_line(err)


@pytest.mark.parametrize("field, key", [("top_k", "drafter.top_k"), ("budget", "drafter.budget"),
                                        ("heads", "drafter.heads")])
def test_bad_sizes_are_one_line(target, tmp_path, field, key):
    folder = make_checkpoint(tmp_path / "ckpt", target)
    with pytest.raises(ConfigError) as err:
        medusa(target, node(folder, **{field: 0}))
    assert _one_line(err).startswith(f"{key}: ")


def test_more_heads_than_the_checkpoint_has(target, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt", target, heads=2)
    with pytest.raises(ConfigError) as err:
        medusa(target, node(folder, heads=3))
    assert _one_line(err).startswith("drafter.heads: ")


def test_dynamic_cache_is_refused(target, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt", target)
    with pytest.raises(ConfigError) as err:
        medusa(target, node(folder), lm=LMAdapter(target.model, cache="dynamic"))
    assert _one_line(err).startswith("backend.kv_cache: ")


class OracleHeads:
    """Heads that know the greedy continuation ``full``: a feature is matched to its position i by the reference
    features, head k ranks token full[i + 1 + k] first, or second behind a decoy at every other position (so
    accepted paths also run through second branches)."""

    def __init__(self, head, features, full, heads, vocab):
        self.head, self.features, self.full, self.heads, self.vocab = head, features, full, heads, vocab

    def __call__(self, feature):
        i = int((self.features - feature.float()).norm(dim=-1).argmin())
        logits = torch.zeros(self.heads, self.vocab)
        for k in range(self.heads):
            j = i + 2 + k
            if j < len(self.full):
                logits[k, self.full[j]] = 5.0
                if i % 2:
                    logits[k, (self.full[j] + 1) % self.vocab] = 6.0
        return logits


@pytest.mark.parametrize("top_k, budget", [(2, 14), (1, 3)])
def test_accepted_paths_are_walked_to_the_right_feature(target, tmp_path, top_k, budget):
    """With heads that guess right (at rank 1 or 2), most drafts are accepted, deep and through second branches;
    the output is still plain decoding's and every proposal reads the feature before its root."""
    folder = make_checkpoint(tmp_path / "ckpt", target)
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    ar = ar_tokens(target, ids, 40)
    full = ids + ar
    ref = LMAdapter(target.model)
    ref.prefill(full)
    drafter, lm = medusa(target, node(folder, top_k=top_k, budget=budget))
    drafter.heads = OracleHeads(drafter.heads.head, ref.features.float().clone(), full, 3,
                                target.model.config.vocab_size)
    used = []
    feature = drafter._feature

    def spy(context):
        f = feature(context)
        used.append((list(context), f))
        return f

    drafter._feature = spy
    stop = StopCriteria(target.tokenizer, eos_ids(target), [], 40)
    gen = decode(lm, ids, pipeline=GREEDY, drafter=drafter, stop=stop, generator=torch.Generator().manual_seed(0))
    assert gen.tokens == ar
    accepted = sum(s.accepted for s in gen.steps)
    assert accepted >= 20 and max(s.accepted for s in gen.steps) == 3
    assert all(f is not None for _, f in used)
    for context, f in used:
        assert torch.allclose(f, ref.features[len(context) - 2], atol=1e-4)
