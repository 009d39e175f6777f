"""The ``pych`` process: what its start-up imports (pych.cli.process, pych.cli.main)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# Runs pych's real no-VM start path (pych --api-socket S) on the main thread, as the pych
# command does; a second thread waits for vmm.ping's answer, notes which modules are
# imported at that moment, then sends a vm.create body (the first request that needs a model)
# and vmm.shutdown, which ends main().
_PROBE = textwrap.dedent("""
    import http.client, json, os, socket, sys, threading, time

    from pych.cli.main import main

    path = sys.argv[1]
    seen = {}

    def request(method, url, body=None):
        for _ in range(2000):
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                break
            except OSError:
                sock.close()
                time.sleep(0.005)
        head = f"{method} /api/v1/{url} HTTP/1.1\\r\\nHost: localhost\\r\\n"
        if body is not None:
            head += f"Content-Length: {len(body)}\\r\\n"
        sock.sendall((head + "\\r\\n" + (body or "")).encode())
        answer = b""
        while b"\\r\\n\\r\\n" not in answer:
            answer += sock.recv(65536)
        sock.close()
        return int(answer.split()[1])

    def client():
        seen["ping"] = request("GET", "vmm.ping")
        seen["after_ping"] = sorted(sys.modules)
        seen["create"] = request("PUT", "vm.create", '{"cpus": {"boot_vcpus": "two"}}')
        seen["after_create"] = sorted(sys.modules)
        request("PUT", "vmm.shutdown")

    threading.Thread(target=client, daemon=True).start()
    seen["exit"] = main(["--api-socket", path])
    print(json.dumps(seen))
""")


def _pydantic(modules: list[str]) -> list[str]:
    return [name for name in modules if name == "pydantic" or name.startswith("pydantic")]


def test_the_no_vm_start_path_does_not_import_pydantic(tmp_path: Path) -> None:
    """``pych --api-socket S`` answers ``vmm.ping`` without having imported pydantic (or any
    configuration model, KVM or a device): that is most of what made its start-up slow
    (docs/benchmarks.md, "Start-up"). The first request with a body imports its model."""
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "api.sock")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.splitlines()[-1])
    assert seen["ping"] == 200
    assert _pydantic(seen["after_ping"]) == []
    loaded = set(seen["after_ping"])
    for heavy in ("pych.config.base", "pych.config.vm", "pych.config.support",
                  "pych.vmm.controllers", "pych.vm", "pych.hypervisor.kvm", "pych.api.client"):
        assert heavy not in loaded, f"{heavy} imported before any request needed it"
    # The first request that needs a model imports it (and pydantic): a body that does not
    # validate is the client's error, 400, as before.
    assert seen["create"] == 400
    assert "pydantic" in seen["after_create"] and "pych.config.vm" in seen["after_create"]
    assert seen["exit"] == 0


def test_pychs_commands_turn_pydantic_plugins_off_unless_told(monkeypatch) -> None:
    from pych.cli import without_pydantic_plugins

    monkeypatch.delenv("PYDANTIC_DISABLE_PLUGINS", raising=False)
    without_pydantic_plugins()
    import os
    assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == "__all__"
    monkeypatch.setenv("PYDANTIC_DISABLE_PLUGINS", "")          # the user's word stands
    without_pydantic_plugins()
    assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == ""
