"""Waiting for hot plug to show in a real guest and in pych's event monitor.

``wait_in_guest`` polls a shell condition inside the guest in one command (acpiphp can take
tens of seconds to probe or release a device where guest kernel code is emulated); ``events``
and ``wait_for_events`` read the JSON lines of the file the guest's ``--event-monitor
path=...`` writes, which tests keep as ``guest.events_path``; ``curl`` sends a request the
way the user's document does, with curl on the API socket.
"""

from __future__ import annotations

import json
import subprocess
import time


def wait_in_guest(guest, condition: str, limit: int = 300,
                  interval: float = 1) -> tuple[int, str]:
    """One guest command: poll ``condition`` (a shell test) every ``interval`` s, up to
    ``limit`` s; returns (rc, output) of its last evaluation, rc 0 once it became true."""
    steps = round(limit / interval)
    return guest.run(f"i=0; until {condition}; do [ $i -ge {steps} ] && break; "
                     f"sleep {interval}; i=$((i+1)); done; {condition}", timeout=limit + 120,
                     again_if_shell_restarts=True)


def events(guest, name: str) -> list[dict]:
    """The events called ``name`` pych has written to ``guest.events_path`` so far."""
    found = []
    for line in guest.events_path.read_text().splitlines():
        if line and (event := json.loads(line))["event"] == name:
            found.append(event)
    return found


def wait_for_events(guest, name: str, count: int, limit: float = 120) -> list[dict]:
    """The events called ``name`` once there are ``count`` of them, or all there are after
    ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while len(found := events(guest, name)) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def curl(guest, endpoint: str, body: dict | None = None, method: str = "PUT") -> tuple[int, str]:
    """``curl -X<method> --unix-socket <guest.api_path> http://localhost/api/v1/<endpoint>``
    with ``body`` as JSON, as the user's document writes it; returns (HTTP status, body)."""
    args = ["curl", "-s", "-H", "Accept: application/json", f"-X{method}",
            "--unix-socket", guest.api_path, "-w", "\n%{http_code}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    out = subprocess.run([*args, f"http://localhost/api/v1/{endpoint}"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    text, _, status = out.rpartition("\n")
    return int(status), text
