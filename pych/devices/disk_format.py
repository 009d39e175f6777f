"""What kind of disk image a file is, read from its header as the reference detects it.

pych's virtio-blk serves raw images.  Any other format must never be shown to the guest as
its container bytes (the guest's writes would corrupt the image), so a disk is checked
before it is opened for writing: :func:`check_image` refuses a format pych cannot serve
and an ``image_type`` that disagrees with the file, with a message that names both.
Nothing is written to the file.
"""

from __future__ import annotations

import os
import struct

#: ``image_type`` values of the API (the reference's ImageType) for what the header says.
RAW, QCOW2, VHDX, FIXED_VHD, FLAT_VMDK = "Raw", "Qcow2", "Vhdx", "FixedVhd", "FlatVmdk"
UNKNOWN = "Unknown"

_VHD_FOOTER = 512
_VHD_FIXED, _VHD_DYNAMIC, _VHD_DIFFERENCING = 2, 3, 4


class ImageFormatError(ValueError):
    """The image cannot be served as configured; the message says why and what to do."""


def detect_format(path: str | os.PathLike[str]) -> str:
    """The image format of ``path``: one of the ImageType names above, or a descriptive
    name (``"dynamic VHD"``, ``"sparse VMDK"``, ``"VDI"``, ``"QCOW (version 1)"``) for
    formats the API has no ImageType for.  Raises OSError if the file cannot be read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, 4096, 0)
        size = os.lseek(fd, 0, os.SEEK_END)
        tail = os.pread(fd, _VHD_FOOTER, size - _VHD_FOOTER) if size >= _VHD_FOOTER else b""
    finally:
        os.close(fd)
    if head[:4] == b"QFI\xfb":
        version = struct.unpack_from(">I", head, 4)[0] if len(head) >= 8 else 0
        return QCOW2 if version >= 2 else f"QCOW (version {version})"
    if head[:8] == b"vhdxfile":
        return VHDX
    if head[:4] == b"KDMV":
        return "sparse VMDK"
    if head.startswith(b"# Disk DescriptorFile"):
        return FLAT_VMDK
    if len(head) >= 68 and struct.unpack_from("<I", head, 64)[0] == 0xBEDA107F:
        return "VDI"
    if tail[:8] == b"conectix" and len(tail) >= 64:
        disk_type = struct.unpack_from(">I", tail, 60)[0]
        if disk_type == _VHD_FIXED:
            return FIXED_VHD
        return "differencing VHD" if disk_type == _VHD_DIFFERENCING else "dynamic VHD"
    return RAW


def check_image(path: str | os.PathLike[str], image_type: str = UNKNOWN) -> None:
    """Refuse ``path`` unless it is a raw image and ``image_type`` (the configuration's,
    ``Unknown`` to detect) agrees.  Raises :class:`ImageFormatError`; OSError if the file
    cannot be read (the caller reports that as it reports any unusable path).

    ``image_type=Raw`` is taken at its word and the header is not probed, as QEMU's
    ``format=raw``: a guest may write any bytes, a qcow2 header included, at the start of
    its own raw disk, and that must not make the VM unbootable."""
    if image_type == RAW:
        return
    detected = detect_format(path)
    if image_type not in (UNKNOWN, detected):
        raise ImageFormatError(
            f"disk image {os.fspath(path)}: image_type={image_type} does not match the "
            f"file, which is a {detected} image")
    if detected != RAW:
        raise ImageFormatError(
            f"disk image {os.fspath(path)} is a {detected} image: pych serves raw images "
            f"only (convert it: qemu-img convert -O raw {os.fspath(path)} <raw image>)")


def image_format(path: str | os.PathLike[str], image_type: str = UNKNOWN) -> str:
    """The format ``path`` is served as: ``Raw`` (pych's in-process virtio-blk) or what the
    header says (served through qemu-storage-daemon). ``image_type=Raw`` is taken at its
    word, as in :func:`check_image`; any other ``image_type`` that disagrees with the header
    is refused (:class:`ImageFormatError`). OSError if the file cannot be read."""
    if image_type == RAW:
        return RAW
    detected = detect_format(path)
    if image_type not in (UNKNOWN, detected):
        raise ImageFormatError(
            f"disk image {os.fspath(path)}: image_type={image_type} does not match the "
            f"file, which is a {detected} image")
    return detected
