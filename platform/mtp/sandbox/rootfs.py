"""The zygote's view of the filesystem: a read-only tmpfs root holding only what Python needs.

Built once per worker inside the zygote's private mount namespace, then pivoted into,
so host paths (the repo, /root, /etc, secrets) are not reachable at all, not merely
unreadable. Each program gets a fresh tmpfs at ``SCRATCH``; unmounting it is the cleanup.
``/tmp`` is a link to it, unless the interpreter itself lives under /tmp: then /tmp is a
writable tmpfs holding the interpreter's read-only binds, emptied after every program.
"""

from __future__ import annotations

import importlib.machinery
import os
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
            remove_tree(os.path.join("/tmp", name))


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str) -> None:
    """Remove ``path`` (a file, a link or a directory tree of any depth) without recursion.

    A program can leave a chain deeper than Python's recursion limit (``shutil.rmtree``
    then raises ``RecursionError``) or longer than PATH_MAX, so this walks down by
    directory fds, one open at a time, keeping only the names on the way back up.
    Called after the program's tree is dead, so nothing changes under it; links are
    removed, never followed.
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except NotADirectoryError:  # a file, or a link (O_NOFOLLOW on a link: ELOOP or ENOTDIR)
        os.unlink(path)
        return
    except OSError as exc:
        if not os.path.islink(path):
            raise
        os.unlink(path)
        return
    names: list[str] = []  # the directories we are inside of, below ``path``
    try:
        while True:
            child = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if child is None and not names:
                break
            step = os.open(child if child is not None else "..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = step
            if child is not None:
                names.append(child)
            else:
                os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def safe_sys_path() -> None:
    """Keep only ``sys.path`` entries that exist on a read-only mount.

    An entry that is missing after the pivot (the hidden source root, a zip that was never
    there) could be created by a program wherever its parent is writable (a /tmp that holds
    the interpreter): a module planted there would run in the next import of that name, in
    any process of the slot, the judge included. Run in each zygote after the pivot.
    """
    kept = []
    for entry in sys.path:
        try:
            read_only = bool(entry) and os.path.isdir(entry) and bool(os.statvfs(entry).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        if read_only:
            kept.append(entry)
    sys.path[:] = kept
    sys.path_importer_cache.clear()
    # Rebuild the finders (and their directory listings) here, once: forked children inherit them
    # instead of each listing every directory again at its first import.
    importlib.machinery.PathFinder.find_spec("_mtp_sandbox_warm_import_caches_")


def mount_scratch(uid: int, size_mb: int) -> str:
    libc.mount(
        "tmpfs", SCRATCH, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV,
        f"size={size_mb}m,nr_inodes=16384,mode=0700,uid={uid},gid={uid}",
    )
    return SCRATCH


def unmount_scratch() -> None:
    libc.umount(SCRATCH)
