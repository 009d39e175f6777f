"""The host end of vsock tests against the test guest.

``build_vsockcat_disk(directory)`` compiles tests/guest/data/vsockcat.c (the guest end) and
pads it into a raw disk image the guest reads it back from (``head -c SIZE /dev/vdX``);
``vsock_to_guest`` opens a host-initiated stream through a hybrid vsock's Unix socket;
``vsock_from_guest`` takes a guest-initiated one on the host's ``<socket>_<port>`` listener.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from tests.support.guest import REPO

VSOCKCAT_SOURCE = REPO / "tests" / "guest" / "data" / "vsockcat.c"


def build_vsockcat_disk(directory: Path) -> tuple[Path, int]:
    """Build ``vsockcat`` statically into ``directory`` and write ``tool.img``: the binary
    padded to whole 512-byte sectors. Returns (image path, binary size)."""
    tool = directory / "vsockcat"
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(tool), str(VSOCKCAT_SOURCE)],
                   check=True)
    data = tool.read_bytes()
    image = directory / "tool.img"
    image.write_bytes(data + bytes(-len(data) % 512))
    return image, len(data)


def vsock_to_guest(path: str, port: int, data: bytes, deadline: float) -> bytes:
    """The hybrid vsock's host-initiated stream (as the reference): ``CONNECT <port>``,
    ``OK ...``, then ``data``; returns everything the guest sends back before closing.
    Retries until ``deadline`` (time.monotonic()) while the guest is not listening yet."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect(path)
        s.sendall(f"CONNECT {port}\n".encode())
        if s.makefile("rb").readline().startswith(b"OK "):
            break
        s.close()                       # the guest was not listening yet: it reset us
        assert time.monotonic() < deadline, "the guest never accepted the vsock stream"
        time.sleep(1)
    with s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    return reply


def vsock_from_guest(path: str, port: int, connect: Callable[[], tuple[int, str]],
                     answer: bytes, timeout: float = 120) -> tuple[tuple[int, str], bytes]:
    """A guest-initiated stream (as the reference's hybrid vsock): listen on
    ``<path>_<port>``, run ``connect`` (the guest command that connects to the host's CID 2
    port ``port``), read everything the guest sends until it shuts its side down, answer
    ``answer``. Returns ``connect``'s (status, output) and what the guest sent; the
    listener's socket file is removed afterwards."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{path}_{port}")
    listener.listen(1)
    listener.settimeout(timeout)
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            while chunk := conn.recv(4096):
                received.append(chunk)
            conn.sendall(answer)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        result = connect()
        server.join(60)
    finally:
        listener.close()
        os.unlink(f"{path}_{port}")
    return result, b"".join(received)
