"""A pych :class:`~pych.vm.Vm` as the sender's :class:`~pych.migration.sender.Source` and the
receiver's :class:`~pych.migration.receiver.Target`: where the migration protocol meets the
VM's memory (KVM dirty logging and the device-write tracking of
:class:`~pych.memory.guest_memory.GuestMemory`), its state (the snapshot's ``save_state`` /
``restore_state`` pairs), its disk image locks and the host end of its serial port."""

from __future__ import annotations

import logging
import os
from typing import Callable

from pych.memory.guest_memory import PAGE_SIZE, GuestMemoryError
from pych.migration.protocol import MAX_MEMORY, MigrationError
from pych.snapshot.format import CHUNK, saved_chunks

log = logging.getLogger(__name__)
_ZERO = bytes(CHUNK)
PAGE_SHIFT = 12


def bitmap_pages(bitmap: bytes, first_page: int) -> list[int]:
    """The page numbers whose bits are set in KVM's dirty ``bitmap`` (64-bit little-endian
    words, bit n for page ``first_page + n``)."""
    pages: list[int] = []
    words = memoryview(bitmap).cast("Q")
    for index, word in enumerate(words):
        if not word:
            continue
        base = first_page + index * 64
        while word:
            low = word & -word
            pages.append(base + low.bit_length() - 1)
            word ^= low
    return pages


def page_runs(pages, limit: int = MAX_MEMORY) -> list[tuple[int, int]]:
    """Sorted page numbers as ``(gpa, length)`` runs of contiguous pages, none longer than
    ``limit`` bytes."""
    runs: list[list[int]] = []
    for page in sorted(pages):
        gpa = page << PAGE_SHIFT
        if runs and runs[-1][0] + runs[-1][1] == gpa and runs[-1][1] < limit:
            runs[-1][1] += PAGE_SIZE
        else:
            runs.append([gpa, PAGE_SIZE])
    return [(gpa, n) for gpa, n in runs]


class VmSource:
    """The running VM being sent. ``console`` is the VMM's serial port (None without one)
    and ``reopen_console`` opens its host end again (a migration that failed late)."""

    def __init__(self, vm, config, console=None, reopen_console: Callable | None = None, *,
                 local: bool = False):
        self.vm = vm
        self._config = config
        self.console = console
        self._reopen_console = reopen_console
        self._local = local                     # vhost-user connections are handed over
        self._regions = [r for r, copy in vm.memory.saved_regions() if copy and r.slot is not None]
        self._released_nets: list = []          # net devices whose taps were handed over
        self._released_vhost: list = []         # vhost-user devices whose connection was

    def config(self) -> dict:
        """The configuration, with the name of each tap pych named itself (``vmtapN``):
        the receiver opens it by that name."""
        config = self._config.model_dump(mode="json")
        nets = self.vm.devices.tap_nets()
        for net in config.get("net") or ():
            device = nets.get(net.get("id"))
            if device is not None and not net.get("fds") and not net.get("tap"):
                net["tap"] = device.tap.name
        return config

    def layout(self) -> dict:
        """What the receiver builds before the memory comes: the RAM layout and each
        device's slot (compared again once paused: nothing may have changed)."""
        return {"memory": self.vm.memory.save_state(), "devices": {"slots": self.vm.devices.slots()}}

    def shared_memory(self) -> tuple[dict, list[int]]:
        names, fds = self.vm.memory.shared_fds()
        return {"fds": names}, fds

    # --- memory --------------------------------------------------------------------------
    def start_dirty_log(self) -> None:
        self.vm.guest_memory.track_writes(True)
        for region in self._regions:
            self.vm.kvm_vm.set_dirty_logging(region.slot, True)

    def stop_dirty_log(self) -> None:
        for region in self._regions:
            try:
                self.vm.kvm_vm.set_dirty_logging(region.slot, False)
            except Exception:  # noqa: BLE001 - a slot the guest ejected meanwhile
                log.warning("cannot turn dirty logging off on %s", region.name)
        self.vm.guest_memory.track_writes(False)

    def all_memory(self) -> list[tuple[int, memoryview]]:
        """Every allocated, non-zero 1 MiB chunk of RAM (the receiver's RAM is zero)."""
        runs: list[tuple[int, memoryview]] = []
        for region in self._regions:
            view = memoryview(region.mmap)
            start = length = 0
            for offset in saved_chunks(region):
                if region.mmap[offset:offset + CHUNK] == _ZERO[:min(CHUNK, region.size - offset)]:
                    continue
                n = min(CHUNK, region.size - offset)
                if length and start + length == offset and length < MAX_MEMORY:
                    length += n
                    continue
                if length:
                    runs.append((region.gpa + start, view[start:start + length]))
                start, length = offset, n
            if length:
                runs.append((region.gpa + start, view[start:start + length]))
        return runs

    def blocks(self) -> list[tuple[int, int]]:
        """Every allocated 1 MiB chunk of RAM, ``(gpa, length)`` (what VERIFY checks)."""
        return [(region.gpa + offset, min(CHUNK, region.size - offset))
                for region in self._regions for offset in saved_chunks(region)]

    def view(self, gpa: int, length: int) -> memoryview:
        for region in self._regions:
            if region.gpa <= gpa and gpa + length <= region.end:
                return memoryview(region.mmap)[gpa - region.gpa:gpa - region.gpa + length]
        raise MigrationError(f"{gpa:#x}+{length:#x} is not in the VM's RAM")

    def dirty_memory(self, final: bool = False) -> list[tuple[int, memoryview]]:
        """The pages written since the last call: KVM's log of each RAM slot and the pages
        device models wrote (``final``: or ever viewed, see GuestMemory.take_written)."""
        written = self.vm.guest_memory.take_written(final=final)
        runs: list[tuple[int, memoryview]] = []
        for region in self._regions:
            first = region.gpa >> PAGE_SHIFT
            last = region.end >> PAGE_SHIFT
            pages = set(bitmap_pages(self.vm.kvm_vm.get_dirty_log(region.slot), first))
            pages.update(p for p in written if first <= p < last)
            view = memoryview(region.mmap)
            for gpa, n in page_runs(pages):
                off = gpa - region.gpa
                runs.append((gpa, view[off:off + n]))
        return runs

    # --- the VM ------------------------------------------------------------------------------
    def pause(self) -> None:
        self.vm.pause()

    def resume(self) -> None:
        self.vm.resume()

    def save_state(self) -> dict:
        return self.vm.save_state(local_migration=self._local)

    def release_backends(self, local: bool) -> tuple[dict, list[int]]:
        """Hand the back-ends over (the VM is paused): the disk images' locks, and each
        net's tap: its queues' fds to pass with STATE (``local``), or closed here, a tap
        that would go with them made persistent first, for the receiver to open by name;
        with ``local``, each vhost-user device's connection (virtio-fs: the socket and
        its rings' eventfds, see VhostUserDevice.release_backend; the device sends the
        back-end nothing from now on). Returns what STATE says of them, ``{"taps": {net
        id: [fd index, ...]}, "persisted": [tap name, ...], "vhost_user": {device id:
        {"socket": fd index, "rings": {...}, "session": {...}}}}``, and the fds."""
        for image in self.vm.devices.disk_images():
            image.unlock()
        taps: dict[str, list[int]] = {}
        fds: list[int] = []
        persisted: list[str] = []
        for dev_id, device in self.vm.devices.tap_nets().items():
            persisted += device.release_taps(close=not local)
            self._released_nets.append(device)
            if local:
                taps[dev_id] = list(range(len(fds), len(fds) + len(device.taps)))
                fds += [tap.fd for tap in device.taps]
        vhost_user: dict[str, dict] = {}
        if local:
            index_of: dict[int, int] = {}

            def take(fd: int) -> int:
                """``fd``'s index among the fds passed (one index per descriptor: two
                rings sharing an MSI-X vector share its irqfd)."""
                if fd not in index_of:
                    index_of[fd] = len(fds)
                    fds.append(fd)
                return index_of[fd]

            for dev_id, device in self.vm.devices.vhost_user_devices().items():
                vhost_user[dev_id] = device.release_backend(take)
                self._released_vhost.append(device)
        backends: dict = {"taps": taps, "persisted": persisted}
        if vhost_user:                  # only then: what a pych from before it reads is as was
            backends["vhost_user"] = vhost_user
        return backends, fds

    def retake_backends(self) -> None:
        """The migration failed: the disk images' locks and the taps taken again (each
        on its own: one that fails is logged and the others still are)."""
        for image in self.vm.devices.disk_images():
            image.relock()
        released, self._released_nets = self._released_nets, []
        for device in released:
            try:
                device.retake_taps()
            except Exception:  # noqa: BLE001 - the others must still be taken back
                log.exception("%s: cannot take its tap back after the failed migration",
                              device.name)
        handed, self._released_vhost = self._released_vhost, []
        for device in handed:
            try:
                device.retake_backend()
            except Exception:  # noqa: BLE001 - the others must still be taken back
                log.exception("%s: cannot serve its vhost-user back-end again after the "
                              "failed migration", device.name)

    def hand_over_console(self) -> None:
        if self.console is not None:
            self.console.release()

    def retake_console(self) -> None:
        if self.console is not None and self._reopen_console is not None:
            self.console.reopen(self._reopen_console())


def _vhost_user_indices(vspec: dict) -> set[int]:
    """The fd indices the vhost-user hand-over ``vspec`` names (MigrationError if it is
    malformed)."""
    try:
        return {int(i) for spec in vspec.values()
                for i in [spec["socket"], *(ring[k] for ring in spec["rings"].values()
                                            for k in ("kick", "call"))]}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MigrationError(f"malformed vhost-user hand-over: {e!r}") from None


class VmTarget:
    """The VM a migration builds on the receiver. ``open_console`` opens the host end of its
    serial port when it takes over (the sender released it), None without one."""

    def __init__(self, vm, console=None, open_console: Callable | None = None):
        self.vm = vm
        self.console = console
        self._open_console = open_console

    def view(self, gpa: int, length: int) -> memoryview:
        try:
            return self.vm.guest_memory.view(gpa, length)
        except GuestMemoryError as e:
            raise MigrationError(f"the sender sent memory outside the VM's RAM: {e}") from None

    def finish(self, state: dict, backends: dict, fds: list[int]) -> None:
        """Build the devices and restore the state. ``backends`` says what came with STATE
        (:meth:`VmSource.release_backends`): the taps' fds (``fds``, taken over: a net
        given tap fds gets these as its new ones, a tap opened by name is taken from them
        instead of being opened again) and the taps the sender made persistent."""
        spec = backends.get("taps") or {}
        vspec = backends.get("vhost_user") or {}
        nets = {net.id: net for net in self.vm.config.net or ()}
        adopt: dict[str, list[int]] = {}
        offered_taps: dict[str, list[int]] = {}
        vhost_indices: set[int] = set()
        vhost_taken = False             # _adopt_connections owns the vhost-user fds
        connections: dict = {}
        try:
            vhost_indices = _vhost_user_indices(vspec)
            indices = sorted(i for chosen in spec.values() for i in chosen)
            if sorted(set(indices) | vhost_indices) != list(range(len(fds))) \
                    or len(indices) != len(set(indices)) or set(indices) & vhost_indices:
                raise MigrationError("the tap and vhost-user fds named with STATE are not "
                                     "the ones passed")
            vhost_taken = True
            connections = self._adopt_connections(vspec, fds)
            for net_id, chosen in spec.items():
                net = nets.get(net_id)
                if net is None:
                    raise MigrationError(f"tap fds came for {net_id}, which is not a net "
                                         "device of the VM")
                if net.fds:              # a net given tap fds: these are its new ones
                    net.fds = [fds[i] for i in chosen]
                else:
                    adopt[net_id] = [fds[i] for i in chosen]
            for net in nets.values():
                if net.fds and net.id not in spec:
                    raise MigrationError(f"net device {net.id} was given tap fds and none "
                                         "came with STATE (only a local migration passes them)")
            self._persisted = list(backends.get("persisted") or ())
            offered_taps = {k: list(v) for k, v in adopt.items()}
            self.vm.finish_incoming(state, adopt, connections)
            if connections:
                raise MigrationError("vhost-user connections came for "
                                     f"{', '.join(sorted(connections))}, which no device of "
                                     "the VM adopted")
        except BaseException:
            # what make_net took it closed; the rest is still ours
            offered = {fd for chosen in offered_taps.values() for fd in chosen}
            left = [fd for chosen in adopt.values() for fd in chosen] if offered_taps else []
            # the vhost-user fds: those made into connections are closed with them (a
            # device that adopted one closes it with the VM); the others here
            for fd in left + [fd for i, fd in enumerate(fds) if fd not in offered
                              and not (vhost_taken and i in vhost_indices)]:
                try:
                    os.close(fd)
                except OSError:
                    pass
            for connection in connections.values():
                connection.close()
            raise

    def _adopt_connections(self, vspec: dict, fds: list[int]) -> dict:
        """Each vhost-user connection the sender handed over (``vspec``, see
        VmSource.release_backends) as an AdoptedBackend for its device, by id: every fd
        they name is theirs from then on (on failure here, all are closed)."""
        if not vspec:
            return {}
        from pych.devices.virtio.vhost_user_device import AdoptedBackend
        # the devices a connection can come for: virtio-fs shares and vhost-user-blk disks
        sockets = {fs.id: fs.socket for fs in getattr(self.vm.config, "fs", None) or ()}
        sockets.update({disk.id: disk.vhost_socket
                        for disk in getattr(self.vm.config, "disks", None) or ()
                        if disk.vhost_user})
        made: dict = {}
        consumed: set[int] = set()      # fd indices a made connection owns, or already closed
        try:
            for dev_id, spec in vspec.items():
                path = sockets.get(dev_id)
                if path is None:
                    raise MigrationError(f"a vhost-user connection came for {dev_id}, which "
                                         "is not a virtio-fs or vhost-user-blk device of the VM")
                AdoptedBackend.rings_of(spec, fds)          # malformed: nothing taken yet
                consumed.add(int(spec["socket"]))
                made[dev_id] = AdoptedBackend.from_handover(spec, fds, path)
                consumed |= {int(ring[k]) for ring in spec["rings"].values()
                             for k in ("kick", "call")}
        except BaseException as e:
            for backend in made.values():
                backend.close()
            for i in sorted(_vhost_user_indices(vspec) - consumed):
                try:
                    os.close(fds[i])
                except OSError:
                    pass
            if isinstance(e, (KeyError, TypeError, ValueError, IndexError)):
                raise MigrationError(f"malformed vhost-user hand-over: {e!r}") from None
            raise
        return made

    def resume(self) -> None:
        if self.console is not None and self._open_console is not None:
            self.console.reopen(self._open_console())
        # the migration completed: the adopted vhost-user connections are served from here
        for device in self.vm.devices.vhost_user_devices().values():
            device.commit_adoption()
        self.vm.resume()
        # the taps the sender made persistent to hand them over go with this VM again
        persisted = set(getattr(self, "_persisted", ()))
        for device in self.vm.devices.tap_nets().values():
            if device.tap.name in persisted:
                try:
                    device.tap.set_persistent(False)
                except OSError as e:
                    log.warning("%s: %s (the tap stays after this VM)", device.name, e)

    def close(self) -> None:
        self.vm.close()
