"""Build a (model, tokenizer) pair from a ModelConfig and a BackendConfig.

GGUF files are dequantized by transformers on every load, which takes tens of seconds; we keep a
converted safetensors copy keyed by the GGUF file's hash, so the second load takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from decodelab.config import BackendConfig, ModelConfig
from decodelab.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    # What the weights came from (file hash or path): keys caches of outputs computed with this model.
    fingerprint: str


def resolve_device(backend: BackendConfig) -> torch.device:
    """The torch device for backend.device, or a UserError when this machine lacks it."""
    kind = backend.device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"backend.device: '{backend.device}' requested but CUDA is not available on this machine "
                        "(torch.cuda.is_available() is False); use backend=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"backend.device: '{backend.device}' requested but MPS is not available on this machine; "
                        "use backend=cpu")
    return torch.device(backend.device)


# Jobs of a sweep that run in one process (the sequential launcher) share loaded models: a model is
# loaded once per (model config, device, dtype, attention, compile). Weights are never modified by a run
# (KV caches live outside the model), so sharing is safe. DECODELAB_MODEL_CACHE=0 turns it off.
_LOADED: "OrderedDict[str, LoadedModel]" = OrderedDict()


def load_model(cfg: ModelConfig, backend: BackendConfig) -> LoadedModel:
    """The model and tokenizer for ``cfg`` on ``backend``, from this process's cache when already loaded."""
    capacity = int(os.environ.get("DECODELAB_MODEL_CACHE", "2"))
    key = json.dumps([asdict(cfg), backend.device, backend.dtype, backend.attn_implementation, backend.compile],
                     sort_keys=True, default=str)
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    loaded = _load_model(cfg, backend)
    if capacity > 0:
        _LOADED[key] = loaded
        while len(_LOADED) > capacity:
            _LOADED.popitem(last=False)
    return loaded


def _load_model(cfg: ModelConfig, backend: BackendConfig) -> LoadedModel:
    device = resolve_device(backend)
    dtype = DTYPES[backend.dtype]
    if cfg.source == "tiny_random":
        model, tokenizer = build_tiny_random(cfg)
        # Every field that shapes the weights (a cached baseline or an exported copy is keyed by it).
        fingerprint = (f"tiny_random:{cfg.architecture}:{cfg.init_seed}:{cfg.vocab_size}x{cfg.hidden_size}x"
                       f"{cfg.intermediate_size}x{cfg.num_layers}x{cfg.num_heads}x{cfg.num_kv_heads}"
                       f"x{cfg.max_position_embeddings}")
    elif cfg.source == "hf":
        model, tokenizer = _load_hf(cfg, dtype, backend.attn_implementation)
        fingerprint = f"hf:{cfg.path}@{cfg.revision or 'default'}"
    else:
        gguf_path = _gguf_path(cfg)
        model, tokenizer, fingerprint = _load_gguf(gguf_path, cfg, dtype, backend.attn_implementation)
    model = model.to(device=device, dtype=dtype).eval()
    if cfg.source == "tiny_random":
        model.config._attn_implementation = backend.attn_implementation
    return LoadedModel(model=model, tokenizer=tokenizer, name=cfg.name, fingerprint=fingerprint)


def _gguf_path(cfg: ModelConfig) -> Path:
    from decodelab.models import gguf as model_files

    if cfg.source == "gguf_package":
        return model_files.locate_gguf(cfg.package, cfg.gguf_file)
    return model_files.join_gguf_parts(list(cfg.part_packages), cfg.gguf_file, cfg.cache_dir)


def _load_hf(cfg: ModelConfig, dtype: torch.dtype, attn: str):
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attn, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model.path: cannot load '{cfg.path}' (no local directory and no cached weights; "
                        f"decodelab never downloads at run time): {first}") from err
    return model, tokenizer


def file_hash(path: Path) -> str:
    """sha256 of a file, remembered in a sidecar keyed by size and mtime so large files are read once."""
    stat = path.stat()
    sidecar = path.with_name(path.name + ".sha256.json")
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    for candidate in (sidecar, _user_hash_sidecar(path)):
        try:
            saved = json.loads(candidate.read_text())
            if saved.get("key") == key:
                return saved["sha256"]
        except (OSError, ValueError):
            pass
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    for candidate in (sidecar, _user_hash_sidecar(path)):
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.write_text(json.dumps({"key": key, "sha256": sha}))
            break
        except OSError:
            continue
    return sha


def _user_hash_sidecar(path: Path) -> Path:
    """Where the hash is remembered when the GGUF's own folder is read-only (site-packages)."""
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return Path(os.path.expanduser(os.environ.get("DECODELAB_CACHE", "~/.cache/decodelab"))) / "hashes" / f"{tag}.json"


def _load_gguf(gguf_path: Path, cfg: ModelConfig, dtype: torch.dtype, attn: str):
    sha = file_hash(gguf_path)
    fingerprint = f"gguf:{gguf_path.name}:{sha[:16]}"
    converted = Path(os.path.expanduser(cfg.cache_dir)) / "converted" / f"{gguf_path.stem}-{sha[:16]}"
    if cfg.convert_cache and (converted / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(converted)
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype, attn_implementation=attn)
        return model, tokenizer, fingerprint
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation=attn)
    if cfg.convert_cache:
        _save_atomically(model, tokenizer, converted)
    return model, tokenizer, fingerprint


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Write the converted copy to a temp folder and rename it, so a crash never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    # The weights are already dequantized; drop the GGUF "quantizer" so transformers will serialize them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise


# --- tiny random models (tests) ------------------------------------------------------------------

TINY_SPECIALS = ["<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 byte tokens + chat specials) built in memory: no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in TINY_SPECIALS:
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(TINY_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|end|>",
                                        pad_token="<|end|>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_random(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    if cfg.vocab_size < len(tokenizer):
        raise UserError(f"model.vocab_size: must be >= {len(tokenizer)} (the tiny tokenizer's size), got {cfg.vocab_size}")
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        cfg.architecture]
    config = config_cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.init_seed)
    model = model_cls(config)
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


def check_model_available(cfg: ModelConfig) -> None:
    """Fail early, with the install command, when the weights' package or file is absent (cheap: no loading)."""
    from decodelab.models import gguf as model_files

    if cfg.source == "gguf_package":
        model_files.locate_gguf(cfg.package, cfg.gguf_file)
    elif cfg.source == "gguf_parts":
        for package in cfg.part_packages:
            model_files.package_dir(package)
    elif cfg.source == "hf" and not Path(os.path.expanduser(cfg.path)).exists():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(cfg.path, "config.json", revision=cfg.revision)
        except ValueError:  # not a valid hub id either (e.g. a path that does not exist)
            cached = None
        if not isinstance(cached, str):
            raise UserError(f"model.path: '{cfg.path}' is neither a local directory nor in the local Hugging Face "
                            "cache; decodelab never downloads weights at run time")
