"""``--landlock``: pych restricts its own file access to what its VM configuration names,
plus ``--landlock-rules``, with Linux's Landlock (docs.kernel.org/userspace-api/landlock.html).

The three system calls (``landlock_create_ruleset``, ``landlock_add_rule``,
``landlock_restrict_self``) are made with ctypes.  A Landlock domain applies to the thread
that asks for it and to the threads and processes it starts afterwards, never to threads
that already run, so :func:`restrict` is called by the main thread before it starts any
other (the API server, vCPUs, device workers, qemu-storage-daemon): the whole process is
then sandboxed, which :func:`restrict` checks (``/proc/self/task`` has one entry).

As the reference (vmm/src/landlock.rs, ``VmConfig::apply_landlock``), the ruleset handles
the file system rights of Landlock ABI 3, ``r`` allows reading and executing, ``w`` every
write right (write, truncate, create and remove entries, rename/link across directories),
and each path of the configuration gets a rule: the payload read-only, disks, memory zone
files, pmem files, sockets and console/serial files read-write, a socket still to be
created its directory.  Beyond the reference, a Python VMM also needs to read its own code
(``sys.path``, the interpreter's prefixes, and the system's ``/usr`` and ``/lib``: modules
and C extensions are loaded lazily, qemu-storage-daemon is run) and to open
``/dev/kvm`` again when the guest reboots; ``/dev/net/tun`` is always allowed (``vm.add-net``
of a VM booted without a NIC works, as without Landlock).  Device ioctls and TCP are not
restricted (not handled), as in the reference.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LandlockError", "Rule", "abi_version", "access_bits", "active", "allowed",
           "check_allowed", "own_rules", "restrict", "rules_for"]

SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

# include/uapi/linux/landlock.h
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13                 # ABI 2
TRUNCATE = 1 << 14              # ABI 3

ABI = 3
READ = EXECUTE | READ_FILE | READ_DIR
WRITE = (WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG | MAKE_SOCK
         | MAKE_FIFO | MAKE_BLOCK | MAKE_SYM | REFER | TRUNCATE)
HANDLED = READ | WRITE
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE
"""The rights a rule on a file (not a directory) may carry."""


class LandlockError(Exception):
    """Landlock cannot be set up as asked; the message says why."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_state = threading.local()
_domain: list["Rule"] | None = None       # the rules in force, once restricted


def _syscall(number: int, *args) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def abi_version() -> int:
    """The Landlock ABI the running kernel offers; 0 without Landlock."""
    try:
        return _syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except OSError:
        return 0


def access_bits(access: str) -> int:
    """``r``, ``w`` or ``rw`` (as ``--landlock-rules access=``) as Landlock rights."""
    if not access:
        raise LandlockError("Invalid landlock access: Access cannot be empty")
    bits = 0
    for char in access:
        if char == "r":
            bits |= READ
        elif char == "w":
            bits |= WRITE
        else:
            raise LandlockError(f"Invalid landlock access: Invalid access: {char}")
    return bits


@dataclass(frozen=True)
class Rule:
    """``path`` and what beneath it may be done (``r``, ``w``, ``rw``); ``why``: what in
    the configuration asks for it."""

    path: str
    access: str
    why: str = ""
    optional: bool = False        # pych's own: left out where the host lacks the path


def _add(rules: list[Rule], path: str | None, access: str, why: str,
         optional: bool = False) -> None:
    if path:
        rules.append(Rule(str(path), access, why, optional))


def _socket(rules: list[Rule], path: str | None, why: str) -> None:
    """A Unix socket pych connects to, or creates (then its directory must be writable)."""
    if not path:
        return
    if os.path.exists(path):
        _add(rules, path, "rw", why)
    else:
        _add(rules, os.path.dirname(os.path.abspath(path)), "rw", why + " (to create)")


def _listening(rules: list[Rule], path: str | None, why: str) -> None:
    """A Unix socket pych listens on: it removes a stale one and binds it again, in its
    directory."""
    if path:
        _add(rules, os.path.dirname(os.path.abspath(path)), "rw", why)


def _created_file(rules: list[Rule], path: str | None, why: str) -> None:
    if not path:
        return
    if os.path.exists(path):
        _add(rules, path, "rw", why)
    else:
        _add(rules, os.path.dirname(os.path.abspath(path)), "rw", why + " (to create)")


def _output(rules: list[Rule], output, name: str) -> None:
    if output is None:
        return
    if output.mode == "Pty":
        _add(rules, "/dev/pts", "rw", f"{name} pty")
        _add(rules, "/dev/ptmx", "rw", f"{name} pty")
    elif output.mode == "File":
        _created_file(rules, output.file, f"{name} file")
    elif output.mode == "Socket":
        _listening(rules, output.socket, f"{name} socket")


def rules_for(config, api_socket: str | None = None) -> list[Rule]:
    """What pych with the VM configuration ``config`` (a VmConfig) may access: the paths
    the configuration names, its ``landlock_rules``, and what pych itself needs."""
    rules: list[Rule] = []
    payload = config.payload
    if payload is not None:
        for what in ("firmware", "kernel", "initramfs"):
            _add(rules, getattr(payload, what, None), "r", f"payload {what}")
    for zone in config.memory.zones or ():
        _add(rules, zone.file, "rw", f"memory zone {zone.id}")
    for disk in config.disks or ():
        _add(rules, disk.path, "rw", "disk")
        _socket(rules, disk.vhost_socket, "vhost-user disk")
    for net in config.net or ():
        _socket(rules, net.vhost_socket, "vhost-user net")
    if config.rng is not None:
        _add(rules, config.rng.src, "r", "rng")
    for fs in config.fs or ():
        _socket(rules, fs.socket, "fs")
    for pmem in config.pmem or ():
        _add(rules, pmem.file, "r" if pmem.discard_writes else "rw", "pmem")
    _output(rules, config.console, "console")
    _output(rules, config.serial, "serial")
    if config.devices:
        _add(rules, "/dev/vfio", "rw", "VFIO")
        for device in config.devices:
            _add(rules, device.path, "rw", "VFIO device")
    if config.vsock is not None:
        _listening(rules, config.vsock.socket, "vsock")
    if any(disk.path and not disk.vhost_user and _needs_storage_daemon(disk.path)
           for disk in config.disks or ()):
        _add(rules, tempfile.gettempdir(), "rw", "qemu-storage-daemon's socket")
    rules += own_rules(api_socket)
    for rule in config.landlock_rules or ():
        _add(rules, rule.path, rule.access, "--landlock-rules")
    return [rule for rule in rules if not rule.optional or os.path.exists(rule.path)]


def own_rules(api_socket: str | None = None) -> list[Rule]:
    """What pych itself needs under any configuration (those of these paths the host has)."""
    rules: list[Rule] = []
    own = [("/dev/kvm", "rw", "KVM (a reboot opens it again)"),
           ("/dev/net/tun", "rw", "taps"),
           ("/dev/null", "rw", "child processes' standard streams"),
           ("/proc/self", "rw", "pych's own /proc entries"),
           ("/sys/kernel/mm/hugepages", "r", "huge page pools"),
           ("/etc/ld.so.cache", "r", "shared libraries"),
           # the system's programs and shared libraries, read-only: C extensions are loaded
           # lazily too (pydantic-core needs libgcc_s), qemu-storage-daemon is run
           ("/usr", "r", "the system's programs and libraries"),
           ("/lib", "r", "the system's libraries"),
           ("/lib64", "r", "the system's libraries")]
    if api_socket:
        own.append((os.path.dirname(os.path.abspath(api_socket)), "w",
                    "the API socket (removed at exit)"))
    own += [(path, "r", "pych's Python code") for path in _python_paths()]
    for path, access, why in own:
        _add(rules, path, access, why, optional=True)
    return [rule for rule in rules if os.path.exists(rule.path)]


def _needs_storage_daemon(path: str) -> bool:
    """Whether the disk image at ``path`` is served by a qemu-storage-daemon (not raw)."""
    try:
        from pych.devices.disk_format import detect_format

        return detect_format(path) != "Raw"
    except Exception:
        return False


def _python_paths() -> Iterator[str]:
    seen = set()
    for path in (sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable),
                 str(Path(__file__).resolve().parents[1]), *sys.path):
        if path and path not in seen and os.path.exists(path):
            seen.add(path)
            yield path


def restrict(rules: Iterable[Rule]) -> None:
    """Sandbox the whole process to ``rules``.  Must be called by the only thread of the
    process (before any other starts: a thread already running would stay outside).
    Raises :class:`LandlockError` naming what fails: no Landlock in the kernel, a path
    that does not exist, another thread running."""
    global _domain
    rules = list(rules)
    tasks = os.listdir("/proc/self/task")
    if len(tasks) != 1 or threading.active_count() != 1:
        raise LandlockError(f"--landlock must be applied before pych starts any thread "
                            f"({len(tasks)} threads run)")
    version = abi_version()
    if version < ABI:
        raise LandlockError(
            "the kernel offers no Landlock" if version == 0 else
            f"the kernel offers Landlock ABI {version}; pych needs ABI {ABI} (Linux 6.2)")
    attr = _RulesetAttr(HANDLED)
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    try:
        for rule in rules:
            _add_rule(ruleset, rule)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise LandlockError(f"cannot set no_new_privs: {os.strerror(err)}")
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    except OSError as e:
        raise LandlockError(f"cannot apply the Landlock ruleset: {e.strerror}") from None
    finally:
        os.close(ruleset)
    _domain = rules


def _add_rule(ruleset: int, rule: Rule) -> None:
    try:
        fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise LandlockError(f"landlock rule for {rule.path} ({rule.why}): "
                            f"{e.strerror}") from None
    try:
        access = access_bits(rule.access)
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= FILE_RIGHTS
        attr = _PathBeneathAttr(access, fd)
        try:
            _syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                     ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(attr),
                     ctypes.c_uint32(0))
        except OSError as e:
            raise LandlockError(f"landlock rule for {rule.path} ({rule.why}): "
                                f"{e.strerror}") from None
    finally:
        os.close(fd)


def active() -> bool:
    """Whether this process is sandboxed by :func:`restrict`."""
    return _domain is not None


def allowed(path: str, access: str, rules: Iterable[Rule] | None = None) -> bool:
    """Whether ``rules`` (the rules in force by default) allow ``access`` (``r``, ``w``,
    ``rw``) on ``path``: some rule's path is ``path`` or a directory above it (symbolic
    links resolved, as the kernel sees the file).  Rights add up across rules."""
    rules = _domain if rules is None else list(rules)
    if rules is None:
        return True
    wanted = access_bits(access)
    target = os.path.realpath(path)
    exists = os.path.exists(target)
    granted = 0
    for rule in rules:
        base = os.path.realpath(rule.path)
        if target == base or target.startswith(base.rstrip("/") + "/"):
            granted |= access_bits(rule.access)
    if exists and not os.path.isdir(target):
        wanted &= FILE_RIGHTS
        granted &= FILE_RIGHTS
    return wanted & granted == wanted


def check_allowed(paths: Iterable[tuple[str, str, str]]) -> None:
    """Raise :class:`LandlockError` for the first ``(what, path, access)`` the sandbox in
    force does not allow, naming it; nothing when pych runs without ``--landlock``."""
    if _domain is None:
        return
    for what, path, access in paths:
        if not allowed(path, access):
            raise LandlockError(
                f"{what} {path} is outside pych's Landlock sandbox (--landlock allows the "
                f"VM configuration's paths and --landlock-rules; start pych with "
                f"--landlock-rules path=<it or its directory>,access=rw to hot plug it)")
