"""The fork server: one warm Python per worker slot, inside its namespaces, forking programs.

Started by the host (``mtp.sandbox.sandbox.Sandbox``) as PID 1 of a fresh pid, mount,
net, ipc and uts namespace. It builds a read-only root, preloads common modules, then
loops: receive a program, fork it into the slot's cgroups under the slot's uid with
rlimits, no_new_privs and seccomp, watch it, kill the whole tree, remove every IPC
object it left, answer with a verdict.

Two modes (see ``harness``): in-process, one child runs the whole program; trusted
oracle, one child under the slot's uid runs the completion and a second under the
slot's judge uid runs the tests, calling the first through a plain-data channel. The
verdict is read only from the main child (the judge, or the in-process program), as
attested by the kernel (SCM_CREDENTIALS), and only from messages carrying the nonce
that child reads from a pipe. In-process, code written against this protocol can
read that nonce; in the oracle mode it never runs in the process that holds it.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import importlib
import os
import resource
import secrets
import select
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field

from mtp.sandbox import _libc as libc
from mtp.sandbox import harness, protocol, rootfs, seccomp
from mtp.sandbox.cgroups import Handles, SlotCgroups
from mtp.sandbox.limits import Limits
from mtp.sandbox.verdict import Verdict

PATH = "/usr/local/bin:/usr/bin:/bin"
CPU_CHECK_S = 0.05  # how often the watcher reads the tree's CPU time
_libc_ipc = ctypes.CDLL(None, use_errno=True)
IPC_RMID = 0


def signal_name(number: int) -> str:
    """SIGSEGV, SIGRTMIN+3, ...: a name for every signal 1..64, never an exception."""
    try:
        return signal.Signals(number).name
    except ValueError:
        low, high = signal.SIGRTMIN, signal.SIGRTMAX
        if low <= number <= high:
            return f"SIGRTMIN+{number - low}" if number - low <= high - number else f"SIGRTMAX-{high - number}"
        return f"signal {number}"


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

    timed_out: str = ""  # "", "cpu" or "wall"
    exit_code: int | None = None
    signal: int | None = None
    passed_signal: bool = False
    error: str = ""
    fallback: str = ""  # the judge found the tests cannot be proxied: why
    candidate_signal: int | None = None  # oracle mode: how the candidate's process ended
    oom_kills: int = 0
    refused_forks: int = 0


def decide(o: _Outcome, limits: Limits, wall_s: float) -> tuple[str, str]:
    """(status, detail). Only the main child's nonce-bearing pass plus a clean exit is a pass."""
    if o.passed_signal and o.exit_code == 0 and not o.timed_out:
        return "passed", ""
    if o.timed_out == "cpu":
        return "timed_out", f"cpu time limit of {limits.timeout_s:g}s (whole process tree)"
    if o.timed_out == "wall":
        return "timed_out", f"wall time limit of {wall_s:g}s"
    if o.oom_kills:
        return "crashed", f"memory limit of {limits.memory_mb} MB exceeded"
    if signal.SIGXCPU in (o.signal, o.candidate_signal):
        return "timed_out", f"cpu time limit of {limits.cpu_seconds}s per process"
    if signal.SIGXFSZ in (o.signal, o.candidate_signal):
        return "crashed", f"file size limit of {limits.file_size_mb} MB exceeded"
    if o.signal is not None:
        return "crashed", f"killed by {signal_name(o.signal)} (signal {o.signal})"
    fork_note = f" (process limit of {limits.max_processes} hit)" if o.refused_forks else ""
    if o.candidate_signal is not None:
        fork_note += f" (the candidate's process was killed by {signal_name(o.candidate_signal)})"
    if o.error:
        return "failed", o.error + fork_note
    return "failed", f"exited with code {o.exit_code} before the program finished{fork_note}"


class Zygote:
    """Set up once (namespaces are already ours; root, cgroup fds, preloads), then ``run`` programs."""

    def __init__(self, config: dict):
        self.isolated: bool = config["isolated"]
        self.uid: int | None = config.get("uid")
        self.judge_uid: int | None = config.get("judge_uid")
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
            self.tmp_kept = rootfs.build_and_enter(config["root_dir"], rootfs.python_binds(config["hidden"]), self.uid)
            rootfs.safe_sys_path()
        else:
            self.cgroups = None
            libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)

    # ------------------------------------------------------------------ per program
    def run(self, source: str, limits: Limits, oracle: dict | None = None) -> Verdict:
        """One program to its verdict; with ``oracle`` ({prefix, tests, names, candidate}) in the trusted-oracle mode."""
        if oracle is None:
            return self._run_once(source, limits, None)
        verdict = self._run_once(source, limits, oracle)
        if verdict.oracle != "fallback":
            return verdict
        reason = verdict.detail
        verdict = self._run_once(source, limits, None)
        verdict.oracle = "fallback"
        verdict.detail = f"{verdict.detail}; " if verdict.detail else ""
        verdict.detail += f"ran in-process: {reason}"
        return verdict

    def _run_once(self, source: str, limits: Limits, oracle: dict | None) -> Verdict:
        start = time.monotonic()
        self.children.clear()
        if self.isolated:
            scratch = rootfs.mount_scratch(self.uid, limits.memory_mb)
            self.cgroups.set_limits(limits.memory_mb << 20, limits.max_processes, limits.cpus)
            before = self.cgroups.counters()
        else:
            scratch = tempfile.mkdtemp(prefix="mtp-sandbox-")
            before = (0, 0)
        wall_s = self._wall_seconds(limits)
        try:
            outcome, out, err = self._fork_and_watch(source, oracle, limits, scratch, start, wall_s)
        finally:
            self._end_tree()
            if self.isolated:
                rootfs.unmount_scratch()
                if self.tmp_kept:
                    rootfs.clean_tmp(self.tmp_kept)
                remove_ipc_objects()
            else:
                rootfs.remove_tree(scratch)
        if self.isolated:
            after = self.cgroups.counters()
            outcome.oom_kills, outcome.refused_forks = after[0] - before[0], after[1] - before[1]
        status, detail = decide(outcome, limits, wall_s)
        truncated = out.truncated or err.truncated
        if truncated:
            detail = (detail + "; " if detail else "") + f"output truncated to {limits.output_bytes} bytes per stream"
        if outcome.fallback:
            status, detail = "failed", outcome.fallback
        return Verdict(
            status=status, detail=detail, stdout=out.text(), stderr=err.text(), output_truncated=truncated,
            exit_code=outcome.exit_code, signal=signal_name(outcome.signal) if outcome.signal else None,
            duration_s=round(time.monotonic() - start, 6), isolation="full" if self.isolated else "insecure",
            oracle="fallback" if outcome.fallback else ("trusted" if oracle else "inprocess"),
        )

    def _wall_seconds(self, limits: Limits) -> float:
        """Wall limit: a multiple of the CPU budget where the tree's CPU is counted, else the budget itself."""
        counting = self.cgroups is not None and self.cgroups.counts_cpu
        return limits.timeout_s * limits.wall_factor if counting else limits.timeout_s

    def _fork_and_watch(self, source: str, oracle: dict | None, limits: Limits, scratch: str, start: float,
                        wall_s: float):
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        nonce_r, nonce_w = os.pipe()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        parent_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        nonce = secrets.token_hex(harness.NONCE_BYTES // 2).encode()
        os.write(nonce_w, nonce)  # before the fork: a child that exits at once must not break this pipe
        os.close(nonce_w)
        candidate = None
        if oracle is None:
            main = os.fork()
            if main == 0:
                self._enter_child(limits, scratch, self.uid, [self.devnull, out_w, err_w, child_sock.fileno(), nonce_r])
                harness.run_program(source)
                os._exit(70)  # only a patched harness returns; never run the zygote's code in a child
        else:
            judge_end, candidate_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            candidate = os.fork()
            if candidate == 0:
                self._enter_child(limits, scratch, self.uid, [self.devnull, out_w, err_w, candidate_end.fileno()])
                harness.serve_candidate(oracle["candidate"])
                os._exit(70)
            main = os.fork()
            if main == 0:
                self._enter_child(limits, "/", self.judge_uid, [self.devnull, out_w, err_w, child_sock.fileno(),
                                                                nonce_r, judge_end.fileno()])
                harness.judge(oracle["prefix"], oracle["tests"], oracle["names"])
                os._exit(70)
            judge_end.close()
            candidate_end.close()
        for fd in (out_w, err_w, nonce_r):
            os.close(fd)
        child_sock.close()
        out, err = _Capture(limits.output_bytes), _Capture(limits.output_bytes)
        streams = {out_r: out, err_r: err}
        outcome = _Outcome()
        try:
            outcome.timed_out = self._watch(main, streams, start + wall_s, limits.timeout_s)
            self._reap()
            ended_alone = self.children.get(candidate)  # before our kill: how the candidate ended by itself
            self._end_tree()
            if ended_alone is None and candidate is not None:
                # The judge can see the candidate's socket close before the candidate's exit status
                # is reapable (a loaded machine widens that window). A death already under way keeps
                # its own signal through our kill, and we send only SIGKILL, so any other is its own.
                after = self.children.get(candidate)
                if after is not None and os.WIFSIGNALED(after) and os.WTERMSIG(after) != signal.SIGKILL:
                    ended_alone = after
            status = self.children.pop(main)
            if os.WIFSIGNALED(status):
                outcome.signal = os.WTERMSIG(status)
            else:
                outcome.exit_code = os.WEXITSTATUS(status)
            if ended_alone is not None and os.WIFSIGNALED(ended_alone):
                outcome.candidate_signal = os.WTERMSIG(ended_alone)
            for fd, capture in streams.items():
                self._drain(fd, capture)
            self._read_status(parent_sock, main, nonce, outcome)
        finally:
            for fd in streams:
                os.close(fd)
            parent_sock.close()
        return outcome, out, err

    def _watch(self, pid: int, streams: dict[int, _Capture], deadline: float, cpu_budget: float) -> str:
        """Pump output until the main process exits; "wall" or "cpu" if a limit ran out first, else ""."""
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        for fd in streams:
            poller.register(fd, select.POLLIN)
        cpu_start = self.cgroups.cpu_seconds() if self.cgroups is not None else None
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "wall"
                if cpu_start is not None:
                    if self.cgroups.cpu_seconds() - cpu_start >= cpu_budget:
                        return "cpu"
                    remaining = min(remaining, CPU_CHECK_S)
                for fd, _ in poller.poll(remaining * 1000):
                    if fd == pidfd:
                        return ""
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
        """Accept only nonce-bearing datagrams from the main child, as attested by the kernel."""
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
            kind, token, detail = message[:1], message[1:1 + len(nonce)], message[1 + len(nonce):]
            if sender != pid or token != nonce:
                continue
            text = detail.decode("utf-8", "replace")
            if kind == harness.PASS:
                outcome.passed_signal = True
            elif kind == harness.ERROR and not outcome.error:
                outcome.error = text
            elif kind == harness.FALLBACK and not outcome.fallback:
                outcome.fallback = text

    def _enter_child(self, limits: Limits, cwd: str, uid: int | None, fds: list[int]) -> None:
        """Confine the forked child; on any failure it exits without running the program."""
        try:
            os.setsid()
            if self.cgroups is not None:
                for fd in self.cgroups.join_fds:
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


def remove_ipc_objects() -> None:
    """Remove every SysV shm segment, message queue and semaphore set, and every POSIX message
    queue, in this (the slot's own) IPC namespace: nothing a program made reaches the next one,
    and the memory they hold is uncharged from the slot's cgroup before it starts."""
    removers = {
        "shm": lambda ident: _libc_ipc.shmctl(ident, IPC_RMID, None),
        "msg": lambda ident: _libc_ipc.msgctl(ident, IPC_RMID, None),
        "sem": lambda ident: _libc_ipc.semctl(ident, 0, IPC_RMID),
    }
    for table, remove in removers.items():
        with open(f"/proc/sysvipc/{table}") as f:
            next(f)  # the header
            for line in f:
                remove(int(line.split()[1]))
    for name in os.listdir(rootfs.MQUEUE):
        try:
            os.unlink(os.path.join(rootfs.MQUEUE, name))
        except FileNotFoundError:
            pass


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


def _default_signals() -> None:
    """Every signal at its default action and none blocked, whatever the host process had.

    Ignored dispositions and the blocked mask survive fork and exec: a host that blocked
    or ignored, say, a real-time signal would otherwise let a program survive it.
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for number in range(1, signal.NSIG):
        if number in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):  # numbers the C library reserves for itself (32, 33)
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
            verdict = zygote.run(request["source"], Limits.from_dict(request["limits"]), request.get("oracle"))
            protocol.send(1, {"verdict": verdict.to_dict()})
        except Exception as exc:  # noqa: BLE001 - report, then let the host restart us
            protocol.send(1, {"error": f"{type(exc).__name__}: {exc}"})
            raise
