"""Environment fingerprint recorded with every run (README, 'What a run records').

A throughput number means nothing without the machine, library versions and code revision that produced
it, so every run stores this dict in ``fingerprint.json``. Each probe is isolated: a failing probe yields
None instead of failing the run, and nothing here is slow (no package imports except torch, which the run
has loaded anyway; versions come from package metadata).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

# Distribution names whose versions matter for a decoding benchmark.
_PACKAGES = ("decodelab", "torch", "transformers", "triton", "accelerate", "gguf", "mlflow", "wandb",
             "hydra-core", "omegaconf", "numpy")
_GIT_TIMEOUT_S = 2.0


def _safe(probe: Callable[[], Any]) -> Any:
    """Run one probe; any failure becomes None so the fingerprint never raises."""
    try:
        return probe()
    except Exception:  # noqa: BLE001 - a fingerprint must never break a run
        return None


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def cpu_model() -> Optional[str]:
    """CPU model name from /proc/cpuinfo (Linux), sysctl (macOS) or platform (elsewhere)."""
    if os.path.exists("/proc/cpuinfo"):
        fields = {}
        for line in _read("/proc/cpuinfo").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
        for key in ("model name", "hardware", "cpu model", "processor"):
            if fields.get(key) and not fields[key].isdigit():
                return fields[key]
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                             text=True, timeout=_GIT_TIMEOUT_S)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return platform.processor() or platform.machine() or None


# The vector and matrix extensions that decide which GEMM and attention kernels a CPU runs well.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")


def cpu_isa() -> List[str]:
    """The ISA extensions of ISA_FLAGS this CPU reports (/proc/cpuinfo flags, or torch's own probe elsewhere)."""
    flags: set = set()
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        capability = _safe(_torch_cpu_capability)
        return [capability.lower()] if capability else []
    return [flag for flag in ISA_FLAGS if flag in flags]


def _torch_cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to (e.g. AVX512, AVX2)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def physical_cores() -> Optional[int]:
    """Physical core count: psutil when present, else distinct (physical id, core id) pairs."""
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        pass
    cores, physical = set(), "0"
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or None


def total_memory_bytes() -> Optional[int]:
    """Total RAM from /proc/meminfo, else sysconf (POSIX)."""
    if os.path.exists("/proc/meminfo"):
        for line in _read("/proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def package_versions() -> dict[str, Optional[str]]:
    """Installed versions from metadata (no imports; None when not installed)."""
    versions: dict[str, Optional[str]] = {}
    for name in _PACKAGES:
        versions[name] = _safe(lambda n=name: importlib.metadata.version(n))
    if versions.get("decodelab") is None:  # running from a source tree that was never installed
        from decodelab import __version__

        versions["decodelab"] = __version__
    return versions


def _git(args: list[str], cwd: Path) -> Optional[str]:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S)
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(project_root: Optional[Path] = None) -> dict[str, Any]:
    """Commit and dirtiness of the checkout holding the decodelab package.

    Only a repository whose top level is the package's parent counts, so a non-editable install inside
    some unrelated repository (e.g. a venv inside another project) reports None rather than a wrong commit.
    """
    root = (project_root or Path(__file__).resolve().parents[2]).resolve()
    state: dict[str, Any] = {"git_commit": None, "git_dirty": None}
    top = _safe(lambda: _git(["rev-parse", "--show-toplevel"], root))
    if not top or Path(top).resolve() != root:
        return state
    commit = _safe(lambda: _git(["rev-parse", "--verify", "-q", "HEAD"], root))
    state["git_commit"] = commit or None
    status = _safe(lambda: _git(["status", "--porcelain", "--untracked-files=no"], root))
    state["git_dirty"] = None if status is None else bool(status)
    return state


def gpu_driver_version() -> Optional[str]:
    """NVIDIA driver version from the kernel module (no nvidia-smi process, no pynvml needed)."""
    text = _read("/proc/driver/nvidia/version")
    for token in text.split():
        if token.count(".") >= 1 and token.replace(".", "").isdigit():
            return token
    return None


def torch_state() -> dict[str, Any]:
    """Accelerators and threads as torch sees them; empty-ish when torch is missing."""
    state: dict[str, Any] = {"cuda_available": False, "cuda_version": None, "cudnn_version": None,
                             "gpu_driver_version": None, "gpus": [], "mps_available": False,
                             "torch_num_threads": None, "torch_num_interop_threads": None}
    try:
        import torch
    except Exception:  # noqa: BLE001
        return state
    state["torch_num_threads"] = _safe(torch.get_num_threads)
    state["torch_num_interop_threads"] = _safe(torch.get_num_interop_threads)
    state["mps_available"] = bool(_safe(lambda: torch.backends.mps.is_available()))
    state["cuda_available"] = bool(_safe(torch.cuda.is_available))
    if not state["cuda_available"]:
        return state
    state["cuda_version"] = _safe(lambda: torch.version.cuda or torch.version.hip)
    state["cudnn_version"] = _safe(torch.backends.cudnn.version)
    state["gpu_driver_version"] = _safe(gpu_driver_version)
    state["gpus"] = _safe(_gpu_list) or []
    return state


def _gpu_list() -> list[dict[str, Any]]:
    import torch

    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": props.name, "memory_bytes": int(props.total_memory),
                     "capability": f"{props.major}.{props.minor}"})
    return gpus


def environment_fingerprint(seeds: dict, threads: int | None) -> dict:
    """Everything needed to tell whether two runs' timings are comparable; never raises."""
    fingerprint: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": _safe(socket.gethostname),
        "os": _safe(platform.platform),
        "system": _safe(platform.system),
        "machine": _safe(platform.machine),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "cpu_model": _safe(cpu_model),
        "cpu_isa": _safe(cpu_isa),
        "torch_cpu_capability": _safe(_torch_cpu_capability),
        "cpu_count_logical": _safe(os.cpu_count),
        "cpu_count_physical": _safe(physical_cores),
        "cpu_affinity": _safe(lambda: len(os.sched_getaffinity(0))),
        "memory_total_bytes": _safe(total_memory_bytes),
        "versions": _safe(package_versions) or {},
        "threads_requested": threads,
        "seeds": _safe(lambda: dict(seeds or {})) or {},
    }
    fingerprint.update(_safe(torch_state) or {})
    fingerprint.update(_safe(git_state) or {"git_commit": None, "git_dirty": None})
    return fingerprint
