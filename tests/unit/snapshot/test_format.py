"""pych's snapshot format: sparse memory files, checksums, versions, nothing half-written."""

from __future__ import annotations

import json
import os

import pytest

from pych.memory.guest_memory import GuestMemory
from pych.snapshot import format as fmt

MiB = 1 << 20


@pytest.fixture
def memory():
    mem = GuestMemory()
    mem.add_region(0, 8 * MiB, name="ram0")
    mem.add_region(16 * MiB, 4 * MiB, name="dimm0")
    mem.write(3 * MiB + 5, b"boot RAM")
    mem.write(16 * MiB + 4096, b"hot plugged")
    mem.write(6 * MiB, bytes(4096))              # allocated, but zero: not written
    yield mem
    mem.close()


def snapshot(memory, destination, config=None):
    fmt.write(destination, config or {"cpus": {"boot_vcpus": 2}}, {"clock": 7},
              [(r, True) for r in memory.regions])


def test_a_snapshot_round_trips_and_its_files_are_sparse(memory, tmp_path):
    snapshot(memory, tmp_path / "snap")
    manifest = fmt.read_manifest(tmp_path / "snap")
    assert manifest["config"] == {"cpus": {"boot_vcpus": 2}} and manifest["state"] == {"clock": 7}
    entries = {m["name"]: m for m in manifest["memory"]}
    assert entries["ram0"]["extents"] == [[3 * MiB, MiB]]        # one chunk: the zero one left out
    assert entries["dimm0"]["extents"] == [[0, MiB]]
    ram0 = tmp_path / "snap" / "ram0.mem"
    assert os.stat(ram0).st_size == 8 * MiB and os.stat(ram0).st_blocks * 512 <= 2 * MiB
    fresh = GuestMemory()
    fresh.add_region(0, 8 * MiB, name="ram0")
    fresh.add_region(16 * MiB, 4 * MiB, name="dimm0")
    try:
        fmt.load_memory(tmp_path / "snap", manifest, fresh)
        assert fresh.read(3 * MiB + 5, 8) == b"boot RAM"
        assert fresh.read(16 * MiB + 4096, 11) == b"hot plugged"
    finally:
        fresh.close()


def test_a_destination_holding_anything_is_refused_and_nothing_is_left(memory, tmp_path):
    snapshot(memory, tmp_path / "snap")
    with pytest.raises(fmt.SnapshotError, match="already holds a snapshot"):
        snapshot(memory, tmp_path / "snap")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(fmt.SnapshotError, match="not an empty directory"):
        snapshot(memory, tmp_path / "other")
    with pytest.raises(fmt.SnapshotError, match="is not a directory"):
        snapshot(memory, tmp_path / "missing" / "snap")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "snap"]


def test_a_failed_write_leaves_nothing(memory, tmp_path):
    class Broken:
        name, gpa, size, fd, fd_offset = "ram0", 0, MiB, -1, 0
        mmap = None                                  # reading it fails
    with pytest.raises(Exception):
        fmt.write(tmp_path / "snap", {}, {}, [(Broken(), True)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("damage", "words"), [
    (lambda m: m["config"].update(cpus={"boot_vcpus": 1}), "was altered or damaged"),
    (lambda m: m.update(version=1), "format version 1 .* this pych reads version 2"),
    (lambda m: m.update(format="other"), "is not a pych snapshot"),
])
def test_an_altered_manifest_or_another_version_is_refused(memory, tmp_path, damage, words):
    snapshot(memory, tmp_path / "snap")
    path = tmp_path / "snap" / "manifest.json"
    manifest = json.loads(path.read_text())
    damage(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(fmt.SnapshotError, match=words):
        fmt.read_manifest(tmp_path / "snap")


def test_a_truncated_manifest_or_memory_file_is_refused(memory, tmp_path):
    snapshot(memory, tmp_path / "snap")
    manifest = fmt.read_manifest(tmp_path / "snap")
    os.truncate(tmp_path / "snap" / "dimm0.mem", MiB)
    with pytest.raises(fmt.SnapshotError, match="dimm0.mem is truncated"):
        fmt.check_files(tmp_path / "snap", manifest)
    with pytest.raises(fmt.SnapshotError, match="truncated"):
        fmt.load_memory(tmp_path / "snap", manifest, memory)
    text = (tmp_path / "snap" / "manifest.json").read_text()
    (tmp_path / "snap" / "manifest.json").write_text(text[:len(text) // 2])
    with pytest.raises(fmt.SnapshotError, match="not valid JSON"):
        fmt.read_manifest(tmp_path / "snap")


def test_altered_memory_is_refused(memory, tmp_path):
    snapshot(memory, tmp_path / "snap")
    manifest = fmt.read_manifest(tmp_path / "snap")
    with open(tmp_path / "snap" / "ram0.mem", "r+b") as f:
        f.seek(3 * MiB + 5)
        f.write(b"BOOT")
    with pytest.raises(fmt.SnapshotError, match="ram0.mem was altered"):
        fmt.load_memory(tmp_path / "snap", manifest, memory)


def test_only_file_urls_are_taken():
    assert str(fmt.directory_of("file:///var/snap%20a")) == "/var/snap a"
    for url in ("http://host/x", "file://host/x", "/var/snap", "file://"):
        with pytest.raises(fmt.SnapshotError, match="only file:///"):
            fmt.directory_of(url)


def test_of_a_region_only_partly_ram_only_the_parts_in_use_are_written(tmp_path):
    """A virtio-mem region: what the guest wrote into plugged blocks is saved; a page of an
    unplugged block (allocated on the host, never the guest's) is not."""
    mem = GuestMemory()
    try:
        region = mem.add_region(1 << 32, 16 * MiB, name="virtio-mem-mem0")
        plugged = [(2 * MiB, 4 * MiB), (12 * MiB, 2 * MiB)]
        region.in_use = lambda: plugged
        mem.write((1 << 32) + 3 * MiB, b"in a plugged block")
        mem.write((1 << 32) + 13 * MiB + 7, b"and in another")
        mem.write((1 << 32) + 8 * MiB, b"not plugged")
        assert list(fmt.saved_chunks(region)) == [3 * MiB, 13 * MiB]
        fmt.write(tmp_path / "snap", {}, {}, [(region, True)])
        manifest = fmt.read_manifest(tmp_path / "snap")
        assert manifest["memory"][0]["extents"] == [[3 * MiB, MiB], [13 * MiB, MiB]]
        fresh = GuestMemory()
        fresh.add_region(1 << 32, 16 * MiB, name="virtio-mem-mem0")
        try:
            fmt.load_memory(tmp_path / "snap", manifest, fresh)
            assert fresh.read((1 << 32) + 3 * MiB, 18) == b"in a plugged block"
            assert fresh.read((1 << 32) + 13 * MiB + 7, 14) == b"and in another"
            assert fresh.read((1 << 32) + 8 * MiB, 11) == bytes(11)
        finally:
            fresh.close()
        plugged.clear()                         # nothing plugged: nothing saved
        assert list(fmt.saved_chunks(region)) == []
    finally:
        mem.close()
