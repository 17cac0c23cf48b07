"""The candidate zygote: the one process that forks model-written code, and one that never holds any.

The slot's zygote (``zygote``) execs it fresh before pivoting the root, so its memory
starts from an empty interpreter and only ever gains its preloaded modules, its
configuration (uids, cgroup files, whether to install seccomp) and fork orders. An
order names a mode (``candidate``: the trusted oracle's untrusted side; ``program``: a
whole program, in-process), the limits, a working directory and the fds the child gets;
the program text is in a memfd among those fds, read only by the forked child. So no
child can find, in memory it inherited, a test, an expected output, another sample's
completion or any captured output: its parent never received one (the README's
address-space rule). It waits for each child and reports how it ended.

    zygote -> here:  {"mode", "limits", "cwd"} + fds     here -> zygote:  {"pid": n}, then {"status": s}
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import socket

from mtp.sandbox import _libc as libc
from mtp.sandbox import harness, rootfs
from mtp.sandbox.cgroups import SlotCgroups
from mtp.sandbox.confine import Confinement
from mtp.sandbox.limits import Limits

CONTROL_FD = 3  # a SOCK_SEQPACKET socket to the slot's zygote
MAX_FDS = 8


def _send(control: socket.socket, message: dict) -> None:
    control.send(json.dumps(message).encode())


def _receive(control: socket.socket) -> dict:
    data = control.recv(1 << 16)
    if not data:
        raise EOFError
    return json.loads(data)


def _serve(control: socket.socket, confinement: Confinement, uid: int | None) -> None:
    while True:
        data, fds, _, _ = socket.recv_fds(control, 1 << 16, MAX_FDS)
        if not data:
            return  # the zygote is gone
        order = json.loads(data)
        limits = Limits.from_dict(order["limits"])
        pid = os.fork()
        if pid == 0:
            try:
                confinement.enter(limits, order["cwd"], uid, fds)
                if order["mode"] == "candidate":
                    harness.serve_candidate()
                else:
                    harness.run_program()
            finally:
                os._exit(70)  # only a patched or failing harness gets here; never run this loop in a child
        for fd in fds:
            os.close(fd)
        _send(control, {"pid": pid})
        _, status = os.waitpid(pid, 0)
        _send(control, {"status": status})


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    control = socket.socket(fileno=CONTROL_FD)
    config = _receive(control)
    join_fds = []
    if config["isolated"]:  # opened before the pivot, which hides the cgroup filesystem
        join_fds = [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
                    for d in SlotCgroups(**config["cgroups"]).directories()]
    confinement = Confinement(config["isolated"], join_fds, config["seccomp"])
    for name in config["preload"]:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    _send(control, {"ready": True})
    if not _receive(control).get("pivoted"):  # the zygote moved us into the sandbox's root
        raise RuntimeError("unexpected order before the pivot")
    if config["isolated"]:
        rootfs.safe_sys_path()
    gc.freeze()
    _send(control, {"ready": True})
    _serve(control, confinement, config.get("uid"))
