"""Seccomp filters for vCPU threads: ``pych --seccomp true|false|log``.

Each vCPU thread installs, before its first ``KVM_RUN``, a classic-BPF seccomp filter
that allows the system calls a vCPU thread makes (:data:`VCPU_SYSCALLS`, each with the
reason it is there) and acts on any other one as the mode says:

* ``true``: the call does not run. A ``SIGSYS`` handler writes one line naming the
  thread and the system call to standard error (``pych: error: seccomp: ...``), makes
  the call fail with ``ENOSYS`` and asks the VMM to stop the VM, which exits 1.
* ``log``: the call runs, and the kernel's audit log records it (``dmesg``:
  ``audit: type=1326 ... pid=P ... syscall=N ... code=0x7ffc0000``);
  :func:`audit_records` names them. This, and ``strace -f`` of soak runs
  (``scripts/soak.py``), is how the allowlist was found.
* ``false``: no filter.

These are the reference's flag and values; as in the reference the mode is a property
of the VMM process (a command line flag, not part of ``vm.create``'s configuration).

What the filter covers. A filter belongs to the thread that installs it and to every
thread that thread starts later. vCPU threads start the virtio device workers (a driver
writing ``DRIVER_OK`` activates its device on the vCPU thread) and tear devices, DIMMs and
vCPUs down when the guest ejects them, so the allowlist covers what those do as well:
block I/O (``preadv2``/``pwritev2``/``fsync``), tap reads and writes, the vsock worker's
Unix sockets, ``madvise`` for virtio-mem and the balloon, closing fds, ``tgkill`` to stop
an ejected vCPU's thread. The VMM thread, the API server and the serial backend are not
filtered: they open files, create taps and memfds, and start vCPU threads.

Arguments are checked where that is cheap and meaningful: ``ioctl`` only for the KVM,
VFIO and tty/tun request types; ``clone`` only for threads (``clone3``, whose flags a
filter cannot see, fails with ``ENOSYS`` so the C library falls back to ``clone``);
``socket`` only for ``AF_UNIX``; ``openat`` only read-only (the C library reads
``/sys/devices/system/cpu/online`` when a thread gets its first malloc arena, Python
reads source files for a traceback). A call through another architecture's ABI (i386
or x32) kills the process.

Why a hand-assembled BPF program instead of libseccomp through ctypes: pych is x86_64
only, the program is ~70 instructions of one shape (compare the system call number,
jump to allow; a few argument checks), and written out here it needs nothing beyond the
standard library (like the KVM core), no extra Debian package, and unit tests can run
the exact program the kernel gets (``tests/unit/test_seccomp.py`` interprets it).

The ``true`` handler is a ctypes callback installed with ``sigaction(SA_SIGINFO)``: only
the siginfo carries the system call's number, which Python's ``signal`` module does not
pass on. It runs on the offending thread, which then continues with ``ENOSYS``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
import threading
from typing import Callable, Iterable

MODES = ("true", "false", "log")
#: The reference's default. The guest test modules of hot plug, devices and the soak pass
#: with it; with ``log`` the others recorded nothing the filter does not list.
DEFAULT_MODE = "true"

# --- the x86_64 system call table (arch/x86/entry/syscalls/syscall_64.tbl) ---------------
# 0-334 are contiguous, 335-423 are unused on x86_64, 424 on are the newer calls.
_SYSCALLS_0 = """
read write open close stat fstat lstat poll lseek mmap mprotect munmap brk rt_sigaction
rt_sigprocmask rt_sigreturn ioctl pread64 pwrite64 readv writev access pipe select
sched_yield mremap msync mincore madvise shmget shmat shmctl dup dup2 pause nanosleep
getitimer alarm setitimer getpid sendfile socket connect accept sendto recvfrom sendmsg
recvmsg shutdown bind listen getsockname getpeername socketpair setsockopt getsockopt clone
fork vfork execve exit wait4 kill uname semget semop semctl shmdt msgget msgsnd msgrcv
msgctl fcntl flock fsync fdatasync truncate ftruncate getdents getcwd chdir fchdir rename
mkdir rmdir creat link unlink symlink readlink chmod fchmod chown fchown lchown umask
gettimeofday getrlimit getrusage sysinfo times ptrace getuid syslog getgid setuid setgid
geteuid getegid setpgid getppid getpgrp setsid setreuid setregid getgroups setgroups
setresuid getresuid setresgid getresgid getpgid setfsuid setfsgid getsid capget capset
rt_sigpending rt_sigtimedwait rt_sigqueueinfo rt_sigsuspend sigaltstack utime mknod uselib
personality ustat statfs fstatfs sysfs getpriority setpriority sched_setparam sched_getparam
sched_setscheduler sched_getscheduler sched_get_priority_max sched_get_priority_min
sched_rr_get_interval mlock munlock mlockall munlockall vhangup modify_ldt pivot_root
_sysctl prctl arch_prctl adjtimex setrlimit chroot sync acct settimeofday mount umount2
swapon swapoff reboot sethostname setdomainname iopl ioperm create_module init_module
delete_module get_kernel_syms query_module quotactl nfsservctl getpmsg putpmsg afs_syscall
tuxcall security gettid readahead setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr
listxattr llistxattr flistxattr removexattr lremovexattr fremovexattr tkill time futex
sched_setaffinity sched_getaffinity set_thread_area io_setup io_destroy io_getevents
io_submit io_cancel get_thread_area lookup_dcookie epoll_create epoll_ctl_old epoll_wait_old
remap_file_pages getdents64 set_tid_address restart_syscall semtimedop fadvise64
timer_create timer_settime timer_gettime timer_getoverrun timer_delete clock_settime
clock_gettime clock_getres clock_nanosleep exit_group epoll_wait epoll_ctl tgkill utimes
vserver mbind set_mempolicy get_mempolicy mq_open mq_unlink mq_timedsend mq_timedreceive
mq_notify mq_getsetattr kexec_load waitid add_key request_key keyctl ioprio_set ioprio_get
inotify_init inotify_add_watch inotify_rm_watch migrate_pages openat mkdirat mknodat
fchownat futimesat newfstatat unlinkat renameat linkat symlinkat readlinkat fchmodat
faccessat pselect6 ppoll unshare set_robust_list get_robust_list splice tee sync_file_range
vmsplice move_pages utimensat epoll_pwait signalfd timerfd_create eventfd fallocate
timerfd_settime timerfd_gettime accept4 signalfd4 eventfd2 epoll_create1 dup3 pipe2
inotify_init1 preadv pwritev rt_tgsigqueueinfo perf_event_open recvmmsg fanotify_init
fanotify_mark prlimit64 name_to_handle_at open_by_handle_at clock_adjtime syncfs sendmmsg
setns getcpu process_vm_readv process_vm_writev kcmp finit_module sched_setattr
sched_getattr renameat2 seccomp getrandom memfd_create kexec_file_load bpf execveat
userfaultfd membarrier mlock2 copy_file_range preadv2 pwritev2 pkey_mprotect pkey_alloc
pkey_free statx io_pgetevents rseq
""".split()
_SYSCALLS_424 = """
pidfd_send_signal io_uring_setup io_uring_enter io_uring_register open_tree move_mount
fsopen fsconfig fsmount fspick pidfd_open clone3 close_range openat2 pidfd_getfd faccessat2
process_madvise epoll_pwait2 mount_setattr quotactl_fd landlock_create_ruleset
landlock_add_rule landlock_restrict_self memfd_secret process_mrelease futex_waitv
set_mempolicy_home_node cachestat fchmodat2 map_shadow_stack futex_wake futex_wait
futex_requeue statmount listmount lsm_get_self_attr lsm_set_self_attr lsm_list_modules mseal
""".split()
SYSCALL_NUMBERS: dict[str, int] = {
    **{name: nr for nr, name in enumerate(_SYSCALLS_0)},
    **{name: 424 + i for i, name in enumerate(_SYSCALLS_424)},
}
_SYSCALL_NAMES = {nr: name for name, nr in SYSCALL_NUMBERS.items()}


def syscall_name(nr: int) -> str:
    """The x86_64 name of system call ``nr`` (``"syscall 999"`` if unknown)."""
    return _SYSCALL_NAMES.get(nr, f"syscall {nr}")


# --- what a vCPU thread may do ----------------------------------------------------------------
#: Allowed without looking at the arguments, each with why a vCPU thread (or a device
#: worker it starts) makes it.
VCPU_SYSCALLS: dict[str, str] = {
    # I/O on fds the VMM opened: device backends, eventfds, the serial port, the event monitor
    "read": "eventfds, tap reads; Python reading a source file for a traceback",
    "write": "eventfds (irqfds, waking the VMM), serial output, the event monitor, log lines",
    "readv": "virtio-net receive and virtio-rng, straight into guest buffers",
    "writev": "virtio-net transmit, straight from guest buffers",
    "preadv2": "virtio-blk reads: CPython's os.preadv calls preadv2",
    "pwritev2": "virtio-blk writes: CPython's os.pwritev calls pwritev2",
    "pread64": "VFIO config space and region reads",
    "pwrite64": "VFIO config space and region writes",
    "fsync": "virtio-blk and virtio-pmem flush",
    "close": "device teardown when the guest ejects a device or DIMM",
    "eventfd2": "a device worker's stop eventfd, made when the driver activates the device",
    # waiting: the device workers
    "poll": "device workers wait for queue kicks",
    "epoll_wait": "virtio-net's tap and the vsock worker's host sockets",
    "epoll_ctl": "virtio-net's tap and the vsock worker's host sockets",
    # the vsock worker's Unix sockets (socket() itself: AF_UNIX only, below)
    "connect": "vsock: guest-initiated connections to <socket>_<port>",
    "accept4": "vsock: host-initiated connections",
    "sendto": "vsock streams",
    "recvfrom": "vsock streams",
    "sendmsg": "vsock streams",
    "recvmsg": "vsock streams",
    "shutdown": "vsock streams",
    "getsockopt": "vsock: the result of a connection",
    "getsockname": "repr() of a socket, e.g. the ResourceWarning of one collected here",
    "getpeername": "repr() of a socket",
    "unlink": "vsock: its listening socket's path when the guest ejects the device",
    # memory: the allocators, thread stacks, DIMMs and BARs
    "mmap": "the C and Python allocators, thread stacks, BAR mappings",
    "munmap": "the allocators; DIMM and BAR mappings released on eject",
    "mprotect": "thread stacks (guard pages), malloc arenas",
    "madvise": "thread stacks; virtio-mem unplug and balloon inflate (MADV_REMOVE)",
    "mremap": "the C allocator's realloc",
    "brk": "the C allocator",
    # threads and signals (clone itself: threads only, below)
    "futex": "the GIL, locks, condition variables",
    "set_robust_list": "a new thread: device workers start on the vCPU thread",
    "rseq": "a new thread",
    "rt_sigprocmask": "thread creation, signal delivery",
    "rt_sigreturn": "the end of a signal handler (the kick that interrupts KVM_RUN)",
    "tgkill": "the kick that stops an ejected vCPU's thread (pthread_kill)",
    "gettid": "the C library",
    "getpid": "the C library, logging",
    "exit": "the thread ends: a reset, a poweroff, the VM stops",
    "clock_gettime": "time: the vDSO's fallback",
    # reading files, which Python does itself (openat: read-only, below)
    "newfstatat": "Python opening a file (a traceback's source lines)",
    "fstat": "Python opening a file",
    "lseek": "Python reading a file",
}

#: ioctl request types (bits 8-15 of the request) a vCPU thread uses.
IOCTL_TYPES = {
    0xAE: "KVM: KVM_RUN, registers, IRQ lines, MSIs, ioeventfds, irqfds, memory slots",
    0x3B: "VFIO: BAR and interrupt set-up when the guest programs a passed-through device",
    0x54: "tty and tun ('T'): TUNSETOFFLOAD when virtio-net activates, FIONBIO, TCGETS",
}
CLONE_THREAD = 0x00010000
AF_UNIX = 1
PR_SET_NAME = 15                         # prctl: a device worker names itself (pych.threads)
#: openat flags that would write, create or truncate: any of them is refused.
OPENAT_WRITE_FLAGS = (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                      | getattr(os, "O_TMPFILE", 0x410000))

# --- seccomp and classic BPF ABI (linux/seccomp.h, linux/filter.h, linux/audit.h) -----------
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
# struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64)
DATA_NR, DATA_ARCH = 0, 4


def data_arg_low(i: int) -> int:
    """Offset of the low 32 bits of argument ``i`` in struct seccomp_data (little-endian)."""
    return 16 + 8 * i


BPF_LD_W_ABS = 0x20
BPF_ALU_AND_K = 0x54
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
BPF_MAXINSNS = 4096
_INSN = struct.Struct("=HBBI")          # struct sock_filter


class _Assembler:
    """Classic BPF with symbolic jump targets, resolved to the 8-bit relative offsets
    the conditional jumps carry."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def load(self, offset: int) -> None:
        self.code.append((BPF_LD_W_ABS, 0, 0, offset))

    def and_(self, mask: int) -> None:
        self.code.append((BPF_ALU_AND_K, 0, 0, mask))

    def jump(self, op: int, k: int, jt: str | None, jf: str | None) -> None:
        """Conditional jump to label ``jt`` or ``jf`` (None: the next instruction)."""
        self.code.append((op, jt, jf, k))

    def ret(self, action: int) -> None:
        self.code.append((BPF_RET_K, 0, 0, action))

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (op, jt, jf, k) in enumerate(self.code):
            out += _INSN.pack(op, self._offset(pc, jt), self._offset(pc, jf), k)
        if len(self.code) > BPF_MAXINSNS:
            raise ValueError(f"seccomp filter too long ({len(self.code)} instructions)")
        return bytes(out)

    def _offset(self, pc: int, target) -> int:
        if not target:
            return 0
        offset = self.labels[target] - pc - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"seccomp filter jump to {target} out of range ({offset})")
        return offset


def build_vcpu_filter(default_action: int, *, allowed: Iterable[str] = VCPU_SYSCALLS) -> bytes:
    """The vCPU threads' filter as ``struct sock_filter`` bytes: :data:`VCPU_SYSCALLS`,
    ioctl/clone/clone3/socket/openat/prctl with their argument checks, and ``default_action``
    for any other x86_64 call."""
    a = _Assembler()
    a.load(DATA_ARCH)
    a.jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, None, "kill")
    a.load(DATA_NR)
    a.jump(BPF_JGE_K, X32_SYSCALL_BIT, "kill", None)
    # the hottest call first: every guest exit is one KVM_RUN ioctl
    checked = {"ioctl": "ioctl", "clone": "clone", "clone3": "clone3", "socket": "socket",
               "openat": "openat", "prctl": "prctl"}
    for name, target in checked.items():
        a.jump(BPF_JEQ_K, SYSCALL_NUMBERS[name], target, None)
    for name in allowed:
        if name in checked:
            raise ValueError(f"{name} is allowed with argument checks only")
        a.jump(BPF_JEQ_K, SYSCALL_NUMBERS[name], "allow", None)
    a.ret(default_action)

    # argument checks; classic BPF jumps only forward, so the verdicts come last
    a.label("ioctl")                     # the request's type byte
    a.load(data_arg_low(1))
    a.and_(0xFF00)
    for kind in IOCTL_TYPES:
        a.jump(BPF_JEQ_K, kind << 8, "allow", None)
    a.ret(default_action)
    a.label("clone")                     # threads only, never a new process
    a.load(data_arg_low(0))
    a.jump(BPF_JSET_K, CLONE_THREAD, "allow", "deny")
    a.label("clone3")                    # flags out of a filter's sight: use clone
    a.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
    a.label("socket")
    a.load(data_arg_low(0))
    a.jump(BPF_JEQ_K, AF_UNIX, "allow", "deny")
    a.label("openat")                    # read-only
    a.load(data_arg_low(2))
    a.jump(BPF_JSET_K, OPENAT_WRITE_FLAGS, "deny", "allow")
    a.label("prctl")                     # naming the thread, nothing else
    a.load(data_arg_low(0))
    a.jump(BPF_JEQ_K, PR_SET_NAME, "allow", "deny")

    a.label("deny")
    a.ret(default_action)
    a.label("allow")
    a.ret(SECCOMP_RET_ALLOW)
    a.label("kill")
    a.ret(SECCOMP_RET_KILL_PROCESS)
    return a.assemble()


# --- installing it ------------------------------------------------------------------------------
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SIGSYS = 31
SA_SIGINFO = 4
SYS_SECCOMP = 1                          # si_code of a SIGSYS raised by seccomp
# siginfo_t for SIGSYS: si_signo, si_errno, si_code, (pad), _call_addr, _syscall, _arch
_SI_CODE, _SI_SYSCALL = 8, 24
# ucontext_t: uc_flags, uc_link, uc_stack (24 bytes), then uc_mcontext.gregs: RAX is 13th
_UC_RAX = 40 + 13 * 8

_libc = ctypes.CDLL(None, use_errno=True)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Sigaction(ctypes.Structure):
    _fields_ = [("sa_sigaction", ctypes.c_void_p), ("sa_mask", ctypes.c_ulong * 16),
                ("sa_flags", ctypes.c_int), ("sa_restorer", ctypes.c_void_p)]


_SIGACTION_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class SeccompError(OSError):
    pass


class _State:
    mode = "false"
    program: ctypes.Array | None = None
    fprog: _SockFprog | None = None
    on_violation: Callable[[str], None] | None = None
    sigsys_handler = None               # keeps the ctypes callback alive


_state = _State()


def configure(mode: str, on_violation: Callable[[str], None] | None = None) -> None:
    """Set the process's mode (one of :data:`MODES`) before any vCPU thread starts.

    With ``true``, ``on_violation(message)`` is called on the offending thread after the
    message is written to standard error; the VMM uses it to stop the VM."""
    if mode not in MODES:
        raise ValueError(f"--seccomp must be one of {', '.join(MODES)}, not {mode!r}")
    _state.mode = mode
    _state.on_violation = on_violation
    if mode == "false":
        _state.program = _state.fprog = None
        return
    action = SECCOMP_RET_TRAP if mode == "true" else SECCOMP_RET_LOG
    code = build_vcpu_filter(action)
    _state.program = ctypes.create_string_buffer(code, len(code))
    _state.fprog = _SockFprog(len(code) // _INSN.size, ctypes.addressof(_state.program))
    if mode == "true":
        _install_sigsys_handler()


def mode() -> str:
    return _state.mode


def apply_vcpu_filter() -> None:
    """Install the configured filter on the calling thread (a vCPU thread, before its
    first KVM_RUN); nothing with mode ``false``. Raises :class:`SeccompError`."""
    fprog = _state.fprog
    if fprog is None:
        return
    # Without CAP_SYS_ADMIN the kernel wants no_new_privs first; it is per thread too.
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompError(err, f"cannot install the seccomp filter: {os.strerror(err)}")


def _install_sigsys_handler() -> None:
    if _state.sigsys_handler is not None:
        return
    handler = _SIGACTION_HANDLER(_on_sigsys)
    action = _Sigaction(sa_sigaction=ctypes.cast(handler, ctypes.c_void_p).value,
                        sa_flags=SA_SIGINFO)
    if _libc.sigaction(SIGSYS, ctypes.byref(action), None) != 0:
        err = ctypes.get_errno()
        raise SeccompError(err, f"cannot install the SIGSYS handler: {os.strerror(err)}")
    _state.sigsys_handler = handler


def violation_message(thread: str, nr: int) -> str:
    return (f"seccomp: thread {thread} made system call {syscall_name(nr)} ({nr}), which "
            f"vCPU threads may not make (--seccomp true): stopping the VM")


def _on_sigsys(signum: int, info: int, context: int) -> None:
    """SIGSYS on the offending thread: the call has not run. Make it return -ENOSYS,
    say which call it was, and have the VM stopped."""
    try:
        if ctypes.c_int.from_address(info + _SI_CODE).value != SYS_SECCOMP:
            return
        nr = ctypes.c_int.from_address(info + _SI_SYSCALL).value
        ctypes.c_int64.from_address(context + _UC_RAX).value = -errno.ENOSYS
        message = violation_message(threading.current_thread().name, nr)
        os.write(2, f"pych: error: {message}\n".encode())
        if _state.on_violation is not None:
            _state.on_violation(message)
    except BaseException:  # noqa: BLE001 - never raise out of a signal handler
        os.write(2, b"pych: error: seccomp: a vCPU thread made a forbidden system call\n")


# --- log mode: reading the kernel's records ------------------------------------------------------
_AUDIT = re.compile(r"audit: type=1326 .*?\bpid=(\d+)\b.*?\bsyscall=(\d+)\b.*?\bcode=(0x[0-9a-f]+)")


def audit_records(kernel_log: str, pid: int | None = None) -> dict[str, int]:
    """Seccomp audit records (``type=1326``) in ``kernel_log`` (``dmesg`` output), for
    process ``pid`` if given: {system call name: count}. With ``--seccomp log`` these are
    the calls vCPU threads made that the filter does not list. The kernel rate-limits
    these messages, so run again after adding what was found."""
    found: dict[str, int] = {}
    for m in _AUDIT.finditer(kernel_log):
        if pid is not None and int(m.group(1)) != pid:
            continue
        if int(m.group(3), 16) != SECCOMP_RET_LOG:
            continue
        name = syscall_name(int(m.group(2)))
        found[name] = found.get(name, 0) + 1
    return found


__all__ = ["DEFAULT_MODE", "MODES", "SYSCALL_NUMBERS", "VCPU_SYSCALLS", "SeccompError",
           "apply_vcpu_filter", "audit_records", "build_vcpu_filter", "configure", "mode",
           "syscall_name", "violation_message"]
