"""Devices that cannot be made, against a real pych process (issue 4): a tap that cannot be
opened or created, and ``pci_device_id`` requests the reference refuses.

On the command line each is one ``pych: error:`` line before anything boots; over the API it
is a 4xx (or the reference's 500 for a taken slot) whose body is the reference's JSON array of
messages, and nothing is left behind: no interface, no descriptor, no slot, no id. The VM is
the few-instruction guest of tests/support/microguest.py (it boots in milliseconds), and pych
runs in a network namespace the module creates, so every tap stays in it.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from pych.api.client import ApiClient

from tests.support.guest import REPO
from tests.support.microguest import build_elf

NETNS = f"pych-deverr-{os.getpid()}"
PYCH = str(REPO / ".venv" / "bin" / "pych")
HALT_LOOP = b"\xfa\xf4\xeb\xfd"          # cli; hlt; jmp hlt
MiB = 1 << 20
TOO_LONG = "a-name-of-16-byt"
NOT_A_TAP = "lo"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("device-errors")
    kernel = d / "idle.elf"
    kernel.write_bytes(build_elf(HALT_LOOP))
    disks = []
    for name in ("a.img", "b.img"):
        (d / name).write_bytes(bytes(MiB))
        disks.append(str(d / name))
    return {"dir": d, "kernel": str(kernel), "disks": disks}


def links(netns) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, "ip", "-o", "link"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def pych_cli(netns, files, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, PYCH, "--kernel", files["kernel"],
                           "--memory", "size=64M", "--serial", "null", "--console", "off", *args],
                          capture_output=True, text=True, timeout=120)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result
    assert result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pych: error: "), result.stderr
    return lines[0].removeprefix("pych: error: ")


# --- the command line ---------------------------------------------------------------------------
def test_a_tap_that_cannot_be_made_is_one_error_line_before_boot(netns, files):
    before = links(netns)
    long_name = pych_cli(netns, files, "--net", f"tap={TOO_LONG}")
    assert one_error_line(long_name) == f"tap name '{TOO_LONG}' is longer than 15 bytes"
    assert long_name.returncode == 1
    not_a_tap = pych_cli(netns, files, "--disk", f"path={files['disks'][0]}",
                         "--net", f"tap={NOT_A_TAP}")
    assert one_error_line(not_a_tap) == (f"cannot open or create tap '{NOT_A_TAP}': an interface "
                                         "of that name exists and is not a tap")
    assert links(netns) == before


@pytest.mark.parametrize(("disks", "status", "message"), [
    (["path=A,pci_device_id=32"], 2,
     "Given PCI device ID (32) is out of the supported range of 0..32"),
    (["path=A,pci_device_id=0"], 2, "Given PCI device ID (0) is reserved"),
    (["path=A,pci_device_id=3", "path=B,pci_device_id=3"], 1,
     "Valid PCI device identifier but already used: 3"),
])
def test_a_refused_pci_device_id_is_one_error_line(netns, files, disks, status, message):
    disks = [d.replace("A", files["disks"][0]).replace("B", files["disks"][1]) for d in disks]
    result = pych_cli(netns, files, "--disk", *disks)
    assert one_error_line(result) == message
    assert result.returncode == status


# --- the API ------------------------------------------------------------------------------------
class Pych:
    """``pych --api-socket`` in the namespace."""

    def __init__(self, netns, workdir: Path):
        self.netns = netns
        self.api = str(workdir / "api.sock")
        self.log = open(workdir / "pych.log", "wb")
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, PYCH, "--api-socket", self.api],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.api):
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                (workdir / "pych.log").read_text()
            time.sleep(0.05)
        self.client = ApiClient(self.api)

    def put(self, path, body=None):
        status, payload = self.client.put(path, body)
        return status, json.loads(payload) if payload else None

    def leaks(self) -> tuple[list[str], list[str]]:
        """(what pych's descriptors point to, the namespace's interfaces); left out: sockets
        (API connections come and go) and /dev/kvm (opened at the first boot and kept)."""
        fd_dir = f"/proc/{self.proc.pid}/fd"
        targets = []
        for fd in os.listdir(fd_dir):
            try:
                targets.append(os.readlink(f"{fd_dir}/{fd}"))
            except OSError:
                pass
        return (sorted(t for t in targets if not t.startswith("socket:") and t != "/dev/kvm"),
                links(self.netns))

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def pych(netns, tmp_path):
    p = Pych(netns, tmp_path)
    yield p
    p.close()


def vm_config(files, **devices) -> dict:
    return {"payload": {"kernel": files["kernel"]}, "memory": {"size": 64 * MiB},
            "serial": {"mode": "Null"}, "console": {"mode": "Off"}, **devices}


def test_vm_boot_with_a_tap_that_cannot_be_made_is_a_400_and_leaves_nothing(pych, files):
    assert pych.put("vm.create", vm_config(files, disks=[{"path": files["disks"][0]}],
                                           net=[{"tap": NOT_A_TAP}]))[0] == 204
    before = pych.leaks()
    assert pych.put("vm.boot") == (400, [
        "Error from API", "Error booting VM",
        f"cannot open or create tap '{NOT_A_TAP}': an interface of that name exists and is not a tap"])
    assert pych.leaks() == before
    info = json.loads(pych.client.get("vm.info")[1])
    assert info["state"] == "Created"
    assert [d.get("id") for d in info["config"]["disks"]] == [None]    # no id handed out
    # fixed, the same VM boots
    assert pych.put("vm.delete")[0] == 204
    assert pych.put("vm.create", vm_config(files, disks=[{"path": files["disks"][0]}],
                                           net=[{"tap": ""}]))[0] == 204
    assert pych.put("vm.boot")[0] == 204
    assert "vmtap0" in links(pych.netns)


def test_add_net_with_a_tap_that_cannot_be_made_is_a_400_and_leaves_nothing(pych, files):
    assert pych.put("vm.create", vm_config(files))[0] == 204
    assert pych.put("vm.boot")[0] == 204
    before = pych.leaks()
    for tap, why in ((TOO_LONG, f"tap name '{TOO_LONG}' is longer than 15 bytes"),
                     (NOT_A_TAP, f"cannot open or create tap '{NOT_A_TAP}': an interface of "
                                 "that name exists and is not a tap")):
        assert pych.put("vm.add-net", {"tap": tap}) == (
            400, ["Error from API", "Error adding device to the VM", why])
        assert pych.leaks() == before
    # no id, no slot consumed: the first net that works is _net0 at the first free slot
    # (the rng holds 00:01.0)
    assert pych.put("vm.add-net", {"tap": "pychtap0"}) == (
        200, {"id": "_net0", "bdf": "0000:00:02.0"})
    assert "pychtap0" in links(pych.netns)
    info = json.loads(pych.client.get("vm.info")[1])
    assert [(n["id"], n["tap"]) for n in info["config"]["net"]] == [("_net0", "pychtap0")]


def test_hot_plug_pci_device_id_over_the_api(pych, files):
    assert pych.put("vm.create", vm_config(files))[0] == 204
    assert pych.put("vm.boot")[0] == 204
    disk = files["disks"][0]
    assert pych.put("vm.add-disk", {"path": disk, "pci_device_id": 32}) == (400, [
        "Error from API", "Given PCI device ID (32) is out of the supported range of 0..32"])
    assert pych.put("vm.add-disk", {"path": disk, "pci_device_id": 0}) == (400, [
        "Error from API", "Given PCI device ID (0) is reserved"])
    assert pych.put("vm.add-disk", {"path": disk, "pci_device_id": 1}) == (500, [
        "Error from API", "Error adding device to the VM",
        "Valid PCI device identifier but already used: 1"])
    assert pych.put("vm.add-disk", {"path": disk, "pci_device_id": 0x1e}) == (
        200, {"id": "_disk0", "bdf": "0000:00:1e.0"})
    tree = json.loads(pych.client.get("vm.info")[1])["device_tree"]
    assert tree["_virtio-pci-_disk0"]["pci_bdf"] == "0000:00:1e.0"
