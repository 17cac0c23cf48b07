"""What runs inside the forked children: the in-process harness, and the trusted oracle's two sides.

In-process (``run_program``): one process runs the whole program (prompt, completion,
tests) and, if it reaches the end, writes ``P`` + the nonce to the status socket. Code
in that process can forge that (see the README's threat model); it is kept for tests
that cannot be proxied.

Every process that runs model-written code (``run_program``, ``serve_candidate``) is
forked by the candidate zygote and reads its program from a memfd (``_source``): the
zygote that forked it never held the text (``candidate_zygote``).

Trusted oracle: two processes, two uids, two cgroups.

* ``serve_candidate`` (untrusted uid) runs the prompt and the completion, then answers
  calls: each request names a function and carries plain-data arguments; the reply is
  the return value or the raised exception's type name and message, by value.
* ``serve_judge`` (another uid, so the candidate can neither signal it nor read its
  memory or fds) runs only benchmark code: for each program the zygote hands it, the
  prompt's helpers, then the tests with each candidate name bound to a proxy. The
  proxy's answers are decoded by ``codec``, which builds only plain values, so asserts,
  ``check`` and builtins here are the benchmark's own: a completion cannot reach them.
  Its verdict is the only one read. It is long-lived (``mtp.sandbox.judge``): it holds
  tests, and no candidate is ever forked from it.

Status messages are ``kind + nonce + detail`` on the status socket; the zygote keeps
only those from the main child (the in-process program, or the judge) whose nonce
matches: ``P`` passed, ``E`` failed (detail), ``F`` the tests need in-process access
(detail: why), rerun in-process; from the judge, ``R`` before its verdict: it exits after
this program (see ``serve_judge``).
"""

from __future__ import annotations

import builtins
import json
import os
import resource
import signal
import socket
import struct
import sys

from mtp.sandbox import codec

STATUS_FD, NONCE_FD = 3, 4  # in-process harness (the judge: status only)
JUDGE_CONTROL_FD, JUDGE_CHANNEL_FD = 4, 5  # the judge's programs from the zygote; its end of a call channel
PROGRAM_SOURCE_FD = 5  # in-process: a memfd holding the program (see candidate_zygote)
CANDIDATE_CHANNEL_FD, CANDIDATE_SOURCE_FD = 3, 4  # candidate's end of the channel, its memfd
PASS, ERROR, FALLBACK, RETIRING = b"P", b"E", b"F", b"R"
NONCE_BYTES = 32
_read, _write, _exit = os.read, os.write, os._exit  # bound before any program runs
_HEADER = struct.Struct("<I")
MAX_DETAIL = 2000


def _message(exc: BaseException) -> str:
    try:
        return str(exc)[:MAX_DETAIL]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        return "(unprintable message)"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_message(exc)}"


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed or replaced stream
            pass


def _status(kind: bytes, nonce: bytes, detail: str = "") -> None:
    _flush()
    _write(STATUS_FD, kind + nonce + detail[:MAX_DETAIL].encode("utf-8", "replace"))


def _report(kind: bytes, detail: str = "") -> None:
    """In-process: write one status message with the nonce, then exit (0 for a pass)."""
    try:
        _status(kind, _read(NONCE_FD, 64), detail)
    finally:
        _exit(0 if kind == PASS else 1)


def _source(fd: int) -> str:
    """The program text from the memfd the candidate zygote handed over (and never read itself)."""
    size, chunks, offset = os.fstat(fd).st_size, [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogatepass")


def memfd(text: str) -> int:
    """A memfd holding ``text`` (the writer's side of ``_source``)."""
    fd = os.memfd_create("program", os.MFD_CLOEXEC)
    data = memoryview(text.encode("utf-8", "surrogatepass"))
    while data:
        data = data[os.write(fd, data):]
    return fd


def run_program() -> None:
    """In-process mode: the whole program in this process; never returns."""
    source = _source(PROGRAM_SOURCE_FD)
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__file__": "program.py",
                                                     "__builtins__": builtins})
    except BaseException as exc:  # noqa: BLE001 - every way out of the program is a non-pass
        _report(ERROR, _describe(exc))
    _report(PASS)


# ---------------------------------------------------------------- the call channel
def _send(fd: int, kind: bytes, payload: bytes = b"") -> None:
    data = memoryview(_HEADER.pack(len(payload) + 1) + kind + payload)
    while data:
        data = data[_write(fd, data):]


def _receive(fd: int) -> tuple[bytes, bytes]:
    """(kind, payload); EOFError when the peer is gone, CodecError for an oversized frame."""

    def exact(n: int) -> bytes:
        chunks = []
        while n:
            chunk = _read(fd, min(n, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    (size,) = _HEADER.unpack(exact(_HEADER.size))
    if not 1 <= size <= codec.MAX_BYTES + 1:
        raise codec.CodecError(f"a frame of {size} bytes")
    frame = exact(size)
    return frame[:1], frame[1:]


# ---------------------------------------------------------------- untrusted side
def serve_candidate() -> None:
    """Run prompt + completion, then answer calls until the judge closes the channel; never returns."""
    fd = CANDIDATE_CHANNEL_FD
    source = _source(CANDIDATE_SOURCE_FD)
    namespace = {"__name__": "__main__", "__file__": "program.py", "__builtins__": builtins}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001
        _flush()
        _send(fd, b"F", _describe(exc)[:MAX_DETAIL].encode("utf-8", "replace"))
        _exit(1)
    _flush()
    _send(fd, b"L")
    while True:
        try:
            _, request = _receive(fd)
        except EOFError:
            _flush()
            _exit(0)
        name, args, kwargs = codec.decode(request)
        try:
            if name not in namespace:
                raise NameError(f"name {name!r} is not defined")
            result = namespace[name](*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the candidate's exception is its answer
            _flush()
            try:
                answer = codec.encode([type(exc).__name__, _message(exc), _changed(request, name, args, kwargs)],
                                      lenient=True)
            except codec.CodecError:
                answer = codec.encode([type(exc).__name__, _message(exc), None])
            _send(fd, b"X", answer)
            continue
        _flush()
        try:
            _send(fd, b"R", codec.encode([result, _changed(request, name, args, kwargs)], lenient=True))
        except codec.CodecError as exc:
            _send(fd, b"I", str(exc).encode())


def _changed(request: bytes, name: str, args: tuple, kwargs: dict) -> list | None:
    """The arguments as the call left them, where it changed them (an in-place sort), else None;
    the judge applies them to its own objects, so a test that reads them sees the change."""
    try:
        after = codec.encode((name, args, kwargs), lenient=True)
    except codec.CodecError:
        return None
    return None if after == request else [args, kwargs]


# ---------------------------------------------------------------- trusted side
class CandidateFailure(BaseException):
    """The candidate gave no valid answer (crashed, hung up, sent something that is not plain data).

    A BaseException so ``except Exception`` in a test does not swallow it; the judge
    also records it, so a bare ``except:`` cannot turn it into a pass either.
    """


class CandidateRaised(Exception):
    """The candidate raised an exception that is not a builtin type; carries its name and message."""


class NeedsInProcess(BaseException):
    """The benchmark's own arguments are not plain data: this test cannot be proxied."""


class _Judge:
    def __init__(self) -> None:
        self.failure = ""  # first reason the candidate failed, sticky
        self.loaded = False
        self.unsupported = ""
        self.changed_arguments = False  # a call changed objects of ours in place (see serve_judge)

    def fail(self, reason: str) -> CandidateFailure:
        self.failure = self.failure or reason
        return CandidateFailure(self.failure)

    def await_load(self) -> None:
        """Read the candidate's load report (once). Read after the first request is sent, so loading
        and the first call cost one wait, not two."""
        if self.loaded:
            return
        self.loaded = True
        try:
            kind, payload = _receive(JUDGE_CHANNEL_FD)
        except (EOFError, codec.CodecError):
            raise self.fail("the candidate's process ended before its code finished loading") from None
        if kind == b"F":
            raise self.fail(payload.decode("utf-8", "replace") + " (raised while the completion loaded)")
        if kind != b"L":
            raise self.fail("the candidate's process broke the call protocol")

    def proxy(self, name: str):
        def candidate(*args, **kwargs):
            if self.failure:
                raise CandidateFailure(self.failure)
            try:
                request = codec.encode((name, args, kwargs))
            except codec.NotPlainData as exc:
                self.unsupported = f"the test passes {name} an argument that is not plain data ({exc})"
                raise NeedsInProcess(self.unsupported) from None
            except codec.CodecError as exc:
                raise self.fail(f"arguments for {name} too large: {exc}") from None
            try:
                try:
                    _send(JUDGE_CHANNEL_FD, b"C", request)
                except BrokenPipeError:
                    pass  # the candidate is gone: its load report, or the end of the channel, says why
                self.await_load()
                kind, payload = _receive(JUDGE_CHANNEL_FD)
                if kind in (b"R", b"X"):
                    answer = codec.decode(payload)
                    if type(answer) is not list or len(answer) != (2 if kind == b"R" else 3):
                        raise self.fail(f"the candidate's process broke the call protocol (answer {kind!r})")
                    if answer[-1] is not None:
                        self.changed_arguments = True
                        _apply_changes(args, kwargs, answer[-1])
                    if kind == b"R":
                        return answer[0]
                    raise _rebuilt(str(answer[0]), str(answer[1]))
                if kind == b"I":
                    raise self.fail(f"{name} returned something that is not a valid answer: "
                                    f"{payload[:MAX_DETAIL].decode('utf-8', 'replace')}")
                raise self.fail(f"the candidate's process broke the call protocol (frame {kind!r})")
            except (EOFError, BrokenPipeError, ConnectionResetError):
                raise self.fail(f"the candidate's process ended during a call to {name}") from None
            except codec.CodecError as exc:
                raise self.fail(f"{name} returned something that is not a valid answer: {exc}") from None

        candidate.__name__ = candidate.__qualname__ = name
        return candidate


def _apply_changes(args: tuple, kwargs: dict, changed) -> None:
    """Update the test's own argument objects in place to the values the call left them with."""
    if (type(changed) is not list or len(changed) != 2 or type(changed[0]) is not tuple or type(changed[1]) is not dict
            or len(changed[0]) != len(args) or changed[1].keys() != kwargs.keys()):
        raise codec.CodecError("changed arguments that do not match the call's")
    for old, new in [*zip(args, changed[0]), *((kwargs[k], changed[1][k]) for k in kwargs)]:
        _update(old, new)


def _update(old, new) -> None:
    kind = type(old)
    if kind is not type(new):
        return  # a call cannot change an object's type in place
    if kind is list:
        old[:] = new
    elif kind in (dict, set):
        old.clear()
        old.update(new)
    elif kind is tuple and len(old) == len(new):
        for inner_old, inner_new in zip(old, new):
            _update(inner_old, inner_new)


def _rebuilt(type_name: str, message: str) -> Exception:
    """The candidate's exception as the builtin type of that name (so tests can catch it), else CandidateRaised."""
    cls = getattr(builtins, type_name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:  # e.g. UnicodeDecodeError needs five arguments
            pass
    return CandidateRaised(f"{type_name}: {message}")


def judge(state: _Judge, prefix: str, tests: str, names: list[str]) -> tuple[bytes, str]:
    """Trusted side, one program: benchmark code only, each name in ``names`` a proxy; (status kind, detail)."""
    try:
        namespace = {"__name__": "__main__", "__file__": "tests.py", "__builtins__": builtins}
        exec(compile(prefix, "prompt.py", "exec"), namespace)
        for name in names:
            namespace[name] = state.proxy(name)
        exec(compile(tests, "tests.py", "exec"), namespace)
        state.await_load()  # tests that never call the candidate still need it to load
    except BaseException as exc:  # noqa: BLE001
        if state.unsupported:
            return FALLBACK, state.unsupported
        return ERROR, state.failure or _describe(exc)
    if state.unsupported:
        return FALLBACK, state.unsupported
    if state.failure:  # the test swallowed the failure
        return ERROR, state.failure
    return PASS, ""


def serve_judge() -> None:
    """The slot's judge: judge each program the zygote sends, one after another; never returns.

    A program arrives as fds (its stdout and stderr pipes, its end of the call channel, a
    memfd holding ``{prefix, tests, names, nonce, cpu_seconds}``). Each program's tests get
    a fresh namespace; between programs the judge puts back what benchmark code may have
    changed in it (streams, recursion limit, the random stream) and gives the next one a
    fresh CPU allowance (``RLIMIT_CPU``). A candidate reaches nothing here but the values
    its answers rebuild, with one exception: a call that changed its arguments has the
    judge update the test's objects in place, and those could be shared with later
    programs (a module's list), so after such a program the judge exits and the zygote
    starts another. It also exits when the zygote closes the control socket, and before
    its lifetime CPU limit could cut an allowance short.
    """
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a vanished candidate is an error to report, not our death
    control = socket.socket(fileno=JUDGE_CONTROL_FD)
    recursion_limit = sys.getrecursionlimit()
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    while True:
        _, fds, _, _ = socket.recv_fds(control, 1, 4)
        if len(fds) != 4:
            _exit(0)  # the zygote is done with us
        for target, fd in zip((1, 2, JUDGE_CHANNEL_FD), fds):
            if fd != target:
                os.dup2(fd, target)
                os.close(fd)
        request = json.loads(_source(fds[3]))
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        sys.setrecursionlimit(recursion_limit)
        if "random" in sys.modules:
            sys.modules["random"].seed()
        used = _cpu_seconds()
        resource.setrlimit(resource.RLIMIT_CPU, (min(hard, used + 1 + request["cpu_seconds"]), hard))
        state = _Judge()
        kind, detail = judge(state, request["prefix"], request["tests"], request["names"])
        nonce = request["nonce"].encode()
        retiring = state.changed_arguments or _cpu_seconds() > hard // 2
        if retiring:  # said before the verdict, so the zygote knows by the time it reads that
            _status(RETIRING, nonce)
        _status(kind, nonce, detail)
        os.close(JUDGE_CHANNEL_FD)  # the candidate's cue to exit
        if retiring:
            _exit(0)


def _cpu_seconds() -> int:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return int(used.ru_utime + used.ru_stime)
