"""Host side of one worker slot: starts the zygote in fresh namespaces and asks it for verdicts.

``Sandbox`` is the one API for the CLI, the evaluator and tests. Each instance owns a
slot: two uids nobody else uses (the program's and the trusted oracle's judge, held
with one lock file), cgroups, and a zygote process.
"""

from __future__ import annotations

import fcntl
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from mtp.sandbox import cgroups, protocol, seccomp
from mtp.sandbox.limits import Limits
from mtp.sandbox.verdict import Verdict

UID_BASE, UID_SLOTS = 200_000, 4096  # program uids; judge uids are the next UID_SLOTS
SOURCE_ROOT = str(Path(__file__).resolve().parents[2])  # holds the `mtp` package
NAMESPACES = ("--pid", "--fork", "--kill-child", "--mount", "--net", "--ipc", "--uts")
# Imported once in the zygote so programs that use them do not pay for the import.
DEFAULT_PRELOAD = (
    "math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string",
    "typing", "random", "statistics", "fractions", "decimal", "json", "copy", "operator",
    "datetime", "hashlib", "array", "numbers", "dataclasses", "traceback",
)
INSECURE_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! mtp.sandbox running with --insecure: NO namespaces, NO cgroups, NO separate uid.\n"
    "!! Programs can read your files and environment, reach the network and signal your\n"
    "!! processes. Use this only for code you trust.\n" + "!" * 78 + "\n"
)


class SandboxUnavailable(RuntimeError):
    """Full isolation is impossible here (not root, no namespaces, no cgroups)."""


@dataclass(frozen=True)
class OracleProgram:
    """A program split for the trusted oracle (see ``mtp.sandbox.harness``).

    ``candidate`` (prompt + completion) runs in one process; ``prefix`` (benchmark code
    the tests rely on, e.g. HumanEval's prompt) then ``tests`` run in another, where each
    of ``names`` calls into the first by value.
    """

    candidate: str
    prefix: str
    tests: str
    names: tuple[str, ...]

    def to_dict(self) -> dict:
        return {**asdict(self), "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: dict) -> "OracleProgram":
        return cls(data["candidate"], data["prefix"], data["tests"], tuple(data["names"]))


@dataclass(frozen=True)
class SandboxConfig:
    insecure: bool = False  # run without isolation (loud warning), where it is impossible
    seccomp: bool = True  # deny namespace, ptrace, bpf, io_uring, mount... calls (x86_64, aarch64)
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    start_timeout_s: float = 30.0
    grace_s: float = 15.0  # extra wait beyond a program's timeout before the zygote is presumed dead


def isolation_problem() -> str | None:
    """Why full isolation cannot work here, or None."""
    if os.geteuid() != 0:
        return "the sandbox needs root for namespaces, cgroups and per-slot uids (running as uid %d)" % os.geteuid()
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not installed"
    if not hasattr(os, "pidfd_open"):
        return "this Python/kernel has no pidfd_open"
    return None


class _UidSlot:
    """A uid held exclusively by this process (flock), so slots never share RLIMIT_NPROC counts."""

    def __init__(self) -> None:
        lock_dir = Path("/run/mtp-sandbox") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / "mtp-sandbox"
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for uid in range(UID_BASE, UID_BASE + UID_SLOTS):
            fd = os.open(lock_dir / f"uid-{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self.judge_uid, self._fd = uid, uid + UID_SLOTS, fd
            return
        raise SandboxUnavailable(f"all {UID_SLOTS} sandbox uids from {UID_BASE} are in use")

    def release(self) -> None:
        os.close(self._fd)


class Sandbox:
    """One worker slot. ``run`` is serialised; make one Sandbox per concurrent worker."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._slot: _UidSlot | None = None
        self._cgroups: cgroups.SlotCgroups | None = None  # the programs'
        self._judge_cgroups: cgroups.SlotCgroups | None = None  # the trusted oracle's judge (mtp.sandbox.judge)
        self._root_dir: str | None = None
        problem = isolation_problem()
        if problem is None:
            try:
                self._slot = _UidSlot()
                self._cgroups = cgroups.create_slot(f"mtp-sandbox-{self._slot.uid}")
                self._judge_cgroups = cgroups.create_slot(f"mtp-sandbox-{self._slot.uid}-judge")
            except cgroups.CgroupUnavailable as exc:
                problem = str(exc)
                self._release_slot()
        if problem is not None:
            if not self.config.insecure:
                raise SandboxUnavailable(f"{problem}. Refusing to run untrusted code; pass --insecure (insecure=True) to run it anyway, unisolated")
            sys.stderr.write(INSECURE_WARNING + f"!! reason: {problem}\n")
        self.isolated = problem is None
        try:
            self._start()
        except BaseException:
            self._release_slot()
            raise

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        boot = f"import sys; sys.path.insert(0, {SOURCE_ROOT!r}); from mtp.sandbox.zygote import main; main()"
        command = [sys.executable, "-I", "-c", boot]
        config: dict = {"isolated": self.isolated, "preload": list(self.config.preload),
                         "seccomp": self.config.seccomp and platform.machine() in seccomp.TABLES}
        if self.isolated:
            command = ["unshare", *NAMESPACES, "--", *command]
            self._root_dir = f"/tmp/.mtp-sandbox-root-{self._slot.uid}"
            os.makedirs(self._root_dir, mode=0o700, exist_ok=True)
            config.update(uid=self._slot.uid, judge_uid=self._slot.judge_uid, cgroups=self._cgroups.to_dict(),
                          judge_cgroups=self._judge_cgroups.to_dict(), root_dir=self._root_dir, hidden=[SOURCE_ROOT])
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env={"LANG": "C.UTF-8", "PATH": "/usr/local/bin:/usr/bin:/bin"}, close_fds=True,
        )
        try:
            protocol.send(self._proc.stdin.fileno(), config)
            reply = self._receive(self.config.start_timeout_s)
        except (OSError, EOFError, TimeoutError) as exc:
            detail = self._log_tail()
            self._stop()
            raise SandboxUnavailable(f"the sandbox zygote did not start ({exc}): {detail}") from exc
        if not reply.get("ready"):
            self._stop()
            raise SandboxUnavailable(f"unexpected zygote handshake: {reply}")

    def _receive(self, timeout_s: float) -> dict:
        fd = self._proc.stdout.fileno()
        if not select.select([fd], [], [], timeout_s)[0]:
            raise TimeoutError(f"no answer from the zygote within {timeout_s:.0f}s")
        return protocol.receive(fd)

    def _log_tail(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:].decode("utf-8", "replace").strip() or "(no output)"

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()  # unshare --kill-child takes the zygote, so the whole pid namespace
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                stream.close()
            self._proc = None
            self._log.close()

    def _release_slot(self) -> None:
        for slot in (self._cgroups, self._judge_cgroups):
            if slot is not None:
                cgroups.remove_slot(slot)
        self._cgroups = self._judge_cgroups = None
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    def close(self) -> None:
        with self._lock:
            self._stop()
            self._release_slot()
            if self._root_dir:
                shutil.rmtree(self._root_dir, ignore_errors=True)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            self.close()

    @property
    def uid(self) -> int | None:
        return self._slot.uid if self._slot else None

    @property
    def cgroup_dirs(self) -> list[str]:
        return self._cgroups.directories() if self._cgroups else []

    # ------------------------------------------------------------------ programs
    def run(self, source: str, limits: Limits | None = None, oracle: OracleProgram | None = None) -> Verdict:
        """Run one program to its verdict: in-process (``source``), or with the trusted oracle.

        With ``oracle``, the verdict comes from a process that never runs the completion;
        if the judge finds the tests cannot be proxied, ``source`` runs in-process instead
        and the verdict says so (``oracle == "fallback"``).

        If the zygote dies (it should not: programs cannot signal it), it is restarted and
        the program run once more; a second failure is the program's ``crashed`` verdict.
        """
        limits = (limits or Limits()).validate()
        request = {"source": source, "limits": limits.to_dict(), "oracle": oracle.to_dict() if oracle else None}
        with self._lock:
            for attempt in range(2):
                if self._proc is None:
                    self._start()
                try:
                    protocol.send(self._proc.stdin.fileno(), request)
                    reply = self._receive(2 * limits.timeout_s * limits.wall_factor + self.config.grace_s)
                except (OSError, EOFError, TimeoutError) as exc:
                    reply = {"error": f"{type(exc).__name__}: {exc}; zygote log: {self._log_tail()}"}
                if "verdict" in reply:
                    return Verdict.from_dict(reply["verdict"])
                self._stop()
            return Verdict(status="crashed", detail=f"the sandbox worker failed twice on this program: {reply['error']}",
                           isolation="full" if self.isolated else "insecure", oracle="trusted" if oracle else "inprocess")
