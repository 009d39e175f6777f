"""Host tap interfaces for virtio-net: open or create one, configure its host side.

A :class:`Tap` is one queue of a tap interface opened through ``/dev/net/tun`` with
``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``: every frame read or written starts with a
12-byte ``virtio_net_hdr_v1``, so frames pass between the tap and the guest's virtio
buffers unchanged (checksum and segmentation offloads included).  The fd is
non-blocking.

A tap created here (no name, or a name that does not exist) is not persistent: it
disappears when its last fd is closed, so a failed or finished VM leaves nothing behind.
An existing (persistent) tap is opened as it is and outlives us.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import struct

log = logging.getLogger(__name__)

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
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


class Tap:
    """One open tap interface (a single queue)."""

    def __init__(self, name: str | None = None) -> None:
        """Open tap ``name``, creating it if it does not exist (``None``/empty: a new
        ``vmtapN``).  Raises :class:`TapError`."""
        wanted = name or DEFAULT_NAME_PATTERN
        if len(wanted.encode()) >= IFNAMSIZ:
            raise TapError(f"tap name {wanted!r} is longer than {IFNAMSIZ - 1} bytes")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(f"cannot open /dev/net/tun: {e.strerror}") from e
        try:
            request = _IFREQ.pack(wanted.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                answer = fcntl.ioctl(self.fd, TUNSETIFF, request)
            except OSError as e:
                hint = " (needs CAP_NET_ADMIN)" if e.errno == errno.EPERM else ""
                raise TapError(f"cannot open or create tap {wanted!r}: {e.strerror}{hint}") from e
            self.name = _IFREQ.unpack(answer)[0].rstrip(b"\0").decode()
            try:
                fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            except OSError as e:
                raise TapError(f"tap {self.name}: cannot set the vnet header size: {e.strerror}") from e
        except BaseException:
            os.close(self.fd)
            raise

    def __repr__(self) -> str:
        return f"<Tap {self.name}>"

    def set_offload(self, flags: int) -> None:
        """Which offloaded frames (``TUN_F_*``) the tap may hand us: those the guest's
        driver accepts.  Raises :class:`TapError`."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            raise TapError(f"tap {self.name}: cannot set offloads {flags:#x}: {e.strerror}") from e

    def configure_host(self, *, ip: str | None = None, mask: str | None = None,
                       mac: str | None = None, mtu: int | None = None) -> None:
        """Give the host side an address, a MAC and an MTU, and bring it up.
        Raises :class:`TapError`."""
        from pyroute2 import IPRoute          # netlink: imported only when a tap is set up

        try:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=self.name)[0]
                if ip is not None:
                    network = ipaddress.ip_network(f"{ip}/{mask or '255.255.255.0'}", strict=False)
                    ipr.addr("replace", index=index, address=ip, prefixlen=network.prefixlen)
                link = {"state": "up"}
                if mac is not None:
                    link["address"] = mac
                if mtu is not None:
                    link["mtu"] = mtu
                ipr.link("set", index=index, **link)
        except Exception as e:                 # pyroute2's NetlinkError, ValueError, ...
            raise TapError(f"tap {self.name}: cannot configure the host side: {e}") from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
