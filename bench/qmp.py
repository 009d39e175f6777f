"""A minimal QMP client for the benchmarks' QEMU peers."""

from __future__ import annotations

import json
import socket
import time


class Qmp:
    """A minimal QMP client: one command at a time, events skipped."""

    def __init__(self, path: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.reader = self.sock.makefile("r")
        json.loads(self.reader.readline())                       # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments) -> dict:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode())
        while True:
            reply = json.loads(self.reader.readline())
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
