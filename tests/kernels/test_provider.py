"""``backend.kernels``: the one-line refusals, the wiring from config to the decoding core, and decoding through
the engine on the Triton kernels giving the torch path's tokens (greedy and sampled, chains and trees)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from decodelab.cli import main
from decodelab.config import BackendConfig, DrafterConfig, StrategyConfig
from decodelab.decoding.logits import LogitsPipeline
from decodelab.drafters.none import NoDrafter
from decodelab.errors import ConfigError
from decodelab.kernels.provider import build_kernels, check_kernels
from decodelab.models.loading import LoadedModel
from tests.helpers.decoding import encode_chat
from tests.helpers.drafters import decode_with, draft_model_node, make_drafter

pytestmark = pytest.mark.usefixtures("one_thread")

TRITON = BackendConfig(kernels="triton")
SAMPLE = StrategyConfig(name="sample", do_sample=True, temperature=0.8, top_k=50, top_p=0.9, min_p=0.02)


def _refusal(backend: BackendConfig, strategy: StrategyConfig) -> str:
    with pytest.raises(ConfigError) as info:
        check_kernels(backend, strategy)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = _refusal(TRITON, SAMPLE)
    assert message.startswith("backend.kernels:") and "TRITON_INTERPRET=1" in message and "backend=cuda" in message


def test_missing_triton_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    message = _refusal(TRITON, SAMPLE)
    assert message.startswith("backend.kernels:") and "pip install 'decodelab[triton]'" in message


def test_mps_is_refused():
    assert _refusal(BackendConfig(device="mps", kernels="triton"), SAMPLE).startswith("backend.kernels:")


@pytest.mark.parametrize("field,value,off", [("typical_p", 0.9, "1.0"), ("epsilon_cutoff", 0.01, "0.0"),
                                             ("eta_cutoff", 0.01, "0.0"), ("acceptance", "typical", "lossless")])
def test_what_no_kernel_covers_is_refused_by_name(field, value, off):
    strategy = StrategyConfig(name="sample", do_sample=True, **{field: value})
    message = _refusal(TRITON, strategy)
    assert message.startswith(f"strategy.{field}:") and f"set strategy.{field}={off}" in message
    assert "backend.kernels=torch" in message


def test_what_runs_anyway(monkeypatch, capsys):
    """Greedy never runs the warpers; the repetition penalty runs in torch before the kernel, and says so."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    check_kernels(TRITON, StrategyConfig(typical_p=0.5, acceptance="typical"))
    assert build_kernels(BackendConfig(), SAMPLE) is None
    kernels = build_kernels(TRITON, StrategyConfig(name="s", do_sample=True, repetition_penalty=1.2))
    assert kernels.name == "triton"
    assert "repetition_penalty runs in torch" in capsys.readouterr().err


def _cli(args, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "model=tiny-random", "tracking=none", *args])
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args,key", [(["backend.kernels=triton"], "backend.kernels"),
                                      (["backend.kernels=triton", "strategy=sample", "strategy.typical_p=0.9"],
                                       "strategy.typical_p")])
def test_the_command_line_refuses_in_one_line_with_exit_2(args, key, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, lines = _cli(args, capsys, tmp_path, monkeypatch)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"decodelab: error: {key}:"), lines
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------
# On the Triton kernels
# ------------------------------------------------------------------------------------------------

def test_the_runner_hands_the_kernels_to_the_pipeline(tiny_loaded, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the tiny model runs on CPU
    from decodelab.experiment.compose import compose, to_run_config
    from decodelab.experiment.runner import PromptRunner

    for kernels, expected in (("torch", None), ("triton", "triton")):
        run = to_run_config(compose(["model=tiny-random", "tracking=none", "output_dir=unused", "strategy=sample",
                                     f"backend.kernels={kernels}"]))
        pipeline = PromptRunner(tiny_loaded, run).pipeline
        assert (pipeline.kernels and pipeline.kernels.name) == expected


def _perturbed(loaded: LoadedModel, scale: float = 0.2) -> LoadedModel:
    """The model with noise on its weights: a draft that agrees with it often, not always."""
    model = copy.deepcopy(loaded.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.numel() > 1:
                weight.add_(torch.randn(weight.shape, generator=g) * scale * weight.std())
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, name="perturbed", fingerprint="perturbed")


@pytest.fixture(scope="module")
def near(tiny_loaded):
    return _perturbed(tiny_loaded)


DRAFTERS = {
    "none": None,
    "prompt_lookup": {"name": "prompt_lookup", "num_speculative_tokens": 3, "max_ngram_size": 2},
    "draft_chain": draft_model_node(length={"k": 3}),
    "draft_tree": draft_model_node(branching=2, length={"k": 2}),
}


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_decoding_on_triton_gives_the_torch_tokens(tiny_loaded, near, strategy, drafter, device):
    """Same seed, same tokens: kernels=triton draws exactly what kernels=torch draws (tiny random model)."""
    pytest.importorskip("triton")
    if device.type != "cpu":
        pytest.skip("the tiny model decodes on CPU tensors, which only the interpreter takes")
    from decodelab.kernels.provider import TritonKernels

    ids = encode_chat(tiny_loaded.tokenizer, "Summarize: the quick brown fox jumps over the lazy dog, twice.")
    settings = StrategyConfig() if strategy == "greedy" else SAMPLE
    outputs, accepted = [], []
    for kernels in (None, TritonKernels()):
        pipeline = LogitsPipeline(settings, kernels=kernels)
        node = DRAFTERS[drafter]
        parts = {"draft": near} if node and node["name"] == "draft_model" else {}
        proposer = NoDrafter(DrafterConfig()) if node is None else make_drafter(tiny_loaded, node, pipeline, **parts)
        generation = decode_with(tiny_loaded, ids, proposer, max_new_tokens=12, pipeline=pipeline)
        outputs.append(generation.tokens)
        accepted.append([(s.drafted, s.accepted) for s in generation.steps])
    assert outputs[0] == outputs[1] and accepted[0] == accepted[1] and len(outputs[0]) > 1
