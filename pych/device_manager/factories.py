"""Device factories: how each kind of device is built from its configuration, in one table
keyed by the device-kind registry's names (:data:`pych.config.kinds.DEVICE_KINDS`).

A factory builds a complete device from one configuration object and the device's id, and
raises, holding nothing, when the backend cannot be used (one of :data:`BACKEND_ERRORS`).
Boot and hot plug share them; the device manager puts what they build on the PCI bus. VFIO
is not here: a host device is opened, not built (see ``DeviceManager``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any


from pych.devices.legacy.serial_backend import open_serial_backend
from pych.devices.pci.allocator import AddressAllocator
from pych.devices.rate_limiter import RateLimiter
from pych.devices.disk_format import RAW, ImageFormatError, image_format
from pych.devices.virtio.balloon import VirtioBalloon
from pych.devices.virtio.block import DiskError, VirtioBlock
from pych.devices.virtio.console import VirtioConsole
from pych.devices.virtio.device import VirtioDevice
from pych.devices.virtio.rng import VirtioRng

# The modules of the kinds a VM may well not have (taps, vhost-user back-ends, the storage
# daemon, virtio-fs, -pmem, -vsock) are imported by their factories, when a device of
# theirs is built: 10-15 ms of every VM's start otherwise (35-60 ms on a loaded host).
if TYPE_CHECKING:
    from pych.devices.net.tap import Tap
    from pych.devices.vhost_user import VhostUserConnections
    from pych.devices.virtio.fs import VirtioFs
    from pych.devices.virtio.net import VirtioNet
    from pych.devices.virtio.pmem import VirtioPmem
    from pych.devices.virtio.vhost_user_blk import VhostUserBlock
    from pych.devices.virtio.vhost_user_net import VhostUserNet
    from pych.devices.virtio.vsock import VirtioVsock

log = logging.getLogger(__name__)

#: What a factory raises when the configuration names an unusable backend (a missing or
#: locked file, a bad size ...): the request was wrong, not the VMM.
BACKEND_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, DiskError)


@dataclass
class FactoryContext:
    """What factories need beyond the configuration: the 64-bit window and the KVM memslots
    device memory (pmem) is mapped with (None: it cannot be), and the vhost-user
    connections kept across reboots (virtio-fs)."""

    mmio64: AddressAllocator
    memslots: Any = None
    vhost_user: VhostUserConnections | None = None
    #: ``rate_limit_groups`` by id: one limiter each, shared by the disks that name it.
    rate_limit_groups: dict[str, RateLimiter] = field(default_factory=dict)
    #: A local migration's receiver: net id -> the tap queue fds the sender passed (taken
    #: by make_net instead of opening the tap by name; the fds are closed once taken).
    adopt_taps: dict[str, list[int]] = field(default_factory=dict)
    #: A local migration's receiver: device id -> the vhost-user connection the sender
    #: handed over (:class:`~pych.devices.virtio.vhost_user_device.AdoptedBackend`), taken
    #: by the device's factory instead of connecting to the socket.
    adopt_vhost_user: dict[str, Any] = field(default_factory=dict)


def rate_limit_groups(config) -> dict[str, RateLimiter]:
    """One limiter per ``rate_limit_groups`` entry of the VM configuration ``config``
    (a boot's disks, boot and hot-added, share them)."""
    groups = {}
    for group in config.rate_limit_groups or ():
        limiter = RateLimiter.from_config(group.rate_limiter_config)
        if limiter is not None:
            groups[group.id] = limiter
    return groups


Make = Callable[[Any, str, FactoryContext], VirtioDevice]


@dataclass(frozen=True)
class Factory:
    """How one kind is built: ``make(config, device_id, context)``. ``wanted(config)``: whether
    a configured device of the kind is created at all (a console that is off is not);
    ``boot_64bit_bar``: whether its BAR goes in the 64-bit window at boot (hot-plugged
    devices always use it)."""

    make: Make
    wanted: Callable[[Any], bool] = lambda config: True
    boot_64bit_bar: bool = True


def make_console(console, name: str, ctx: FactoryContext) -> VirtioConsole:
    """``--console``: hvc0, its host end one of the serial backends (tty, pty, file,
    socket, null), owned and closed by the device."""
    backend = open_serial_backend(console.mode, console.file or console.socket)
    try:
        device = VirtioConsole(backend, owns_sink=True, name=name)
    except BaseException:
        backend.close()
        raise
    backend.start(device)
    return device


def make_disk(disk, name: str, ctx: FactoryContext) -> VirtioDevice:
    """``--disk``: a raw image (or block device) is served in-process (:class:`VirtioBlock`);
    ``vhost_user=on,socket=`` connects to that vhost-user-blk back-end; an image in another
    format (qcow2, VHDX, VMDK, VDI, VHD) gets a qemu-storage-daemon of its own, started
    here and owned by the device (stopped when it is removed or the VM ends), served as
    vhost-user-blk. An ``image_type`` that disagrees with the header is refused."""
    if disk.vhost_user:
        from pych.devices.virtio.vhost_user_blk import VhostUserBlock
        if disk.serial is not None:
            raise ValueError(f"{name}: serial={disk.serial} cannot be honoured: the vhost-user "
                             "backend answers the guest's serial number requests itself")
        adopted = ctx.adopt_vhost_user.pop(name, None)
        if adopted is not None:         # a local migration's: the sender's connection
            return VhostUserBlock(disk.vhost_socket, num_queues=disk.num_queues,
                                  queue_size=disk.queue_size, readonly=disk.readonly,
                                  name=name, adopted=adopted)
        parked = ctx.vhost_user.take(name, disk.vhost_socket) if ctx.vhost_user else None
        return VhostUserBlock(disk.vhost_socket, num_queues=disk.num_queues,
                              queue_size=disk.queue_size, readonly=disk.readonly, name=name,
                              connection=parked)
    if not disk.path:
        raise ValueError("a disk needs a path")
    try:
        fmt = image_format(disk.path, disk.image_type)
    except OSError as e:
        raise DiskError(f"cannot open disk image {disk.path}: {e.strerror}") from e
    if disk.rate_limit_group is not None:
        limiter = ctx.rate_limit_groups.get(disk.rate_limit_group)
    else:
        limiter = RateLimiter.from_config(disk.rate_limiter_config)
    if fmt == RAW:
        return VirtioBlock(disk.path, readonly=disk.readonly, serial=disk.serial,
                           num_queues=disk.num_queues, queue_size=disk.queue_size,
                           image_type=RAW, name=name, rate_limiter=limiter,
                           direct=disk.direct)
    if limiter is not None or disk.direct:
        what = "direct=on" if disk.direct else "a rate limiter"
        raise ValueError(f"{name}: {what} cannot be honoured for a {fmt} image yet: "
                         "qemu-storage-daemon serves it, and pych applies rate limits and "
                         "O_DIRECT only to the raw images it serves itself")
    return _served_by_daemon(disk, fmt, name)


def _served_by_daemon(disk, fmt: str, name: str) -> VhostUserBlock:
    """A qemu-storage-daemon for ``disk`` (an image of format ``fmt``), and the
    vhost-user-blk device on its export; nothing is left running if either fails."""
    if disk.serial is not None:
        raise ValueError(f"{name}: serial={disk.serial} cannot be honoured for a {fmt} image: "
                         "qemu-storage-daemon, which serves it, answers the guest's serial "
                         "number requests itself")
    from pych.devices.storage_daemon import StorageDaemon, connect_when_listening, qemu_driver
    from pych.devices.virtio.vhost_user_blk import VhostUserBlock
    driver = qemu_driver(fmt)
    if driver is None:
        raise ImageFormatError(f"disk image {disk.path} is a {fmt} image, which "
                               "qemu-storage-daemon cannot serve")
    daemon = StorageDaemon(disk.path, driver, readonly=disk.readonly,
                           num_queues=disk.num_queues, name=name)
    daemon.start()
    try:
        connection = connect_when_listening(daemon.socket_path)
        return VhostUserBlock(daemon.socket_path, num_queues=disk.num_queues,
                              queue_size=disk.queue_size, readonly=disk.readonly, name=name,
                              connection=connection, daemon=daemon)
    except BaseException:
        daemon.stop()
        raise


def make_net(net, name: str, ctx: FactoryContext) -> VirtioNet:
    """virtio-net on a tap, one tap queue per queue pair (``num_queues`` / 2; several are
    queues of one ``IFF_MULTI_QUEUE`` tap): opened or created by name with its host side
    configured, or, with ``fds`` (``--net fd=[N,...]``, SCM_RIGHTS with ``vm.add-net``), the
    tap queues someone else set up, each on a duplicate of its fd (the configuration keeps the
    original, so every boot of the VM gets its own copy; the VMM closes the original
    when the device is removed or the VM deleted). Such a tap is not configured: only
    ``mtu`` is applied, as in the reference; ``ip``, ``mask`` and ``host_mac`` are
    ignored. A generated MAC is written back into ``net`` so a reboot keeps it."""
    if net.vhost_user:
        return _vhost_user_net(net, name, ctx)
    from pych.devices.virtio.net import VirtioNet, format_mac, parse_mac, random_mac
    mac = parse_mac(net.mac) if net.mac else random_mac()
    adopted = ctx.adopt_taps.pop(name, None)
    if adopted is not None:             # the sender's tap, passed by a local migration
        from pych.devices.net.tap import queues_from_fds
        try:
            taps = queues_from_fds(adopted)
        finally:
            for fd in adopted:
                os.close(fd)
    else:
        taps = _open_taps(net, name)
    try:
        device = VirtioNet(taps, mac=mac, mtu=net.mtu, queue_size=net.queue_size,
                           offload_csum=net.offload_csum, offload_tso=net.offload_tso,
                           offload_ufo=net.offload_ufo, name=name,
                           rate_limiter=lambda: RateLimiter.from_config(net.rate_limiter_config))
    except BaseException:
        for tap in taps:
            tap.close()
        raise
    net.mac = format_mac(mac)
    log.info("%s: tap %s (%d queue pair%s), mac %s", name, taps[0].name, len(taps),
             "" if len(taps) == 1 else "s", net.mac)
    return device


def _vhost_user_net(net, name: str, ctx: FactoryContext) -> VhostUserNet:
    """``--net vhost_user=on,socket=,vhost_mode=``: the back-end at ``socket`` serves the
    queues; ``client`` connects to it, ``server`` listens there until it connects. After a
    reboot the device takes back the connection its predecessor parked."""
    from pych.devices.vhost_user import VhostUserFrontend
    from pych.devices.virtio.net import format_mac, parse_mac, random_mac
    from pych.devices.virtio.vhost_user_net import VhostUserNet, accept_backend
    mac = parse_mac(net.mac) if net.mac else random_mac()
    parked = ctx.vhost_user.take(name, net.vhost_socket) if ctx.vhost_user else None
    connect = accept_backend if net.vhost_mode == "Server" else VhostUserFrontend.connect
    device = VhostUserNet(net.vhost_socket, mac=mac, mtu=net.mtu, queue_size=net.queue_size,
                          pairs=net.num_queues // 2,
                          offload_csum=net.offload_csum, offload_tso=net.offload_tso,
                          offload_ufo=net.offload_ufo, name=name, connect=connect,
                          connection=parked)
    net.mac = format_mac(mac)
    log.info("%s: vhost-user backend at %s (%s), %d queue pair%s, mac %s", name,
             net.vhost_socket, net.vhost_mode.lower(), device.pairs,
             "" if device.pairs == 1 else "s", net.mac)
    return device


def _open_taps(net, name: str) -> list[Tap]:
    """The tap queues of the net configuration ``net``, host side configured (see
    make_net)."""
    from pych.devices.net.tap import open_queues, queues_from_fds
    if not net.fds:
        taps = open_queues(net.tap, net.num_queues // 2)
        try:
            taps[0].configure_host(ip=net.ip, mask=net.mask, mac=net.host_mac, mtu=net.mtu)
        except BaseException:
            for tap in taps:
                tap.close()
            raise
        return taps
    taps = queues_from_fds(net.fds)
    tap = taps[0]
    try:
        ignored = [key for key in ("ip", "mask", "host_mac") if getattr(net, key) is not None]
        if ignored:
            log.warning("%s: tap %s comes as an fd and is not configured: %s ignored",
                        name, tap.name, ", ".join(ignored))
        if net.mtu is not None:
            tap.configure_host(mtu=net.mtu, up=False)
    except BaseException:
        for tap in taps:
            tap.close()
        raise
    return taps


def make_rng(rng, name: str, ctx: FactoryContext) -> VirtioRng:
    return VirtioRng(rng.src, name=name)


def make_fs(fs, name: str, ctx: FactoryContext) -> VirtioFs:
    """virtio-fs served by the vhost-user back-end (virtiofsd) listening at ``fs.socket``:
    connected and negotiated now, so a missing or unsuitable back-end fails the boot or
    the add (400). After a reboot the device takes back the connection its predecessor
    of the same id and socket parked (``DeviceManager.close`` with ``keep_connections``).
    Removal stops its rings and hangs up (``VirtioFs.shutdown``)."""
    from pych.devices.virtio.fs import VirtioFs
    adopted = ctx.adopt_vhost_user.pop(name, None)
    if adopted is not None:             # a local migration's: the sender's connection
        return VirtioFs(fs.tag, fs.socket, num_request_queues=fs.num_queues,
                        queue_size=fs.queue_size, name=name, adopted=adopted)
    parked = ctx.vhost_user.take(name, fs.socket) if ctx.vhost_user is not None else None
    return VirtioFs(fs.tag, fs.socket, num_request_queues=fs.num_queues,
                    queue_size=fs.queue_size, name=name, connection=parked)


def make_pmem(pmem, name: str, ctx: FactoryContext) -> VirtioPmem:
    """The file mapped at a 2 MiB aligned address of the 64-bit window."""
    if ctx.memslots is None:
        raise ValueError(f"{name}: this device manager cannot map device memory")
    from pych.devices.virtio.pmem import VirtioPmem
    return VirtioPmem(pmem.file, DeviceMemoryMapper(ctx.mmio64, ctx.memslots),
                      size=pmem.size, discard_writes=pmem.discard_writes, name=name)


def make_vsock(vsock, name: str, ctx: FactoryContext) -> VirtioVsock:
    from pych.devices.virtio.vsock import VirtioVsock
    return VirtioVsock(vsock.cid, vsock.socket, name=name)


def make_balloon(balloon, name: str, ctx: FactoryContext) -> VirtioBalloon:
    return VirtioBalloon(balloon.size, deflate_on_oom=balloon.deflate_on_oom,
                         free_page_reporting=balloon.free_page_reporting, name=name)


FACTORIES: dict[str, Factory] = {
    "console": Factory(make_console, wanted=lambda console: console.mode != "Off"),
    # Boot disks get a 32-bit BAR, as in the reference; a hot-plugged disk a 64-bit one.
    "disk": Factory(make_disk, boot_64bit_bar=False),
    "net": Factory(make_net),
    "rng": Factory(make_rng),
    "fs": Factory(make_fs),
    "pmem": Factory(make_pmem),
    "vsock": Factory(make_vsock),
    "balloon": Factory(make_balloon),
}
"""The virtio kinds pych builds, by :attr:`DeviceKind.name <pych.config.kinds.DeviceKind.name>`.
A kind that is neither here nor VFIO (vfio-user, vDPA, generic vhost-user) is not created."""


class DeviceMemoryMapper:
    """Maps device memory (a pmem file) into the guest: an aligned range of the segment's
    64-bit window, backed by a KVM memslot (pmem's
    :class:`~pych.devices.virtio.pmem.GuestMapper`)."""

    def __init__(self, window: AddressAllocator, memslots) -> None:
        self._window = window
        self._memslots = memslots
        self._slots: dict[int, int] = {}

    def map(self, host_addr: int, size: int, alignment: int) -> int:
        gpa = self._window.allocate(size, alignment)
        try:
            self._slots[gpa] = self._memslots.add_memory(gpa, size, host_addr)
        except BaseException:
            self._window.free(gpa)
            raise
        return gpa

    def unmap(self, gpa: int) -> None:
        self._memslots.remove_memory(self._slots.pop(gpa), gpa)
        self._window.free(gpa)
