"""A disk image is flushed to stable storage when pych closes it (remove-device, VM shutdown,
SIGTERM), and only when pych may have written it (tests/guest/test_durability.py checks the
guest-visible side)."""

import os

import pytest

from pych.devices.virtio.block import DiskImage


def _fsyncs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def spy(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_a_writable_image_is_flushed_on_close(tmp_path, monkeypatch):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(4096))
    image = DiskImage(path)
    fd = image.fd
    calls = _fsyncs(monkeypatch)
    image.close()
    image.close()                               # idempotent: one flush, one close
    assert calls == [fd]


def test_a_readonly_image_is_not_flushed(tmp_path, monkeypatch):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(4096))
    image = DiskImage(path, readonly=True)
    calls = _fsyncs(monkeypatch)
    image.close()
    assert calls == []


def test_a_failing_flush_still_closes(tmp_path, monkeypatch, caplog):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(4096))
    image = DiskImage(path)
    fd = image.fd

    def fail(_fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    image.close()
    assert image.fd == -1
    assert "flushing disk image" in caplog.text
    with pytest.raises(OSError):
        os.fstat(fd)                            # closed all the same
