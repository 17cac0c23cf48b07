"""Length-prefixed JSON messages over raw file descriptors (host <-> zygote).

Raw ``os.read``/``os.write`` on fds, never ``sys.stdout``: forked programs inherit
Python's buffers, and a buffered protocol byte would leak into a program's output.
"""

from __future__ import annotations

import json
import os
import struct

_HEADER = struct.Struct("<I")
MAX_MESSAGE = 64 * 1024 * 1024


def send(fd: int, message: dict) -> None:
    payload = json.dumps(message).encode()
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def receive(fd: int) -> dict:
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes exceeds {MAX_MESSAGE}")
    return json.loads(_read_exact(fd, size))
