"""The fork server: one warm Python per worker slot, inside its namespaces, forking programs.

Started by the host (``mtp.sandbox.sandbox.Sandbox``) as PID 1 of a fresh pid, mount,
net, ipc and uts namespace. It builds a read-only root, preloads common modules, then
loops: receive a program, fork it into the slot's cgroups under the slot's uid with
rlimits and no_new_privs, watch it, kill the whole tree, answer with a verdict.

A pass is decided only from a datagram the harness sends after the program's code ran
to its end, carrying a nonce the harness reads only then, and sent by the program's
main process (the kernel attests the sender's pid with SCM_CREDENTIALS). Exit codes,
``atexit`` handlers, killing the harness, walking stack frames and forked copies of the
harness cannot produce one. What no in-process harness can rule out: the tests call the
candidate in one interpreter, so code written against this protocol could read the
nonce fd itself; that takes deliberate work, and is a forgery, not a lucky exit code.
"""

from __future__ import annotations

import builtins
import fcntl
import gc
import importlib
import os
import resource
import secrets
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field

from mtp.sandbox import _libc as libc
from mtp.sandbox import protocol, rootfs, seccomp
from mtp.sandbox.cgroups import Handles, SlotCgroups
from mtp.sandbox.limits import Limits
from mtp.sandbox.verdict import Verdict

STATUS_FD, NONCE_FD = 3, 4
PASS, ERROR = b"P", b"E"
_read, _write, _exit = os.read, os.write, os._exit  # bound before any program runs
PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class _Capture:
    """Keeps the first ``limit`` bytes of a stream and counts the rest."""

    limit: int
    data: bytearray = field(default_factory=bytearray)
    total: int = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass
class _Outcome:
    """What the watcher observed; ``decide`` turns it into a verdict."""

    timed_out: bool = False
    exit_code: int | None = None
    signal: int | None = None
    passed_signal: bool = False
    error: str = ""
    oom_kills: int = 0
    refused_forks: int = 0


def decide(o: _Outcome, limits: Limits) -> tuple[str, str]:
    """(status, detail). Only the harness's attested signal plus a clean exit is a pass."""
    if o.passed_signal and o.exit_code == 0 and not o.timed_out:
        return "passed", ""
    if o.timed_out:
        return "timed_out", f"wall time limit of {limits.timeout_s:g}s"
    if o.oom_kills:
        return "crashed", f"memory limit of {limits.memory_mb} MB exceeded"
    if o.signal == signal.SIGXCPU:
        return "timed_out", f"cpu time limit of {limits.cpu_seconds}s"
    if o.signal == signal.SIGXFSZ:
        return "crashed", f"file size limit of {limits.file_size_mb} MB exceeded"
    if o.signal is not None:
        return "crashed", f"killed by {signal.Signals(o.signal).name}"
    fork_note = f" (process limit of {limits.max_processes} hit)" if o.refused_forks else ""
    if o.error:
        return "failed", o.error + fork_note
    return "failed", f"exited with code {o.exit_code} before the program finished{fork_note}"


def _harness(source: str) -> None:
    """Runs in the forked child as the slot's user; never returns."""
    try:
        code = compile(source, "program.py", "exec")
        exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": builtins})
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as exc:  # noqa: BLE001 - every way out of the program is a non-pass
        try:
            detail = f"{type(exc).__name__}: {exc}"
        except BaseException:  # noqa: BLE001 - a hostile __str__
            detail = "exception with an unprintable message"
        try:
            _write(STATUS_FD, ERROR + detail[:2000].encode("utf-8", "replace"))
        finally:
            _exit(1)
    _write(STATUS_FD, PASS + _read(NONCE_FD, 64))
    _exit(0)


class Zygote:
    """Set up once (namespaces are already ours; root, cgroup fds, preloads), then ``run`` programs."""

    def __init__(self, config: dict):
        self.isolated: bool = config["isolated"]
        self.uid: int | None = config.get("uid")
        self.seccomp = seccomp.Prepared() if config.get("seccomp") else None
        for name in config.get("preload", ()):
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.children: dict[int, int] = {}  # reaped pid -> wait status
        if self.isolated:
            self.cgroups: Handles | None = Handles(SlotCgroups(**config["cgroups"]))
            rootfs.build_and_enter(config["root_dir"], rootfs.python_binds(config["hidden"]), self.uid)
        else:
            self.cgroups = None
            libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)

    # ------------------------------------------------------------------ per program
    def run(self, source: str, limits: Limits) -> Verdict:
        start = time.monotonic()
        self.children.clear()
        if self.isolated:
            scratch = rootfs.mount_scratch(self.uid, limits.memory_mb)
            self.cgroups.set_limits(limits.memory_mb << 20, limits.max_processes)
            before = self.cgroups.counters()
        else:
            scratch = tempfile.mkdtemp(prefix="mtp-sandbox-")
            before = (0, 0)
        try:
            outcome, out, err = self._fork_and_watch(source, limits, scratch, start)
        finally:
            self._end_tree()
            if self.isolated:
                rootfs.unmount_scratch()
            else:
                shutil.rmtree(scratch, ignore_errors=True)
        if self.isolated:
            after = self.cgroups.counters()
            outcome.oom_kills, outcome.refused_forks = after[0] - before[0], after[1] - before[1]
        status, detail = decide(outcome, limits)
        truncated = out.truncated or err.truncated
        if truncated:
            detail = (detail + "; " if detail else "") + f"output truncated to {limits.output_bytes} bytes per stream"
        return Verdict(
            status=status, detail=detail, stdout=out.text(), stderr=err.text(), output_truncated=truncated,
            exit_code=outcome.exit_code, signal=signal.Signals(outcome.signal).name if outcome.signal else None,
            duration_s=round(time.monotonic() - start, 6), isolation="full" if self.isolated else "insecure",
        )

    def _fork_and_watch(self, source: str, limits: Limits, scratch: str, start: float):
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        nonce_r, nonce_w = os.pipe()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        parent_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        nonce = secrets.token_hex(16).encode()
        os.write(nonce_w, nonce)  # before the fork: a child that exits at once must not break this pipe
        os.close(nonce_w)
        pid = os.fork()
        if pid == 0:
            self._enter_child(limits, scratch, [self.devnull, out_w, err_w, child_sock.fileno(), nonce_r])
            _harness(source)
        for fd in (out_w, err_w, nonce_r):
            os.close(fd)
        child_sock.close()
        out, err = _Capture(limits.output_bytes), _Capture(limits.output_bytes)
        streams = {out_r: out, err_r: err}
        outcome = _Outcome()
        try:
            outcome.timed_out = self._watch(pid, streams, start + limits.timeout_s)
            self._end_tree()
            status = self.children.pop(pid)
            if os.WIFSIGNALED(status):
                outcome.signal = os.WTERMSIG(status)
            else:
                outcome.exit_code = os.WEXITSTATUS(status)
            for fd, capture in streams.items():
                self._drain(fd, capture)
            self._read_status(parent_sock, pid, nonce, outcome)
        finally:
            for fd in streams:
                os.close(fd)
            parent_sock.close()
        return outcome, out, err

    def _watch(self, pid: int, streams: dict[int, _Capture], deadline: float) -> bool:
        """Pump output until the main process exits; True if the wall deadline came first."""
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        for fd in streams:
            poller.register(fd, select.POLLIN)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                for fd, _ in poller.poll(remaining * 1000):
                    if fd == pidfd:
                        return False
                    chunk = os.read(fd, 1 << 16)
                    if chunk:
                        streams[fd].add(chunk)
                    else:
                        poller.unregister(fd)
        finally:
            os.close(pidfd)

    @staticmethod
    def _drain(fd: int, capture: _Capture) -> None:
        """Read what is left; every writer is dead by now, so this ends at EOF or EAGAIN."""
        os.set_blocking(fd, False)
        try:
            while chunk := os.read(fd, 1 << 16):
                capture.add(chunk)
        except BlockingIOError:
            pass

    @staticmethod
    def _read_status(sock: socket.socket, pid: int, nonce: bytes, outcome: _Outcome) -> None:
        """Accept datagrams only from the main process, as attested by the kernel."""
        sock.setblocking(False)
        creds_size = struct.calcsize("iII")
        while True:
            try:
                message, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(creds_size))
            except BlockingIOError:
                return
            sender = next(
                (struct.unpack("iII", data[:creds_size])[0] for level, kind, data in ancillary
                 if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS),
                None,
            )
            if sender != pid:
                continue
            if message == PASS + nonce:
                outcome.passed_signal = True
            elif message.startswith(ERROR) and not outcome.error:
                outcome.error = message[1:].decode("utf-8", "replace")

    def _enter_child(self, limits: Limits, scratch: str, fds: list[int]) -> None:
        """Confine the forked child; on any failure it exits without running the program."""
        try:
            os.setsid()
            if self.cgroups is not None:
                for fd in self.cgroups.join_fds:
                    os.write(fd, b"0")
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
            for target, fd in enumerate(high):  # stdin, stdout, stderr, STATUS_FD, NONCE_FD
                os.dup2(fd, target)
            os.closerange(NONCE_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            os.chdir(scratch)
            _set_rlimits(limits, isolated=self.isolated)
            if self.isolated:
                os.setgroups([])
                os.setresgid(self.uid, self.uid, self.uid)
                os.setresuid(self.uid, self.uid, self.uid)
            libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
            libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
            if self.seccomp is not None:
                self.seccomp.install()
            os.umask(0o077)
            os.environ.clear()
            os.environ.update({"PATH": PATH, "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"})
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores the last two
                signal.signal(sig, signal.SIG_DFL)
            if "random" in sys.modules:  # forked from one zygote: reseed, or every sample shares a stream
                sys.modules["random"].seed()
            sys.argv = ["program.py"]
        except BaseException as exc:  # noqa: BLE001
            try:
                _write(STATUS_FD, ERROR + f"sandbox setup failed: {exc!r}".encode())
            finally:
                _exit(70)

    # ------------------------------------------------------------------ cleanup
    def _reap(self) -> bool:
        """Reap every exited child; False once no children are left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            self.children[pid] = status

    def _end_tree(self, timeout_s: float = 10.0) -> None:
        """SIGKILL the program and everything it started (setsid daemons included), then reap."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.cgroups is not None:
                self.cgroups.kill_all()
            else:
                _kill_descendants(os.getpid())
            if not self._reap():
                return
            time.sleep(0.0002)
        raise RuntimeError("the program's process tree did not die within 10 s of SIGKILL")


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


def _kill_descendants(root: int) -> None:
    """Insecure mode only: SIGKILL every process whose parent chain reaches ``root``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    doomed, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - doomed
        doomed |= frontier
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host ends us by closing our stdin
    zygote = Zygote(protocol.receive(0))
    gc.freeze()  # the preloaded heap is never scanned again, so forked children do not copy it on write
    protocol.send(1, {"ready": True})
    while True:
        try:
            request = protocol.receive(0)
        except EOFError:
            return
        try:
            verdict = zygote.run(request["source"], Limits.from_dict(request["limits"]))
            protocol.send(1, {"verdict": verdict.to_dict()})
        except Exception as exc:  # noqa: BLE001 - report, then let the host restart us
            protocol.send(1, {"error": f"{type(exc).__name__}: {exc}"})
            raise
