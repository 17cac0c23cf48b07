"""A seccomp deny-list for sandboxed programs, as raw BPF (no libseccomp needed).

Namespaces, the uid and no_new_privs already make these calls useless to a program;
the filter removes them as kernel attack surface: new namespaces (a user namespace
would hand the program capabilities over its own objects), ptrace and cross-process
memory access, bpf, perf, io_uring, userfaultfd, keyrings, mounts, modules, kexec.
Denied calls fail with EPERM (clone3 with ENOSYS, so libc falls back to clone, whose
flags the filter can inspect). Installed in the child just before the program runs.
"""

from __future__ import annotations

import ctypes
import errno
import platform

from mtp.sandbox import _libc as libc

SECCOMP_SET_MODE_FILTER = 1
# Without this flag the kernel turns on speculative-store-bypass mitigations for every
# filtered task, which measured ~8 ms more per program in this VM; the sandbox's
# boundary is the uid and namespaces, not the speculation barrier between processes.
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1 << 2
RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
NEW_NAMESPACE_FLAGS = 0x7E020080  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME

# arch -> (AUDIT_ARCH, clone, clone3, denied syscall numbers)
_GENERIC_NEW = [425, 426, 427, 428, 429, 430, 431, 432, 442]  # io_uring_*, open_tree..fsmount, mount_setattr
SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
TABLES = {
    "x86_64": (0xC000003E, 56, 435, [
        101, 310, 311,  # ptrace, process_vm_readv/writev
        321, 298, 323,  # bpf, perf_event_open, userfaultfd
        248, 249, 250,  # add_key, request_key, keyctl
        272, 308,  # unshare, setns
        165, 166, 155, 161,  # mount, umount2, pivot_root, chroot
        246, 320, 175, 313, 176,  # kexec_load/file_load, init/finit/delete_module
        303, 304, 167, 168, 169, 163, 103, 172, 173,  # handles, swap, reboot, acct, syslog, iopl, ioperm
        *_GENERIC_NEW,
    ]),
    "aarch64": (0xC00000B7, 220, 435, [
        117, 270, 271, 280, 241, 282, 217, 218, 219, 97, 268, 40, 39, 41, 51,
        104, 294, 105, 273, 106, 264, 265, 224, 225, 142, 89, 116, *_GENERIC_NEW,
    ]),
}


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def build(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The BPF program as (code, jt, jf, k) tuples; raises OSError on an unknown architecture."""
    machine = machine or platform.machine()
    if machine not in TABLES:
        raise OSError(f"no seccomp syscall table for {machine}")
    arch, clone, clone3, denied = TABLES[machine]
    deny = [(RET_K, 0, 0, RET_ERRNO | errno.EPERM)]
    # Layout: arch check, load nr, x32 check, clone3, clone flags, the deny list, allow, deny.
    head = [(LD_W_ABS, 0, 0, 4), (JEQ_K, 1, 0, arch), (RET_K, 0, 0, RET_KILL_PROCESS), (LD_W_ABS, 0, 0, 0)]
    body = [(JEQ_K, 0, 1, clone3), (RET_K, 0, 0, RET_ERRNO | errno.ENOSYS)]
    n = len(denied)
    clone_check = [(JEQ_K, 0, 3, clone), (LD_W_ABS, 0, 0, 16), (JSET_K, n + 2, 0, NEW_NAMESPACE_FLAGS), (RET_K, 0, 0, RET_ALLOW)]
    checks = [(JEQ_K, n - i, 0, nr) for i, nr in enumerate(denied)]  # jump to deny, just past allow
    if machine == "x86_64":  # the x32 ABI reaches the same calls with bit 30 set
        body = [(JGE_K, len(body) + len(clone_check) + n + 1, 0, 0x40000000), *body]
    return head + body + clone_check + checks + [(RET_K, 0, 0, RET_ALLOW)] + deny


class Prepared:
    """The filter in kernel format, built once in the zygote so a forked child only makes one syscall
    (Python work in the child copies the zygote's pages on write, which costs more than the filter)."""

    def __init__(self, machine: str | None = None):
        self.machine = machine or platform.machine()
        program = build(self.machine)
        self._filters = (_Filter * len(program))(*(_Filter(*insn) for insn in program))
        self._fprog = _Program(len(program), self._filters)
        self._address = ctypes.addressof(self._fprog)

    def install(self) -> None:
        """Load the filter into this process (needs no_new_privs)."""
        libc.syscall(SYS_SECCOMP[self.machine], SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW, self._address)
