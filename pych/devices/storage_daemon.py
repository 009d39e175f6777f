"""A qemu-storage-daemon that pych starts and owns for one disk image in a format pych does
not serve in-process (qcow2, VHDX, VMDK, VDI, VHD ...).

QEMU's block layer reads the format (and follows backing files); the daemon exports the
virtual disk as vhost-user-blk on a socket in a private directory, which the disk's
:class:`~pych.devices.virtio.vhost_user_blk.VhostUserBlock` connects to, so the guest's
I/O goes from the guest's rings to the daemon without passing through pych. pych talks to
the daemon's QMP monitor (a second socket) for ``vm.resize-disk`` (``block_resize``).

Lifecycle: :meth:`StorageDaemon.start` returns once the export's socket accepts
connections (or raises :class:`StorageDaemonError` with the daemon's own words); the device
is announced to the guest only after that. :meth:`StorageDaemon.stop` (removal, shutdown,
pych's exit on SIGTERM) asks it to quit (SIGTERM: it flushes and closes the image), then
kills it if it does not within a few seconds, and removes the directory. Should pych die
without stopping it (SIGKILL), the kernel sends the daemon SIGTERM (PR_SET_PDEATHSIG), so
no daemon outlives its owner holding the image.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import queue
import tempfile
import threading
import time

from pych.devices.vhost_user import VhostUserError, VhostUserFrontend

log = logging.getLogger(__name__)

QEMU_STORAGE_DAEMON = "/usr/bin/qemu-storage-daemon"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
QMP_TIMEOUT = 10.0

#: The API's image types, as QEMU's block drivers name them.
QEMU_DRIVERS = {"Qcow2": "qcow2", "Vhdx": "vhdx", "FixedVhd": "vpc", "FlatVmdk": "vmdk",
                "sparse VMDK": "vmdk", "VDI": "vdi", "dynamic VHD": "vpc",
                "differencing VHD": "vpc", "Raw": "raw"}

NODE = "disk"
PR_SET_PDEATHSIG = 1


def qemu_driver(fmt: str) -> str | None:
    """QEMU's block driver for the format :func:`~pych.devices.disk_format.detect_format`
    named, or None."""
    if fmt.startswith("QCOW (version"):
        return "qcow"
    return QEMU_DRIVERS.get(fmt)


def connect_when_listening(path: str, timeout: float = 2.0) -> VhostUserFrontend:
    """Connect to a just-started daemon's export, retrying while it is not listening yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return VhostUserFrontend.connect(path)
        except VhostUserError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


class StorageDaemonError(OSError):
    """The daemon could not be started, died, or refused a command."""


class StorageDaemon:
    """qemu-storage-daemon serving ``image`` (QEMU block driver ``driver``) as vhost-user-blk
    with ``num_queues`` queues; read-only if ``readonly``. ``name``: the disk's id (for
    messages and the directory's name)."""

    def __init__(self, image: str, driver: str, *, readonly: bool = False, num_queues: int = 1,
                 name: str = "disk", executable: str = QEMU_STORAGE_DAEMON) -> None:
        self.image = os.path.abspath(image)
        self.driver = driver
        self.readonly = readonly
        self.num_queues = num_queues
        self.name = name
        self.executable = executable
        self.process: subprocess.Popen | None = None
        self.directory = ""
        self.socket_path = ""
        self.monitor_path = ""
        self._stderr_path = ""

    # --- starting and stopping ----------------------------------------------------------------
    def command(self) -> list[str]:
        blockdev = {"driver": self.driver, "node-name": NODE, "read-only": self.readonly,
                    "file": {"driver": "file", "filename": self.image,
                             "read-only": self.readonly}}
        export = {"type": "vhost-user-blk", "id": "export", "node-name": NODE,
                  "writable": not self.readonly, "num-queues": self.num_queues,
                  "addr": {"type": "unix", "path": self.socket_path}}
        return [self.executable,
                "--blockdev", json.dumps(blockdev),
                "--export", json.dumps(export),
                "--chardev", f"socket,id=monitor,path={self.monitor_path},server=on,wait=off",
                "--monitor", "chardev=monitor"]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the daemon and wait until its export accepts connections (on the VMM's
        control loop or main thread, not a vCPU thread)."""
        _Reaper.instance()
        self.directory = tempfile.mkdtemp(prefix=f"pych-qsd-{self.name}-")
        self.socket_path = os.path.join(self.directory, "vhost-user-blk.sock")
        self.monitor_path = os.path.join(self.directory, "qmp.sock")
        self._stderr_path = os.path.join(self.directory, "stderr")
        try:
            with open(self._stderr_path, "wb") as stderr:
                self.process = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                    close_fds=True, preexec_fn=_die_with_parent)
        except OSError as e:
            self._remove_directory()
            raise StorageDaemonError(f"cannot start {self.executable} for disk {self.name}: "
                                     f"{e.strerror or e}") from None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                why = self.exit_description()
                self.stop()
                raise StorageDaemonError(why)
            if _accepts(self.socket_path):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise StorageDaemonError(f"qemu-storage-daemon for disk {self.name} did not "
                                         f"open its export within {timeout:g} s")
            time.sleep(0.005)
        log.info("%s: qemu-storage-daemon (pid %d) serves %s (%s) at %s", self.name,
                 self.process.pid, self.image, self.driver, self.socket_path)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_description(self) -> str:
        """What became of the daemon, in one sentence with its last words."""
        process = self.process
        code = process.poll() if process is not None else None
        if code is None:
            state = "is running"
        elif code < 0:
            state = f"was killed by signal {-code}"
        else:
            state = f"exited with status {code}"
        said = self._last_words()
        return (f"qemu-storage-daemon for disk {self.name} ({self.image}) {state}"
                + (f": {said}" if said else ""))

    def _last_words(self) -> str:
        try:
            with open(self._stderr_path, "rb") as f:
                lines = [line.strip() for line in f.read().decode(errors="replace").splitlines()
                         if line.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def stop(self) -> None:
        """Ask the daemon to quit (it flushes and closes the image), kill it if it does not,
        and remove its directory; returns when done. Idempotent.

        Callable from any thread: the work is done on the reaper thread pych started with
        its first daemon, because the thread that removes a device may be a vCPU thread (the
        guest ejects it), whose seccomp filter forbids signalling and waiting for processes."""
        process, self.process = self.process, None
        directory, self.directory = self.directory, ""
        if process is None and not directory:
            return
        _Reaper.instance().run(lambda: self._end(process, directory))

    def _end(self, process: subprocess.Popen | None, directory: str) -> None:
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log.warning("%s: qemu-storage-daemon did not quit within %g s; killing it",
                                self.name, STOP_TIMEOUT)
                    process.kill()
                    process.wait()
            log.info("%s: qemu-storage-daemon (pid %d) stopped", self.name, process.pid)
        if directory:
            shutil.rmtree(directory, ignore_errors=True)

    def _remove_directory(self) -> None:
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = ""

    # --- QMP ------------------------------------------------------------------------------------
    def resize(self, size: int) -> None:
        """Grow the virtual disk to ``size`` bytes (QMP ``block_resize``)."""
        self.qmp("block_resize", {"node-name": NODE, "size": size})

    def qmp(self, command: str, arguments: dict | None = None) -> object:
        """Run one QMP command on a fresh monitor connection; its ``return``. Raises
        StorageDaemonError with QEMU's message."""
        if not self.running():
            raise StorageDaemonError(self.exit_description())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(QMP_TIMEOUT)
            try:
                sock.connect(self.monitor_path)
                stream = sock.makefile("rwb")
                _read_reply(stream)                             # the greeting
                _send(stream, {"execute": "qmp_capabilities"})
                _read_reply(stream)
                message = {"execute": command}
                if arguments:
                    message["arguments"] = arguments
                _send(stream, message)
                reply = _read_reply(stream)
            except (OSError, ValueError) as e:
                raise StorageDaemonError(f"qemu-storage-daemon for disk {self.name}: QMP "
                                         f"{command} failed: {e}") from None
        if "error" in reply:
            raise StorageDaemonError(f"qemu-storage-daemon for disk {self.name} refused "
                                     f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")


class _Reaper:
    """One thread that stops daemons for whoever asks (see :meth:`StorageDaemon.stop`),
    started by the first :meth:`StorageDaemon.start`, on a thread free to make it."""

    _instance: "_Reaper | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="qsd-reaper", daemon=True)
        self._thread.start()

    @classmethod
    def instance(cls) -> "_Reaper":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, job) -> None:
        """Run ``job`` on the reaper thread and wait for it (at once if this is it)."""
        if threading.current_thread() is self._thread:
            job()
            return
        done = threading.Event()
        self._jobs.put((job, done))
        done.wait()

    def _serve(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                job()
            except Exception:  # noqa: BLE001 - a failed stop must not end the reaper
                log.exception("stopping a qemu-storage-daemon")
            finally:
                done.set()


def _accepts(path: str) -> bool:
    """Whether the daemon has created its export's socket. (Not probed with a connection:
    the export serves one front end at a time and tears a closed one down asynchronously,
    so a probe could make pych's own connection be refused; the caller retries a refused
    connection briefly instead.)"""
    return os.path.exists(path)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when pych dies (even by SIGKILL), so an image is
    never left open by a daemon nobody owns."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _send(stream, message: dict) -> None:
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()


def _read_reply(stream) -> dict:
    """The next line that is not an asynchronous event."""
    while True:
        line = stream.readline()
        if not line:
            raise ValueError("the monitor closed the connection")
        reply = json.loads(line)
        if "event" not in reply:
            return reply
