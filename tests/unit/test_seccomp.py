"""The vCPU seccomp filter (pych/seccomp.py): the exact program the kernel gets, run through a
small classic-BPF interpreter, and installed for real in a child process's thread."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from pych import seccomp
from pych.cli.main import CliError, build_parser
from pych.seccomp import (
    AUDIT_ARCH_X86_64, SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS,
    SECCOMP_RET_LOG, SECCOMP_RET_TRAP, SYSCALL_NUMBERS, VCPU_SYSCALLS, build_vcpu_filter,
)

NR = SYSCALL_NUMBERS
KVM_RUN = 0xAE80
TCGETS = 0x5401
BLKGETSIZE64 = 0x80081272
CLONE_THREAD_FLAGS = 0x3D0F00            # what glibc's pthread_create passes


def run_filter(program: bytes, nr: int, args=(0,) * 6, arch=AUDIT_ARCH_X86_64) -> int:
    """Evaluate a classic BPF seccomp program on one struct seccomp_data; returns the action."""
    args = [a & (1 << 64) - 1 for a in (*args, 0, 0, 0, 0, 0, 0)[:6]]     # as registers hold them
    data = struct.pack("=IIQ6Q", nr, arch, 0, *args)
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:                                   # ld [k]
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x54:                                 # and #k
            acc &= k
        elif code in (0x15, 0x35, 0x45):                   # jeq / jge / jset #k
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        elif code == 0x06:                                 # ret #k
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x} at {pc}")
        pc += 1


@pytest.fixture(scope="module")
def trap() -> bytes:
    return build_vcpu_filter(SECCOMP_RET_TRAP)


def test_every_listed_call_is_allowed_and_others_trap(trap):
    for name in VCPU_SYSCALLS:
        assert run_filter(trap, NR[name]) == SECCOMP_RET_ALLOW, name
    for name in ("execve", "fork", "vfork", "ptrace", "mount", "kill", "setuid", "memfd_create",
                 "bind", "listen", "ftruncate", "chmod", "getppid"):
        assert run_filter(trap, NR[name]) == SECCOMP_RET_TRAP, name


def test_log_mode_differs_only_in_the_default_action(trap):
    log = build_vcpu_filter(SECCOMP_RET_LOG)
    assert run_filter(log, NR["execve"]) == SECCOMP_RET_LOG
    assert run_filter(log, NR["futex"]) == SECCOMP_RET_ALLOW
    assert len(log) == len(trap)


def test_ioctl_only_for_kvm_vfio_and_tty_tun_requests(trap):
    for request in (KVM_RUN, 0x4020AE46, TCGETS, 0x400454D0, 0x3B6E):
        assert run_filter(trap, NR["ioctl"], (5, request)) == SECCOMP_RET_ALLOW, hex(request)
    # the upper half of the argument is not part of an ioctl request
    assert run_filter(trap, NR["ioctl"], (5, (1 << 32) | KVM_RUN)) == SECCOMP_RET_ALLOW
    for request in (BLKGETSIZE64, 0x8912, 0):                 # block, socket (SIOCGIFCONF)
        assert run_filter(trap, NR["ioctl"], (5, request)) == SECCOMP_RET_TRAP, hex(request)


def test_clone_only_for_threads_and_clone3_falls_back(trap):
    assert run_filter(trap, NR["clone"], (CLONE_THREAD_FLAGS,)) == SECCOMP_RET_ALLOW
    assert run_filter(trap, NR["clone"], (0x11,)) == SECCOMP_RET_TRAP         # fork(): SIGCHLD
    assert run_filter(trap, NR["clone3"]) == SECCOMP_RET_ERRNO | errno.ENOSYS


def test_sockets_only_unix_and_files_only_read_only(trap):
    assert run_filter(trap, NR["socket"], (1, 1)) == SECCOMP_RET_ALLOW          # AF_UNIX
    assert run_filter(trap, NR["socket"], (2, 1)) == SECCOMP_RET_TRAP           # AF_INET
    read_only = os.O_RDONLY | os.O_CLOEXEC
    assert run_filter(trap, NR["openat"], (-100, 0, read_only)) == SECCOMP_RET_ALLOW
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC | os.O_RDONLY, os.O_APPEND,
                  os.O_TMPFILE | os.O_RDWR):
        assert run_filter(trap, NR["openat"], (-100, 0, flags)) == SECCOMP_RET_TRAP, flags


def test_prctl_only_to_name_a_thread(trap):
    assert run_filter(trap, NR["prctl"], (15, 0)) == SECCOMP_RET_ALLOW              # PR_SET_NAME
    for option in (22, 38, 4, 1):    # PR_SET_SECCOMP, NO_NEW_PRIVS, SET_DUMPABLE, PDEATHSIG
        assert run_filter(trap, NR["prctl"], (option, 0)) == SECCOMP_RET_TRAP, option


def test_other_abis_kill_the_process(trap):
    assert run_filter(trap, NR["read"], arch=0x40000003) == SECCOMP_RET_KILL_PROCESS     # i386
    assert run_filter(trap, 0x40000000 | NR["read"]) == SECCOMP_RET_KILL_PROCESS         # x32


def test_the_syscall_table_is_the_x86_64_one():
    assert (NR["read"], NR["ioctl"], NR["futex"], NR["openat"], NR["rseq"], NR["clone3"],
            NR["mseal"]) == (0, 16, 202, 257, 334, 435, 462)
    assert seccomp.syscall_name(257) == "openat" and seccomp.syscall_name(999) == "syscall 999"


def test_audit_records_name_the_calls_of_one_process():
    log = ("[1.0] audit: type=1326 audit(1:2): auid=4294967295 uid=0 gid=0 ses=4294967295 "
           "pid=42 comm=\"python\" exe=\"/usr/bin/python3\" sig=0 arch=c000003e syscall=110 "
           "compat=0 ip=0x7f code=0x7ffc0000\n"
           "[1.1] audit: type=1326 audit(1:3): pid=43 sig=0 arch=c000003e syscall=257 "
           "compat=0 ip=0x7f code=0x7ffc0000\n")
    assert seccomp.audit_records(log) == {"getppid": 1, "openat": 1}
    assert seccomp.audit_records(log, pid=42) == {"getppid": 1}


def test_cli_takes_the_reference_values():
    parser = build_parser()
    assert parser.parse_args(["--seccomp", "log"]).seccomp == "log"
    assert parser.parse_args([]).seccomp is None
    with pytest.raises(CliError, match="invalid choice"):
        parser.parse_args(["--seccomp", "errno"])
    with pytest.raises(ValueError, match="one of true, false, log"):
        seccomp.configure("errno")


CHILD = textwrap.dedent("""
    import os, sys, threading
    from pych import seccomp
    seccomp.configure(sys.argv[1], on_violation=lambda m: print("stopping:", m, flush=True))
    def vcpu():
        seccomp.apply_vcpu_filter()
        print("pid", os.getpid() > 0, flush=True)                   # allowed
        worker = threading.Thread(target=lambda: print("worker ok", flush=True))
        worker.start(); worker.join()                               # clone3 -> clone
        try:
            os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o600)   # forbidden
            print("created", flush=True)
        except OSError as e:
            print("refused", e.errno, flush=True)
    t = threading.Thread(target=vcpu, name="vcpu0"); t.start(); t.join()
    print("main thread unfiltered", os.getppid() > 0, flush=True)
""")


def child(mode: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, mode, str(tmp_path / "new-file")],
                          capture_output=True, text=True, timeout=60)


def test_true_mode_refuses_the_call_names_it_once_and_asks_to_stop(tmp_path):
    r = child("true", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "pid True", "worker ok",
        "stopping: " + seccomp.violation_message("vcpu0", NR["openat"]),
        f"refused {errno.ENOSYS}", "main thread unfiltered True"]
    assert r.stderr.splitlines() == [
        "pych: error: " + seccomp.violation_message("vcpu0", NR["openat"])]
    assert "openat (257)" in r.stderr
    assert not (tmp_path / "new-file").exists()


def test_log_and_false_modes_let_the_call_run(tmp_path):
    for mode in ("log", "false"):
        r = child(mode, tmp_path)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert "created" in r.stdout.splitlines()
        (tmp_path / "new-file").unlink()
