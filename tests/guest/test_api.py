"""The VM lifecycle over the REST API against a real guest (issue: API).

pych starts with only --api-socket and waits; the test creates and boots the VM over the
API, then drives pause/resume, reboot and the power button, as a ch-remote user would.
"""

import json
import subprocess
import sys
import time

import pytest

from pych.api.client import ApiClient

from tests.support.guest import READY, REPO, Console, Shell, guest_artifacts, guest_cmdline

PYCH = [sys.executable, "-m", "pych"]
REMOTE = [str(REPO / ".venv" / "bin" / "pych-remote")]


def _events(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def vmm(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    api, events, serial = str(d / "api.sock"), str(d / "events.json"), str(d / "serial.sock")
    log = open(d / "pych.log", "wb")
    proc = subprocess.Popen([*PYCH, "--api-socket", api, "--event-monitor", f"path={events}"],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (d / "api.sock").exists():
        assert proc.poll() is None, (d / "pych.log").read_text()
        assert time.monotonic() < deadline, "API socket never appeared"
        time.sleep(0.05)
    state = {"proc": proc, "api": api, "events": events, "serial": serial, "dir": d,
             "client": ApiClient(api)}
    yield state
    if proc.poll() is None:
        proc.terminate()
        proc.wait(20)
    log.close()


def _remote(vmm, *args):
    return subprocess.run([*REMOTE, "--api-socket", vmm["api"], *args], capture_output=True,
                          text=True, timeout=120)


def test_ping_before_any_vm(vmm):
    status, body = vmm["client"].get("vmm.ping")
    assert status == 200
    assert json.loads(body)["pid"] == vmm["proc"].pid
    status, body = vmm["client"].get("vm.info")
    assert status == 404 and isinstance(json.loads(body), list)


# Every implemented hot plug endpoint with a body that parses, before any vm.create.
HOT_PLUG_REQUESTS = {
    "vm.resize": {"desired_vcpus": 2},
    "vm.resize-zone": {"id": "mem0", "desired_ram": 256 << 20},
    "vm.add-disk": {"path": "/nonexistent/disk.raw"},
    "vm.add-net": {"tap": "chtap9"},
    "vm.add-fs": {"tag": "myfs", "socket": "/nonexistent/virtiofsd.sock"},
    "vm.add-pmem": {"file": "/nonexistent/pmem.img"},
    "vm.add-vsock": {"cid": 3, "socket": "/nonexistent/vsock.sock"},
    "vm.add-device": {"path": "/sys/bus/pci/devices/0000:00:04.0"},
    "vm.remove-device": {"id": "_disk0"},
}


def test_every_hot_plug_endpoint_without_a_vm_is_404_vm_is_not_created(vmm):
    """The reference's answer (VmNotCreated, checked before anything else): 404 and the
    error chain ending in "VM is not created"; nothing is created by the attempt."""
    answers = {endpoint: vmm["client"].put(endpoint, body)
               for endpoint, body in HOT_PLUG_REQUESTS.items()}
    assert {endpoint: (status, json.loads(body)) for endpoint, (status, body) in answers.items()} \
        == {endpoint: (404, ["Error from API", "VM is not created"]) for endpoint in answers}
    status, _ = vmm["client"].get("vm.info")
    assert status == 404


def test_create_and_boot_over_the_api(vmm):
    art = guest_artifacts()
    config = {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256 << 20},
        "payload": {"kernel": str(art["vmlinux"]), "initramfs": str(art["initramfs.cpio"]),
                    "cmdline": guest_cmdline()},
        "serial": {"mode": "Socket", "socket": vmm["serial"]},
        "console": {"mode": "Off"},
    }
    status, body = vmm["client"].put("vm.create", config)
    assert status == 204, body
    info = json.loads(vmm["client"].get("vm.info")[1])
    assert info["state"] == "Created"
    assert info["config"]["cpus"]["boot_vcpus"] == 2
    status, body = vmm["client"].put("vm.boot")
    assert status == 204, body
    console = Console.connect_unix(vmm["serial"], 30, vmm["dir"] / "console.log")
    console.expect(READY, 300)
    shell = Shell(console)
    shell.prepare()
    vmm["shell"], vmm["console"] = shell, console
    assert shell.run("nproc") == (0, "2")
    info = json.loads(vmm["client"].get("vm.info")[1])
    assert info["state"] == "Running"
    assert info["memory_actual_size"] == 256 << 20
    names = [e["event"] for e in _events(vmm["events"])]
    assert names[:3] == ["starting", "booting", "booted"]


def test_pause_stops_the_guest_clock_and_resume_continues(vmm):
    shell = vmm["shell"]
    rc, before = shell.run("cut -d' ' -f1 /proc/uptime")
    assert rc == 0
    t0 = time.monotonic()
    assert _remote(vmm, "pause").returncode == 0
    assert json.loads(vmm["client"].get("vm.info")[1])["state"] == "Paused"
    time.sleep(10)
    r = _remote(vmm, "pause")                  # pausing twice is an error, not a hang
    assert r.returncode == 1 and "Server responded with" in r.stderr
    assert _remote(vmm, "resume").returncode == 0
    rc, after = shell.run("cut -d' ' -f1 /proc/uptime")
    host = time.monotonic() - t0
    guest = float(after) - float(before)
    assert guest < host - 8, f"guest clock advanced {guest:.1f} s over {host:.1f} s with a 10 s pause"
    assert json.loads(vmm["client"].get("vm.info")[1])["state"] == "Running"


def test_bad_requests_leave_vmm_and_guest_running(vmm):
    c = vmm["client"]
    assert c.request("PUT", "/api/v1/vm.resize", b"{not json")[0] == 400
    assert c.request("PUT", "/api/v1/vm.boot", b'{"x":1}')[0] == 400
    assert c.request("GET", "/api/v1/vm.boot")[0] == 405
    assert c.request("GET", "/api/v1/vm.nope")[0] == 404
    # a VM exists: that is the answer, before the (also bad) body is looked at
    assert c.put("vm.create", {"memory": {"size": 1}})[0] == 409
    assert c.get("vmm.ping")[0] == 200
    assert vmm["shell"].run("echo alive") == (0, "alive")


def test_reboot_over_the_api_keeps_the_configuration(vmm):
    start = len(vmm["console"].buf)
    assert _remote(vmm, "reboot").returncode == 0
    vmm["console"].expect(READY, 300, start)
    vmm["shell"].prepare()
    assert vmm["shell"].run("nproc") == (0, "2")
    names = [e["event"] for e in _events(vmm["events"])]
    assert "rebooting" in names and "rebooted" in names


def test_power_button_shuts_the_guest_down_and_pych_exits_zero(vmm):
    assert _remote(vmm, "power-button").returncode == 0
    assert vmm["proc"].wait(120) == 0
    assert "shutdown" in [e["event"] for e in _events(vmm["events"])]
