"""The KVM core against a few-instruction PVH guest: boots in milliseconds, no Linux."""

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support.microguest import build_elf, reset_via_port, serial_then_poweroff

PYCH = [sys.executable, "-m", "pych"]


def _pych(tmp_path: Path, code: bytes, *extra: str, timeout: float = 30):
    kernel = tmp_path / "micro.elf"
    kernel.write_bytes(build_elf(code))
    return subprocess.run([*PYCH, "--kernel", str(kernel), "--memory", "size=64M", "--serial", "tty",
                           "--console", "off", *extra], capture_output=True, timeout=timeout)


def test_serial_output_and_acpi_poweroff_exit_zero(tmp_path):
    r = _pych(tmp_path, serial_then_poweroff(b"HELLO-PYCH\n"))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"HELLO-PYCH\n"


def test_unemulatable_instructions_are_handled_by_the_vmm(tmp_path):
    # fwait, then popcnt eax, ecx with ecx = 0xF0F0 (8 bits set), then print '0' + eax
    code = b"\x9b"                                   # fwait
    code += b"\xb9\xf0\xf0\x00\x00"                  # mov ecx, 0xf0f0
    code += b"\xf3\x0f\xb8\xc1"                      # popcnt eax, ecx
    code += b"\x04\x30"                              # add al, '0'
    code += b"\x66\xba\xf8\x03\xee"                  # mov dx, 0x3f8; out dx, al
    r = _pych(tmp_path, code + serial_then_poweroff(b"\n"), "-v")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"8\n"
    if os.path.isdir("/sys/module/kvm_pvm"):
        # This KVM leaves both to userspace: the answer above is pych's emulation's.
        assert b"emulated fwait" in r.stderr and b"emulated popcnt" in r.stderr, r.stderr


def test_unknown_emulation_failure_is_one_clear_line(tmp_path):
    # popcnt eax, [esi]: KVM's emulator has no popcnt and pych computes only the
    # register form, so the VM must stop with one line naming the bytes and registers.
    r = _pych(tmp_path, b"\xbe\x00\x10\x00\x00\xf3\x0f\xb8\x06" + serial_then_poweroff(b"X"))
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert r.stdout == b""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("pych: error:")]
    assert len(lines) == 1 and "f3 0f b8 06" in lines[0] and "rip=" in lines[0], err


def test_guest_reset_reboots_in_the_same_process(tmp_path):
    code = serial_then_poweroff(b"", sleep_port=0x3F8)[:-3]  # just "mov dx, 0x3f8" plumbing
    code = b"\x66\xba\xf8\x03\xb0\x42\xee" + reset_via_port()   # print 'B', then reset
    kernel = tmp_path / "micro.elf"
    kernel.write_bytes(build_elf(code))
    p = subprocess.Popen([*PYCH, "--kernel", str(kernel), "--memory", "size=64M", "--serial", "tty",
                          "--console", "off"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = b""
        deadline = time.monotonic() + 30
        while out.count(b"B") < 3 and time.monotonic() < deadline:
            out += p.stdout.read1(64)
        assert out.count(b"B") >= 3, "the guest did not boot again after its reset"
        assert p.poll() is None
    finally:
        p.terminate()
        p.wait(10)
    assert p.returncode == 0, p.stderr.read().decode()
