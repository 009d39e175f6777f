"""The host end of vsock tests against the test guest.

``build_vsockcat_disk(directory)`` compiles tests/guest/data/vsockcat.c (the guest end) and
pads it into a raw disk image the guest reads it back from (``head -c SIZE /dev/vdX``);
``vsock_to_guest`` opens a host-initiated stream through a hybrid vsock's Unix socket.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

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
