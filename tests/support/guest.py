"""Drive a booted guest over its serial console: wait for lines, run shell commands.

Used by the guest tests, ``bench/`` and ``make demo``. The same :class:`Console` works for
a guest under pych (serial on a Unix socket) and under QEMU (serial on a pipe), so the
benchmarks compare both on equal terms.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("PYCH_GUEST_DIR", REPO / "build" / "guest"))
READY = b"GUEST-READY"


class GuestError(Exception):
    pass


def guest_artifacts() -> dict[str, Path]:
    paths = {name: GUEST_DIR / name for name in ("vmlinux", "bzImage", "initramfs.cpio", "cmdline")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise GuestError(f"test guest not built ({', '.join(missing)} missing): run `make guest`")
    return paths


def guest_cmdline(extra: str = "") -> str:
    base = guest_artifacts()["cmdline"].read_text().strip()
    return f"{base} {extra}".strip()


# what Shell.prepare runs (see there)
PREPARE_COMMAND = "stty -echo 2>/dev/null; set -o ignoreeof; PS1=''; export PS1; dmesg -n 1"


class Console:
    """A byte stream to a guest's serial console (a socket or a pair of pipe fds)."""

    def __init__(self, rfd: int, wfd: int, log_path: Path | None = None):
        self.rfd, self.wfd = rfd, wfd
        self.buf = bytearray()
        self.log = open(log_path, "ab", buffering=0) if log_path else None
        self.eof = False

    @classmethod
    def connect_unix(cls, path: str, timeout: float, log_path: Path | None = None,
                     alive=lambda: True) -> "Console":
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                c = cls(s.fileno(), s.fileno(), log_path)
                c._sock = s
                return c
            except OSError:
                s.close()
                if time.monotonic() > deadline or not alive():
                    raise GuestError(f"serial socket {path} never accepted a connection")
                time.sleep(0.05)

    def _fill(self, timeout: float) -> bool:
        r, _, _ = select.select([self.rfd], [], [], max(timeout, 0))
        if not r:
            return False
        data = os.read(self.rfd, 65536)
        if not data:
            self.eof = True
            return False
        if self.log:
            self.log.write(data)
        self.buf += data
        return True

    def expect(self, pattern: bytes | re.Pattern, timeout: float, start: int = 0) -> re.Match:
        """Wait until ``pattern`` appears in the output at or after ``start``."""
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, start)
            if m:
                return m
            if self.eof:
                raise GuestError(f"console closed while waiting for {rx.pattern!r}; "
                                 f"last output: {self.tail()!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"timed out after {timeout:.0f} s waiting for {rx.pattern!r}; "
                                 f"last output: {self.tail()!r}")
            self._fill(min(left, 1.0))

    def tail(self, n: int = 600) -> str:
        return self.buf[-n:].decode(errors="replace")

    def send(self, text: str) -> None:
        data = text.encode()
        while data:
            n = os.write(self.wfd, data)
            data = data[n:]

    def close(self) -> None:
        if getattr(self, "_sock", None):
            self._sock.close()
        if self.log:
            self.log.close()


SHELL_RESTARTED = b"pych-guest: shell exited, restarting it"
"""What the test guest's init (guest/init) prints when its console shell has ended."""

IGNORED_EOF = '\nUse "exit" to leave shell.\n'
"""What the console shell (busybox ash with ``ignoreeof``) prints, instead of exiting, when
reading its next command fails; :meth:`Shell.run` drops it from outputs.

Why the shell is told to ignore an end of input: with the terminal's echo off
(:meth:`Shell.prepare`), busybox's line editor reads a command line with ``fgets()``, and
ash catches SIGCHLD without SA_RESTART. A background job (``cmd &``: its process is the
shell's child) that ends while the shell waits for the next command interrupts that read
(EINTR); busybox 1.35 takes the failed ``fgets()`` for the end of input and the shell exits
(status 0; the guest's init prints SHELL_RESTARTED and starts a new shell, without the
prompt settings). ``setsid sh -c '...' &`` always does it: setsid's first process forks
and exits at once. With ``ignoreeof`` ash prints this notice and reads again."""


class Shell:
    """Runs commands in the guest's console shell and returns (exit code, output)."""

    def __init__(self, console: Console):
        self.console = console

    def prepare(self, timeout: float = 180) -> None:
        """Quiet the shell (no echo, no prompt) and the kernel's console messages (only
        emergencies: a stall warning of a guest slowed by a loaded host would otherwise land
        in the middle of a command's output; ``dmesg`` still has them) so outputs come back
        clean, and keep the shell from exiting when a background job ends while it waits
        (see IGNORED_EOF). ``timeout`` is wide: the first command after a boot waits for
        the shell to start, which a loaded host delays by minutes."""
        c = self.console
        c.send("\n")
        self.run(PREPARE_COMMAND, timeout=timeout, check=False)

    def run(self, cmd: str, timeout: float = 120, check: bool = False, *,
            again_if_shell_restarts: bool = False) -> tuple[int, str]:
        """Run ``cmd``; (exit code, output). If the guest's console shell dies while ``cmd``
        runs (the test guest's init prints SHELL_RESTARTED and starts a new one), the command
        is lost: a GuestError says so at once, or, for a command that may safely run twice
        (``again_if_shell_restarts``: a poll), it is sent once more to the new shell."""
        c = self.console
        tag = uuid.uuid4().hex[:12]
        start = len(c.buf)
        # The marker is assembled by printf, so the command's own echo never matches it.
        c.send(f"{cmd}\nprintf '@@%s@@%d@@\\n' {tag} $?\n")
        m = c.expect(re.compile(rb"@@" + tag.encode() + rb"@@(\d+)@@|" + SHELL_RESTARTED),
                     timeout, start)
        if m.group(0) == SHELL_RESTARTED:
            if not again_if_shell_restarts:
                raise GuestError(f"the guest's shell exited while running {cmd!r}; "
                                 f"last output: {c.tail()!r}")
            print(f"guest shell restarted while running {cmd!r}: sending it again",
                  file=sys.stderr)
            c.expect(b"built-in commands", 60, m.end())
            self.prepare()
            return self.run(cmd, timeout, check)
        out = (c.buf[start:m.start()].decode(errors="replace").replace("\r", "")
               .replace(IGNORED_EOF, "\n"))
        lines = [ln for ln in out.split("\n")
                 if not (ln.startswith(cmd.split("\n")[0]) and ln.strip() == cmd.strip())]
        rc = int(m.group(1))
        text = "\n".join(lines).strip("\n")
        if check and rc != 0:
            raise GuestError(f"guest command {cmd!r} failed ({rc}): {text}")
        return rc, text


class _PychProcess:
    """What :class:`PychGuest` and :class:`ApiOnlyPych` share: the pych process, its log
    file, and the guest's console and shell once there is one."""

    proc: "subprocess.Popen | None" = None
    console: "Console | None" = None
    shell: "Shell | None" = None
    log_path: Path
    _log_file = None

    def run(self, cmd: str, timeout: float = 120, check: bool = False, *,
            again_if_shell_restarts: bool = False) -> tuple[int, str]:
        return self.shell.run(cmd, timeout, check,
                              again_if_shell_restarts=again_if_shell_restarts)

    def pych_log(self) -> str:
        """The last 3000 characters pych wrote (its stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL if pych has not ended within ``timeout`` s; close the
        console and the log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.console is not None:
            self.console.close()
        if self._log_file is not None:
            self._log_file.close()


class PychGuest(_PychProcess):
    """A pych process booting the test guest, with its serial socket and API socket."""

    def __init__(self, workdir: Path, *, cpus: str = "boot=1", memory: str = "size=256M",
                 extra_args: list[str] | None = None, cmdline_extra: str = "",
                 kernel: str = "vmlinux", api: bool = True, env: dict | None = None):
        art = guest_artifacts()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_path = str(self.workdir / "serial.sock")
        self.api_path = str(self.workdir / "api.sock") if api else None
        self.log_path = self.workdir / "pych.log"
        self.args = [
            str(REPO / ".venv" / "bin" / "pych"),
            "--kernel", str(art[kernel]), "--initramfs", str(art["initramfs.cpio"]),
            "--cmdline", guest_cmdline(cmdline_extra),
            "--cpus", cpus, "--memory", memory,
            "--serial", f"socket={self.serial_path}", "--console", "off",
        ]
        if api:
            self.args += ["--api-socket", self.api_path]
        self.args += extra_args or []
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.console: Console | None = None
        self.shell: Shell | None = None
        self.boot_started = 0.0

    def start(self) -> "PychGuest":
        self.boot_started = time.monotonic()
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=self._log_file, env=self.env)
        self.console = Console.connect_unix(self.serial_path, 30, self.workdir / "console.log",
                                            alive=lambda: self.proc.poll() is None)
        self.shell = Shell(self.console)
        return self

    def wait_ready(self, timeout: float = 600, start: int = 0) -> float:
        """Wait for GUEST-READY (after ``start`` in the output); returns seconds since start."""
        try:
            self.console.expect(READY, timeout, start)
        except GuestError as e:
            raise GuestError(f"{e}\npych log: {self.pych_log()}") from None
        took = time.monotonic() - self.boot_started
        self.shell.prepare()
        return took

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"pych still running after {timeout} s; log: {self.pych_log()}") from None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()



class ApiOnlyPych(_PychProcess):
    """A pych started with only ``--api-socket`` (plus ``extra_args``; in network namespace
    ``netns`` if given): a client creates and boots its VM over the API, as Kata Containers
    does, or it receives a migrated one. Once a guest runs in it, :meth:`attach_console`
    connects to the serial socket that VM's configuration names, and :meth:`run` drives the
    guest's shell as :class:`PychGuest` does."""

    def __init__(self, workdir: Path, name: str = "pych", *, extra_args: list[str] | None = None,
                 netns: str | None = None, api_path: str | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.api_path = api_path or str(self.workdir / f"{name}.api")
        self.log_path = self.workdir / f"{name}.log"
        self._log_file = open(self.log_path, "ab")
        args = [str(REPO / ".venv" / "bin" / "pych"), "--api-socket", self.api_path,
                *(extra_args or [])]
        if netns:
            args = ["ip", "netns", "exec", netns, *args]     # it exec()s: the same pid
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=self._log_file)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.api_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise GuestError(f"pych did not start: {self.pych_log()}")
            time.sleep(0.05)

    def put(self, endpoint: str, body: dict | None = None) -> tuple[int, str]:
        from pych.api.client import ApiClient
        status, data = ApiClient(self.api_path).put(endpoint, body)
        return status, data.decode()

    def info(self) -> dict:
        from pych.api.client import ApiClient
        return json.loads(ApiClient(self.api_path).get("vm.info")[1])

    def attach_console(self, serial_path: str, *, wait_ready: bool = False,
                       timeout: float = 300) -> None:
        """Connect to the guest's serial socket; with ``wait_ready`` (a VM just booted), wait
        for its GUEST-READY line first. Then prepare its shell."""
        self.console = Console.connect_unix(serial_path, 60, self.workdir / "console.log",
                                            alive=lambda: self.proc.poll() is None)
        if wait_ready:
            try:
                self.console.expect(READY, timeout)
            except GuestError as e:
                raise GuestError(f"{e}\npych log: {self.pych_log()}") from None
        self.shell = Shell(self.console)
        self.shell.prepare()


def qemu_command(art: dict[str, Path], *, machine: str = "microvm,acpi=on", memory: str = "256M",
                 smp: str = "1", cmdline: str | None = None) -> list[str]:
    return ["qemu-system-x86_64", "-M", machine, "-enable-kvm",
            "-cpu", "host,-arch-capabilities,-cx16", "-m", memory, "-smp", smp,
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", str(art["vmlinux"]), "-initrd", str(art["initramfs.cpio"]),
            "-append", cmdline if cmdline is not None else guest_cmdline()]


def mem_total_kib(guest: PychGuest) -> int:
    """The guest's MemTotal in KiB, read from /proc/meminfo."""
    rc, out = guest.run("grep MemTotal /proc/meminfo")
    assert rc == 0, out
    return int(re.search(r"MemTotal:\s+(\d+) kB", out).group(1))


def vm_info(guest: PychGuest) -> dict:
    """``vm.info`` of the guest's pych, as JSON."""
    from pych.api.client import ApiClient

    status, body = ApiClient(guest.api_path).get("vm.info")
    assert status == 200, body
    return json.loads(body)
