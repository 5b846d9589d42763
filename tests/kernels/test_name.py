"""The bare name ``kernels`` is Hugging Face's package (transformers >= 5.25 imports it); this folder, on
``sys.path`` whenever the repository root is, must never shadow it, and stays ``decodelab.kernels``."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _from_the_root(code: str) -> str:
    """Runs ``code`` the way ``python -c`` does from the root: the root first on sys.path."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(), reason="Hugging Face's kernels package is not installed")
def test_the_bare_name_is_hugging_faces_package_from_the_root():
    where = _from_the_root("import kernels; print(kernels.__file__)")
    assert not Path(where).resolve().is_relative_to(ROOT / "kernels"), where
    assert Path(where).resolve().parent == Path(str(importlib.metadata.distribution("kernels").locate_file("kernels")))


@pytest.mark.skipif(_installed(), reason="Hugging Face's kernels package is installed")
def test_the_bare_name_stays_this_folder_without_hugging_faces_package():
    assert Path(_from_the_root("import kernels; print(kernels.__file__)")) == ROOT / "kernels" / "__init__.py"


def test_transformers_and_decodelab_kernels_import_together_from_the_root():
    where = _from_the_root("import transformers.activations, decodelab.kernels.provider as p; print(p.__file__)")
    assert Path(where) == ROOT / "kernels" / "provider.py"
