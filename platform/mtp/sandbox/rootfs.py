"""The zygote's view of the filesystem: a read-only tmpfs root holding only what Python needs.

Built once per worker inside the zygote's private mount namespace, then pivoted into,
so host paths (the repo, /root, /etc, secrets) are not reachable at all, not merely
unreadable. Each program gets a fresh tmpfs at ``SCRATCH``; unmounting it is the cleanup.
``/tmp`` is a link to it, unless the interpreter itself lives under /tmp: then /tmp is a
writable tmpfs holding the interpreter's read-only binds, emptied after every program.
"""

from __future__ import annotations

import os
import shutil
import sys

from mtp.sandbox import _libc as libc

SCRATCH = "/scratch/w"
MQUEUE = "/dev/mqueue"  # the slot's POSIX message queues, listed by the zygote to remove them
DEVICES = ("null", "zero", "full", "random", "urandom")
RO = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV


def _bind(source: str, target: str, read_only: bool = True) -> None:
    if os.path.islink(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.readlink(source), target)
        return
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "w").close()
    libc.mount(source, target, None, libc.MS_BIND | libc.MS_REC)
    if read_only:
        libc.mount(None, target, None, RO)


SYSTEM = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin", "/etc/ld.so.cache", "/etc/localtime")


def python_binds(hidden: list[str]) -> list[str]:
    """System libraries plus this interpreter's own ``sys.path``, minus ``hidden``; nested paths dropped."""
    wanted = [*SYSTEM, sys.base_prefix, sys.prefix, *(p for p in sys.path if p and os.path.isdir(p))]
    hidden_set = {os.path.abspath(h) for h in hidden}
    kept: list[str] = []
    for path in sorted({os.path.abspath(p) for p in wanted} - hidden_set):
        if os.path.lexists(path) and not any(path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def build_and_enter(new_root: str, binds: list[str], uid: int, hostname: str = "sandbox") -> list[str]:
    """Make ``new_root`` the root of this mount namespace (needs root in fresh namespaces).

    Returns what ``clean_tmp`` must keep in /tmp: the top-level entries the binds live in
    (empty when /tmp is a link to the scratch directory).
    """
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    libc.mount("tmpfs", new_root, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "size=4m,mode=755")
    kept = sorted({b.split("/")[2] for b in binds if b.startswith("/tmp/")})
    if kept:  # the interpreter lives under /tmp: /tmp stays a directory, writable like a real one
        os.makedirs(f"{new_root}/tmp")
        libc.mount("tmpfs", f"{new_root}/tmp", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "size=256m,mode=1777")
    for source in binds:
        if os.path.lexists(source):
            _bind(source, new_root + source)
    for name in DEVICES:
        _bind(f"/dev/{name}", f"{new_root}/dev/{name}", read_only=False)
    os.makedirs(new_root + MQUEUE)
    libc.mount("mqueue", new_root + MQUEUE, "mqueue", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
    os.makedirs(f"{new_root}/proc")
    # hidepid=2 ("invisible"; kernels before 5.8 know only the number): other users' processes are not listed.
    libc.mount("proc", f"{new_root}/proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC, "hidepid=2")
    os.makedirs(new_root + SCRATCH)
    os.chmod(os.path.dirname(new_root + SCRATCH), 0o711)
    if not os.path.lexists(f"{new_root}/tmp"):  # a bound path may already live under /tmp
        os.symlink(SCRATCH, f"{new_root}/tmp")
    os.makedirs(f"{new_root}/etc", exist_ok=True)
    with open(f"{new_root}/etc/passwd", "w") as f:
        f.write(f"root:x:0:0::/:/bin/false\nsandbox:x:{uid}:{uid}::{SCRATCH}:/bin/false\n")
    with open(f"{new_root}/etc/group", "w") as f:
        f.write(f"root:x:0:\nsandbox:x:{uid}:\n")
    libc.mount(None, new_root, None, RO)
    os.chdir(new_root)
    libc.pivot_root(".", ".")
    libc.umount(".")
    os.chdir("/")
    libc.sethostname(hostname)
    return kept


def clean_tmp(kept: list[str]) -> None:
    """Remove what a program left in a shared /tmp (only when the interpreter lives there)."""
    for name in os.listdir("/tmp"):
        if name not in kept:
            path = os.path.join("/tmp", name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


def mount_scratch(uid: int, size_mb: int) -> str:
    libc.mount(
        "tmpfs", SCRATCH, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV,
        f"size={size_mb}m,nr_inodes=16384,mode=0700,uid={uid},gid={uid}",
    )
    return SCRATCH


def unmount_scratch() -> None:
    libc.umount(SCRATCH)
