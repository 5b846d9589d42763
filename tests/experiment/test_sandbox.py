"""The sandbox for generated code: hostile programs, each asserted contained; fail closed; the logged opt-out.

Nothing here is skipped: a machine that cannot isolate code fails these tests (and HumanEval refuses to
run there), with the reason and what to install. Each containment test is paired, where the host allows it, with the same program run unconfined (the
``task.unsafe_execution`` path), which shows the program does what it claims and the test can fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from decodelab.errors import UserError
from decodelab.experiment import sandbox
from decodelab.experiment.sandbox import SANDBOX_PROCESSES, SandboxError, run_isolated, run_unconfined



def _marker() -> str:
    return f"decodelab-escape-{uuid.uuid4().hex[:12]}"


def test_a_plain_program_runs_and_writes_in_its_work_dir():
    program = "open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'\nraise SystemExit(7)\n"
    assert run_isolated(program, timeout=10) == 7


def test_files_written_outside_the_work_dir_never_reach_the_host(tmp_path):
    name = _marker()
    targets = [Path("/tmp") / name, Path.home() / name, tmp_path / name, Path("/var/tmp") / name,
               Path("/dev/shm") / name, Path.cwd() / name, Path(sys.prefix) / name]
    program = (f"targets = {[str(t) for t in targets]!r}\n"
               "for path in targets:\n"
               "    try:\n"
               "        open(path, 'w').write('escaped')\n"
               "    except OSError:\n"
               "        pass\n")
    try:
        assert run_isolated(program, timeout=10) == 0
        assert [t for t in targets if t.exists()] == []
        # Unconfined, the same program does write outside (so the assertion above can fail).
        assert run_unconfined(program, timeout=10) == 0
        assert (tmp_path / name).exists()
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_home_directory_cannot_be_read():
    secret = Path.home() / f".{_marker()}"
    secret.write_text("secret")
    program = (f"try:\n    data = open({str(secret)!r}).read()\nexcept OSError:\n    raise SystemExit(0)\n"
               "raise SystemExit(3 if data == 'secret' else 4)\n")
    try:
        assert run_isolated(program, timeout=10) == 0
        assert run_unconfined(program, timeout=10) == 3
    finally:
        secret.unlink()


def test_no_socket_reaches_loopback_or_an_external_address():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    # The raw _socket module, not socket.socket (which a Python-level guard could replace).
    program = ("import _socket\n"
               f"for host, port, code in (('127.0.0.1', {port}, 3), ('1.1.1.1', 53, 4), ('8.8.8.8', 443, 5)):\n"
               "    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
               "    s.settimeout(2)\n"
               "    try:\n"
               "        s.connect((host, port))\n"
               "    except OSError:\n"
               "        continue\n"
               "    raise SystemExit(code)\n")
    try:
        assert run_isolated(program, timeout=15) == 0
        with pytest.raises(BlockingIOError):
            listener.accept()
        assert run_unconfined(program, timeout=15) == 3  # the listener is reachable from the host
    finally:
        listener.close()


def test_fork_bomb_is_capped_and_its_processes_die_with_the_sandbox():
    marker = _marker()
    # Forks until refused, each child sleeping; the exit code is how many forks succeeded.
    program = (f"import os, time\nMARK = {marker!r}\nforked = 0\n"
               "for _ in range(10 * 1000):\n"
               "    try:\n"
               "        pid = os.fork()\n"
               "    except OSError:\n"
               "        break\n"
               "    if pid == 0:\n"
               "        time.sleep(60)\n"
               "        os._exit(0)\n"
               "    forked += 1\n"
               "raise SystemExit(min(forked, 250))\n")
    forked = run_isolated(program, timeout=20)
    assert forked is not None and 0 < forked <= SANDBOX_PROCESSES
    assert _processes_running(marker) == []


def test_endless_fork_bomb_is_stopped_by_the_timeout():
    marker = _marker()
    program = f"import os\nMARK = {marker!r}\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    assert run_isolated(program, timeout=3) is None
    assert time.monotonic() - start < 10
    time.sleep(0.5)  # the namespace's processes are reaped by the kernel
    assert _processes_running(marker) == []


def _processes_running(marker: str) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                pass
    return found


def test_memory_bomb_is_stopped():
    # 4 GiB at once, then growth in 64 MiB steps: both hit the 1 GiB address-space cap.
    assert run_isolated("try:\n    x = bytearray(4 << 30)\nexcept MemoryError:\n    raise SystemExit(5)\n", 10) == 5
    grow = "chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(64 << 20))\nexcept MemoryError:\n    raise SystemExit(6)\n"
    assert run_isolated(grow, timeout=20) == 6


def test_time_bomb_is_stopped():
    start = time.monotonic()
    assert run_isolated("while True:\n    pass\n", timeout=2) is None
    assert time.monotonic() - start < 6


def test_the_program_cannot_signal_its_parent():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    # Never kill(-1) or the parent's group here: were the sandbox broken, that would reach the whole machine.
    hostile = (f"import os, signal\nfor send in (lambda: os.kill({os.getpid()}, signal.SIGUSR1),\n"
               f"             lambda: os.killpg({os.getpgid(0)}, signal.SIGUSR1)):\n"
               "    try:\n        send()\n    except OSError:\n        pass\n")
    control = f"import os, signal\nos.kill({os.getpid()}, signal.SIGUSR1)\n"
    try:
        run_isolated(hostile, timeout=10)
        time.sleep(0.2)
        assert received == []
        assert run_unconfined(control, timeout=10) == 0  # unconfined, a program reaches this process
        time.sleep(0.2)
        assert received
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.skipif(os.geteuid() != 0, reason="the program runs as nobody only when the sandbox starts as root")
def test_program_runs_as_nobody_without_privileges():
    program = ("import os\nstatus = open('/proc/self/status').read()\n"
               "raise SystemExit(0 if os.getuid() == 65534 and 'NoNewPrivs:\\t1' in status else 3)\n")
    assert run_isolated(program, timeout=10) == 0


def test_a_sandbox_that_cannot_be_built_refuses_to_run(monkeypatch):
    monkeypatch.setattr(sandbox, "unshare_command", lambda: ["unshare", "--no-such-option"])
    with pytest.raises(SandboxError, match="could not be set up"):
        run_isolated("raise SystemExit(0)\n", timeout=10)


def test_no_isolation_fails_closed_with_one_line_naming_the_opt_in(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no unshare on PATH
    sandbox.isolation_problem.cache_clear()
    try:
        with pytest.raises(UserError) as err:
            sandbox.require_isolation("task=humaneval")
    finally:
        sandbox.isolation_problem.cache_clear()
    message = str(err.value)
    assert "\n" not in message and "unshare is not on PATH" in message and "task.unsafe_execution=true" in message


SYSTEM_PYTHON = "/usr/bin/python3"
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", "-i", "PATH=/usr/bin:/bin"]
REPO = Path(__file__).resolve().parents[2]


def _nobody_can_run_the_package() -> bool:
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        return False
    probe = subprocess.run([*AS_NOBODY, SYSTEM_PYTHON, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                            "import decodelab.experiment.sandbox"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _nobody_can_run_the_package(),
                    reason="needs root (to become nobody), a system python3 and a repository nobody can read")
def test_an_unprivileged_caller_gets_the_same_containment_in_a_user_namespace(tmp_path):
    """decodelab run by an ordinary user: unshare adds a user namespace, and the limits still hold."""
    shared = Path(tempfile.mkdtemp(prefix="decodelab-nobody-"))
    try:
        os.chmod(shared, 0o777)
        escape = shared / "escaped"
        script = shared / "probe.py"
        script.write_text(
            f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
            "from decodelab.experiment.sandbox import isolation_problem, run_isolated\n"
            "assert isolation_problem() is None, isolation_problem()\n"
            f"codes = [run_isolated(p, 10) for p in {_USERNS_PROGRAMS!r}]\n"
            "print(codes)\n".replace("ESCAPE", str(escape)))
        os.chmod(script, 0o644)
        out = subprocess.run([*AS_NOBODY, SYSTEM_PYTHON, str(script)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[0] == "[0, 0, 0]", out.stdout
        assert not escape.exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# Each exits 0 only if contained: a write to a world-writable host dir, a loopback connect, forks past the cap.
_USERNS_PROGRAMS = [
    "try:\n    open('ESCAPE', 'w').write('x')\nexcept OSError:\n    raise SystemExit(0)\nraise SystemExit(3)\n",
    "import _socket\ns = _socket.socket()\ntry:\n    s.connect(('127.0.0.1', 22))\nexcept OSError:\n    raise SystemExit(0)\n"
    "raise SystemExit(3)\n",
    "import os, time\nfor n in range(1000):\n    try:\n        pid = os.fork()\n    except OSError:\n        raise SystemExit(0)\n"
    "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\nraise SystemExit(3)\n",
]
