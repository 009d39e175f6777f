"""Durability (issue: reliability): what the guest wrote to a disk and synced is in the host
file afterwards, whichever way the disk or the VM goes away.

Two pych processes, three guest boots, in order (each test leaves the state the next needs):

* pych 1, boot 1: a hot-added disk is written and synced, then ``vm.remove-device``d; once
  the guest has ejected it the file holds the data and pych no longer holds the image. The
  boot disk is written and synced, then ``vm.shutdown``: the file holds it.
* pych 1, boot 2 (``vm.boot`` after ``vm.shutdown``, as the reference allows): the new boot
  reads back what the last one wrote; the guest writes (synced, and not synced: busybox's
  ``poweroff`` syncs first) and powers off; pych exits 0 and the file holds both.
* pych 2: the guest writes and syncs, pych gets SIGTERM, shuts the VM down and exits 0; the
  file holds the data.
* pych 3 (each kill ends a process, so SIGKILL needs its own): the guest writes a raw disk
  (``conv=fsync``, and ``oflag=direct`` with no fsync at all) and a file on an ext4 filesystem
  (made on the host by ``mkfs.ext4``), runs ``sync``, and pych gets SIGKILL: no shutdown, no
  close, no flush of its own. The raw image holds both writes; ``e2fsck -fn`` finds the ext4
  image consistent as it is, and again once its journal is replayed (as the next mount
  would), when it holds the file.

Each write is a distinct text pattern at its own offset of a zeroed image, so stale data
cannot pass for new. 64 KiB per write: data through this host's guest kernel is slow.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pych.api.client import ApiClient

from tests.support.host import lock_is_free

IMAGE_SIZE = 1 << 20
BLOCK = 4096
SIZE = 64 << 10                       # bytes per write


def pattern(tag: str) -> bytes:
    """What ``yes TAG | head -c SIZE`` writes."""
    line = f"{tag}\n".encode()
    return (line * (SIZE // len(line) + 1))[:SIZE]


def guest_write(device: str, tag: str, block: int, sync: bool = True) -> str:
    """The shell command that writes ``pattern(tag)`` at 4 KiB block ``block`` of ``device``
    (conv=fsync: the data reaches the disk, with a flush, before dd exits)."""
    return (f"yes {tag} | head -c {SIZE} | dd of={device} bs={BLOCK} seek={block} "
            f"conv=notrunc{',fsync' if sync else ''} 2>/dev/null")


def run_ok(guest, cmd: str, timeout: float = 300) -> str:
    rc, out = guest.run(cmd, timeout=timeout)
    assert rc == 0, f"{cmd!r} failed ({rc}): {out}"
    return out


def holds(image: Path, tag: str, block: int) -> bool:
    with open(image, "rb") as f:
        f.seek(block * BLOCK)
        return f.read(SIZE) == pattern(tag)


def put(guest, endpoint: str, body=None) -> tuple[int, bytes]:
    return ApiClient(guest.api_path, timeout=120).put(endpoint, body)


def state(guest) -> str:
    return json.loads(ApiClient(guest.api_path).get("vm.info")[1])["state"]


def wait_for_event(events: Path, name: str, limit: float = 300) -> dict | None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if events.exists():
            for line in events.read_text().splitlines():
                if line.strip() and json.loads(line)["event"] == name:
                    return json.loads(line)
        time.sleep(0.5)
    return None


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("durability")
    paths = {name: d / f"{name}.raw" for name in ("boot", "hot", "term", "kill", "ext4")}
    for path in paths.values():
        path.write_bytes(bytes(IMAGE_SIZE))
    paths["events"] = d / "events.json"
    return paths


@pytest.fixture(scope="module")
def guest(guest_factory, images):
    return guest_factory("durable", memory="size=128M",
                         extra_args=["--disk", f"path={images['boot']}",
                                     "--event-monitor", f"path={images['events']}"])


def test_synced_writes_to_a_hot_removed_disk_are_in_its_file(guest, images):
    status, body = put(guest, "vm.add-disk", {"path": str(images["hot"]), "id": "hot"})
    assert status == 200, body
    run_ok(guest, "i=0; until [ -e /sys/block/vdb ]; do [ $i -ge 300 ] && break; sleep 1; "
                  "i=$((i+1)); done; [ -e /sys/block/vdb ]", timeout=420)
    run_ok(guest, guest_write("/dev/vdb", "written-before-remove-device", 16))

    assert put(guest, "vm.remove-device", {"id": "hot"}) == (204, b"")
    removed = wait_for_event(images["events"], "device-removed")
    assert removed is not None and removed["properties"]["id"] == "hot", \
        "the guest never ejected the disk"
    assert lock_is_free(images["hot"]), "pych still holds the removed disk's image"
    assert holds(images["hot"], "written-before-remove-device", 16)


def test_synced_writes_survive_vm_shutdown(guest, images):
    run_ok(guest, guest_write("/dev/vda", "written-before-vm-shutdown", 32))
    assert put(guest, "vm.shutdown") == (204, b"")
    assert state(guest) == "Shutdown"
    assert lock_is_free(images["boot"]), "pych still holds the boot disk of a shut-down VM"
    assert holds(images["boot"], "written-before-vm-shutdown", 32)


def test_a_new_boot_reads_it_back_and_a_guest_poweroff_keeps_what_it_wrote(guest, images):
    mark = len(guest.console.buf)
    assert put(guest, "vm.boot") == (204, b"")
    guest.wait_ready(start=mark)
    out = run_ok(guest, f"dd if=/dev/vda bs={BLOCK} skip=32 count={SIZE // BLOCK} 2>/dev/null "
                        "| head -c 40")
    assert out.startswith("written-before-vm-shutdown\n"), out
    run_ok(guest, guest_write("/dev/vda", "written-before-poweroff", 48) + "; "
           + guest_write("/dev/vda", "written-unsynced-before-poweroff", 64, sync=False))
    guest.console.send("poweroff -f\n")           # busybox: sync(), then power off
    assert guest.wait_exit(180) == 0
    assert holds(images["boot"], "written-before-vm-shutdown", 32)
    assert holds(images["boot"], "written-before-poweroff", 48)
    assert holds(images["boot"], "written-unsynced-before-poweroff", 64)


def test_synced_writes_survive_sigterm_and_pych_exits_zero(guest_factory, images):
    g = guest_factory("sigterm", memory="size=128M",
                      extra_args=["--disk", f"path={images['term']}"])
    run_ok(g, guest_write("/dev/vda", "written-before-sigterm", 16))
    g.proc.send_signal(signal.SIGTERM)
    assert g.wait_exit(60) == 0, g.pych_log()
    assert "signal 15" in g.pych_log()
    assert holds(images["term"], "written-before-sigterm", 16)
    assert lock_is_free(images["term"])


def ext4_file(image: Path, name: str) -> bytes:
    """``name`` in the root of the ext4 filesystem on ``image``, read on the host (debugfs)."""
    out = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_flushed_writes_survive_sigkill_and_the_filesystem_is_consistent(guest_factory, images):
    ext4 = images["ext4"]
    ext4.write_bytes(bytes(16 << 20))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "durable", str(ext4)], check=True,
                   timeout=60)
    g = guest_factory("sigkill", memory="size=128M",
                      extra_args=["--disk", f"path={images['kill']}", f"path={ext4}"])
    run_ok(g, guest_write("/dev/vda", "written-fsync-before-sigkill", 16))
    run_ok(g, f"yes written-direct-before-sigkill | head -c {SIZE} | dd of=/dev/vda bs={SIZE} "
              f"seek={48 * BLOCK // SIZE} iflag=fullblock oflag=direct conv=notrunc 2>/dev/null")
    run_ok(g, "mkdir -p /mnt/d && mount -t ext4 /dev/vdb /mnt/d")
    run_ok(g, f"yes written-to-ext4-before-sigkill | head -c {SIZE} > /mnt/d/data && "
              "mkdir /mnt/d/dir && echo small > /mnt/d/dir/small")
    run_ok(g, "sync")
    g.proc.send_signal(signal.SIGKILL)
    assert g.wait_exit(60) == -signal.SIGKILL
    assert holds(images["kill"], "written-fsync-before-sigkill", 16)
    assert holds(images["kill"], "written-direct-before-sigkill", 48)
    # The image as SIGKILL left it (its journal not replayed) is consistent ...
    fsck = subprocess.run(["e2fsck", "-fn", str(ext4)], capture_output=True, text=True,
                          timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # ... and once its journal is replayed, as the next mount would, it still is and it
    # holds what the guest wrote and synced (on a copy: the image is evidence)
    replayed = ext4.with_name("ext4-replayed.raw")
    shutil.copyfile(ext4, replayed)
    replay = subprocess.run(["e2fsck", "-fy", "-E", "journal_only", str(replayed)],
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode in (0, 1), replay.stdout + replay.stderr
    fsck = subprocess.run(["e2fsck", "-fn", str(replayed)], capture_output=True, text=True,
                          timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert ext4_file(replayed, "data") == pattern("written-to-ext4-before-sigkill")
    assert ext4_file(replayed, "dir/small") == b"small\n"
    assert lock_is_free(images["kill"]) and lock_is_free(ext4)
