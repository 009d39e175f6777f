"""The console shell's handling of a guest shell that dies mid-command (tests/support/guest.py),
against a scripted "guest" on a pair of pipes: no guest needed."""

import os
import re
import threading

import pytest

from tests.support.guest import SHELL_RESTARTED, Console, GuestError, Shell

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
    assert sent == ["[ -e /x ]\n", "\nstty -echo 2>/dev/null; PS1=''; export PS1\n", "[ -e /x ]\n"]
