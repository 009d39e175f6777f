"""Network namespaces for tests that make taps: everything pych creates stays inside one.

``network_namespace(name)`` creates a named namespace (``ip netns add``) and deletes it on
exit; ``in_netns(name, fn)`` runs ``fn`` on a thread that has joined it, for host-side
sockets and tap fds that must live in the guest's network.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


@contextlib.contextmanager
def network_namespace(name: str) -> Iterator[str]:
    """Create the network namespace ``name`` (needs root); delete it on exit."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(name: str, fn: Callable[[], T]) -> Callable[..., T]:
    """Run ``fn()`` on a new thread that has joined network namespace ``name``; returns a
    ``wait(timeout=180)`` that gives back fn's result (or raises its exception)."""
    box: dict = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET):
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def wait(timeout: float = 180) -> T:
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"host-side helper in {name} did not finish in {timeout} s")
        if "error" in box:
            raise box["error"]
        return box["value"]
    return wait


def tcp_receive_md5(listener: socket.socket, timeout: float = 180) -> tuple[int, str]:
    """Accept one connection on ``listener`` (closed after) and read it to its end: the
    number of bytes and their md5 (run it in the namespace with :func:`in_netns`)."""
    with listener:
        conn, _ = listener.accept()
    with conn:
        conn.settimeout(timeout)
        digest, size = hashlib.md5(), 0
        while chunk := conn.recv(1 << 16):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def open_tap_queue(name: str) -> int:
    """What a manager such as Kata does before handing a tap to the VMM: open /dev/net/tun
    and attach it to (creating) interface ``name``; returns the fd. Call it in the network
    namespace the tap belongs in (``in_netns``)."""
    from pych.devices.net.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except BaseException:
        os.close(fd)
        raise
    return fd
