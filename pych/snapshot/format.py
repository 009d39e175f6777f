"""pych's snapshot format, version 2: a directory holding ``manifest.json`` and one file per
guest RAM region. docs/snapshot.md describes it; this module writes and reads it.

``manifest.json``::

    {"format": "pych-snapshot", "version": 2, "pych_version": "...",
     "config": {...VmConfig, every hot plug applied...},
     "state": {...the VM's state: vCPUs, irqchip, PIT, clock, memory layout, devices...},
     "memory": [{"name": "ram0", "gpa": 0, "size": ..., "file": "ram0.mem",
                 "extents": [[offset, length], ...], "sha256": "..."}, ...],
     "sha256": "<of the manifest without this key, keys sorted, compact>"}

A memory file is as large as its region and sparse: only the ``extents`` (runs of 1 MiB chunks
that hold a non-zero byte, found among the pages the host has allocated, SEEK_DATA/SEEK_HOLE)
are written (of a virtio-mem region, only those in its plugged blocks), and ``sha256`` is
over their bytes in order. A region mapped shared from the
user's own file (a memory zone's ``file=``, ``shared=on``) is that file: it is recorded with
``"file": null`` and not copied.

Writing goes to a hidden directory beside the destination, renamed into place once complete,
so a failed snapshot leaves nothing behind; a destination that holds a snapshot already (or
anything else) is refused. Reading checks the format, the version and the manifest's
checksum at once, and each memory file's extents and checksum as it is loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pych

FORMAT = "pych-snapshot"
VERSION = 2
MANIFEST = "manifest.json"
CHUNK = 1 << 20
_ZERO = bytes(CHUNK)


class SnapshotError(Exception):
    """A snapshot that cannot be written or read (the client's: a bad URL or directory, a
    snapshot from another version, truncated or altered)."""


def directory_of(url: str) -> Path:
    """The directory of a ``file://`` URL (the only kind pych writes and reads)."""
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path:
        raise SnapshotError(f"{url}: only file:///<directory> URLs are supported")
    return Path(unquote(parsed.path))


def _checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


# --- writing ---------------------------------------------------------------------------------
def write(destination: Path, config: dict, state: dict, regions) -> None:
    """Write a snapshot of ``config`` and ``state`` with the contents of ``regions`` (the
    memory manager's ``(region, copy)`` pairs) to ``destination``, which must not exist or
    be an empty directory; its parent must exist."""
    if (destination / MANIFEST).exists():
        raise SnapshotError(f"{destination} already holds a snapshot")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise SnapshotError(f"{destination} exists and is not an empty directory")
    if not destination.parent.is_dir():
        raise SnapshotError(f"{destination.parent} is not a directory")
    tmp = destination.parent / f".{destination.name}.pych-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        memory = [_write_region(tmp, region, copy) for region, copy in regions]
        manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                                    "pych_version": pych.__version__, "config": config,
                                    "state": state, "memory": memory}
        manifest["sha256"] = _checksum(manifest)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, destination)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SnapshotError(f"cannot write the snapshot to {destination}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_region(directory: Path, region, copy: bool) -> dict:
    entry: dict[str, Any] = {"name": region.name, "gpa": region.gpa, "size": region.size,
                             "file": None}
    if not copy:
        return entry
    name = f"{region.name}.mem"
    digest = hashlib.sha256()
    extents: list[list[int]] = []
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, region.size)
        for offset in saved_chunks(region):
            data = region.mmap[offset:offset + CHUNK]
            if data == _ZERO[:len(data)]:
                continue
            os.pwrite(fd, data, offset)
            digest.update(data)
            if extents and extents[-1][0] + extents[-1][1] == offset:
                extents[-1][1] += len(data)
            else:
                extents.append([offset, len(data)])
        os.fsync(fd)
    finally:
        os.close(fd)
    entry.update(file=name, extents=extents, sha256=digest.hexdigest())
    return entry


def saved_chunks(region) -> Iterator[int]:
    """Offsets (in the region) of the 1 MiB chunks a snapshot or migration copies: those
    holding pages the host allocated (:func:`_allocated_chunks`) and, in a region of which
    only parts are RAM (virtio-mem's, ``region.in_use``), only in those parts (its
    plugged blocks, 2 MiB each: whole chunks)."""
    in_use = getattr(region, "in_use", None)
    if in_use is None:
        yield from _allocated_chunks(region)
        return
    runs = in_use()
    if not runs:
        return
    ends = iter(runs)
    start, length = next(ends)
    for offset in _allocated_chunks(region):
        while offset >= start + length:
            nxt = next(ends, None)
            if nxt is None:
                return
            start, length = nxt
        if offset >= start:
            yield offset


def _allocated_chunks(region) -> Iterator[int]:
    """Offsets (in the region) of the 1 MiB chunks holding pages the host allocated: the
    data extents of the region's memfd or file, or every chunk if it cannot tell."""
    start, end = region.fd_offset, region.fd_offset + region.size
    pos = start
    while pos < end:
        try:
            data = os.lseek(region.fd, pos, os.SEEK_DATA)
            hole = os.lseek(region.fd, data, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:           # no data after pos
                return
            yield from range(pos - start, region.size, CHUNK)   # cannot tell: every chunk
            return
        if data >= end:
            return
        first = (data - start) // CHUNK * CHUNK
        last = min(hole, end) - start
        yield from range(first, last, CHUNK)
        pos = start + (last + CHUNK - 1) // CHUNK * CHUNK
        if pos <= data:
            pos = data + 1


# --- reading ---------------------------------------------------------------------------------
def read_manifest(source: Path) -> dict:
    """The manifest of the snapshot in ``source``, checked: format, version, checksum."""
    try:
        text = (source / MANIFEST).read_text()
    except FileNotFoundError:
        raise SnapshotError(f"{source} holds no snapshot ({MANIFEST} is missing)") from None
    except OSError as e:
        raise SnapshotError(f"cannot read {source / MANIFEST}: {e.strerror}") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise SnapshotError(f"{source / MANIFEST} is not valid JSON (truncated?): {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{source / MANIFEST} is not a pych snapshot")
    if manifest.get("version") != VERSION:
        raise SnapshotError(f"snapshot format version {manifest.get('version')!r} (written by "
                            f"pych {manifest.get('pych_version')}) is not supported: this pych "
                            f"reads version {VERSION}")
    if manifest.get("sha256") != _checksum(manifest):
        raise SnapshotError(f"{source / MANIFEST} was altered or damaged: its checksum does "
                            "not match")
    return manifest


def check_files(source: Path, manifest: dict) -> None:
    """Each memory file is there and as large as its region (before anything is built; the
    contents are checked as they are loaded)."""
    for entry in manifest["memory"]:
        if entry["file"] is None:
            continue
        path = source / entry["file"]
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise SnapshotError(f"cannot read {path}: {e.strerror}") from None
        if size != entry["size"]:
            raise SnapshotError(f"{path} is truncated or resized: {size} bytes, "
                                f"{entry['size']} expected")


def load_memory(source: Path, manifest: dict, guest_memory) -> None:
    """Copy each saved region's extents into the restored region of the same name, checking
    the region's place and size and the file's checksum."""
    regions = {r.name: r for r in guest_memory.regions}
    saved = {entry["name"] for entry in manifest["memory"]}
    if saved != set(regions):
        raise SnapshotError(f"the snapshot's memory regions ({', '.join(sorted(saved))}) are "
                            f"not the restored VM's ({', '.join(sorted(regions))})")
    for entry in manifest["memory"]:
        region = regions[entry["name"]]
        if (region.gpa, region.size) != (entry["gpa"], entry["size"]):
            raise SnapshotError(f"memory region {entry['name']}: saved at {entry['gpa']:#x} "
                                f"+{entry['size']:#x}, restored at {region.gpa:#x}+{region.size:#x}")
        if entry["file"] is None:
            continue
        path = source / entry["file"]
        digest = hashlib.sha256()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SnapshotError(f"cannot open {path}: {e.strerror}") from None
        try:
            if os.fstat(fd).st_size != region.size:
                raise SnapshotError(f"{path} is truncated or resized: "
                                    f"{os.fstat(fd).st_size} bytes, {region.size} expected")
            for offset, length in entry["extents"]:
                for at in range(offset, offset + length, CHUNK):
                    n = min(CHUNK, offset + length - at)
                    data = os.pread(fd, n, at)
                    if len(data) != n:
                        raise SnapshotError(f"{path} is truncated")
                    digest.update(data)
                    region.mmap[at:at + n] = data
        finally:
            os.close(fd)
        if digest.hexdigest() != entry["sha256"]:
            raise SnapshotError(f"{path} was altered or damaged: its checksum does not match")
