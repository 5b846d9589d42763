"""Running untrusted generated code (HumanEval's tests) contained by the operating system, or not at all.

Model output is untrusted input. An isolated run gets, through util-linux's ``unshare`` and
:mod:`decodelab.experiment.sandbox_init`:
- new network namespace: only a loopback that is down, so no address (127.0.0.1 included) is reachable;
- new mount namespace: everything read-only, homes hidden, a private tmpfs work dir that vanishes;
- new PID namespace: the program cannot see or signal anything outside it, and when it ends (or the
  timeout kills ``unshare``) the kernel kills everything it started;
- limits on memory, CPU time, file size, open files and processes; no new privileges;
- as real root: the program runs as ``nobody``; otherwise as the user, inside a user namespace.

Fail closed: where isolation cannot be built, :func:`isolation_problem` says why and the run refuses to
execute code, unless ``task.unsafe_execution=true`` asks for :data:`UNCONFINED` (rlimits only), which the
run records.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

from decodelab.errors import UserError

ISOLATED = "isolated"
UNCONFINED = "unconfined"

SANDBOX_MEMORY_BYTES = 1 << 30
SANDBOX_FILE_BYTES = 64 << 20
SANDBOX_TMP_BYTES = 128 << 20
SANDBOX_OPEN_FILES = 256
# Processes the program may add to those its user id already runs (a fork bomb stops here).
SANDBOX_PROCESSES = 32
INIT = Path(__file__).with_name("sandbox_init.py")
HOW_TO_ISOLATE = ("install util-linux (for unshare) and run as root or with unprivileged user namespaces "
                  "enabled (sysctl kernel.unprivileged_userns_clone=1), or set task.unsafe_execution=true "
                  "to run generated code unconfined (the run records it)")


class SandboxError(UserError):
    """The sandbox could not be built, so the program was not run."""


def unshare_command() -> List[str]:
    """unshare with every namespace the containment needs; a user namespace too when not real root."""
    command = ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
    if os.geteuid() != 0:
        command[1:1] = ["--user", "--map-root-user"]
    return command


def _unprivileged() -> Dict[str, Optional[int]]:
    """The ids the program runs as: nobody when the sandbox starts as real root, else the caller's (None)."""
    if os.geteuid() != 0:
        return {"uid": None, "gid": None}
    try:
        entry = pwd.getpwnam("nobody")
        return {"uid": entry.pw_uid, "gid": entry.pw_gid}
    except KeyError:
        return {"uid": 65534, "gid": 65534}


def _interpreter() -> str:
    """The base interpreter, not the venv's link to it: the program needs no site-packages."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _hidden() -> List[str]:
    return sorted({"/root", "/home", os.path.expanduser("~")})


def run_isolated(program: str, timeout: float) -> Optional[int]:
    """The program's exit code (negative: killed by that signal), None on timeout; SandboxError if no sandbox."""
    with tempfile.TemporaryDirectory(prefix="decodelab-sandbox-") as host:
        file = Path(host) / "program.py"
        file.write_text(program, encoding="utf-8")
        read, write = os.pipe()
        python = _interpreter()
        spec = {"program": str(file), "status_fd": write, "python": python, "hidden": _hidden(),
                "keep": [sys.base_prefix, os.path.dirname(python)], **_unprivileged(),
                "memory_bytes": SANDBOX_MEMORY_BYTES, "cpu_s": int(timeout) + 1, "file_bytes": SANDBOX_FILE_BYTES,
                "tmp_bytes": SANDBOX_TMP_BYTES, "open_files": SANDBOX_OPEN_FILES, "processes": SANDBOX_PROCESSES}
        with open(Path(host) / "stderr", "w+b") as stderr:
            try:
                proc = subprocess.Popen([*unshare_command(), sys.executable, "-I", str(INIT), json.dumps(spec)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                        pass_fds=(write,), start_new_session=True)
            except OSError as err:
                os.close(read)
                raise SandboxError(f"cannot start unshare: {err}") from None
            finally:
                os.close(write)
            code = _wait(proc, timeout)
            with os.fdopen(read, "rb") as status_pipe:
                status = status_pipe.read().decode(errors="replace")
            if status != "ready":
                stderr.seek(0)
                told = status.partition("error: ")[2] or _last_line(stderr.read()) or f"exit code {code}"
                raise SandboxError(f"the sandbox could not be set up: {told}")
    return code


def _wait(proc: subprocess.Popen, timeout: float) -> Optional[int]:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # unshare dies, and --kill-child takes the namespace with it
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()
        return None


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


@lru_cache(maxsize=None)
def isolation_problem() -> Optional[str]:
    """Why generated code cannot be isolated here (None: it can). Probed once by running a tiny program."""
    if not sys.platform.startswith("linux"):
        return f"isolation needs Linux namespaces; this is {sys.platform}"
    if shutil.which("unshare") is None:
        return "util-linux's unshare is not on PATH"
    try:
        code = run_isolated("raise SystemExit(7)\n", timeout=30.0)
    except SandboxError as err:
        return str(err)
    return None if code == 7 else f"a probe program exited with {code}, expected 7"


def require_isolation(what: str) -> None:
    """Raise a one-line UserError (exit code 2) naming ``what`` when this machine cannot isolate code."""
    problem = isolation_problem()
    if problem is not None:
        raise UserError(f"{what} runs generated code, and this machine cannot isolate it ({problem}): {HOW_TO_ISOLATE}")


# Unconfined: rlimits set in the child before the program (a preexec_fn is unsafe in a threaded parent).
_GUARD = """\
import resource, runpy, sys
for kind, value in ((resource.RLIMIT_AS, int(sys.argv[1])), (resource.RLIMIT_FSIZE, int(sys.argv[2])),
                    (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):  # not enforceable everywhere (RLIMIT_AS on macOS)
        pass
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_unconfined(program: str, timeout: float) -> Optional[int]:
    """The opt-in ``task.unsafe_execution=true`` path: memory and file-size limits and a temp cwd, nothing more."""
    with tempfile.TemporaryDirectory(prefix="decodelab-unconfined-") as tmpdir:
        file = Path(tmpdir) / "program.py"
        file.write_text(program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmpdir, "TMPDIR": tmpdir,
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _GUARD, str(SANDBOX_MEMORY_BYTES), str(SANDBOX_FILE_BYTES), str(file)],
            cwd=tmpdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        return _wait(proc, timeout)


def run_program(program: str, timeout: float, execution: str = ISOLATED) -> Optional[int]:
    """Run ``program`` as ``execution`` says (:data:`ISOLATED` or :data:`UNCONFINED`); its exit code, None on timeout."""
    if execution == UNCONFINED:
        return run_unconfined(program, timeout)
    if execution != ISOLATED:
        raise ValueError(f"execution must be {ISOLATED!r} or {UNCONFINED!r}, got {execution!r}")
    return run_isolated(program, timeout)
