"""cgroups for one worker slot: the tree's memory, process count and CPU, and killing it.

Host side (``create_slot``/``remove_slot``) makes the slot's directories; the zygote
side (``Handles``) opens the few control files once, before the root is pivoted away,
and keeps them as fds. Whichever the host has is used:

* cgroup v2 with memory and pids: ``<v2 root>/mtp-sandbox/<slot>``. A dedicated parent
  without processes of its own, because v2 only delegates controllers to children of
  cgroups that hold no processes (our own cgroup usually does).
* v1 controllers (hybrid hosts, like this project's VMs): ``<own v1 cgroup>/<slot>``
  per controller, nested under whatever a container or Ray gave us; a v2 hierarchy
  without controllers still adds a ``<own v2 cgroup>/<slot>`` for its ``cgroup.kill``.

CPU is optional where the host lacks it: a quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``)
caps the slot at ``cpus`` CPUs so a program's busy children cannot starve other slots,
and the tree's CPU time (v2 ``cpu.stat``, v1 ``cpuacct.usage``) lets timeouts count the
CPU the program got rather than the wall time a loaded neighbour made it wait.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass


class CgroupUnavailable(RuntimeError):
    """The host has no usable memory or pids controller."""


V2_PARENT = "mtp-sandbox"
CONTROLLERS = ("memory", "pids")
CPU_PERIOD_US = 100_000


@dataclass
class SlotCgroups:
    memory: str  # directory that limits the tree's memory
    pids: str  # directory that limits the tree's process count
    kill: str | None  # a v2 directory whose cgroup.kill ends the tree atomically
    v2: bool  # memory and pids are v2 controllers (file names differ)
    cpu: str | None = None  # directory whose quota caps the tree's CPU share
    cpuacct: str | None = None  # directory that counts the tree's CPU time

    def directories(self) -> list[str]:
        return sorted({d for d in (self.memory, self.pids, self.kill, self.cpu, self.cpuacct) if d})

    def to_dict(self) -> dict:
        return asdict(self)


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(root within hierarchy, mount point, fstype, super options) of cgroup mounts."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fields, rfields = left.split(), right.split()
            if rfields[0] in ("cgroup", "cgroup2"):
                found.append((fields[3], fields[4], rfields[0], set(rfields[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """Controller name ('' for v2) -> this process's cgroup path in that hierarchy."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


def _join(mount_root: str, mount_point: str, path: str) -> str:
    rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path.lstrip("/")
    return os.path.normpath(os.path.join(mount_point, rel))


def _v2_mount() -> tuple[str, str] | None:
    """(root within the hierarchy, mount point) of the cgroup2 mount, if any."""
    return next(((root, point) for root, point, fstype, _ in _mounts() if fstype == "cgroup2"), None)


def _v1_dir(controller: str) -> str | None:
    own = _own_paths().get(controller)
    for root, point, fstype, opts in _mounts():
        if fstype == "cgroup" and controller in opts and own is not None:
            return _join(root, point, own)
    return None


def _make(parent: str, name: str) -> str:
    path = os.path.join(parent, name)
    os.makedirs(path, exist_ok=True)
    _kill_procs(path)  # a stale slot left by a crashed worker
    return path


def _delegate(directory: str, controllers: tuple[str, ...]) -> None:
    with open(os.path.join(directory, "cgroup.subtree_control"), "w") as f:
        f.write(" ".join(f"+{c}" for c in controllers))


def _v2_parent(mount_point: str) -> tuple[str, bool] | None:
    """(``<v2 root>/mtp-sandbox`` with memory, pids and cpu if any delegated to its children, has cpu), or None."""
    try:
        with open(os.path.join(mount_point, "cgroup.controllers")) as f:
            available = set(f.read().split())
        if not set(CONTROLLERS) <= available:
            return None
        wanted = CONTROLLERS + (("cpu",) if "cpu" in available else ())
        _delegate(mount_point, wanted)  # the root is exempt from v2's no-internal-processes rule
        parent = os.path.join(mount_point, V2_PARENT)
        os.makedirs(parent, exist_ok=True)
        _delegate(parent, wanted)
        return parent, "cpu" in wanted
    except OSError:
        return None


def create_slot(name: str) -> SlotCgroups:
    """Create (or reuse) this slot's cgroups. Raises CgroupUnavailable naming what is missing."""
    v2 = _v2_mount()
    found = _v2_parent(v2[1]) if v2 else None
    if found is not None:
        slot = _make(found[0], name)
        kill = slot if os.path.exists(os.path.join(slot, "cgroup.kill")) else None
        return SlotCgroups(slot, slot, kill, v2=True, cpu=slot if found[1] else None, cpuacct=slot)
    dirs = {}
    for controller in CONTROLLERS:
        v1 = _v1_dir(controller)
        if v1 is None or not os.access(v1, os.W_OK):
            raise CgroupUnavailable(
                f"no writable {controller} cgroup controller (v2 at the hierarchy root, or v1) for this process; "
                "the sandbox needs one to limit the whole process tree"
            )
        dirs[controller] = _make(v1, name)
    kill = None
    own_v2 = _join(v2[0], v2[1], _own_paths().get("", "/")) if v2 else None
    if own_v2 and os.access(own_v2, os.W_OK):
        kill = _make(own_v2, name)
        if not os.path.exists(os.path.join(kill, "cgroup.kill")):  # kernels before 5.14
            os.rmdir(kill)
            kill = None
    optional = {}
    for controller in ("cpu", "cpuacct"):
        v1 = _v1_dir(controller)
        optional[controller] = _make(v1, name) if v1 is not None and os.access(v1, os.W_OK) else None
    return SlotCgroups(dirs["memory"], dirs["pids"], kill, v2=False, **optional)


def _kill_procs(directory: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    procs = os.path.join(directory, "cgroup.procs")
    while time.monotonic() < deadline:
        with open(procs) as f:
            pids = [int(p) for p in f.read().split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def remove_slot(slot: SlotCgroups) -> None:
    for directory in slot.directories():
        if os.path.isdir(directory):
            _kill_procs(directory)
            for _ in range(100):  # rmdir fails (EBUSY) until the killed tasks are released
                try:
                    os.rmdir(directory)
                    break
                except OSError:
                    time.sleep(0.01)


def _read(fd: int) -> bytes:
    """The whole file from its start (cgroup files are generated on read; pread of one fd is not reliable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0


class Handles:
    """The slot's control files as fds, opened before the zygote pivots its root."""

    def __init__(self, slot: SlotCgroups):
        def opened(directory: str, name: str, flags: int) -> int:
            return os.open(os.path.join(directory, name), flags | os.O_CLOEXEC)

        self.join_fds = [opened(d, "cgroup.procs", os.O_WRONLY) for d in slot.directories()]
        self._memory_limit = opened(slot.memory, "memory.max" if slot.v2 else "memory.limit_in_bytes", os.O_WRONLY)
        self._oom = opened(slot.memory, "memory.events" if slot.v2 else "memory.oom_control", os.O_RDONLY)
        self._pids_max = opened(slot.pids, "pids.max", os.O_WRONLY)
        self._pids_events = opened(slot.pids, "pids.events", os.O_RDONLY)
        # A directory fd, not cgroup.procs itself: v1 caches a file's pid list while it is
        # being re-read, so each read must open the file afresh (openat works after the pivot).
        self._procs_dir = os.open(slot.kill or slot.pids, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._kill = opened(slot.kill, "cgroup.kill", os.O_WRONLY) if slot.kill else None
        self._cpu_v2 = slot.v2
        self._cpu_quota = (opened(slot.cpu, "cpu.max" if slot.v2 else "cpu.cfs_quota_us", os.O_WRONLY)
                           if slot.cpu else None)
        self._cpu_usage = (opened(slot.cpuacct, "cpu.stat" if slot.v2 else "cpuacct.usage", os.O_RDONLY)
                           if slot.cpuacct else None)
        self._limits: tuple | None = None

    def set_limits(self, memory_bytes: int, max_processes: int, cpus: float) -> None:
        if self._limits != (memory_bytes, max_processes, cpus):
            os.write(self._memory_limit, str(memory_bytes).encode())
            os.write(self._pids_max, str(max_processes).encode())
            if self._cpu_quota is not None:
                quota = max(1000, int(cpus * CPU_PERIOD_US))
                os.write(self._cpu_quota, (f"{quota} {CPU_PERIOD_US}" if self._cpu_v2 else str(quota)).encode())
            self._limits = (memory_bytes, max_processes, cpus)

    @property
    def counts_cpu(self) -> bool:
        """Whether ``cpu_seconds`` can count the tree's CPU time (a cpuacct or v2 cpu controller)."""
        return self._cpu_usage is not None

    def cpu_seconds(self) -> float | None:
        """CPU time the slot's processes have used so far (a running total; callers diff it), or None."""
        if self._cpu_usage is None:
            return None
        text = _read(self._cpu_usage).decode()
        return _counter(text, "usage_usec") / 1e6 if self._cpu_v2 else int(text) / 1e9

    def counters(self) -> tuple[int, int]:
        """(OOM kills so far, forks refused by pids.max so far); callers diff them."""
        oom = _counter(_read(self._oom).decode(), "oom_kill")
        refused = _counter(_read(self._pids_events).decode(), "max")
        return oom, refused

    def pids(self) -> list[int]:
        fd = os.open("cgroup.procs", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._procs_dir)
        try:
            return [int(p) for p in _read(fd).split()]
        finally:
            os.close(fd)

    def kill_all(self) -> None:
        """SIGKILL every process in the slot; cgroup.kill is atomic, the fallback loops."""
        if self._kill is not None:
            os.write(self._kill, b"1")
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
