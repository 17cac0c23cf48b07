"""The slot's judge, seen from the zygote: one long-lived process that runs every trusted-oracle program's tests.

A judge forked per program cost as much again as the candidate's own process (a fork,
copy-on-write faults over the zygote's heap, an exit that unmaps it), for code that is
the benchmark's, not the model's. So the zygote forks one judge, confined like any child
but under the slot's judge uid and in the slot's judge cgroup, and hands it programs one
after another (``harness.serve_judge``). It holds tests, which is allowed: no candidate
is ever forked from it, and the candidate runs under another uid that can neither read
its memory nor signal it. The zygote replaces it whenever a program does not end with
its report (a timeout, its death), when the limits change, or when it retires itself
(after a call that changed its arguments, or before its CPU allowance could run short).

Its cgroup gets the program's limits (memory, processes, CPU quota) as a tree of its
own, and its CPU time counts toward the program's timeout, as when it was the program's
child.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
from dataclasses import replace

from mtp.sandbox import harness
from mtp.sandbox.cgroups import Handles
from mtp.sandbox.confine import Confinement
from mtp.sandbox.limits import Limits

LIFETIME_CPU_S = 3600  # its RLIMIT_CPU hard limit: it retires at half, so each program keeps its full allowance


class Judge:
    """Start, feed, and end the slot's judge process."""

    def __init__(self, confinement: Confinement, uid: int | None, cgroups: Handles | None, devnull: int):
        self.confinement, self.uid, self.cgroups, self.devnull = confinement, uid, cgroups, devnull
        self.pid: int | None = None
        self.status: int | None = None  # its wait status, once it has ended and been reaped
        self.limits: Limits | None = None
        self.pidfd: int | None = None  # readable once it has ended
        self.reports: socket.socket | None = None  # its status datagrams, with the sender's credentials
        self._control: socket.socket | None = None  # programs go out here

    # ------------------------------------------------------------------ lifecycle
    def _start(self, limits: Limits) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        reports, report_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        reports.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        pid = os.fork()
        if pid == 0:
            lifetime = replace(limits, cpu_s=LIFETIME_CPU_S)
            self.confinement.enter(lifetime, "/", self.uid, [self.devnull, self.devnull, self.devnull,
                                                            report_end.fileno(), theirs.fileno()])
            try:
                harness.serve_judge()
            finally:
                os._exit(70)  # whatever ends it, never run the zygote's code in a child
        theirs.close()
        report_end.close()
        self.pid, self.status, self.limits = pid, None, limits
        self.pidfd = os.pidfd_open(pid)
        self._control, self.reports = ours, reports

    def alive(self) -> bool:
        return self.pid is not None and self.status is None and not select.select([self.pidfd], [], [], 0)[0]

    def submit(self, request: dict, limits: Limits, fds: list[int]) -> None:
        """Hand it one program: ``request`` ({prefix, tests, names, nonce}) and its stdout, stderr, channel fds."""
        if not self.alive() or self.limits != limits:
            self.stop()
            self._start(limits)
        text = harness.memfd(json.dumps({**request, "cpu_seconds": limits.cpu_seconds}))
        try:
            socket.send_fds(self._control, [b"p"], [*fds, text])
        finally:
            os.close(text)

    def reaped(self, status: int) -> None:
        """The zygote's reaper collected it."""
        self.status = status

    def stop(self) -> int | None:
        """Kill it (and anything it started) and reap it; its wait status, None if none was running."""
        if self.pid is None:
            return None
        if self.status is None:
            if self.cgroups is not None:
                self.cgroups.kill_all()
            else:
                os.kill(self.pid, signal.SIGKILL)
            try:
                self.status = os.waitpid(self.pid, 0)[1]
            except ChildProcessError:  # the zygote's reaper took it; it recorded the status
                pass
        status = self.status
        os.close(self.pidfd)
        self._control.close()
        self.reports.close()
        self.pid = self.pidfd = self._control = self.reports = None
        return status

