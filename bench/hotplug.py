"""Memory hot plug: pych vs QEMU (q35) on the same guest, same kernel, initramfs and cmdline.

For each VMM and method the test guest boots with 256 MiB (hot plugged memory onlined by
``memhp_default_state=online``) and gets SIZE (default 1 GiB) more:

* pych, ACPI DIMM: ``PUT vm.resize`` (``--memory size=256M,hotplug_size=2G``);
* pych, virtio-mem: ``PUT vm.resize`` (``hotplug_method=virtio-mem,hotplug_size=SIZE``);
* QEMU, pc-dimm: QMP ``object-add memory-backend-ram`` + ``device_add pc-dimm``;
* QEMU, virtio-mem-pci: QMP ``qom-set requested-size`` (device created at start with 0).

Measured: the VMM-side time (the control request's round trip: API socket or QMP) and the
guest-visible time (from sending the request until MemTotal has grown by SIZE, seen by a
shell loop of builtins already spinning in the guest). Also, without a guest, pych's memory
manager alone on a real KVM VM: the ACPI add's VMM-side cost without HTTP (goal < 5 ms).
Prints a table and saves a plot to docs/bench-hotplug.png.

    .venv/bin/python bench/hotplug.py [--size 1G] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pych.api.client import ApiClient
from pych.config import VmConfig
from pych.devices.bus import Bus
from pych.devices.virtio.mem import VirtioMem
from pych.hypervisor.kvm import Kvm
from pych.memory_manager import MemoryManager
from pych.testing.guest import (READY, REPO, Console, PychGuest, Shell, guest_artifacts,
                                guest_cmdline, qemu_command)

MiB = 1 << 20
BOOT = 256 * MiB
ONLINE = "memhp_default_state=online"
TIMEOUT = 900


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


# --- the guest side -------------------------------------------------------------------------
def mem_total_kib(shell: Shell) -> int:
    rc, out = shell.run("grep MemTotal /proc/meminfo")
    if rc:
        raise RuntimeError(f"guest: {out}")
    return int(re.search(r"MemTotal:\s+(\d+) kB", out).group(1))


def timed_plug(shell: Shell, size: int, request) -> tuple[float, float]:
    """Start a guest loop waiting for MemTotal to grow by ``size``, then time ``request()``
    (the VMM-side time) and the wait for the loop's end (the guest-visible time)."""
    target = mem_total_kib(shell) + size // 1024
    tag = uuid.uuid4().hex[:12]
    console = shell.console
    start = len(console.buf)
    console.send(f"while read -r k v u < /proc/meminfo; [ $v -lt {target} ]; do :; done; "
                 f"printf '%s-%s\\n' {tag} grown\n")
    t0 = time.perf_counter()
    request()
    vmm_side = time.perf_counter() - t0
    console.expect(f"{tag}-grown".encode(), TIMEOUT, start)
    return vmm_side, time.perf_counter() - t0


# --- pych -----------------------------------------------------------------------------------
def bench_pych(memory: str, size: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        g = PychGuest(Path(d), memory=memory, cmdline_extra=ONLINE)
        try:
            g.start()
            g.wait_ready(TIMEOUT)
            client = ApiClient(g.api_path)

            def resize():
                status, body = client.put("vm.resize", {"desired_ram": BOOT + size})
                if status != 204:
                    raise RuntimeError(f"vm.resize: {status} {body!r}")

            return timed_plug(g.shell, size, resize)
        finally:
            g.stop()


def pych_manager_resize(size: int, method: str, runs: int) -> list[float]:
    """The memory manager's resize alone, on a real KVM VM without a guest (seconds)."""
    kvm = Kvm()
    times = []
    try:
        for _ in range(runs):
            memory = {"size": BOOT, "hotplug_size": size if method == "VirtioMem" else 2 * size,
                      "hotplug_method": method}
            config = VmConfig.model_validate({"payload": {"kernel": "/k"}, "memory": memory})
            vm = kvm.create_vm()
            manager = MemoryManager(config.memory, vm, Bus("mmio"), notify=lambda event: None)
            try:
                manager.create_boot_memory()
                if manager.virtio_mem is not None:
                    zone = manager.virtio_mem
                    zone.device = VirtioMem(zone.region, name=zone.id)
                t0 = time.perf_counter()
                manager.resize(BOOT + size)
                times.append(time.perf_counter() - t0)
            finally:
                vm.close()
                manager.close()
    finally:
        kvm.close()
    return times


# --- QEMU -----------------------------------------------------------------------------------
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


def bench_qemu(size: int) -> dict[str, tuple[float, float]]:
    """One q35 boot: a pc-dimm add, then a virtio-mem-pci grow, both of ``size``."""
    with tempfile.TemporaryDirectory() as d:
        qmp_path = str(Path(d) / "qmp.sock")
        maxmem = (BOOT + 2 * size) // MiB + 1024        # the pc-dimm and virtio-mem's region
        cmd = qemu_command(guest_artifacts(), machine="q35",
                           memory=f"{BOOT // MiB}M,slots=4,maxmem={maxmem}M",
                           cmdline=guest_cmdline(ONLINE))
        cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off",
                "-object", f"memory-backend-ram,id=vmem0,size={size}",
                "-device", "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0"]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        try:
            console = Console(p.stdout.fileno(), p.stdin.fileno())
            console.expect(READY, TIMEOUT)
            shell = Shell(console)
            shell.prepare()
            qmp = Qmp(qmp_path)
            try:
                def pc_dimm():
                    qmp.execute("object-add", **{"qom-type": "memory-backend-ram",
                                                 "id": "mem1", "size": size})
                    qmp.execute("device_add", driver="pc-dimm", id="dimm1", memdev="mem1")

                def virtio_mem():
                    qmp.execute("qom-set", path="/machine/peripheral/vm0",
                                property="requested-size", value=size)

                return {"pc-dimm": timed_plug(shell, size, pc_dimm),
                        "virtio-mem-pci": timed_plug(shell, size, virtio_mem)}
            finally:
                qmp.close()
        finally:
            p.kill()
            p.wait()


# --- report ---------------------------------------------------------------------------------
def plot(rows: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r[0] for r in rows]
    fig, (vmm_ax, guest_ax) = plt.subplots(1, 2, figsize=(10, 4))
    vmm_ax.barh(names, [r[1] * 1000 for r in rows])
    vmm_ax.set_xlabel("VMM-side time (ms)")
    guest_ax.barh(names, [r[2] for r in rows])
    guest_ax.set_xlabel("until the guest's MemTotal shows it (s)")
    guest_ax.set_yticks([])
    fig.suptitle("Memory hot plug, same guest (this host's nested KVM)")
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="memory to add (K/M/G)")
    ap.add_argument("--runs", type=int, default=5, help="runs of the guest-less measurement")
    args = ap.parse_args()
    size = args.size
    if size % (128 * MiB):
        ap.error("--size must be a multiple of 128M")

    manager = {method: pych_manager_resize(size, method, args.runs)
               for method in ("Acpi", "VirtioMem")}
    rows = [
        ("pych ACPI DIMM", *bench_pych(f"size={BOOT // MiB}M,hotplug_size={2 * size}", size)),
        ("pych virtio-mem", *bench_pych(f"size={BOOT // MiB}M,hotplug_method=virtio-mem,"
                                        f"hotplug_size={size}", size)),
    ]
    rows += [(f"QEMU q35 {name}", *times) for name, times in bench_qemu(size).items()]

    print(f"\nAdding {size // MiB} MiB to a {BOOT // MiB} MiB guest\n")
    print("| VMM, method | VMM-side (ms) | guest-visible (s) |\n|---|---|---|")
    for name, vmm_side, guest in rows:
        print(f"| {name} | {vmm_side * 1000:.2f} | {guest:.1f} |")
    print(f"\npych memory manager alone, real KVM VM, no guest ({args.runs} runs):\n")
    print("| method | median (ms) | min (ms) | max (ms) |\n|---|---|---|---|")
    for method, times in manager.items():
        print(f"| {method} | {statistics.median(times) * 1000:.3f} | {min(times) * 1000:.3f} | "
              f"{max(times) * 1000:.3f} |")
    print(f"\nACPI add, VMM side (manager, median): "
          f"{statistics.median(manager['Acpi']) * 1000:.2f} ms (goal < 5 ms)")
    out = REPO / "docs" / "bench-hotplug.png"
    try:
        plot(rows, out)
        print(f"plot: {out}")
    except ImportError:
        print("matplotlib missing: no plot (make bench installs it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
