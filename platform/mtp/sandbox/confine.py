"""How every forked child of a slot is confined, whichever zygote forked it.

Both zygotes (``zygote``: the judge; ``candidate_zygote``: everything model-written) fork
children the same way: into the slot's cgroups, in a new session, with only the fds it
needs, then rlimits, the slot's uid, no_new_privs, seccomp, a scrubbed environment and
default signal dispositions. Any failure exits the child before it runs a byte of code.
"""

from __future__ import annotations

import copy
import fcntl
import os
import resource
import signal
import sys

from mtp.sandbox import _libc as libc
from mtp.sandbox import seccomp
from mtp.sandbox.limits import Limits

PATH = "/usr/local/bin:/usr/bin:/bin"


class Confinement:
    """What a zygote prepares once (the slot's cgroup join fds, the seccomp filter) for every child."""

    def __init__(self, isolated: bool, join_fds: list[int], use_seccomp: bool):
        self.isolated = isolated
        self.join_fds = join_fds
        self.seccomp = seccomp.Prepared() if use_seccomp else None

    def joining(self, join_fds: list[int]) -> "Confinement":
        """The same confinement for children of other cgroups (the judge's)."""
        other = copy.copy(self)
        other.join_fds = join_fds
        return other

    def enter(self, limits: Limits, cwd: str, uid: int | None, fds: list[int]) -> None:
        """Confine this (just forked) child; ``fds`` become its 0, 1, 2, 3...; on failure it exits 70."""
        try:
            os.setsid()
            for fd in self.join_fds:
                os.write(fd, b"0")
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
            for target, fd in enumerate(high):  # stdin, stdout, stderr, then the harness's own fds
                os.dup2(fd, target)
            os.closerange(len(fds), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            os.chdir(cwd)
            _set_rlimits(limits, isolated=self.isolated)
            if self.isolated:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
            libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
            if self.seccomp is not None:
                self.seccomp.install()
            os.umask(0o077)
            os.environ.clear()
            os.environ.update({"PATH": PATH, "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8"})
            _default_signals()
            if "random" in sys.modules:  # forked from one zygote: reseed, or every sample shares a stream
                sys.modules["random"].seed()
            sys.argv = ["program.py"]
        except BaseException as exc:  # noqa: BLE001
            try:
                os.write(2, f"sandbox setup failed: {exc!r}\n".encode())
            finally:
                os._exit(70)


def _set_rlimits(limits: Limits, isolated: bool) -> None:
    """Per-process limits. Isolated, the cgroups also bound the tree's memory and processes;
    insecure, a per-process address-space cap stands in (RLIMIT_NPROC would count every
    process of the host user, so it is left alone)."""
    cpu = limits.cpu_seconds
    file_size = limits.file_size_mb << 20
    settings = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_FSIZE, (file_size, file_size)),
        (resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if isolated:
        settings.append((resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes)))
    else:
        settings.append((resource.RLIMIT_AS, (limits.memory_mb << 20, limits.memory_mb << 20)))
    for which, value in settings:
        resource.setrlimit(which, value)


def _default_signals() -> None:
    """Every signal at its default action and none blocked, whatever the host process had.

    Ignored dispositions and the blocked mask survive fork and exec: a host that blocked
    or ignored, say, a real-time signal would otherwise let a program survive it.
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for number in range(1, signal.NSIG):
        # Python knows every disposition (read from the kernel at start, then each one it set):
        # resetting only those not at their default saved about 0.4 ms per forked child.
        if number in (signal.SIGKILL, signal.SIGSTOP) or signal.getsignal(number) is signal.SIG_DFL:
            continue
        try:
            signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):  # numbers the C library reserves for itself (32, 33)
            pass
