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
    """pydantic's modules among ``modules``, less pych's stand-in for its plugin loader
    (pych.cli.without_pydantic_plugins: a module of pych's, under pydantic's name)."""
    return [name for name in modules if (name == "pydantic" or name.startswith("pydantic"))
            and name != "pydantic.plugin._loader"]


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


def test_with_plugins_off_pydantic_builds_models_without_its_plugin_loader() -> None:
    """pych's stand-in for pydantic's plugin loader (importing the real one costs
    importlib.metadata and email) is what pydantic asks when it builds a validator: models
    validate, and neither module is imported. A pydantic that asks its loader for more
    than ``get_plugins`` fails here, not in a user's pych."""
    import subprocess
    import sys
    code = ("import os, sys; os.environ.pop('PYDANTIC_DISABLE_PLUGINS', None); "
            "from pych.cli import without_pydantic_plugins; without_pydantic_plugins(); "
            "from pych.config import VmResize; "
            "assert VmResize.model_validate_json('{\"desired_vcpus\": 2}').desired_vcpus == 2; "
            "print(sorted(m for m in ('importlib.metadata', 'email') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    code = ("import os, sys; os.environ['PYDANTIC_DISABLE_PLUGINS'] = ''; "
            "from pych.cli import without_pydantic_plugins; without_pydantic_plugins(); "
            "from pych.config import VmResize; VmResize.model_validate({}); "
            "print(hasattr(sys.modules['pydantic.plugin._loader'], 'entry_points'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"            # plugins wanted: pydantic's own loader
