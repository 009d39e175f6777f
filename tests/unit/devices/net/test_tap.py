"""Host taps (pych/devices/net/tap.py) that cannot be opened or created: one clear message
each, and nothing left behind (no interface, no descriptor).

Each test runs on a thread that has moved into a network namespace of its own (only ``lo``
in it), so the host's interfaces are never touched. Needs root (CAP_NET_ADMIN) and
/dev/net/tun, as pych itself does for taps.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

import pytest

from pych.devices.net.tap import Tap, TapError

CLONE_NEWNET = 0x40000000

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="TAP TESTS NOT RUN: they need root and /dev/net/tun")


def in_new_netns(fn):
    """Run ``fn()`` on a thread in a new network namespace; return its result or raise its
    error. The namespace goes away with the thread."""
    box = {}

    def run():
        try:
            if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if "error" in box:
        raise box["error"]
    return box["value"]


def links() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


def fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def refused(name: str) -> tuple[str, list[str], bool]:
    """Try ``Tap(name)``: (the error message, the interfaces afterwards, descriptors unchanged)."""
    before = fds()
    with pytest.raises(TapError) as e:
        Tap(name)
    return str(e.value), links(), fds() == before


@pytest.mark.parametrize(("name", "message"), [
    ("a-name-of-16-bytes", "tap name 'a-name-of-16-bytes' is longer than 15 bytes"),
    ("bad/name", "tap name 'bad/name' is not a valid interface name (no '/', ':' or white "
                 "space; not '.' or '..')"),
    ("bad name", "tap name 'bad name' is not a valid interface name"),
    ("..", "tap name '..' is not a valid interface name"),
])
def test_a_bad_name_is_refused_before_the_kernel_is_asked(name, message):
    text, after, fds_unchanged = in_new_netns(lambda: refused(name))
    assert text.startswith(message)
    assert after == ["lo"] and fds_unchanged


def test_an_existing_interface_that_is_not_a_tap_is_named_as_such():
    text, after, fds_unchanged = in_new_netns(lambda: refused("lo"))
    assert text == "cannot open or create tap 'lo': an interface of that name exists and is not a tap"
    assert after == ["lo"] and fds_unchanged


def test_a_tap_in_use_is_refused_and_a_created_tap_goes_away_with_its_descriptor():
    def scenario():
        tap = Tap("pychtest0")
        created = links()
        try:
            text, during, fds_unchanged = refused("pychtest0")
        finally:
            tap.close()
        return created, text, during, fds_unchanged, links()

    created, text, during, fds_unchanged, after = in_new_netns(scenario)
    assert created == ["lo", "pychtest0"]
    assert text == "cannot open or create tap 'pychtest0': Device or resource busy (the tap is already in use)"
    assert during == ["lo", "pychtest0"] and fds_unchanged
    assert after == ["lo"]


def test_an_unnamed_tap_gets_the_first_free_vmtap_name():
    def scenario():
        first, second = Tap(), Tap("")
        try:
            return first.name, second.name
        finally:
            first.close()
            second.close()

    assert in_new_netns(scenario) == ("vmtap0", "vmtap1")


def test_queues_of_a_multi_queue_tap_by_name_and_by_fd():
    from pych.devices.net.tap import (IFF_MULTI_QUEUE, open_queues, queues_from_fds,
                                      tap_fd_flags)

    def run():
        before = fds()
        taps = open_queues(None, 2)
        try:
            names = {t.name for t in taps}
            flags = [tap_fd_flags(t.fd) & IFF_MULTI_QUEUE for t in taps]
            # by fd, as a caller passes them (fd=[a,b]): duplicates of both, one tap
            from_fds = queues_from_fds([t.fd for t in taps])
            dup_names = [t.name for t in from_fds]
            for t in from_fds:
                t.close()
            # a detached queue can be attached again
            taps[1].set_queue_enabled(False)
            taps[1].set_queue_enabled(True)
            # a plain (single-queue) tap's fd cannot stand for one of several pairs
            single = Tap("single0")
            try:
                with pytest.raises(TapError, match="IFF_MULTI_QUEUE"):
                    queues_from_fds([single.fd, taps[0].fd])
            finally:
                single.close()
            with pytest.raises(TapError, match="queues of one tap"):
                other = open_queues("other0", 2)
                try:
                    queues_from_fds([taps[0].fd, other[0].fd])
                finally:
                    for t in other:
                        t.close()
        finally:
            for t in taps:
                t.close()
        return names, flags, dup_names, links(), fds() == before

    names, flags, dup_names, after, no_fd_left = in_new_netns(run)
    assert len(names) == 1 and all(flags), (names, flags)
    assert dup_names == [next(iter(names))] * 2
    assert after == ["lo"] and no_fd_left
