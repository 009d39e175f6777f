"""Host tap interfaces for virtio-net: open or create one, configure its host side.

A :class:`Tap` is one queue of a tap interface opened through ``/dev/net/tun`` with
``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``: every frame read or written starts with a
12-byte ``virtio_net_hdr_v1``, so frames pass between the tap and the guest's virtio
buffers unchanged (checksum and segmentation offloads included).  The fd is
non-blocking.

A tap created here (no name, or a name that does not exist) is not persistent: it
disappears when its last fd is closed, so a failed or finished VM leaves nothing behind.
An existing (persistent) tap is opened as it is and outlives us.

A tap can also come as an open fd from whoever set it up (``--net fd=[3]``, or
``vm.add-net`` with the fd passed by SCM_RIGHTS, as Kata Containers does):
:meth:`Tap.from_fd` checks with ``TUNGETIFF`` that the fd is a tap queue opened the way
virtio-net needs (``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``) and works on a duplicate of it,
so the caller's fd stays open for the next VM incarnation (a reboot) and is closed by
whoever received it (the VMM, when the device is removed or the VM deleted).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct

log = logging.getLogger(__name__)

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_MULTI_QUEUE = 0x0100
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

IFNAMSIZ = 16
#: The kernel picks the first free name matching this pattern (the reference's default).
DEFAULT_NAME_PATTERN = "vmtap%d"
VNET_HDR_SIZE = 12                      # struct virtio_net_hdr_v1 (virtio 1.x, any features)

_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")   # ifr_name, ifr_flags, union padding (40 bytes)


class TapError(OSError):
    """The tap cannot be opened or configured; the message says which and why."""


def _check_name(name: str) -> None:
    """The kernel's rules for an interface name (``dev_valid_name``), checked before asking
    it, so a bad name gets a message that says what is wrong with it."""
    if len(name.encode()) >= IFNAMSIZ:
        raise TapError(f"tap name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise TapError(f"tap name {name!r} is not a valid interface name "
                       "(no '/', ':' or white space; not '.' or '..')")


def _why(name: str, error: OSError) -> str:
    """Why TUNSETIFF refused ``name``, in words."""
    if error.errno == errno.EPERM:
        return f"{error.strerror} (needs CAP_NET_ADMIN)"
    if error.errno == errno.EBUSY:
        return f"{error.strerror} (the tap is already in use)"
    if error.errno == errno.EINVAL:
        try:
            socket.if_nametoindex(name)
        except OSError:
            return error.strerror
        return "an interface of that name exists and is not a tap"
    return error.strerror


def tap_fd_name(fd: int) -> str:
    """The name of the tap interface whose queue ``fd`` is; raises :class:`TapError`
    saying why ``fd`` cannot be a virtio-net backend: not open, not a ``/dev/net/tun``
    fd, not attached to an interface, a tun rather than a tap, or opened without
    ``IFF_VNET_HDR`` (frames would lack the virtio-net header, and the flag cannot be
    set on an attached fd). ``IFF_NO_PI`` is not checked: the kernel's ``TUNGETIFF``
    reports it whether or not it was asked for (measured on 6.18)."""
    try:
        answer = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    except OSError as e:
        if e.errno == errno.EBADF:
            why = "is not an open file descriptor"
        elif e.errno == errno.EBADFD:
            why = "is a /dev/net/tun fd not attached to any interface (no TUNSETIFF)"
        else:
            why = f"is not a tap (TUNGETIFF: {e.strerror})"
        raise TapError(f"fd {fd} {why}") from e
    raw_name, flags = _IFREQ.unpack(answer)
    name = raw_name.rstrip(b"\0").decode()
    if not flags & IFF_TAP:
        raise TapError(f"fd {fd} is a queue of {name}, which is a tun (IFF_TUN), not a tap")
    if not flags & IFF_VNET_HDR:
        raise TapError(f"fd {fd}: tap {name} was opened without IFF_VNET_HDR "
                       "(virtio-net needs IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)")
    return name


class Tap:
    """One open queue of a tap interface."""

    def __init__(self, name: str | None = None, *, multi_queue: bool = False) -> None:
        """Open tap ``name``, creating it if it does not exist (``None``/empty: a new
        ``vmtapN``); with ``multi_queue``, as one queue of an ``IFF_MULTI_QUEUE`` tap
        (open the same name again for each further queue: :func:`open_queues`).
        Raises :class:`TapError`."""
        wanted = name or DEFAULT_NAME_PATTERN
        _check_name(wanted)
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(f"cannot open /dev/net/tun: {e.strerror}") from e
        try:
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi_queue else 0)
            request = _IFREQ.pack(wanted.encode(), flags)
            try:
                answer = fcntl.ioctl(self.fd, TUNSETIFF, request)
            except OSError as e:
                raise TapError(f"cannot open or create tap {wanted!r}: {_why(wanted, e)}") from e
            self.name = _IFREQ.unpack(answer)[0].rstrip(b"\0").decode()
            try:
                fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            except OSError as e:
                raise TapError(f"tap {self.name}: cannot set the vnet header size: {e.strerror}") from e
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def from_fd(cls, fd: int) -> Tap:
        """The tap queue ``fd`` (checked by :func:`tap_fd_name`), on a duplicate of ``fd``
        that this object owns: ``fd`` itself stays open and is the caller's to close. The
        interface is taken as it is (no address, MAC or state change); the shared file
        description is made non-blocking. Raises :class:`TapError`."""
        name = tap_fd_name(fd)
        tap = cls.__new__(cls)
        tap.name = name
        try:
            tap.fd = os.dup(fd)                # close-on-exec, as every fd pych opens
        except OSError as e:
            raise TapError(f"fd {fd} (tap {name}): cannot duplicate it: {e.strerror}") from e
        try:
            flags = fcntl.fcntl(tap.fd, fcntl.F_GETFL)
            fcntl.fcntl(tap.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            fcntl.ioctl(tap.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as e:
            tap.close()
            raise TapError(f"fd {fd} (tap {name}): cannot configure it: {e.strerror}") from e
        return tap

    def __repr__(self) -> str:
        return f"<Tap {self.name}>"

    def set_queue_enabled(self, enabled: bool) -> None:
        """Attach this queue to its (multi-queue) tap or detach it (``TUNSETQUEUE``): the
        kernel steers received frames only to attached queues. Raises :class:`TapError`."""
        flag = IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self.fd, TUNSETQUEUE, _IFREQ.pack(b"", flag))
        except OSError as e:
            raise TapError(f"tap {self.name}: cannot {'attach' if enabled else 'detach'} "
                           f"a queue: {e.strerror}") from e

    @property
    def persistent(self) -> bool:
        """Whether the interface outlives its last open queue (``IFF_PERSIST``)."""
        return bool(tap_fd_flags(self.fd) & IFF_PERSIST)

    def set_persistent(self, persistent: bool) -> None:
        """Make the interface outlive its last open queue, or not (``TUNSETPERSIST``): a
        live migration keeps a tap pych created while neither VMM has it open. Raises
        :class:`TapError`."""
        try:
            fcntl.ioctl(self.fd, TUNSETPERSIST, int(persistent))
        except OSError as e:
            raise TapError(f"tap {self.name}: cannot {'set' if persistent else 'clear'} "
                           f"IFF_PERSIST: {e.strerror}") from e

    def set_offload(self, flags: int) -> None:
        """Which offloaded frames (``TUN_F_*``) the tap may hand us: those the guest's
        driver accepts.  Raises :class:`TapError`."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            raise TapError(f"tap {self.name}: cannot set offloads {flags:#x}: {e.strerror}") from e

    def configure_host(self, *, ip: str | None = None, mask: str | None = None,
                       mac: str | None = None, mtu: int | None = None,
                       up: bool = True) -> None:
        """Give the host side an address, a MAC and an MTU, and bring it up (unless not
        ``up``: the link state is then left as it is). Raises :class:`TapError`."""
        from pyroute2 import IPRoute          # netlink: imported only when a tap is set up

        try:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=self.name)[0]
                if ip is not None:
                    network = ipaddress.ip_network(f"{ip}/{mask or '255.255.255.0'}", strict=False)
                    ipr.addr("replace", index=index, address=ip, prefixlen=network.prefixlen)
                link = {"state": "up"} if up else {}
                if mac is not None:
                    link["address"] = mac
                if mtu is not None:
                    link["mtu"] = mtu
                if link:
                    ipr.link("set", index=index, **link)
        except Exception as e:                 # pyroute2's NetlinkError, ValueError, ...
            raise TapError(f"tap {self.name}: cannot configure the host side: {e}") from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_queues(name: str | None, count: int) -> list[Tap]:
    """``count`` queues of tap ``name`` (created if it does not exist; ``None``/empty: a new
    ``vmtapN``): one plain queue for 1, else the queues of an ``IFF_MULTI_QUEUE`` tap, as
    the reference opens one per queue pair. Raises :class:`TapError`; nothing stays open."""
    if count == 1:
        return [Tap(name)]
    taps = [Tap(name, multi_queue=True)]
    try:
        while len(taps) < count:
            taps.append(Tap(taps[0].name, multi_queue=True))
    except BaseException:
        for tap in taps:
            tap.close()
        raise
    return taps


def queues_from_fds(fds: list[int]) -> list[Tap]:
    """The tap queues ``fds`` (one per queue pair, as ``--net fd=[a,b]``), each checked with
    :meth:`Tap.from_fd`; several must be queues of one ``IFF_MULTI_QUEUE`` tap.
    Raises :class:`TapError`; the duplicates are closed on failure."""
    taps: list[Tap] = []
    try:
        for fd in fds:
            tap = Tap.from_fd(fd)
            taps.append(tap)
            if len(fds) > 1:
                if not tap_fd_flags(fd) & IFF_MULTI_QUEUE:
                    raise TapError(f"fd {fd} (tap {tap.name}) was opened without "
                                   "IFF_MULTI_QUEUE, and the net has several queue pairs")
                if tap.name != taps[0].name:
                    raise TapError(f"fd {fd} is a queue of tap {tap.name}, fd {fds[0]} one "
                                   f"of {taps[0].name}: a net's fds are queues of one tap")
    except BaseException:
        for tap in taps:
            tap.close()
        raise
    return taps


def tap_fd_flags(fd: int) -> int:
    """The ``IFF_*`` flags ``TUNGETIFF`` reports for tap queue ``fd`` (0 if it cannot)."""
    try:
        return _IFREQ.unpack(fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size)))[1]
    except OSError:
        return 0
