"""The slot's zygote: PID 1 of the slot's namespaces, it decides verdicts and forks the judge.

Started by the host (``mtp.sandbox.sandbox.Sandbox``) as PID 1 of a fresh pid, mount,
net, ipc and uts namespace. It execs the slot's candidate zygote (``candidate_zygote``),
builds a read-only root and pivots both into it, preloads common modules, then loops:
receive a program, have it forked into the slot's cgroups under the slot's uid with
rlimits, no_new_privs and seccomp (``confine``), watch it, kill the whole tree, remove
every IPC object it left, answer with a verdict.

The address-space rule: every process that runs model-written code (an in-process
program, the trusted oracle's candidate) is forked by the candidate zygote, a fresh
exec that never receives a program's text (the forked child reads it from a memfd),
so no such process can find a test, an expected output, another sample's completion or
captured output in memory it inherited. This process receives all of those and reads
every program's output; it forks only the judge (``judge``), which runs benchmark code
under the slot's second uid, in the slot's second cgroup.

Two modes (see ``harness``): in-process, one child runs the whole program; trusted
oracle, a candidate under the slot's uid runs the completion and the judge runs the
tests, calling the first through a plain-data channel. The verdict is read only from
the main child (the judge, or the in-process program), as attested by the kernel
(SCM_CREDENTIALS), and only from messages carrying the program's nonce (in-process, read
from a pipe; the judge gets it with the program). In-process, code written against this
protocol can read that nonce; in the oracle mode it never runs in a process that holds it.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
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
from mtp.sandbox import candidate_zygote, harness, protocol, rootfs
from mtp.sandbox.cgroups import Handles, SlotCgroups
from mtp.sandbox.confine import PATH, Confinement
from mtp.sandbox.judge import Judge
from mtp.sandbox.limits import Limits
from mtp.sandbox.verdict import Verdict

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds `mtp`
CPU_CHECK_S = 0.05  # how often the watcher reads the tree's CPU time
CANDIDATE_END_S = 0.1  # after a verdict other than a pass, how long the candidate's own end may take to be reported
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
    judge_retiring: bool = False  # the judge exits after this program
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


def _nonce() -> bytes:
    return secrets.token_hex(harness.NONCE_BYTES // 2).encode()


def _set_ending(outcome: _Outcome, status: int | None) -> None:
    """How the main child ended (a wait status; None: not known)."""
    if status is None:
        return
    if os.WIFSIGNALED(status):
        outcome.signal = os.WTERMSIG(status)
    else:
        outcome.exit_code = os.WEXITSTATUS(status)


class CandidateZygote:
    """This slot's candidate zygote (``candidate_zygote``), seen from the zygote: exec it, order forks."""

    def __init__(self, config: dict):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        boot = (f"import sys; sys.path.insert(0, {SOURCE_ROOT!r}); "
                "from mtp.sandbox.candidate_zygote import main; main()")
        pid = os.fork()
        if pid == 0:  # a fresh exec: none of this process's memory survives into it
            try:
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)  # our fds 0 and 1 are the host's protocol; 2, the host's log, is kept
                os.dup2(theirs.fileno(), candidate_zygote.CONTROL_FD)
                os.set_inheritable(candidate_zygote.CONTROL_FD, True)
                os.closerange(candidate_zygote.CONTROL_FD + 1, 1 << 16)
                os.chdir("/")  # so the pivot moves our working directory into the new root too
                os.execve(sys.executable, [sys.executable, "-I", "-c", boot], {"LANG": "C.UTF-8", "PATH": PATH})
            finally:
                os._exit(127)
        theirs.close()
        self.pid, self._sock = pid, ours
        self._pending_status = False  # a child's end not collected yet
        self._send(config)

    def _send(self, message: dict) -> None:
        self._sock.send(json.dumps(message).encode())

    def receive(self, timeout_s: float | None = None) -> dict | None:
        """Its next message; None if none came within ``timeout_s``."""
        if timeout_s is not None and not select.select([self._sock], [], [], timeout_s)[0]:
            return None
        data = self._sock.recv(1 << 16)
        if not data:
            raise RuntimeError("the candidate zygote died")
        return json.loads(data)

    def ready(self) -> None:
        reply = self.receive(60.0)
        if not reply or not reply.get("ready"):
            raise RuntimeError(f"the candidate zygote did not start: {reply}")

    def pivoted(self) -> None:
        self._send({"pivoted": True})
        self.ready()

    def order(self, mode: str, limits: Limits, cwd: str, fds: list[int]) -> None:
        """Fork a child running ``mode`` with ``fds`` as its 0, 1, 2...; ``forked`` then reads its pid."""
        if self._pending_status and self.status(10.0) is None:  # the last child's end, not collected yet
            raise RuntimeError("the candidate zygote did not report its last child's end")
        socket.send_fds(self._sock, [json.dumps({"mode": mode, "limits": limits.to_dict(), "cwd": cwd}).encode()], fds)

    def forked(self) -> int:
        reply = self.receive()
        if "pid" not in reply:
            raise RuntimeError(f"the candidate zygote could not fork: {reply}")
        self._pending_status = True
        return reply["pid"]

    def status(self, timeout_s: float | None = None) -> int | None:
        """The wait status of the last child it forked, once it has ended (None: not within ``timeout_s``)."""
        reply = self.receive(timeout_s)
        if reply is None:
            return None
        self._pending_status = False
        return reply["status"]


class Zygote:
    """Set up once (namespaces are already ours; root, cgroup fds, preloads), then ``run`` programs."""

    def __init__(self, config: dict):
        self.isolated: bool = config["isolated"]
        self.uid: int | None = config.get("uid")
        self.judge_uid: int | None = config.get("judge_uid")
        self.candidates = CandidateZygote({key: config.get(key) for key in
                                           ("isolated", "uid", "cgroups", "preload", "seccomp")})
        self.cgroups: Handles | None = Handles(SlotCgroups(**config["cgroups"])) if self.isolated else None
        self.confinement = Confinement(self.isolated, self.cgroups.join_fds if self.cgroups else [],
                                       bool(config.get("seccomp")))
        judge_cgroups = Handles(SlotCgroups(**config["judge_cgroups"])) if self.isolated else None
        for name in config.get("preload", ()):  # while the candidate zygote loads its own
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.judge = Judge(self.confinement.joining(judge_cgroups.join_fds if judge_cgroups else []),
                           self.judge_uid, judge_cgroups, self.devnull)
        self.candidates.ready()  # it has imported all it needs from the source root, which the pivot hides
        if self.isolated:
            self.tmp_kept = rootfs.build_and_enter(config["root_dir"], rootfs.python_binds(config["hidden"]), self.uid)
            rootfs.safe_sys_path()
        else:
            libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
        self.candidates.pivoted()

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
        if self.isolated:
            scratch = rootfs.mount_scratch(self.uid, limits.memory_mb)
            for handles in self._cgroups():
                handles.set_limits(limits.memory_mb << 20, limits.max_processes, limits.cpus)
            before = self._counters()
        else:
            scratch = tempfile.mkdtemp(prefix="mtp-sandbox-")
            before = (0, 0)
        wall_s = self._wall_seconds(limits)
        deadline = start + wall_s
        try:
            if oracle is None:
                outcome, out, err = self._in_process(source, limits, scratch, deadline)
            else:
                outcome, out, err = self._trusted(oracle, limits, scratch, deadline)
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
            after = self._counters()
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

    def _cgroups(self) -> list[Handles]:
        """The program's cgroups and the judge's (isolated mode)."""
        return [h for h in (self.cgroups, self.judge.cgroups) if h is not None]

    def _counters(self) -> tuple[int, int]:
        """OOM kills and refused forks so far, the program's and the judge's together."""
        counts = [h.counters() for h in self._cgroups()]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def _cpu_seconds(self) -> float:
        """CPU time used so far by the program's tree and the judge together (a running total)."""
        return sum(h.cpu_seconds() for h in self._cgroups())

    def _wall_seconds(self, limits: Limits) -> float:
        """Wall limit: a multiple of the CPU budget where the tree's CPU is counted, else the budget itself."""
        counting = self.cgroups is not None and self.cgroups.counts_cpu
        return limits.timeout_s * limits.wall_factor if counting else limits.timeout_s

    def _in_process(self, source: str, limits: Limits, scratch: str, deadline: float):
        """The whole program in one child of the candidate zygote; its exit and nonce-bearing report decide."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        nonce_r, nonce_w = os.pipe()
        reports, report_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        reports.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        nonce = _nonce()
        os.write(nonce_w, nonce)  # before the fork: a child that exits at once must not break this pipe
        os.close(nonce_w)
        source_fd = harness.memfd(source)
        self.candidates.order("program", limits, scratch,
                              [self.devnull, out_w, err_w, report_end.fileno(), nonce_r, source_fd])
        main = self.candidates.forked()
        for fd in (out_w, err_w, nonce_r, source_fd):
            os.close(fd)
        report_end.close()
        streams = {out_r: _Capture(limits.output_bytes), err_r: _Capture(limits.output_bytes)}
        outcome = _Outcome()
        try:
            try:
                pidfd = os.pidfd_open(main)
            except ProcessLookupError:  # the candidate zygote's child ended and was reaped already
                pidfd = None
            if pidfd is not None:
                try:
                    outcome.timed_out = self._watch([pidfd], streams, deadline, self._cpu_start(), limits.timeout_s)
                finally:
                    os.close(pidfd)
            self._end_tree()
            _set_ending(outcome, self._forked_status())
            for fd, capture in streams.items():
                self._drain(fd, capture)
            self._read_status(reports, main, nonce, outcome)
        finally:
            for fd in streams:
                os.close(fd)
            reports.close()
        return outcome, *streams.values()

    def _trusted(self, oracle: dict, limits: Limits, scratch: str, deadline: float):
        """The completion in a candidate forked by the candidate zygote, the tests in the slot's judge;
        only the judge's nonce-bearing report decides."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        judge_end, candidate_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        nonce = _nonce()
        source_fd = harness.memfd(oracle["candidate"])
        self.candidates.order("candidate", limits, scratch, [self.devnull, out_w, err_w, candidate_end.fileno(), source_fd])
        try:
            self.judge.submit({"prefix": oracle["prefix"], "tests": oracle["tests"], "names": oracle["names"],
                               "nonce": nonce.decode()}, limits, [out_w, err_w, judge_end.fileno()])
        finally:
            self.candidates.forked()
            for fd in (out_w, err_w, source_fd):
                os.close(fd)
            judge_end.close()
            candidate_end.close()
        streams = {out_r: _Capture(limits.output_bytes), err_r: _Capture(limits.output_bytes)}
        outcome = _Outcome()
        try:
            cpu_start = self._cpu_start()
            while True:  # until its verdict, its end, or a limit
                outcome.timed_out = self._watch([self.judge.pidfd, self.judge.reports.fileno()], streams, deadline,
                                                cpu_start, limits.timeout_s)
                reported = self._read_status(self.judge.reports, self.judge.pid, nonce, outcome)
                if reported or outcome.timed_out or not self.judge.alive():
                    break
            # Before our kill. A verdict other than a pass names how the candidate ended, so give its
            # end a moment to be reported: after the judge hangs up it exits at once (or has died).
            ended_alone = self.candidates.status(0 if outcome.passed_signal else CANDIDATE_END_S)
            if reported:
                outcome.exit_code = 0 if outcome.passed_signal else 1
                if outcome.judge_retiring:
                    self.judge.stop()
            else:  # it ran out of time, or died: its end is the verdict's, and the next program gets another
                _set_ending(outcome, self.judge.stop())
            self._end_tree()
            for fd, capture in streams.items():
                self._drain(fd, capture)
            if ended_alone is None and not outcome.passed_signal:
                # Only a verdict other than a pass names how the candidate ended (a pass leaves its
                # status for the next order to collect). The judge can see the candidate's socket
                # close before the candidate's exit status is reapable (a loaded machine widens that
                # window): a death already under way keeps its own signal through our kill, and we
                # send only SIGKILL, so any other is its own.
                after = self._forked_status()
                if os.WIFSIGNALED(after) and os.WTERMSIG(after) != signal.SIGKILL:
                    ended_alone = after
            if ended_alone is not None and os.WIFSIGNALED(ended_alone):
                outcome.candidate_signal = os.WTERMSIG(ended_alone)
        finally:
            for fd in streams:
                os.close(fd)
        return outcome, *streams.values()

    def _cpu_start(self) -> float | None:
        """The CPU reading a program's budget counts from (None: CPU time is not counted here)."""
        return self._cpu_seconds() if self.cgroups is not None and self.cgroups.counts_cpu else None

    def _watch(self, until: list[int], streams: dict[int, _Capture], deadline: float, cpu_start: float | None,
               cpu_budget: float) -> str:
        """Pump output until one of ``until`` is readable; "wall" or "cpu" if a limit ran out first, else ""."""
        poller = select.poll()
        for fd in (*until, *streams):
            poller.register(fd, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "wall"
            if cpu_start is not None:
                if self._cpu_seconds() - cpu_start >= cpu_budget:
                    return "cpu"
                remaining = min(remaining, CPU_CHECK_S)
            for fd, _ in poller.poll(remaining * 1000):
                if fd in until:
                    return ""
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    streams[fd].add(chunk)
                else:
                    poller.unregister(fd)

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
    def _read_status(sock: socket.socket, pid: int, nonce: bytes, outcome: _Outcome) -> bool:
        """Accept only nonce-bearing datagrams from the main child, as attested by the kernel; whether a verdict came."""
        creds_size = struct.calcsize("iII")
        verdict = False
        while True:
            try:
                message, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(creds_size), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return verdict
            sender = next(
                (struct.unpack("iII", data[:creds_size])[0] for level, kind, data in ancillary
                 if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS),
                None,
            )
            kind, token, detail = message[:1], message[1:1 + len(nonce)], message[1 + len(nonce):]
            if sender != pid or token != nonce:
                continue
            verdict |= kind in (harness.PASS, harness.ERROR, harness.FALLBACK)
            text = detail.decode("utf-8", "replace")
            if kind == harness.PASS:
                outcome.passed_signal = True
            elif kind == harness.ERROR and not outcome.error:
                outcome.error = text
            elif kind == harness.FALLBACK and not outcome.fallback:
                outcome.fallback = text
            elif kind == harness.RETIRING:
                outcome.judge_retiring = True

    # ------------------------------------------------------------------ cleanup
    def _forked_status(self) -> int:
        """The wait status of the candidate zygote's last child, which is dead or being killed."""
        status = self.candidates.status(10.0)
        if status is None:
            raise RuntimeError("the candidate zygote did not report its child's end within 10 s of SIGKILL")
        return status

    def _reap(self) -> None:
        """Reap every exited child of ours (orphans of the program's tree, an ended judge)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.candidates.pid:
                raise RuntimeError(f"the candidate zygote died (wait status {status})")
            if pid == self.judge.pid:
                self.judge.reaped(status)

    def _tree_alive(self) -> bool:
        if self.cgroups is not None:
            return bool(self.cgroups.pids())
        return bool(_descendants(os.getpid(), spare={self.candidates.pid, self.judge.pid}))

    def _end_tree(self, timeout_s: float = 10.0) -> None:
        """SIGKILL the program and everything it started (setsid daemons included), then reap."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.cgroups is not None:
                self.cgroups.kill_all()
            else:
                for pid in _descendants(os.getpid(), spare={self.candidates.pid, self.judge.pid}):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self._reap()
            if not self._tree_alive():
                self._reap()
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


def _descendants(root: int, spare: set[int | None]) -> set[int]:
    """Insecure mode only: every process whose parent chain reaches ``root``, but not those in ``spare``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found - spare


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
