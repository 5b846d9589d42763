"""The first process inside the sandbox's namespaces: it builds the filesystem view, then becomes the program.

Run by :mod:`decodelab.experiment.sandbox` as ``python -I sandbox_init.py SPEC_JSON`` under ``unshare``
(new mount, network, PID, IPC and UTS namespaces, so it is PID 1 of its own tree). Standard library
only: it runs before anything is trusted and must not import the package. It reports on the status
file descriptor: ``ok`` just before it executes the program (the descriptor is close-on-exec), or one
line saying which step failed, so the parent can tell a sandbox that could not be built (fail closed)
from a program that failed.

Steps, each needed for one containment property:
1. mount propagation private, so nothing done here reaches the host;
2. a fresh tmpfs on /tmp holds the program's private work dir (written files vanish with the namespace);
3. every home directory is covered by an empty tmpfs (the interpreter's prefix is bound back if it
   lives under one);
4. every other mount is remounted read-only and nosuid, and the result is checked in mountinfo;
5. limits: address space, CPU seconds, file size, open files, and processes (counted per user id,
   which is why the program runs as an unprivileged user when the sandbox starts as real root);
6. no new privileges, then the program is executed in place of this process.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
from typing import Dict, List, Tuple

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
# Per-mount options kept on remount: a user namespace may not clear a locked one (EPERM otherwise).
KEPT_FLAGS = {"nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
              "relatime": MS_RELATIME}
WORK = "/tmp/work"
STAGING = "/tmp/.keep"

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), data.encode()) != 0:
        raise SetupError(f"mount {target}: {os.strerror(ctypes.get_errno())}")


def umount(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        raise SetupError(f"umount {target}: {os.strerror(ctypes.get_errno())}")


def mounts() -> List[Tuple[str, List[str]]]:
    """(mount point, per-mount options) from /proc/self/mountinfo, in mount order."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as lines:
        for line in lines:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # octal escapes (\040 for a space)
            found.append((point, fields[5].split(",")))
    return found


def hide(covered: List[str], keep: List[str]) -> None:
    """Cover each directory in ``covered`` with an empty tmpfs; bind each ``keep`` path back where it was."""
    staged: Dict[str, str] = {}
    for index, path in enumerate(keep):
        if any(path == top or path.startswith(top.rstrip("/") + "/") for top in covered) and os.path.isdir(path):
            stage = f"{STAGING}/{index}"
            os.makedirs(stage)
            mount(path, stage, "", MS_BIND | MS_REC)
            staged[path] = stage
    for top in covered:
        if os.path.isdir(top):
            mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for path, stage in staged.items():
        os.makedirs(path, exist_ok=True)
        mount(stage, path, "", MS_BIND | MS_REC)
        umount(stage)
        os.rmdir(stage)
    if staged:
        os.rmdir(STAGING)


def freeze(writable: str) -> None:
    """Remount every mount but ``writable`` read-only and nosuid; refuse if any reachable one stays writable."""
    for point, options in mounts():
        if point == writable:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        flags |= sum(flag for name, flag in KEPT_FLAGS.items() if name in options)
        try:
            mount("none", point, "", flags)
        except SetupError:
            pass  # checked below: only a mount that is hidden (under a covered home) may fail
    top = {point: options for point, options in mounts()}  # the last mount on a point is the one paths reach
    left = [point for point, options in top.items()
            if point != writable and "rw" in options and os.path.lexists(point)]
    if left:
        raise SetupError(f"could not make {', '.join(left)} read-only")


def limit(kind: int, value: int) -> None:
    resource.setrlimit(kind, (value, value))


def processes_of(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                count += os.stat(f"/proc/{name}").st_uid == uid
            except FileNotFoundError:
                pass
    return count


def build(spec: dict) -> None:
    with open(spec["program"], encoding="utf-8") as file:
        program = file.read()
    mount("none", "/", "", MS_REC | MS_PRIVATE)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={spec['tmp_bytes']}")
    hide(spec["hidden"], spec["keep"])
    freeze(writable="/tmp")
    os.makedirs(WORK, mode=0o700)
    with open(f"{WORK}/program.py", "w", encoding="utf-8") as file:
        file.write(program)
    uid, gid = spec["uid"], spec["gid"]
    if uid is not None:
        os.chown(WORK, uid, gid)
        os.chown(f"{WORK}/program.py", uid, gid)
    limit(resource.RLIMIT_AS, spec["memory_bytes"])
    limit(resource.RLIMIT_CPU, spec["cpu_s"])
    limit(resource.RLIMIT_FSIZE, spec["file_bytes"])
    limit(resource.RLIMIT_NOFILE, spec["open_files"])
    limit(resource.RLIMIT_CORE, 0)
    # Processes are counted per real user id across the machine, so the cap is relative to what it runs now.
    limit(resource.RLIMIT_NPROC, processes_of(uid if uid is not None else os.getuid()) + spec["processes"])
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SetupError(f"prctl(no_new_privs): {os.strerror(ctypes.get_errno())}")
    if uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise SetupError(f"could not drop to uid {uid}")
    os.chdir(WORK)


def main() -> None:
    spec = json.loads(sys.argv[1])
    status = spec["status_fd"]
    env = {"PATH": "/usr/bin:/bin", "HOME": WORK, "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    try:
        build(spec)
        quiet = os.open("/dev/null", os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)  # from here on nothing the program prints reaches the host
        os.set_inheritable(status, False)  # closes at exec: the parent sees "ready" then end of file
        os.write(status, b"ready")
        os.execve(spec["python"], [spec["python"], "-I", "-B", "program.py"], env)
    except (SetupError, OSError, ValueError) as err:
        os.write(status, f" error: {err}".encode())
        os._exit(125)


if __name__ == "__main__":
    main()
