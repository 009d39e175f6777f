"""Disk image formats are read from the header: anything but raw is refused, never shown to
the guest as its container bytes, and the file is left byte-for-byte unchanged."""

import hashlib
import os
import shutil
import subprocess

import pytest

from pych.devices.disk_format import (FIXED_VHD, FLAT_VMDK, QCOW2, RAW, VHDX, ImageFormatError,
                                      check_image, detect_format)
from pych.devices.virtio.block import DiskError, VirtioBlock

QEMU_IMG = shutil.which("qemu-img")
needs_qemu_img = pytest.mark.skipif(
    QEMU_IMG is None, reason="LOUD SKIP: qemu-img (Debian qemu-utils, installed by "
    "scripts/install-deps.sh) is missing; image formats cannot be made")

# qemu-img's format name and options -> what detect_format says
FORMATS = [
    ("qcow2", [], QCOW2),
    ("vhdx", [], VHDX),
    ("vpc", ["-o", "subformat=fixed"], FIXED_VHD),
    ("vpc", ["-o", "subformat=dynamic"], "dynamic VHD"),
    ("vmdk", [], "sparse VMDK"),
    ("vmdk", ["-o", "subformat=monolithicFlat"], FLAT_VMDK),
    ("vdi", [], "VDI"),
]


def _make(tmp_path, fmt, opts):
    path = tmp_path / f"disk.{fmt}"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, *opts, str(path), "4M"], check=True)
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_qemu_img
@pytest.mark.parametrize("fmt,opts,expected", FORMATS, ids=lambda v: str(v))
def test_each_format_is_detected_and_refused_untouched(tmp_path, fmt, opts, expected):
    path = _make(tmp_path, fmt, opts)
    before = _digest(path)
    assert detect_format(path) == expected
    with pytest.raises(ImageFormatError, match=f"is a {expected} image: pych serves raw"):
        check_image(path)
    with pytest.raises(ImageFormatError):
        VirtioBlock(path)                          # the device never opens it
    assert _digest(path) == before


@needs_qemu_img
def test_an_image_type_that_disagrees_with_the_file_is_refused(tmp_path):
    qcow2 = _make(tmp_path, "qcow2", [])
    with pytest.raises(ImageFormatError, match="image_type=Vhdx does not match the file, which "
                                               "is a Qcow2 image"):
        check_image(qcow2, "Vhdx")
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(1 << 20))
    with pytest.raises(ImageFormatError, match="image_type=Qcow2 does not match the file, "
                                               "which is a Raw image"):
        check_image(raw, "Qcow2")


def test_raw_images_and_block_sized_files_are_served(tmp_path):
    raw = tmp_path / "raw.img"
    raw.write_bytes(os.urandom(1 << 16))
    assert detect_format(raw) == RAW
    check_image(raw)
    check_image(raw, "Raw")
    disk = VirtioBlock(raw)
    disk.shutdown()
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x")
    assert detect_format(tiny) == RAW


def test_explicit_raw_is_not_probed(tmp_path):
    """A guest may write a qcow2 magic into its own raw disk: with image_type=Raw the VM
    still boots (QEMU's format=raw does the same)."""
    disk = tmp_path / "guest-wrote-a-header.img"
    disk.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(1 << 16))
    with pytest.raises(ImageFormatError):
        check_image(disk)
    check_image(disk, "Raw")
    VirtioBlock(disk, image_type="Raw").shutdown()


def test_an_unreadable_image_is_a_disk_error(tmp_path):
    with pytest.raises(DiskError, match="cannot open disk image"):
        VirtioBlock(tmp_path / "missing.img")
