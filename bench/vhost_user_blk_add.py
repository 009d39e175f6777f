"""``vm.add-disk`` of a vhost-user-blk disk, VMM side: how long pych's device manager takes
to hot plug it (connect to the back-end, SET_OWNER, feature and protocol-feature
negotiation, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, GET_CONFIG, the virtio-pci transport with
its MSI-X vectors and BARs, the slot's PCIU bit, the GED notification) against Debian's
qemu-storage-daemon, without a guest and without HTTP (goal < 50 ms). Also the same for a
qcow2 image, where pych starts the daemon itself first.

The device manager runs on fake KVM objects (tests/support/machines.py), so the KVM ioctls
(irqfd and ioeventfd registration: tens of microseconds each) are not in the figure.

    .venv/bin/python bench/vhost_user_blk_add.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pych.config import DiskConfig  # noqa: E402
from pych.config.kinds import BY_NAME  # noqa: E402
from pych.devices.storage_daemon import QEMU_STORAGE_DAEMON  # noqa: E402
from tests.support.machines import DeviceManagerMachine, vm_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pych-bench-vublk-"))
    image, sock = work / "disk.raw", work / "qsd.sock"
    image.write_bytes(bytes(16 << 20))
    qsd = subprocess.Popen(
        [QEMU_STORAGE_DAEMON, "--blockdev", f"driver=file,node-name=f,filename={image}",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                     "writable=on"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    qcow2 = work / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "16M"], check=True)
    try:
        while not sock.exists():
            time.sleep(0.01)
        machine = DeviceManagerMachine(vm_config())
        results = {}
        for label, config in (
                ("vhost-user-blk (user's qemu-storage-daemon)",
                 DiskConfig(vhost_user=True, vhost_socket=str(sock))),
                ("qcow2 (pych starts qemu-storage-daemon)", DiskConfig(path=str(qcow2)))):
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                added = machine.dm.hotplug(BY_NAME["disk"], config)
                times.append((time.perf_counter() - start) * 1e3)
                # take it away again, as the guest's eject would
                machine.dm.remove_device(added.id)
                machine.eject(machine.dm.pci.slot_of(machine.dm.devices[added.id]))
                time.sleep(0.05)        # the daemon tears the connection down asynchronously
            results[label] = times
        machine.close()
    finally:
        qsd.terminate()
        qsd.wait()
    print(f"{'vm.add-disk, VMM side':48} {'median ms':>10} {'min':>8} {'max':>8}")
    for label, times in results.items():
        print(f"{label:48} {statistics.median(times):10.1f} {min(times):8.1f} "
              f"{max(times):8.1f}")


if __name__ == "__main__":
    main()
