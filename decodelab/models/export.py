"""A loaded model as a Hugging Face folder (config, safetensors, tokenizer) for engines that load their own copy.

vLLM reads weights from a folder, not from a module; exporting the very weights decodelab loaded (a GGUF
dequantized, a tiny random model) makes both engines run the same model. One folder per fingerprint and
dtype, written once (through a temporary folder, so a killed export is never taken for a finished one).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from decodelab.models.loading import LoadedModel


def exported(loaded: LoadedModel, cache_dir: str) -> Path:
    """The folder holding ``loaded`` (written on first use under ``cache_dir``/hf_export)."""
    dtype = str(loaded.model.dtype).replace("torch.", "")
    key = hashlib.sha256(f"{loaded.fingerprint}|{dtype}".encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / "hf_export" / f"{loaded.name}-{dtype}-{key}"
    if (folder / "config.json").exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    loaded.model.save_pretrained(partial)
    loaded.tokenizer.save_pretrained(partial)
    (partial / "FINGERPRINT").write_text(loaded.fingerprint + "\n")
    partial.rename(folder)
    return folder
