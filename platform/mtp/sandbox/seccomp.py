"""The seccomp filter for sandboxed programs, as raw BPF (no libseccomp needed).

Namespaces, the uid and no_new_privs already make most of these calls useless to a
program; the filter removes them as kernel attack surface:

* a deny-list: new namespaces (a user namespace would hand the program capabilities
  over its own objects), ptrace and cross-process memory or fd access, bpf, perf,
  io_uring, userfaultfd, keyrings, the old and the new mount API, modules, kexec;
* default-deny for the future: every number above ``HIGHEST_ALLOWED`` fails with
  ENOSYS, so a call a newer kernel adds is refused until someone reviews it;
* a socket-family allow-list: AF_UNIX, AF_INET/AF_INET6 (the network namespace is
  empty) and AF_NETLINK with NETLINK_ROUTE only (glibc's getaddrinfo and
  if_nameindex use it); AF_VSOCK, AF_PACKET and every other family are outside any
  network namespace's reach, so they are refused with EAFNOSUPPORT.

Denied calls fail with EPERM (clone3 and unknown calls with ENOSYS, so libc falls
back to calls the filter can inspect). Installed in the child just before the program runs.
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
LD_W_ABS, JEQ_K, JGT_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x25, 0x35, 0x45, 0x06
ARG0, ARG2 = 16, 32  # offsets of the low 32 bits of args[0], args[2] in struct seccomp_data (little-endian)
NEW_NAMESPACE_FLAGS = 0x7E020080  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, NETLINK_ROUTE = 1, 2, 10, 16, 0
# fchmodat2, Linux 6.6: the newest call reviewed. Numbers from 403 up are shared by every architecture.
HIGHEST_ALLOWED = 452

# Shared numbers: io_uring_* (425-427), the mount API open_tree..fspick (428-433), pidfd_getfd (438),
# process_madvise (440), mount_setattr (442).
_GENERIC_DENIED = [425, 426, 427, 428, 429, 430, 431, 432, 433, 438, 440, 442]
SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}


class Table:
    """One architecture's numbers."""

    def __init__(self, audit_arch: int, clone: int, clone3: int, socket: int, socketpair: int, denied: list[int]):
        self.audit_arch, self.clone, self.clone3 = audit_arch, clone, clone3
        self.socket, self.socketpair, self.denied = socket, socketpair, denied


TABLES = {
    "x86_64": Table(0xC000003E, clone=56, clone3=435, socket=41, socketpair=53, denied=[
        101, 310, 311,  # ptrace, process_vm_readv/writev
        321, 298, 323,  # bpf, perf_event_open, userfaultfd
        248, 249, 250,  # add_key, request_key, keyctl
        272, 308,  # unshare, setns
        165, 166, 155, 161,  # mount, umount2, pivot_root, chroot
        246, 320, 175, 313, 176,  # kexec_load/file_load, init/finit/delete_module
        303, 304, 167, 168, 169, 163, 103, 172, 173,  # handles, swap, reboot, acct, syslog, iopl, ioperm
        *_GENERIC_DENIED,
    ]),
    "aarch64": Table(0xC00000B7, clone=220, clone3=435, socket=198, socketpair=199, denied=[
        117, 270, 271, 280, 241, 282, 217, 218, 219, 97, 268, 40, 39, 41, 51,
        104, 294, 105, 273, 106, 264, 265, 224, 225, 142, 89, 116, *_GENERIC_DENIED,
    ]),
}

Insn = tuple  # (code, jt, jf, k) with jt/jf an int or a label name; or ("label", name)


def _ret(value: int) -> Insn:
    return (RET_K, 0, 0, value)


def _assemble(program: list[Insn]) -> list[tuple[int, int, int, int]]:
    """Resolve label names in jt/jf into BPF's relative forward offsets."""
    labels, code = {}, []
    for insn in program:
        if insn[0] == "label":
            labels[insn[1]] = len(code)
        else:
            code.append(insn)

    def offset(target, at: int) -> int:
        if isinstance(target, int):
            return target
        jump = labels[target] - at - 1
        if not 0 <= jump <= 255:
            raise ValueError(f"seccomp jump to {target} out of range ({jump})")
        return jump

    return [(c, offset(jt, i), offset(jf, i), k) for i, (c, jt, jf, k) in enumerate(code)]


def build(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The BPF program as (code, jt, jf, k) tuples; raises OSError on an unknown architecture."""
    machine = machine or platform.machine()
    if machine not in TABLES:
        raise OSError(f"no seccomp syscall table for {machine}")
    t = TABLES[machine]
    program: list[Insn] = [
        (LD_W_ABS, 0, 0, 4), (JEQ_K, 1, 0, t.audit_arch), _ret(RET_KILL_PROCESS), (LD_W_ABS, 0, 0, 0),
    ]
    if machine == "x86_64":  # the x32 ABI reaches the same calls with bit 30 set
        program.append((JGE_K, "deny", 0, 0x40000000))
    program += [
        (JGT_K, "unknown", 0, HIGHEST_ALLOWED),
        (JEQ_K, "unknown", 0, t.clone3),  # its flags live in memory the filter cannot read
        (JEQ_K, 0, "not_clone", t.clone),
        (LD_W_ABS, 0, 0, ARG0), (JSET_K, "deny", "allow", NEW_NAMESPACE_FLAGS),
        ("label", "not_clone"),
        (JEQ_K, 0, "not_socket", t.socket),
        (LD_W_ABS, 0, 0, ARG0),
        (JEQ_K, "allow", 0, AF_UNIX), (JEQ_K, "allow", 0, AF_INET), (JEQ_K, "allow", 0, AF_INET6),
        (JEQ_K, 0, "no_family", AF_NETLINK),
        (LD_W_ABS, 0, 0, ARG2), (JEQ_K, "allow", "no_family", NETLINK_ROUTE),
        ("label", "not_socket"),
        (JEQ_K, 0, "listed", t.socketpair),
        (LD_W_ABS, 0, 0, ARG0), (JEQ_K, "allow", "no_family", AF_UNIX),
        ("label", "listed"),
        *((JEQ_K, "deny", 0, nr) for nr in t.denied),
        ("label", "allow"), _ret(RET_ALLOW),
        ("label", "deny"), _ret(RET_ERRNO | errno.EPERM),
        ("label", "unknown"), _ret(RET_ERRNO | errno.ENOSYS),
        ("label", "no_family"), _ret(RET_ERRNO | errno.EAFNOSUPPORT),
    ]
    return _assemble(program)


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


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
