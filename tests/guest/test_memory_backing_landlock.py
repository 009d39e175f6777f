"""Huge pages, KSM and Landlock, honoured, on one booted guest (issue 13, item 1).

One pych runs the test guest under ``--landlock`` (one ``--landlock-rules`` directory) with
its RAM in two zones: ``huge`` (``hugepages=on,hugepage_size=2M``) and ``ksm``
(``mergeable=on``).  The module reserves the huge pages it needs on the host
(``/proc/sys/vm/nr_hugepages``) and gives the previous value back at the end.  Each test reads
the effect where it shows: ``/proc/meminfo``'s HugePages counters and pych's ``smaps``
(hugetlbfs pages, ``mg`` for KSM), the answers of ``vm.add-disk`` inside and outside the
sandbox, and a snapshot written inside it (then restored, sandboxed again, by a second pych)
and one refused by the kernel outside it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from pych.api.client import ApiClient

from tests.support.guest import REPO, PychGuest, guest_artifacts

MiB = 1 << 20
HUGE_ZONE = 128 * MiB
PAGES = HUGE_ZONE // (2 * MiB)              # 2 MiB pages the huge zone takes from the pool
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
GUEST_WAIT = 300


def meminfo() -> dict[str, int]:
    return {key: int(value.split()[0]) for key, value in
            (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            if key.startswith("HugePages_")}


def held(counters: dict[str, int]) -> int:
    """Huge pages in use or promised: faulted in (Total - Free) plus reserved (Rsvd)."""
    return counters["HugePages_Total"] - counters["HugePages_Free"] + counters["HugePages_Rsvd"]


def smaps(pid: int) -> list[dict]:
    """pych's mappings: name, size (kB), KernelPageSize (kB), VmFlags."""
    maps = []
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )",
                          Path(f"/proc/{pid}/smaps").read_text()):
        head = block.split("\n", 1)[0].split()
        fields = dict(re.findall(r"^(\w+):\s*(.*?)(?: kB)?$", block, re.M))
        maps.append({"name": " ".join(head[5:]), "size": int(fields["Size"]),
                     "page": int(fields["KernelPageSize"]), "flags": fields["VmFlags"].split()})
    return maps


def api(path: str, method: str, endpoint: str, body=None) -> tuple[int, str]:
    with ApiClient(path) as client:
        status, text = client.put(endpoint, body) if method == "PUT" else client.get(endpoint)
    return status, text.decode() if isinstance(text, bytes) else text


@pytest.fixture(scope="module")
def hugepages():
    """``PAGES`` more 2 MiB pages in the host's pool for the module; the previous size
    back afterwards."""
    previous = int(NR_HUGEPAGES.read_text())
    before = meminfo()
    NR_HUGEPAGES.write_text(f"{previous + PAGES + 8}\n")
    try:
        now = meminfo()
        assert now["HugePages_Free"] - now["HugePages_Rsvd"] >= PAGES, (
            f"the host could not reserve {PAGES} huge pages: {now}")
        yield before
    finally:
        NR_HUGEPAGES.write_text(f"{previous}\n")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("backing")
    allowed, outside = d / "allowed", d / "outside"
    allowed.mkdir()
    outside.mkdir()
    for path in (allowed / "boot.img", allowed / "in.img", outside / "out.img"):
        path.write_bytes(os.urandom(MiB) + bytes(7 * MiB))
    return d


@pytest.fixture(scope="module")
def guest(hugepages, dirs):
    g = PychGuest(dirs / "vm", memory="size=0", extra_args=[
        "--memory-zone", f"id=huge,size={HUGE_ZONE >> 20}M,hugepages=on,hugepage_size=2M",
        "id=ksm,size=128M,mergeable=on",
        "--disk", f"path={dirs / 'allowed' / 'boot.img'}",
        "--landlock", "--landlock-rules", f"path={dirs / 'allowed'},access=rw"])
    g.restored = None
    try:
        g.start()
        g.wait_ready()
        yield g
    finally:
        if g.restored is not None:
            g.restored.stop()
        g.stop()


# --- huge pages -------------------------------------------------------------------------------
def test_the_huge_zone_takes_its_pages_from_the_hosts_pool(guest, hugepages):
    counters = meminfo()
    print(f"HugePages before pych: {hugepages}, with the guest booted: {counters}")
    # the zone's 64 pages are pych's (faulted in or reserved), and the guest's boot has
    # faulted some in: fewer are free than before it ran
    assert held(counters) - held(hugepages) == PAGES, (hugepages, counters)
    assert counters["HugePages_Free"] < hugepages["HugePages_Free"] + PAGES + 8, counters
    huge = [m for m in smaps(guest.proc.pid) if "pych-huge" in m["name"]]
    assert huge and all(m["page"] == 2048 for m in huge), huge
    assert sum(m["size"] for m in huge) == HUGE_ZONE // 1024, huge
    # the guest runs and uses its RAM: a file in its tmpfs (kept for the restore's check)
    rc, out = guest.run("mkdir -p /mnt/t && mount -t tmpfs tmpfs /mnt/t && "
                        "head -c 1048576 /dev/urandom > /mnt/t/seed && "
                        "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do "
                        "cat /mnt/t/seed; done > /mnt/t/f && "
                        "md5sum /mnt/t/f | cut -c1-32 && awk '/MemTotal/ {print $2}' /proc/meminfo",
                        timeout=GUEST_WAIT)
    assert rc == 0, out
    guest.md5 = out.splitlines()[-2]
    assert re.fullmatch(r"[0-9a-f]{32}", guest.md5), out
    assert int(out.splitlines()[-1]) > 200 * 1024, out          # both zones' RAM


def test_too_few_free_huge_pages_are_refused_at_create_naming_the_option(guest, dirs):
    """With the module's pages taken, a VM asking for 1 GiB of them is refused at once (exit
    2, one line naming the option), before anything is built."""
    art = guest_artifacts()
    before = meminfo()
    started = time.monotonic()
    r = subprocess.run([str(REPO / ".venv" / "bin" / "pych"), "--kernel", str(art["vmlinux"]),
                        "--memory", "size=0", "--memory-zone",
                        "id=big,size=1G,hugepages=on,hugepage_size=2M", "--serial", "off",
                        "--console", "off"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.startswith("pych: error: --memory-zone big hugepages=on: the guest RAM "
                               "needs 512 huge pages of 2 MiB, the host has "), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert time.monotonic() - started < 30
    assert held(meminfo()) == held(before)


# --- KSM ------------------------------------------------------------------------------------------
def test_the_mergeable_zone_is_advised_for_ksm(guest):
    maps = smaps(guest.proc.pid)
    merged = [m for m in maps if "mg" in m["flags"]]
    # the ksm zone: 128 MiB of private anonymous memory (no name), advised MADV_MERGEABLE
    assert [(m["name"], m["size"]) for m in merged] == [("", 128 * 1024)], merged
    assert not [m for m in maps if "pych-huge" in m["name"] and "mg" in m["flags"]]


# --- Landlock -------------------------------------------------------------------------------------
def test_a_disk_outside_the_sandbox_is_refused_and_one_inside_works(guest, dirs):
    outside = dirs / "outside" / "out.img"
    status, body = api(guest.api_path, "PUT", "vm.add-disk", {"path": str(outside)})
    assert status == 400, (status, body)
    assert f"{outside} is outside pych's Landlock sandbox" in body, body
    status, body = api(guest.api_path, "PUT", "vm.add-disk",
                       {"path": str(dirs / "allowed" / "in.img")})
    assert status == 200, body
    rc, out = guest.run("for i in $(seq 100); do [ -e /sys/block/vdb ] && break; sleep 1; done;"
                        " cat /sys/block/vdb/size", timeout=GUEST_WAIT)
    assert rc == 0 and out.splitlines()[-1] == str(8 * MiB // 512), out
    config = json.loads(api(guest.api_path, "GET", "vm.info")[1])["config"]
    assert [d["path"] for d in config["disks"]] == [str(dirs / "allowed" / "boot.img"),
                                                   str(dirs / "allowed" / "in.img")]


def test_the_kernel_denies_pych_a_snapshot_outside_and_allows_one_inside(guest, dirs):
    """Not pych's own check: the snapshot's directory is refused by the kernel (EACCES from
    Landlock; pych runs as root), inside the rules it is written."""
    assert api(guest.api_path, "PUT", "vm.pause")[0] == 204
    try:
        status, body = api(guest.api_path, "PUT", "vm.snapshot",
                           {"destination_url": f"file://{dirs / 'outside' / 'snap'}"})
        assert status >= 400 and "Permission denied" in body, (status, body)
        assert not (dirs / "outside" / "snap").exists()
        status, body = api(guest.api_path, "PUT", "vm.snapshot",
                           {"destination_url": f"file://{dirs / 'allowed' / 'snap'}"})
        assert status == 204, body
    finally:
        assert api(guest.api_path, "PUT", "vm.resume")[0] == 204
    manifest = json.loads((dirs / "allowed" / "snap" / "manifest.json").read_text())
    assert manifest["config"]["landlock_enable"] is True
    assert [z["hugepages"] for z in manifest["config"]["memory"]["zones"]] == [True, False]


class Restored(PychGuest):
    """``pych --restore`` of the snapshot: the guest's serial socket is the first pych's."""

    def __init__(self, workdir: Path, snapshot: Path, serial_path: str):
        super().__init__(workdir)
        self.serial_path = serial_path
        self.args = [str(REPO / ".venv" / "bin" / "pych"), "--api-socket", self.api_path,
                     "--restore", f"source_url=file://{snapshot}"]


def test_the_snapshot_restores_sandboxed_with_its_huge_pages(guest, dirs, hugepages):
    assert (dirs / "allowed" / "snap").exists(), "the snapshot test did not run"
    guest.stop()
    deadline = time.monotonic() + 30
    while held(meminfo()) != held(hugepages) and time.monotonic() < deadline:
        time.sleep(0.5)                              # the first pych's pages back in the pool
    restored = guest.restored = Restored(dirs / "restored", dirs / "allowed" / "snap",
                                         guest.serial_path)
    restored.start()
    deadline = time.monotonic() + GUEST_WAIT
    while True:
        try:
            status, body = api(restored.api_path, "GET", "vm.info")
            if status == 200:
                break
        except OSError:
            pass
        assert restored.proc.poll() is None, restored.pych_log()
        assert time.monotonic() < deadline, restored.pych_log()
        time.sleep(0.5)
    assert json.loads(body)["state"] == "Paused"
    assert held(meminfo()) - held(hugepages) == PAGES
    maps = smaps(restored.proc.pid)
    assert [m["size"] for m in maps if "mg" in m["flags"]] == [128 * 1024]
    assert api(restored.api_path, "PUT", "vm.resume")[0] == 204
    rc, out = restored.run("md5sum /mnt/t/f | cut -c1-32; cat /sys/block/vdb/size",
                           timeout=GUEST_WAIT)
    assert rc == 0 and out.splitlines()[-2:] == [guest.md5, str(8 * MiB // 512)], out
    # the restored pych is sandboxed as the first was
    status, body = api(restored.api_path, "PUT", "vm.add-disk",
                       {"path": str(dirs / "outside" / "out.img")})
    assert status == 400 and "outside pych's Landlock sandbox" in body, body
