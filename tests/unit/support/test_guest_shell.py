"""The console shell's handling of a guest shell that dies mid-command (tests/support/guest.py),
against a scripted "guest" on a pair of pipes, and the shell it prepares, against Debian's
busybox (the test guest's shell) on a pseudo-terminal: no guest needed."""

import os
import pty
import re
import subprocess
import threading
import time

import pytest

from tests.support.guest import (IGNORED_EOF, PREPARE_COMMAND, SHELL_RESTARTED, Console,
                                 GuestError, Shell)

BUSYBOX = "/bin/busybox"

BANNER = b"\r\nBusyBox v1.35.0 built-in shell (ash)\r\nEnter 'help' for a list of built-in commands.\r\n"


def scripted_guest(replies):
    """A Console whose guest answers the n-th command line batch with replies[n](tag)."""
    to_guest_r, to_guest_w = os.pipe()
    from_guest_r, from_guest_w = os.pipe()
    sent = []

    def guest():
        pending = b""
        while True:
            data = os.read(to_guest_r, 4096)
            if not data:
                return
            pending += data
            while (m := re.search(rb"printf '@@%s@@%d@@\\n' (\w+) \$\?\n", pending)):
                sent.append(pending[:m.start()].decode())
                reply = replies[min(len(sent), len(replies)) - 1](m.group(1))
                pending = pending[m.end():]
                os.write(from_guest_w, reply)

    threading.Thread(target=guest, daemon=True).start()
    return Console(from_guest_r, to_guest_w), sent


def answer(tag):
    return b"output\r\n@@" + tag + b"@@0@@\r\n"


def dies(tag):
    return b"partial\r\n" + SHELL_RESTARTED + b"\r\n" + BANNER


def test_a_command_lost_with_its_shell_is_an_error_at_once_not_a_timeout():
    console, sent = scripted_guest([dies])
    with pytest.raises(GuestError, match="shell exited while running 'cat /x'"):
        Shell(console).run("cat /x", timeout=30)
    assert sent == ["cat /x\n"]


def test_a_poll_is_sent_again_to_the_new_shell():
    console, sent = scripted_guest([dies, answer, answer])
    rc, out = Shell(console).run("[ -e /x ]", timeout=30, again_if_shell_restarts=True)
    assert (rc, out) == (0, "output")
    assert sent == ["[ -e /x ]\n",
                    f"\n{PREPARE_COMMAND}\n",
                    "[ -e /x ]\n"]


@pytest.fixture
def busybox_shell(tmp_path):
    """busybox's ash as the guest's init runs it (``setsid -c``: a session leader whose
    controlling terminal is its console), on a pseudo-terminal; (process, Shell)."""
    if not os.path.exists(BUSYBOX):
        pytest.fail(f"{BUSYBOX} is missing: scripts/install-deps.sh installs it (busybox-static)")
    master, slave = pty.openpty()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), "TERM": "linux",
           "COLUMNS": "1000"}
    proc = subprocess.Popen([BUSYBOX, "setsid", "-c", BUSYBOX, "sh", "-i"], stdin=slave,
                            stdout=slave, stderr=slave, env=env, cwd=tmp_path)
    os.close(slave)
    console = Console(master, master)
    try:
        yield proc, Shell(console)
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def test_the_prepared_shell_survives_a_background_job_ending_while_it_waits(busybox_shell):
    """A background job whose process ends while the shell waits for its next command
    interrupts the shell's read of it (SIGCHLD; with echo off busybox reads with fgets()):
    unprepared, ash takes that for the end of input and exits (the guest's init then prints
    SHELL_RESTARTED). Prepared, it says IGNORED_EOF, reads on, and keeps its settings."""
    proc, shell = busybox_shell
    shell.prepare(timeout=30)
    # the job ends while the shell waits (in the guest, where a fork and exec take ~0.5 s,
    # ``setsid sh -c '...' &`` does it: setsid's first process forks and exits)
    rc, _ = shell.run("sleep 0.5 &", timeout=30)
    assert rc == 0
    start = len(shell.console.buf)
    time.sleep(1.5)                                  # the notice waits, unread, meanwhile
    assert proc.poll() is None
    rc, out = shell.run("echo \"[$PS1]\" $$", timeout=30)
    notice = IGNORED_EOF.replace("\n", "\r\n").encode()
    assert notice in shell.console.buf[start:]       # the read was interrupted ...
    assert rc == 0 and IGNORED_EOF.strip() not in out, out      # ... its notice is no output
    assert out.splitlines()[-1] == f"[] {proc.pid}", out     # the same shell, still prepared
