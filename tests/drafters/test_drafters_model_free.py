"""Model-free drafters (prompt_lookup, suffix): their logic on hand-made token lists against brute-force
references, and lossless greedy decoding with them on the tiny model and SmolLM2."""

from __future__ import annotations

import random
from typing import List, Sequence

import pytest
import torch

from decodelab.decoding.lm import LMAdapter
from decodelab.config import DrafterConfig, StrategyConfig
from decodelab.drafters.registry import build_drafter, drafter_config
from decodelab.drafters.none import NoDrafter
from decodelab.drafters.prompt_lookup import PromptLookupConfig, PromptLookupDrafter
from decodelab.drafters.suffix import SuffixConfig, SuffixDrafter, SuffixTrie
from decodelab.decoding.engine import decode
from decodelab.decoding.stop import StopCriteria
from decodelab.errors import UserError
from decodelab.experiment.runner import eos_ids
from decodelab.decoding.logits import LogitsPipeline
from tests.helpers.decoding import assert_bad_value_is_named, assert_registered_with_yaml_defaults, encode_chat


# ---------------------------------------------------------------------------------------------------
# brute-force references
# ---------------------------------------------------------------------------------------------------
def pld_reference(context: Sequence[int], k: int, max_n: int, min_n: int, earliest: bool = False) -> List[int]:
    """Rescan the whole context: latest (or first) earlier occurrence of the longest matching suffix n-gram."""
    context = list(context)
    length = len(context)
    for n in range(max_n, min_n - 1, -1):
        if n >= length:
            continue
        key = context[length - n:]
        starts = range(length - n - 1, -1, -1)
        for start in (reversed(starts) if earliest else starts):
            if context[start:start + n] == key:
                return context[start + n:start + n + k]
    return []


def suffix_reference(docs: List[List[int]], context: Sequence[int], cfg: SuffixConfig, beat: float = 0.0):
    """SuffixDecoding's chain draft computed by scanning the documents: (tokens, score)."""
    D = cfg.max_depth

    def occurrences(s):
        n = len(s)
        return [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - n + 1) if doc[i:i + n] == s]

    best_tokens, best_score = [], beat
    for matched in range(min(len(context), D - 1), 0, -1):
        pattern = list(context[len(context) - matched:])
        if not occurrences(pattern):
            continue
        limit = min(cfg.max_spec_tokens, int(cfg.alpha * matched + 1e-9), D - matched)
        tokens, prob, score, cur = [], 1.0, 0.0, pattern
        while len(tokens) < limit:
            follows = [(d, i) for d, i in occurrences(cur) if i + len(cur) < len(docs[d])]
            if not follows:
                break
            counts, latest = {}, {}
            for d, i in follows:
                t = docs[d][i + len(cur)]
                counts[t] = counts.get(t, 0) + 1
                latest[t] = max(latest.get(t, (-1, -1)), (d, i))
            top = max(counts.values())
            choice = max((t for t in counts if counts[t] == top), key=lambda t: latest[t])
            prob *= top / len(follows)
            if prob < cfg.min_score:
                break
            tokens.append(choice)
            score += prob
            cur = cur + [choice]
        if score > best_score:
            best_tokens, best_score = tokens, score
    return best_tokens, best_score


def feed(drafter, prompt: List[int], output: List[int]) -> List[List[int]]:
    """Drive a drafter as the engine does (reset, propose, update) along a fixed output; the drafts."""
    drafter.reset(prompt)
    drafts, committed = [], 0
    while committed < len(output):
        draft = drafter.propose(prompt + output[:committed]).tokens
        drafts.append(draft)
        accepted = 0
        while accepted < len(draft) and committed + accepted < len(output) and \
                draft[accepted] == output[committed + accepted]:
            accepted += 1
        drafter.update(len(draft), accepted)
        committed += accepted + 1
    return drafts


# ---------------------------------------------------------------------------------------------------
# prompt lookup
# ---------------------------------------------------------------------------------------------------
def pld(**kw) -> PromptLookupDrafter:
    return PromptLookupDrafter(PromptLookupConfig(**kw))


def test_pld_finds_latest_match():
    drafter = pld(max_ngram_size=1, num_speculative_tokens=2)
    # token 5 occurs twice before the end: the latest occurrence (followed by 8, 9) wins.
    assert drafter.propose([5, 1, 2, 7, 5, 8, 9, 3, 5]).tokens == [8, 9]


def test_pld_prefers_longer_ngram():
    drafter = pld(max_ngram_size=3, num_speculative_tokens=3)
    # "4 5" occurs at the start followed by 6; the later "5" alone is followed by 1.
    context = [4, 5, 6, 7, 8, 0, 5, 1, 2, 4, 5]
    assert drafter.propose(context).tokens == [6, 7, 8]
    assert pld(max_ngram_size=1, num_speculative_tokens=3).propose(context).tokens == [1, 2, 4]


def test_pld_no_match_proposes_nothing():
    assert pld().propose([1, 2, 3, 4, 5]).tokens == []
    assert pld().propose([]).tokens == []
    assert pld().propose([7]).tokens == []
    # min_ngram_size=2: a repeated single token is not enough.
    assert pld(min_ngram_size=2).propose([1, 2, 3, 9, 4, 3]).tokens == []


def test_pld_respects_num_speculative_tokens():
    context = list(range(20)) + [0]
    assert pld(num_speculative_tokens=4).propose(context).tokens == [1, 2, 3, 4]
    assert pld(num_speculative_tokens=50).propose(context).tokens == list(range(1, 20)) + [0]
    # the continuation may run into the suffix itself (periodic text) but never past the end.
    assert pld(num_speculative_tokens=10).propose([3, 3, 3]).tokens == [3]


def test_pld_draft_is_deterministic_chain():
    draft = pld().propose([1, 2, 1])
    assert draft.probs is None and draft.forwards == 0 and draft.tokens == [2, 1]


def test_pld_earliest_occurrence():
    # token 5 occurs twice before the end: the first occurrence (followed by 1, 2) wins.
    assert pld(max_ngram_size=1, num_speculative_tokens=2, occurrence="earliest").propose(
        [5, 1, 2, 7, 5, 8, 9, 3, 5]).tokens == [1, 2]


@pytest.mark.parametrize("occurrence", ["latest", "earliest"])
@pytest.mark.parametrize("sizes", [(3, 1), (4, 2), (1, 1)])
def test_pld_incremental_index_equals_rescan(sizes, occurrence):
    max_n, min_n = sizes
    rng = random.Random(1234 + max_n)
    earliest = occurrence == "earliest"
    drafter = pld(max_ngram_size=max_n, min_ngram_size=min_n, num_speculative_tokens=5, occurrence=occurrence)
    checked = 0
    for _ in range(60):
        vocab = rng.choice([2, 3, 5, 12])
        context = [rng.randrange(vocab) for _ in range(rng.randrange(0, 15))]
        drafter.reset(context)
        for _ in range(25):
            assert drafter.propose(context).tokens == pld_reference(context, 5, max_n, min_n, earliest), context
            checked += 1
            roll = rng.random()
            if roll < 0.1:  # not an extension: an edited context must rebuild the index
                context = context[:rng.randrange(0, len(context) + 1)] + [rng.randrange(vocab)]
            elif roll < 0.15:  # a new request without reset()
                context = [rng.randrange(vocab) for _ in range(rng.randrange(0, 6))]
            else:
                context = context + [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
    assert checked == 60 * 25


def test_pld_reset_clears_index():
    drafter = pld()
    assert drafter.propose([1, 2, 3, 1]).tokens == [2, 3, 1]
    drafter.reset([9, 1])
    assert drafter.propose([9, 1]).tokens == []


# ---------------------------------------------------------------------------------------------------
# suffix
# ---------------------------------------------------------------------------------------------------
def suffix(**kw) -> SuffixDrafter:
    return SuffixDrafter(SuffixConfig(**kw))


def test_suffix_proposes_most_frequent_continuation():
    # after "1 2": 3 twice, 4 once (and most recently); prompt lookup would take 4, suffix takes 3.
    prompt = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4, 7, 1, 2]
    drafter = suffix(alpha=4.0, min_score=0.5)
    drafter.reset(prompt)
    assert drafter.propose(prompt).tokens == [3]
    assert pld(num_speculative_tokens=1).propose(prompt).tokens == [4]


def test_suffix_min_score_cut():
    prompt = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4, 7, 1, 2]
    # path probabilities: 3 -> 2/3, then 8 or 9 (1/2 each, the latest wins) -> 1/3, then 1/3 ...
    for min_score, expected in [(0.7, []), (0.5, [3]), (0.3, [3, 8, 1, 2, 4, 7, 1, 2])]:
        drafter = suffix(alpha=4.0, min_score=min_score)
        drafter.reset(prompt)
        assert drafter.propose(prompt).tokens == expected, min_score
    # the cut applies to the path product, not to each step: after "0" the steps are 5 (4/5), 6 (3/4),
    # 7 (2/3), then 11 or 12 (1/2): products 0.8, 0.6, 0.4, 0.2.
    doc = [0, 5, 6, 7, 11, 0, 5, 6, 7, 12, 0, 5, 6, 8, 13, 0, 5, 9, 14, 0, 1, 15, 0]
    for min_score, expected in [(0.5, [5, 6]), (0.35, [5, 6, 7]), (0.25, [5, 6, 7])]:
        drafter = suffix(alpha=16.0, min_score=min_score)
        drafter.reset(doc)
        assert drafter.propose(doc).tokens == expected, min_score


def test_suffix_adaptive_length():
    prompt = list(range(1, 12)) + [50, 1, 2]  # only the suffix "1 2" (m = 2) occurs earlier
    for alpha, max_spec, expected in [(1.0, 16, [3, 4]), (2.0, 16, [3, 4, 5, 6]), (0.5, 16, [3]),
                                      (4.0, 3, [3, 4, 5])]:
        drafter = suffix(alpha=alpha, max_spec_tokens=max_spec)
        drafter.reset(prompt)
        draft = drafter.propose(prompt)
        assert draft.tokens == expected, (alpha, max_spec)
        assert drafter.last_matched == 2 and draft.probs is None
    # the depth cap bounds matched length + draft: max_depth=4 leaves 2 tokens after a 2-token match.
    drafter = suffix(alpha=8.0, max_depth=4)
    drafter.reset(prompt)
    assert drafter.propose(prompt).tokens == [3, 4, 5]  # (its best: the 1-token match "2" with 3 tokens)
    assert drafter.last_matched == 1


def test_suffix_learns_from_previous_request():
    output = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
    drafter = suffix()
    feed(drafter, [1, 2, 3], output)
    # a new request whose prompt shares nothing with the first: the global trie still knows the output.
    drafter.reset([7, 8, 9])
    draft = drafter.propose([7, 8, 9, 40, 41, 42, 43])
    # matched length 4 (alpha = 1): four tokens.
    assert draft.tokens == [44, 45, 46, 47] and drafter.last_source == "global"
    # without the global trie nothing is proposed.
    alone = suffix(use_global_tree=False)
    feed(alone, [1, 2, 3], output)
    alone.reset([7, 8, 9])
    assert alone.propose([7, 8, 9, 40, 41, 42, 43]).tokens == []


def test_suffix_output_ends_with_accepted_draft():
    """The tokens of the last step reach the global trie through update(), not through a later propose()."""
    drafter = suffix()
    prompt = [1, 2, 3, 4, 5, 6, 1, 2]
    drafter.reset(prompt)
    assert drafter.propose(prompt).tokens == [3, 4]
    drafter.update(2, 2)  # the request ends here: output = [3, 4] (+ an unseen bonus token)
    drafter.reset([9, 9])
    assert drafter.global_trie.root.children.keys() == {3, 4}


def test_suffix_global_cache_is_bounded():
    drafter = suffix(max_cached_requests=2, max_depth=6)
    outputs = [[10 + r, 20 + r, 30 + r, 40, 41] for r in range(5)]
    for r, output in enumerate(outputs):
        feed(drafter, [100 + r], output)
    drafter.reset([0])
    fresh = SuffixTrie(6)
    for output in outputs[3:]:  # the last output came in at reset([0]); the first three were evicted
        # nothing was drafted, so the final (bonus) token of each output never reached the drafter.
        fresh.insert(output[:-1])
    assert _trie_dump(drafter.global_trie.root) == _trie_dump(fresh.root)
    assert drafter.global_trie.nodes == fresh.nodes


def _trie_dump(node, prefix=()):
    out = {prefix: (node.count, node.cont)}
    for token, child in (node.children or {}).items():
        out.update(_trie_dump(child, prefix + (token,)))
    return out


@pytest.mark.parametrize("depth", [3, 6, 24])
def test_suffix_matches_bruteforce(depth):
    rng = random.Random(depth)
    for trial in range(40):
        vocab = rng.choice([2, 3, 4, 8])
        cfg = SuffixConfig(max_depth=depth, alpha=rng.choice([0.5, 1.0, 2.0]), max_spec_tokens=rng.choice([3, 16]),
                           min_score=rng.choice([0.0, 0.1, 0.4]), use_global_tree=trial % 2 == 0)
        drafter = SuffixDrafter(cfg)
        previous: List[List[int]] = []
        for _request in range(3):
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
            output = [rng.randrange(vocab) for _ in range(rng.randrange(1, 20))]
            drafter.reset(prompt)
            for cut in range(len(output) + 1):
                context = prompt + output[:cut]
                got = drafter.propose(context).tokens
                expected, score = suffix_reference([context], context, cfg)
                if cfg.use_global_tree and previous:
                    g_expected, _ = suffix_reference(previous, context, cfg, beat=score)
                    expected = g_expected or expected
                assert got == expected, (cfg, previous, context)
                drafter.update(len(got), 0)
            previous.append(output)
            drafter.reset([])  # flush the whole output (every token was seen by propose)


def test_suffix_trie_counts_bruteforce():
    rng = random.Random(7)
    for _ in range(30):
        depth = rng.choice([2, 4, 7])
        docs = [[rng.randrange(3) for _ in range(rng.randrange(0, 25))] for _ in range(3)]
        trie = SuffixTrie(depth)
        for doc in docs:
            trie.insert(doc)
        dump = _trie_dump(trie.root)
        expected = {(): (0, sum(len(d) for d in docs))}
        for doc in docs:
            for i in range(len(doc)):
                for n in range(1, min(depth, len(doc) - i) + 1):
                    key = tuple(doc[i:i + n])
                    count, cont = expected.get(key, (0, 0))
                    expected[key] = (count + 1, cont + (1 if i + n < len(doc) and n < depth else 0))
        assert dump == expected
        assert trie.nodes == len(expected)
        for doc in docs[:2]:
            trie.remove(doc)
        fresh = SuffixTrie(depth)
        fresh.insert(docs[2])
        assert _trie_dump(trie.root) == _trie_dump(fresh.root) and trie.nodes == fresh.nodes


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------
def test_registered_with_yaml_defaults():
    for name, schema in [("prompt_lookup", PromptLookupConfig), ("suffix", SuffixConfig)]:
        assert_registered_with_yaml_defaults(name, schema)


@pytest.mark.parametrize("override,key", [
    ("drafter.max_ngram_size=0", "drafter.max_ngram_size"),
    ("drafter.min_ngram_size=4", "drafter.min_ngram_size"),
    ("drafter.num_speculative_tokens=0", "drafter.num_speculative_tokens"),
    ("drafter.occurrence=last", "drafter.occurrence"),
])
def test_pld_bad_values_name_the_key(override, key):
    assert_bad_value_is_named("prompt_lookup", override, key)


@pytest.mark.parametrize("override,key", [
    ("drafter.max_depth=1", "drafter.max_depth"),
    ("drafter.alpha=0", "drafter.alpha"),
    ("drafter.min_score=1.5", "drafter.min_score"),
    ("drafter.max_spec_tokens=0", "drafter.max_spec_tokens"),
])
def test_suffix_bad_values_name_the_key(override, key):
    assert_bad_value_is_named("suffix", override, key)


def test_cli_compose_rejects_bad_ngram_size():
    from decodelab.experiment.compose import compose, validate

    with pytest.raises(UserError, match=r"drafter\.max_ngram_size"):
        validate(compose(["drafter=prompt_lookup", "drafter.max_ngram_size=0"]))


# ---------------------------------------------------------------------------------------------------
# lossless greedy decoding with the engine
# ---------------------------------------------------------------------------------------------------
TINY_PROMPTS = [
    "Copy exactly: alpha beta gamma delta. Copy exactly: alpha beta gamma delta. Copy exactly: alpha beta",
    "abcabcabcabcabcabcabcabcabcabc",
    "Summarize: the quick brown fox jumps over the lazy dog, again and again, near the river bank.",
]


def _decode(loaded, ids, drafter, max_new_tokens):
    stop = StopCriteria(loaded.tokenizer, eos_ids(loaded), [], max_new_tokens)
    return decode(LMAdapter(loaded.model), ids, pipeline=LogitsPipeline(StrategyConfig()), drafter=drafter,
                  stop=stop, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["prompt_lookup", "suffix"])
def test_tiny_greedy_identical_to_ar(tiny_loaded, name):
    drafter = build_drafter(drafter_config({"name": name}), target=None, loaded=tiny_loaded)
    accepted = drafted = 0
    for text in TINY_PROMPTS:  # one drafter over all prompts: the suffix global trie carries over
        ids = encode_chat(tiny_loaded.tokenizer, text)
        reference = _decode(tiny_loaded, ids, NoDrafter(DrafterConfig()), 40)
        ours = _decode(tiny_loaded, ids, drafter, 40)
        assert ours.tokens == reference.tokens, text
        assert ours.stop_reason == reference.stop_reason
        assert sum(s.accepted + s.bonus for s in ours.steps) + 1 >= len(ours.tokens)
        assert ours.target_forwards == len(ours.steps) + 1
        accepted += sum(s.accepted for s in ours.steps)
        drafted += sum(s.drafted for s in ours.steps)
    assert drafted > 0 and accepted > 0


def test_tiny_prompt_lookup_accepts_on_copy_prompt(tiny_loaded):
    text = TINY_PROMPTS[1]
    ids = encode_chat(tiny_loaded.tokenizer, text)
    gen = _decode(tiny_loaded, ids, PromptLookupDrafter(PromptLookupConfig()), 40)
    assert any(s.accepted > 0 for s in gen.steps)
    assert len(gen.steps) < len(gen.tokens) - 1  # fewer target forwards than plain decoding


@pytest.mark.slow
def test_smollm2_summarization_identical_to_ar(smollm2_loaded, capsys):
    from decodelab.config import TaskConfig
    from decodelab.tasks import load_task

    prompts = load_task(TaskConfig(name="specbench-mini", source="specbench_mini",
                                   categories=["summarization"], limit=2))
    assert len(prompts) == 2
    ids = [encode_chat(smollm2_loaded.tokenizer, p.turns[0]) for p in prompts]
    reference = [_decode(smollm2_loaded, x, NoDrafter(DrafterConfig()), 48).tokens for x in ids]
    for name in ("prompt_lookup", "suffix"):
        drafter = build_drafter(drafter_config({"name": name}), target=None, loaded=smollm2_loaded)
        steps = []
        for x, ref in zip(ids, reference):
            gen = _decode(smollm2_loaded, x, drafter, 48)
            assert gen.tokens == ref, name
            steps.extend(gen.steps)
        mean_accepted = sum(s.accepted for s in steps) / len(steps)
        tau = sum(s.accepted + s.bonus for s in steps) / len(steps)
        with capsys.disabled():
            print(f"\n[smollm2 summarization x2] {name}: steps={len(steps)} mean accepted/step={mean_accepted:.2f} "
                  f"tau={tau:.2f} drafted/step={sum(s.drafted for s in steps) / len(steps):.2f}")
