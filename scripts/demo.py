"""`make demo`: boot the test guest under pych and show it working.

On a terminal, pych runs in the foreground with the serial console on your terminal: you
watch the boot and get the guest's root shell (`poweroff -f` ends it). Without a terminal
(or with --scripted) a short scripted session runs instead: boot with visible progress,
a few commands in the guest, then CPU, memory and PCI disk hot plug through the API,
as Cloud Hypervisor's hot plug guide (``../shared/spec/hotplug.md``, beside the repository)
does them with curl: a disk is added, read in the guest and removed again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

# Run as `python scripts/<name>.py`: the repository root goes on sys.path for the test
# harness (tests.support), which is not part of the installed pych package.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pych.api.client import ApiClient  # noqa: E402

from tests.support.guest import PychGuest, guest_artifacts, guest_cmdline  # noqa: E402

CPUS = "boot=1,max=2"   # small, so the emulated guest kernel onlines it quickly on 2 host cores
MEMORY = "size=256M,hotplug_size=1G"


def interactive() -> int:
    art = guest_artifacts()
    args = [str(REPO / ".venv" / "bin" / "pych"), "--kernel", str(art["vmlinux"]),
            "--initramfs", str(art["initramfs.cpio"]), "--cmdline", guest_cmdline(),
            "--cpus", CPUS, "--memory", MEMORY, "--serial", "tty", "--console", "off",
            "--api-socket", "/tmp/pych-demo.sock"]
    print("Booting the test guest under pych (about a minute under nested KVM).")
    print("API socket: /tmp/pych-demo.sock   e.g. in another terminal:")
    print("  .venv/bin/pych-remote --api-socket /tmp/pych-demo.sock resize --cpus 2")
    print("  .venv/bin/pych-remote --api-socket /tmp/pych-demo.sock add-disk path=/path/to/disk.img")
    print("Leave with `poweroff -f` in the guest.\n", flush=True)
    os.execv(args[0], args)


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def show(guest: PychGuest, cmd: str) -> None:
    rc, out = guest.run(cmd, timeout=300)
    print(f"guest# {cmd}\n{out}" + ("" if rc == 0 else f"\n(exit {rc})"), flush=True)


def api(guest: PychGuest, path: str, body: dict) -> None:
    status, reply = ApiClient(guest.api_path).put(path, body)
    print(f"PUT /api/v1/{path} {json.dumps(body)} -> {status} {reply.decode()}", flush=True)


def wait_in_guest(guest: PychGuest, condition: str, what: str, limit: int = 300) -> None:
    """Poll ``condition`` in the guest (one shell loop of builtins) and say how long it took."""
    t0 = time.monotonic()
    rc, _ = guest.run(f"i=0; until {condition}; do [ $i -ge {2 * limit} ] && break; "
                      f"sleep 0.5; i=$((i+1)); done; {condition}", timeout=limit + 60)
    took = time.monotonic() - t0
    print(f"  ... {what} after {took:.0f} s" if rc == 0 else f"  ... {what}: not after {limit} s",
          flush=True)


def pci_disk(guest: PychGuest, work: Path) -> None:
    """PCI hot plug: add a disk, read it in the guest, remove it."""
    disk = work / "hello.img"
    disk.write_bytes(b"Hello from a disk hot-plugged by pych!\n".ljust(1 << 20, b"\0"))
    step("PCI hot plug: add a disk (vm.add-disk), then read it in the guest")
    api(guest, "vm.add-disk", {"path": str(disk), "id": "hello"})
    wait_in_guest(guest, "[ -e /sys/block/vda ]", "the guest sees /dev/vda")
    show(guest, "lspci -k; head -1 /dev/vda")
    step("PCI hot unplug: remove the disk (vm.remove-device); the guest ejects it")
    api(guest, "vm.remove-device", {"id": "hello"})
    wait_in_guest(guest, "[ ! -e /sys/block/vda ]", "/dev/vda is gone")
    show(guest, "lspci -k")


def scripted() -> int:
    work = Path(tempfile.mkdtemp(prefix="pych-demo-"))
    guest = PychGuest(work, cpus=CPUS, memory=MEMORY)
    step(f"booting: pych --cpus {CPUS} --memory {MEMORY} (console log: {work / 'console.log'})")
    stop = threading.Event()

    def progress():
        t0 = time.monotonic()
        while not stop.wait(5):
            print(f"  ... {time.monotonic() - t0:.0f} s", flush=True)

    threading.Thread(target=progress, daemon=True).start()
    guest.start()
    try:
        took = guest.wait_ready(600)
        stop.set()
        print(f"GUEST-READY after {took:.1f} s", flush=True)
        step("the guest")
        show(guest, "uname -a; nproc; grep MemTotal /proc/meminfo")
        show(guest, "lscpu | grep -E '^CPU\\(s\\)|list'")
        step("CPU hot plug: resize to 2 vCPUs, then online the new one in the guest")
        api(guest, "vm.resize", {"desired_vcpus": 2})
        time.sleep(5)
        show(guest, "lscpu | grep -E 'list'")
        show(guest, "echo 1 | tee /sys/devices/system/cpu/cpu[1]/online >/dev/null; sleep 2; nproc")
        step("CPU hot unplug: resize to 1 (the guest offlines it itself)")
        api(guest, "vm.resize", {"desired_vcpus": 1})
        time.sleep(10)
        show(guest, "cat /sys/devices/system/cpu/online")
        step("memory hot plug: 256 MiB -> 512 MiB")
        show(guest, "echo online > /sys/devices/system/memory/auto_online_blocks; free -m")
        api(guest, "vm.resize", {"desired_ram": 512 << 20})
        time.sleep(15)
        show(guest, "free -m")
        pci_disk(guest, work)
        step("power off")
        guest.console.send("poweroff -f\n")
        print(f"pych exited with {guest.wait_exit(120)}")
        return 0
    finally:
        stop.set()
        guest.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description="boot the pych test guest")
    ap.add_argument("--scripted", action="store_true", help="run the scripted session")
    args = ap.parse_args()
    if sys.stdin.isatty() and sys.stdout.isatty() and not args.scripted:
        return interactive()
    return scripted()


if __name__ == "__main__":
    sys.exit(main())
