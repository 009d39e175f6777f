"""Debian's virtiofsd (QEMU 7.2's C back-end, ``/usr/lib/qemu/virtiofsd`` from
qemu-system-common) as the vhost-user back-end of the guest tests' virtio-fs shares."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.support.host import unix_socket_listening

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


class Virtiofsd:
    """One virtiofsd process sharing ``workdir/name`` on the socket ``workdir/name.sock``."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.source = workdir / name
        self.source.mkdir()
        self.socket = str(workdir / f"{name}.sock")
        self.log = open(workdir / f"{name}.log", "wb")
        self.proc = subprocess.Popen(
            [VIRTIOFSD, f"--socket-path={self.socket}", "-o", f"source={self.source}",
             "-o", "cache=none"], stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not unix_socket_listening(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"virtiofsd did not start: {self.log_text()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()
