"""Kvm / Vm / Vcpu: fd-owning objects over the KVM ioctls, and decoded vCPU exits.

Nothing here knows about devices or boot protocols; ``pych.vm`` assembles those.
``KVM_RUN`` goes through ``fcntl.ioctl`` which releases the GIL, so one Python thread
per vCPU runs guests truly in parallel.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
import threading
from dataclasses import dataclass

from . import bindings as b


class KvmError(Exception):
    pass


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)


def _ioctl(fd: int, request: int, arg=0):
    """ioctl with a mutable buffer/structure (read back in place) or an unsigned long."""
    if isinstance(arg, int):
        ret = _libc.ioctl(fd, request, arg)
        if ret < 0:
            err = ctypes.get_errno()
            raise KvmError(f"ioctl {request:#x} failed: {os.strerror(err)}")
        return ret
    try:
        return fcntl.ioctl(fd, request, arg, True)
    except OSError as e:
        raise KvmError(f"ioctl {request:#x} failed: {os.strerror(e.errno)}") from e


def _flex(header: ctypes.Structure, entry_type, entries) -> bytearray:
    """A mutable buffer holding ``header`` followed by an array of ``entry_type``."""
    n = len(entries)
    arr = (entry_type * n)(*entries)
    return bytearray(bytes(header) + bytes(arr))


@dataclass(frozen=True, slots=True)
class PackedMsrs:
    """MSR values as a ``kvm_msrs`` buffer (:func:`pack_msrs`)."""
    count: int
    buffer: bytes


def pack_msrs(msrs: dict[int, int]) -> PackedMsrs:
    """``msrs`` packed for KVM_SET_MSRS once, for values set on every new vCPU."""
    entries = [b.kvm_msr_entry(index=i, data=v) for i, v in msrs.items()]
    return PackedMsrs(len(entries), bytes(_flex(b.kvm_msrs(nmsrs=len(entries)),
                                                b.kvm_msr_entry, entries)))


class Kvm:
    """The /dev/kvm system fd."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"cannot open {path}: {os.strerror(e.errno)}") from e
        version = fcntl.ioctl(self.fd, b.KVM_GET_API_VERSION)
        if version != b.KVM_API_VERSION:
            raise KvmError(f"unsupported KVM API version {version}")
        self.vcpu_mmap_size = fcntl.ioctl(self.fd, b.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        return fcntl.ioctl(self.fd, b.KVM_CHECK_EXTENSION, cap)

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(b.KVM_CAP_MAX_VCPUS) or self.check_extension(b.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[b.kvm_cpuid_entry2]:
        nent = 256
        while True:
            buf = _flex(b.kvm_cpuid2(nent=nent), b.kvm_cpuid_entry2, [b.kvm_cpuid_entry2()] * nent)
            try:
                fcntl.ioctl(self.fd, b.KVM_GET_SUPPORTED_CPUID, buf, True)
            except OSError as e:
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise KvmError(f"KVM_GET_SUPPORTED_CPUID: {os.strerror(e.errno)}") from e
            n = b.kvm_cpuid2.from_buffer(buf).nent
            off = ctypes.sizeof(b.kvm_cpuid2)
            size = ctypes.sizeof(b.kvm_cpuid_entry2)
            return [b.kvm_cpuid_entry2.from_buffer_copy(buf, off + i * size) for i in range(n)]

    def msr_index_list(self) -> list[int]:
        n = 1024
        buf = bytearray(struct.pack("<I", n) + bytes(4 * n))
        fcntl.ioctl(self.fd, b.KVM_GET_MSR_INDEX_LIST, buf, True)
        count = struct.unpack_from("<I", buf)[0]
        return list(struct.unpack_from(f"<{count}I", buf, 4))

    def create_vm(self) -> "Vm":
        fd = _ioctl(self.fd, b.KVM_CREATE_VM, 0)
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """A KVM VM fd: memslots, the in-kernel irqchip, GSI routes, irqfds, ioeventfds."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._lock = threading.Lock()
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._routes: dict[int, b.kvm_irq_routing_entry] = {}
        self._memslots: dict[int, b.kvm_userspace_memory_region] = {}

    # --- memory ----------------------------------------------------------------------------
    def add_memory(self, gpa: int, size: int, host_addr: int, *, readonly: bool = False) -> int:
        with self._lock:
            slot = self._free_slots.pop() if self._free_slots else self._next_slot
            if slot == self._next_slot:
                self._next_slot += 1
        region = b.kvm_userspace_memory_region(
            slot=slot, flags=b.KVM_MEM_READONLY if readonly else 0,
            guest_phys_addr=gpa, memory_size=size, userspace_addr=host_addr)
        try:
            _ioctl(self.fd, b.KVM_SET_USER_MEMORY_REGION, region)
        except KvmError:
            with self._lock:
                self._free_slots.append(slot)
            raise
        with self._lock:
            self._memslots[slot] = region
        return slot

    def remove_memory(self, slot: int, gpa: int) -> None:
        region = b.kvm_userspace_memory_region(slot=slot, guest_phys_addr=gpa, memory_size=0)
        _ioctl(self.fd, b.KVM_SET_USER_MEMORY_REGION, region)
        with self._lock:
            self._free_slots.append(slot)
            self._memslots.pop(slot, None)

    # --- dirty page logging (live migration) --------------------------------------------------
    def set_dirty_logging(self, slot: int, enabled: bool) -> None:
        """Turn ``KVM_MEM_LOG_DIRTY_PAGES`` on or off for memslot ``slot`` (the same region
        registered again with the flag changed: KVM's flags-only update, allowed while the
        vCPUs run). Turning it on starts from a clean log."""
        with self._lock:
            region = self._memslots[slot]
            flags = region.flags | b.KVM_MEM_LOG_DIRTY_PAGES if enabled else \
                region.flags & ~b.KVM_MEM_LOG_DIRTY_PAGES
            update = b.kvm_userspace_memory_region(
                slot=slot, flags=flags, guest_phys_addr=region.guest_phys_addr,
                memory_size=region.memory_size, userspace_addr=region.userspace_addr)
            _ioctl(self.fd, b.KVM_SET_USER_MEMORY_REGION, update)
            self._memslots[slot] = update

    def get_dirty_log(self, slot: int) -> bytes:
        """The pages of memslot ``slot`` the guest wrote since the last call (or since
        logging was turned on), one bit per 4 KiB page, bit ``n`` of the little-endian bitmap
        for page ``n``; KVM clears the log as it hands it over."""
        with self._lock:
            size = self._memslots[slot].memory_size
        pages = size // 4096
        bitmap = ctypes.create_string_buffer((pages + 63) // 64 * 8)
        _ioctl(self.fd, b.KVM_GET_DIRTY_LOG,
               b.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap)))
        return bitmap.raw

    @property
    def memslots_in_use(self) -> int:
        return self._next_slot - len(self._free_slots)

    # --- platform ----------------------------------------------------------------------------
    def set_tss_address(self, addr: int) -> None:
        _ioctl(self.fd, b.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_address(self, addr: int) -> None:
        _ioctl(self.fd, b.KVM_SET_IDENTITY_MAP_ADDR, bytearray(struct.pack("<Q", addr)))

    def enable_cap(self, cap: int, *args: int) -> None:
        c = b.kvm_enable_cap(cap=cap)
        for i, a in enumerate(args):
            c.args[i] = a
        _ioctl(self.fd, b.KVM_ENABLE_CAP, c)

    def disable_halt_polling(self) -> bool:
        """Make a halted vCPU sleep at once instead of polling (KVM's default spins up to
        halt_poll_ns). On a host where guest kernel code is emulated, every idle vCPU
        would otherwise burn a large share of a host core. False if KVM cannot."""
        if not self.kvm.check_extension(b.KVM_CAP_HALT_POLL):
            return False
        self.enable_cap(b.KVM_CAP_HALT_POLL, 0)
        return True

    def create_irqchip(self) -> None:
        _ioctl(self.fd, b.KVM_CREATE_IRQCHIP, 0)
        # The in-kernel chip starts with identity routes for the PIC and IOAPIC pins;
        # keep a userspace copy so MSI routes can be added without dropping them.
        for gsi in range(24):
            e = b.kvm_irq_routing_entry(gsi=gsi, type=b.KVM_IRQ_ROUTING_IRQCHIP)
            e.u.irqchip.irqchip = b.KVM_IRQCHIP_IOAPIC
            e.u.irqchip.pin = gsi
            self._routes[gsi] = e
        self._pic_routes = []
        for gsi in range(16):
            if gsi == 2:
                continue
            e = b.kvm_irq_routing_entry(gsi=gsi, type=b.KVM_IRQ_ROUTING_IRQCHIP)
            e.u.irqchip.irqchip = b.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else b.KVM_IRQCHIP_PIC_SLAVE
            e.u.irqchip.pin = gsi % 8
            self._pic_routes.append(e)

    def create_pit2(self) -> None:
        _ioctl(self.fd, b.KVM_CREATE_PIT2, b.kvm_pit_config(flags=b.KVM_PIT_SPEAKER_DUMMY))

    def get_clock(self) -> int:
        """The kvmclock value (ns) all vCPUs see."""
        c = b.kvm_clock_data()
        _ioctl(self.fd, b.KVM_GET_CLOCK, c)
        return c.clock

    def set_clock(self, clock: int) -> None:
        _ioctl(self.fd, b.KVM_SET_CLOCK, b.kvm_clock_data(clock=clock))

    # --- state (snapshots) ---------------------------------------------------------------------
    def get_irqchip(self, chip_id: int) -> bytes:
        """The in-kernel PIC master (0), slave (1) or IOAPIC (2), as KVM's ``kvm_irqchip``."""
        c = b.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, b.KVM_GET_IRQCHIP, c)
        return bytes(c)

    def set_irqchip(self, data: bytes) -> None:
        _ioctl(self.fd, b.KVM_SET_IRQCHIP, b.kvm_irqchip.from_buffer_copy(data))

    def get_pit2(self) -> bytes:
        s = b.kvm_pit_state2()
        _ioctl(self.fd, b.KVM_GET_PIT2, s)
        return bytes(s)

    def set_pit2(self, data: bytes) -> None:
        _ioctl(self.fd, b.KVM_SET_PIT2, b.kvm_pit_state2.from_buffer_copy(data))

    def irq_line(self, gsi: int, level: bool) -> None:
        _ioctl(self.fd, b.KVM_IRQ_LINE, b.kvm_irq_level(irq=gsi, level=int(level)))

    def signal_msi(self, address: int, data: int) -> int:
        msi = b.kvm_msi(address_lo=address & 0xFFFF_FFFF, address_hi=address >> 32, data=data)
        return _ioctl(self.fd, b.KVM_SIGNAL_MSI, msi)

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        e = b.kvm_irq_routing_entry(gsi=gsi, type=b.KVM_IRQ_ROUTING_MSI)
        e.u.msi.address_lo = address & 0xFFFF_FFFF
        e.u.msi.address_hi = address >> 32
        e.u.msi.data = data
        with self._lock:
            self._routes[gsi] = e
            self._commit_routes()

    def remove_route(self, gsi: int) -> None:
        with self._lock:
            if self._routes.pop(gsi, None) is not None:
                self._commit_routes()

    def _commit_routes(self) -> None:
        entries = list(self._routes.values()) + list(getattr(self, "_pic_routes", []))
        buf = _flex(b.kvm_irq_routing(nr=len(entries)), b.kvm_irq_routing_entry, entries)
        _ioctl(self.fd, b.KVM_SET_GSI_ROUTING, buf)

    def register_irqfd(self, fd: int, gsi: int) -> None:
        _ioctl(self.fd, b.KVM_IRQFD, b.kvm_irqfd(fd=fd, gsi=gsi))

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        _ioctl(self.fd, b.KVM_IRQFD, b.kvm_irqfd(fd=fd, gsi=gsi, flags=b.KVM_IRQFD_FLAG_DEASSIGN))

    def _ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool,
                   deassign: bool) -> None:
        flags = (b.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | \
                (b.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0) | \
                (b.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        _ioctl(self.fd, b.KVM_IOEVENTFD, b.kvm_ioeventfd(
            datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags))

    def register_ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                           pio: bool = False) -> None:
        self._ioeventfd(fd, addr, length, datamatch, pio, False)

    def unregister_ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                             pio: bool = False) -> None:
        self._ioeventfd(fd, addr, length, datamatch, pio, True)

    def create_vcpu(self, index: int) -> "Vcpu":
        fd = _ioctl(self.fd, b.KVM_CREATE_VCPU, index)
        return Vcpu(self, index, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: The vCPU state a snapshot saves, by name: (get ioctl, set ioctl, KVM structure). The
#: order is the order of restoring: the FPU, then XSAVE (a superset of it), then the XCRs that
#: enable its components; special registers (whose APIC base places the LAPIC) before the
#: LAPIC; events and MP state last. MSRs are separate (a list of indices), restored after the
#: LAPIC: KVM drops a TSC-deadline write while the LAPIC is not in TSC-deadline mode.
VCPU_STATE = {
    "regs": (b.KVM_GET_REGS, b.KVM_SET_REGS, b.kvm_regs),
    "fpu": (b.KVM_GET_FPU, b.KVM_SET_FPU, b.kvm_fpu),
    "xsave": (b.KVM_GET_XSAVE, b.KVM_SET_XSAVE, b.kvm_xsave),
    "xcrs": (b.KVM_GET_XCRS, b.KVM_SET_XCRS, b.kvm_xcrs),
    "sregs": (b.KVM_GET_SREGS, b.KVM_SET_SREGS, b.kvm_sregs),
    "lapic": (b.KVM_GET_LAPIC, b.KVM_SET_LAPIC, b.kvm_lapic_state),
    "debugregs": (b.KVM_GET_DEBUGREGS, b.KVM_SET_DEBUGREGS, b.kvm_debugregs),
    "vcpu_events": (b.KVM_GET_VCPU_EVENTS, b.KVM_SET_VCPU_EVENTS, b.kvm_vcpu_events),
    "mp_state": (b.KVM_GET_MP_STATE, b.KVM_SET_MP_STATE, b.kvm_mp_state),
}


# --- decoded exits ---------------------------------------------------------------------------
@dataclass(slots=True)
class IoExit:
    port: int
    size: int
    write: bool
    count: int
    data_offset: int


@dataclass(slots=True)
class MmioExit:
    address: int
    size: int
    write: bool
    data: bytes


@dataclass(slots=True)
class EmulationFailure:
    suberror: int
    insn: bytes          # the instruction bytes, empty when KVM gave none


@dataclass(slots=True)
class SystemEvent:
    type: int


_IO_FMT = struct.Struct("<BBHIQ")
_MMIO_FMT = struct.Struct("<Q8sIB")


class Vcpu:
    """A KVM vCPU fd plus its shared ``kvm_run`` page."""

    def __init__(self, vm: Vm, index: int, fd: int):
        self.vm = vm
        self.index = index
        self.fd = fd
        self.run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)

    # --- state ---------------------------------------------------------------------------------
    def get_regs(self) -> b.kvm_regs:
        r = b.kvm_regs()
        _ioctl(self.fd, b.KVM_GET_REGS, r)
        return r

    def set_regs(self, r: b.kvm_regs) -> None:
        _ioctl(self.fd, b.KVM_SET_REGS, r)

    def get_sregs(self) -> b.kvm_sregs:
        s = b.kvm_sregs()
        _ioctl(self.fd, b.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, s: b.kvm_sregs) -> None:
        _ioctl(self.fd, b.KVM_SET_SREGS, s)

    def get_fpu(self) -> b.kvm_fpu:
        f = b.kvm_fpu()
        _ioctl(self.fd, b.KVM_GET_FPU, f)
        return f

    def set_fpu(self, f: b.kvm_fpu) -> None:
        _ioctl(self.fd, b.KVM_SET_FPU, f)

    def get_lapic(self) -> b.kvm_lapic_state:
        s = b.kvm_lapic_state()
        _ioctl(self.fd, b.KVM_GET_LAPIC, s)
        return s

    def set_lapic(self, s: b.kvm_lapic_state) -> None:
        _ioctl(self.fd, b.KVM_SET_LAPIC, s)

    def set_cpuid(self, entries: list[b.kvm_cpuid_entry2]) -> None:
        _ioctl(self.fd, b.KVM_SET_CPUID2, _flex(b.kvm_cpuid2(nent=len(entries)),
                                                  b.kvm_cpuid_entry2, entries))

    def set_cpuid_packed(self, count: int, entries: bytes) -> None:
        """KVM_SET_CPUID2 with ``count`` entries already packed (``CpuidTable.packed``)."""
        _ioctl(self.fd, b.KVM_SET_CPUID2, bytearray(bytes(b.kvm_cpuid2(nent=count)) + entries))

    def set_msrs(self, msrs: "dict[int, int] | PackedMsrs") -> int:
        """Set MSRs (a dict, or packed once with :func:`pack_msrs` when set often); returns
        how many KVM accepted (it stops at the first it rejects)."""
        packed = msrs if isinstance(msrs, PackedMsrs) else pack_msrs(msrs)
        return _ioctl(self.fd, b.KVM_SET_MSRS, bytearray(packed.buffer))

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        entries = [b.kvm_msr_entry(index=i) for i in indices]
        buf = _flex(b.kvm_msrs(nmsrs=len(entries)), b.kvm_msr_entry, entries)
        n = _ioctl(self.fd, b.KVM_GET_MSRS, buf)
        off, size = ctypes.sizeof(b.kvm_msrs), ctypes.sizeof(b.kvm_msr_entry)
        out = {}
        for i in range(n):
            e = b.kvm_msr_entry.from_buffer_copy(buf, off + i * size)
            out[e.index] = e.data
        return out

    def get_mp_state(self) -> int:
        s = b.kvm_mp_state()
        _ioctl(self.fd, b.KVM_GET_MP_STATE, s)
        return s.mp_state

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, b.KVM_SET_MP_STATE, b.kvm_mp_state(mp_state=state))

    def get_vcpu_events(self) -> b.kvm_vcpu_events:
        e = b.kvm_vcpu_events()
        _ioctl(self.fd, b.KVM_GET_VCPU_EVENTS, e)
        return e

    def set_vcpu_events(self, e: b.kvm_vcpu_events) -> None:
        _ioctl(self.fd, b.KVM_SET_VCPU_EVENTS, e)

    def get_state(self, name: str) -> bytes:
        """One piece of the vCPU's state by its name in :data:`VCPU_STATE`, as the bytes of
        KVM's structure (what a snapshot stores)."""
        get, _, struct_type = VCPU_STATE[name]
        s = struct_type()
        _ioctl(self.fd, get, s)
        return bytes(s)

    def set_state(self, name: str, data: bytes) -> None:
        _, set_, struct_type = VCPU_STATE[name]
        if len(data) != ctypes.sizeof(struct_type):
            raise KvmError(f"vCPU state {name}: {len(data)} bytes, KVM's structure has "
                           f"{ctypes.sizeof(struct_type)}")
        _ioctl(self.fd, set_, struct_type.from_buffer_copy(data))

    def translate(self, gva: int) -> int | None:
        t = b.kvm_translation(linear_address=gva)
        _ioctl(self.fd, b.KVM_TRANSLATE, t)
        return t.physical_address if t.valid else None

    # --- running ---------------------------------------------------------------------------------
    def set_immediate_exit(self, value: bool) -> None:
        self.run_map[b.RUN_IMMEDIATE_EXIT] = 1 if value else 0

    def run(self) -> int:
        """Enter the guest; returns the exit reason, or KVM_EXIT_INTR when interrupted."""
        try:
            fcntl.ioctl(self.fd, b.KVM_RUN, 0)
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                return b.KVM_EXIT_INTR
            raise KvmError(f"KVM_RUN on vCPU {self.index}: {os.strerror(e.errno)}") from e
        return struct.unpack_from("<I", self.run_map, b.RUN_EXIT_REASON)[0]

    def io_exit(self) -> IoExit:
        direction, size, port, count, data_offset = _IO_FMT.unpack_from(self.run_map, b.RUN_EXIT_UNION)
        return IoExit(port, size, direction == b.KVM_EXIT_IO_OUT, count, data_offset)

    def mmio_exit(self) -> MmioExit:
        addr, data, length, is_write = _MMIO_FMT.unpack_from(self.run_map, b.RUN_EXIT_UNION)
        return MmioExit(addr, length, bool(is_write), data[:length])

    def set_mmio_read_data(self, data: bytes) -> None:
        off = b.RUN_EXIT_UNION + 8
        self.run_map[off:off + len(data)] = data

    def emulation_failure(self) -> EmulationFailure:
        suberror, ndata = struct.unpack_from("<II", self.run_map, b.RUN_EXIT_UNION)
        insn = b""
        if suberror == b.KVM_INTERNAL_ERROR_EMULATION and ndata >= 2:
            flags = struct.unpack_from("<Q", self.run_map, b.RUN_EXIT_UNION + 8)[0]
            if flags & b.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                n = min(self.run_map[b.RUN_EXIT_UNION + 16], 15)
                insn = bytes(self.run_map[b.RUN_EXIT_UNION + 17:b.RUN_EXIT_UNION + 17 + n])
        return EmulationFailure(suberror, insn)

    def system_event(self) -> SystemEvent:
        return SystemEvent(struct.unpack_from("<I", self.run_map, b.RUN_EXIT_UNION)[0])

    def internal_error_data(self) -> tuple[int, list[int]]:
        suberror, ndata = struct.unpack_from("<II", self.run_map, b.RUN_EXIT_UNION)
        ndata = min(ndata, 16)
        return suberror, list(struct.unpack_from(f"<{ndata}Q", self.run_map, b.RUN_EXIT_UNION + 8))

    def close(self) -> None:
        try:
            self.run_map.close()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
