"""Boot the test guest under pych and check what the guest sees (issue: boot to a shell).

One guest (boot=2, max=4, 256 MiB) is shared by the module; reboot and poweroff come last.
"""

import re
import subprocess
import sys

import pytest

from tests.support.guest import guest_artifacts

PYCH = [sys.executable, "-m", "pych"]


@pytest.fixture(scope="module")
def guest(guest_factory):
    return guest_factory(cpus="boot=2,max=4", memory="size=256M")


def test_shell_answers_and_sees_boot_vcpus_and_memory(guest):
    rc, out = guest.run("echo hello; nproc; grep MemTotal /proc/meminfo")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "hello"
    assert lines[1] == "2"
    mem_kib = int(re.search(r"MemTotal:\s+(\d+) kB", out).group(1))
    # the kernel keeps its image and reserved pages: between 70 % and 100 % of 256 MiB
    assert 0.7 * 256 * 1024 < mem_kib <= 256 * 1024


def test_possible_cpus_reach_max_and_only_boot_cpus_are_present(guest):
    # Not-yet-plugged CPUs are "possible" (MADT: disabled, online-capable) but not
    # "present": lscpu, like Linux under the reference or QEMU, lists the present ones.
    rc, out = guest.run("lscpu; cat /sys/devices/system/cpu/possible /sys/devices/system/cpu/present "
                        "/sys/devices/system/cpu/online; grep -c processor /proc/cpuinfo")
    assert rc == 0, out
    assert out.splitlines()[-4:] == ["0-3", "0-1", "0-1", "2"]
    assert re.search(r"^CPU\(s\):\s+2$", out, re.M), out
    assert re.search(r"On-line CPU\(s\) list:\s+0[,-]1$", out, re.M), out
    # one package holding every possible vCPU as a core (the reference's default topology)
    assert re.search(r"Socket\(s\):\s+1$", out, re.M), out
    assert re.search(r"Core\(s\) per socket:\s+2$", out, re.M), out


def test_mp_table_found_at_once_and_the_madt_still_enumerates(guest):
    # The MP floating pointer at 0x9FC00 ends the kernel's early scan before it walks the
    # BIOS area; with ACPI present the MADT, not the MP table, describes CPUs and IOAPIC.
    rc, out = guest.run("dmesg | grep -E 'MP-table|MultiProcessor|MPTABLE|ACPI \\(MADT\\)'")
    assert rc == 0, out
    assert "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]" in out, out
    assert "Using ACPI (MADT) for SMP configuration information" in out, out
    assert "MultiProcessor Specification" not in out and "MPTABLE" not in out, out


def test_acpi_devices_seen_by_the_guest(guest):
    rc, out = guest.run("ls /sys/bus/acpi/devices/ | tr '\\n' ' '")
    assert rc == 0
    for hid in ("ACPI0013", "PNP0C0C", "PNP0501", "PNP0A08", "ACPI0010"):
        assert hid in out, f"{hid} missing from the guest's ACPI namespace: {out}"


def test_pipelines_and_exit_codes(guest):
    rc, out = guest.run("ls / | wc -l")
    assert rc == 0 and int(out) > 5
    rc, _ = guest.run("false")
    assert rc == 1


def test_guest_reboot_boots_again_in_the_same_process(guest):
    start = len(guest.console.buf)
    guest.console.send("reboot -f\n")
    guest.wait_ready(start=start)
    assert guest.proc.poll() is None
    rc, out = guest.run("nproc")
    assert (rc, out) == (0, "2")


def test_guest_poweroff_ends_pych_with_zero(guest):
    guest.console.send("poweroff -f\n")
    assert guest.wait_exit(120) == 0


def test_bzimage_boots_too(guest_factory):
    g = guest_factory("bz", kernel="bzImage", cpus="boot=1", memory="size=256M")
    rc, out = g.run("uname -m")
    assert (rc, out) == (0, "x86_64")
    g.console.send("poweroff -f\n")
    assert g.wait_exit(120) == 0


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode()
    assert r.returncode != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_kernel_file_is_one_clear_line(tmp_path):
    r = subprocess.run([*PYCH, "--kernel", str(tmp_path / "nope"), "--memory", "size=64M"],
                       capture_output=True, timeout=60)
    assert "nope" in _one_error_line(r)


def test_bad_option_is_one_clear_line():
    art = guest_artifacts()
    r = subprocess.run([*PYCH, "--kernel", str(art["vmlinux"]), "--memory", "size=12Q"],
                       capture_output=True, timeout=60)
    assert "--memory" in _one_error_line(r)


def test_boot_above_max_is_one_clear_line():
    art = guest_artifacts()
    r = subprocess.run([*PYCH, "--kernel", str(art["vmlinux"]), "--cpus", "boot=4,max=2"],
                       capture_output=True, timeout=60)
    line = _one_error_line(r)
    assert "max" in line.lower() and "boot" in line.lower()

