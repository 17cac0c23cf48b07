"""cgroups for one worker slot: the tree's memory and process count, and killing it.

Host side (``create_slot``/``remove_slot``) makes the directories under the caller's
own cgroup in each hierarchy, so it nests under whatever a container or Ray gave us.
Zygote side (``Handles``) opens the few control files once, before the root is
pivoted away, and keeps them as fds. Either v2 or v1 controllers are used, whichever
the host has; a v2 hierarchy without controllers still provides ``cgroup.kill``.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass


class CgroupUnavailable(RuntimeError):
    """The host has no usable memory or pids controller."""


@dataclass
class SlotCgroups:
    memory: str  # directory that limits the tree's memory
    memory_v2: bool
    pids: str  # directory that limits the tree's process count
    pids_v2: bool
    kill: str | None  # a v2 directory whose cgroup.kill ends the tree atomically

    def directories(self) -> list[str]:
        return sorted({d for d in (self.memory, self.pids, self.kill) if d})

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


def _v2_dir() -> str | None:
    own = _own_paths().get("")
    for root, point, fstype, _ in _mounts():
        if fstype == "cgroup2" and own is not None:
            return _join(root, point, own)
    return None


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


def create_slot(name: str) -> SlotCgroups:
    """Create (or reuse) this slot's cgroups. Raises CgroupUnavailable naming what is missing."""
    v2 = _v2_dir()
    v2_controllers: set[str] = set()
    if v2 and os.path.exists(os.path.join(v2, "cgroup.controllers")):
        with open(os.path.join(v2, "cgroup.controllers")) as f:
            v2_controllers = set(f.read().split())
    if {"memory", "pids"} <= v2_controllers:
        try:
            with open(os.path.join(v2, "cgroup.subtree_control"), "w") as f:
                f.write("+memory +pids")
        except OSError:
            v2_controllers = set()
    v2_slot = _make(v2, name) if v2 and os.access(v2, os.W_OK) else None
    dirs: dict[str, tuple[str, bool]] = {}
    for controller in ("memory", "pids"):
        if controller in v2_controllers and v2_slot:
            dirs[controller] = (v2_slot, True)
            continue
        parent = _v1_dir(controller)
        if parent is None or not os.access(parent, os.W_OK):
            raise CgroupUnavailable(
                f"no writable {controller} cgroup controller (v1 or v2) for this process; "
                "the sandbox needs one to limit the whole process tree"
            )
        dirs[controller] = (_make(parent, name), False)
    kill = v2_slot if v2_slot and os.path.exists(os.path.join(v2_slot, "cgroup.kill")) else None
    return SlotCgroups(dirs["memory"][0], dirs["memory"][1], dirs["pids"][0], dirs["pids"][1], kill)


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
        self._memory_limit = opened(slot.memory, "memory.max" if slot.memory_v2 else "memory.limit_in_bytes", os.O_WRONLY)
        self._oom = opened(slot.memory, "memory.events" if slot.memory_v2 else "memory.oom_control", os.O_RDONLY)
        self._pids_max = opened(slot.pids, "pids.max", os.O_WRONLY)
        self._pids_events = opened(slot.pids, "pids.events", os.O_RDONLY)
        self._procs = opened(slot.kill or slot.pids, "cgroup.procs", os.O_RDONLY)
        self._kill = opened(slot.kill, "cgroup.kill", os.O_WRONLY) if slot.kill else None
        self._limits: tuple[int, int] | None = None

    def set_limits(self, memory_bytes: int, max_processes: int) -> None:
        if self._limits != (memory_bytes, max_processes):
            os.write(self._memory_limit, str(memory_bytes).encode())
            os.write(self._pids_max, str(max_processes).encode())
            self._limits = (memory_bytes, max_processes)

    def counters(self) -> tuple[int, int]:
        """(OOM kills so far, forks refused by pids.max so far); callers diff them."""
        oom = _counter(os.pread(self._oom, 4096, 0).decode(), "oom_kill")
        refused = _counter(os.pread(self._pids_events, 4096, 0).decode(), "max")
        return oom, refused

    def pids(self) -> list[int]:
        return [int(p) for p in os.pread(self._procs, 1 << 20, 0).split()]

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
