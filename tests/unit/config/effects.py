"""What each configuration field that works *does*: one probe per field and per CLI key.

pych.config.support says, for every field of every request model, whether pych honours it
(``Works``) or refuses it.  tests/unit/config/test_support.py shows the refusals and that
the rest is accepted; this module holds, for every field marked ``Works``, a **probe**: a
function that sets the field to a value other than its default, builds what pych builds
from it, and asserts the effect at the level where the value is used, so that a field
silently ignored fails its probe.  :data:`PROBES` is the one registry, keyed by field
(``DiskConfig.direct``) and by CLI key (``--disk direct``); test_effects.py fails when a
field or key that works has no probe.

What the probes build, without a guest:

* :func:`built_vm`: a whole ``pych.vm.Vm`` assembled from the configuration as ``vm.boot``
  does (memory manager, legacy and PCI devices, CPU manager) on a fake KVM that records
  every call (:class:`RecordingKvm`), with a fake PVH kernel loaded, so the ACPI tables,
  SMBIOS tables, boot information and guest RAM are those the guest would read.  vCPUs are
  created and their threads started as fakes (:class:`FakeVcpuThread` records the host CPUs
  each would be pinned to).  Nets run in a network namespace of their own
  (:func:`~tests.unit.devices.net.test_tap.in_new_netns`); vhost-user back-ends are
  :class:`~tests.unit.devices.test_vhost_user.FakeBackend` listening on a socket.
* ``vm.create``'s own effects (:func:`created`) through a Vmm on fake VMs.

A few fields have effects that only a real guest (or a real host resource this machine
lacks) shows; their probe is a :class:`ShownBy` naming the test that shows it, and
test_effects.py checks that test exists.

Some fields take a value that is what pych always does (``shared=on``: pych's RAM is always
shared; ``vfio_p2p_dma=off``): their probe shows pych's behaviour is the value's.  Fields
whose every sub-field is refused (``debug_console``, ``cpus.features``) or that admit no
value but their default (``cpus.profile``) carry nothing to honour: :func:`nothing_to_honour`
checks that this stays so.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import fcntl
import itertools
import json
import mmap
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pych.arch.x86_64 import boot, layout
from pych.config import VmConfig
from pych.config.support import SUPPORT, Refused

REPO = Path(__file__).resolve().parents[3]
MiB = 1 << 20
GiB = 1 << 30

Probe = Callable[[Path, pytest.MonkeyPatch], None]


@dataclass(frozen=True)
class ShownBy:
    """The effect is shown by this test (``path::name``), in a real guest."""

    test: str
    why: str

    def exists(self) -> bool:
        path, name = self.test.split("::")
        tree = ast.parse((REPO / path).read_text())
        return any(isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                   and node.name == name for node in ast.walk(tree))


PROBES: dict[str, Probe | ShownBy] = {}

IGNORED: set[str] = set()
"""Fields (``Model.field``) to drop on the way to the VM (set back to their default after
validation), as a pych that silently ignored them would: test_effects.py checks each probe
then fails."""


def _drop_ignored(cfg: Any) -> Any:
    """``cfg`` with every field in :data:`IGNORED` set back to its default, everywhere."""
    from pych.config.base import ApiModel

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        if not isinstance(node, ApiModel):
            return
        for name, info in type(node).model_fields.items():
            if f"{type(node).__name__}.{name}" in IGNORED:
                node.__dict__[name] = info.get_default(call_default_factory=True)
            else:
                walk(getattr(node, name))
    if IGNORED:
        walk(cfg)
    return cfg


def probe(*keys: str) -> Callable[[Probe], Probe]:
    """Register the decorated function as the probe of ``keys`` (``Model.field``)."""
    def register(fn: Probe) -> Probe:
        for key in keys:
            assert key not in PROBES, key
            PROBES[key] = fn
        return fn
    return register


# --------------------------------------------------------------------------
# A VM assembled on a recording fake KVM


class RecordingKvmVm:
    """A KVM VM fd that records every call (name and arguments); memory slots are counted."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self._slots = itertools.count()

    def add_memory(self, gpa: int, size: int, host_addr: int) -> int:
        self.calls.append(("add_memory", gpa, size, host_addr))
        return next(self._slots)

    def create_vcpu(self, index: int):
        self.calls.append(("create_vcpu", index))
        return FakeVcpu(index)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            self.calls.append((name, *args))
            return 0
        return call

    def named(self, name: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == name]


class FakeVcpu:
    def __init__(self, index: int) -> None:
        self.index = index
        self.cpuid = None

    def set_cpuid(self, entries) -> None:
        self.cpuid = list(entries)

    def set_cpuid_packed(self, count: int, packed: bytes) -> None:
        from pych.hypervisor.kvm import bindings as kb
        self.cpuid = list((kb.kvm_cpuid_entry2 * count).from_buffer_copy(packed))

    def get_sregs(self):
        from pych.hypervisor.kvm import bindings as kb
        return kb.kvm_sregs()

    def get_lapic(self):
        from pych.hypervisor.kvm import bindings as kb
        return kb.kvm_lapic_state()

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: 0


class RecordingKvm:
    max_vcpus = 64

    def create_vm(self) -> RecordingKvmVm:
        return RecordingKvmVm()

    def supported_cpuid(self):
        from pych.arch.x86_64.cpuid import entry
        return [entry(0), entry(1), entry(0xB, 0), entry(0xB, 1)]


class FakeVcpuThread:
    """pych.cpu.vcpu.VcpuThread's surface: records the host CPUs it is pinned to."""

    def __init__(self, vcpu, pio, mmio, on_exit, *, host_cpus=None, **kwargs) -> None:
        self.vcpu, self.index, self.host_cpus = vcpu, vcpu.index, host_cpus

    def start(self, *, paused: bool = False, starter=None) -> None:
        self.started = True

    def stop(self) -> bool:
        return True

    def pause(self) -> None: ...
    def resume(self) -> None: ...


def _fake_kernel(tmp: Path) -> str:
    from tests.unit.arch.x86_64.test_boot import _fake_elf

    path = tmp / "vmlinux"
    if not path.exists():
        path.write_bytes(_fake_elf())
    return str(path)


def config(tmp: Path, **fields: Any) -> VmConfig:
    """A VM configuration (2 of 4 vCPUs, 64 MiB, fake PVH kernel, serial and console off,
    two PCI segments) with ``fields`` (JSON) on top."""
    payload = {"kernel": _fake_kernel(tmp), **fields.pop("payload", {})}
    body = {"cpus": {"boot_vcpus": 2, "max_vcpus": 4}, "memory": {"size": 32 * MiB},
            "serial": {"mode": "Off"}, "console": {"mode": "Off"},
            "platform": {"num_pci_segments": 2}, **fields, "payload": payload}
    return VmConfig.model_validate(json.loads(json.dumps(body)))


@contextlib.contextmanager
def built_vm(tmp: Path, mp: pytest.MonkeyPatch, *, serial_port=None, vcpus: bool = True,
             **fields: Any) -> Iterator[Any]:
    """``pych.vm.Vm`` of :func:`config` ``(**fields)``, assembled and its payload loaded
    as ``vm.boot`` does, on :class:`RecordingKvm`; boot vCPUs created and (fake) started."""
    from pych.cpu import manager as cpu_manager
    from pych.vm import Vm

    mp.setattr(cpu_manager, "VcpuThread", FakeVcpuThread)
    cfg = fields.pop("_config", None) or config(tmp, **fields)
    cfg.validate()
    _drop_ignored(cfg)
    vm = Vm(cfg, RecordingKvm(), on_exit=lambda kind, detail: None, serial_port=serial_port,
            on_guest_event=lambda event: None)
    try:
        vm._assemble(None)
        kernel = vm._load_payload()
        if vcpus:
            vm.cpus.create_boot_vcpus(kernel)
            vm.cpus.start()
        yield vm
    finally:
        vm.close()


def device(vm, dev_id: str):
    """The virtio device ``dev_id`` of ``vm`` (behind its PCI transport)."""
    return vm.devices.devices[dev_id].device


def bdf(vm, dev_id: str) -> str:
    return next(node["pci_bdf"] for node in vm.devices.device_tree().values()
                if node.get("children") == [dev_id] or node.get("id") == f"_virtio-pci-{dev_id}")


def in_netns(fn: Callable[[], Any]) -> Any:
    from tests.unit.devices.net.test_tap import in_new_netns
    return in_new_netns(fn)


@contextlib.contextmanager
def backend(tmp: Path, name: str = "vu.sock", **kw: Any) -> Iterator[Any]:
    """A fake vhost-user back-end listening at ``tmp/name``."""
    from tests.unit.devices.test_vhost_user import FakeBackend

    b = FakeBackend(tmp / name, **kw)
    try:
        yield b
    finally:
        b.close()


def image(tmp: Path, name: str = "disk.raw", size: int = MiB, head: bytes = b"") -> str:
    path = tmp / name
    path.write_bytes(head + bytes(size - len(head)))
    return str(path)


# --- reading what the guest reads ------------------------------------------------------------


def acpi_tables(vm) -> dict[str, bytes]:
    """The ACPI tables the boot information points the guest to (RSDP -> XSDT), by
    signature; the DSDT from the FADT."""
    mem = vm.guest_memory
    info = mem.read_obj(layout.PVH_INFO_START, boot.hvm_start_info)
    rsdp = mem.read(info.rsdp_paddr, 36)
    assert rsdp[:8] == b"RSD PTR "
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    length = struct.unpack("<I", mem.read(xsdt_addr + 4, 4))[0]
    xsdt = mem.read(xsdt_addr, length)
    tables = {}
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        size = struct.unpack("<I", mem.read(addr + 4, 4))[0]
        table = mem.read(addr, size)
        tables[table[:4].decode()] = table
    fadt = tables["FACP"]
    dsdt_addr = struct.unpack_from("<Q", fadt, 140)[0] or struct.unpack_from("<I", fadt, 40)[0]
    size = struct.unpack("<I", mem.read(dsdt_addr + 4, 4))[0]
    tables["DSDT"] = mem.read(dsdt_addr, size)
    return tables


def madt_apic_ids(vm) -> list[tuple[int, bool]]:
    """(APIC id, enabled) of each processor entry of the MADT, in order."""
    madt = acpi_tables(vm)["APIC"]
    out, at = [], 44
    while at < len(madt):
        kind, length = madt[at], madt[at + 1]
        if kind == 0:
            out.append((madt[at + 3], bool(struct.unpack_from("<I", madt, at + 4)[0] & 1)))
        elif kind == 9:
            apic, flags = struct.unpack_from("<II", madt, at + 4)
            out.append((apic, bool(flags & 1)))
        at += length
    return out


def smbios_table(vm) -> bytes:
    mem = vm.guest_memory
    anchor = mem.read(0xF0000, 0x20)
    assert anchor[:5] == b"_SM3_"
    length, address = struct.unpack_from("<IQ", anchor, 0xC)
    return mem.read(address, length)


def cmdline(vm) -> bytes:
    mem = vm.guest_memory
    info = mem.read_obj(layout.PVH_INFO_START, boot.hvm_start_info)
    return mem.read(info.cmdline_paddr, 256).split(b"\0")[0]


def vm_flags(address: int) -> tuple[set[str], str]:
    """The VmFlags and the name of this process's mapping that holds ``address``."""
    flags, inside, name = None, False, ""
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                inside = start <= address < end
                if inside:
                    name = " ".join(head[5:])
            elif inside and head[0] == "VmFlags:":
                flags = set(head[1:])
    assert flags is not None, f"no mapping holds {address:#x}"
    return flags, name


def resident(address: int, length: int) -> int:
    """How many pages of ``[address, address + length)`` are resident (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) == 0
    return sum(b & 1 for b in vec)


def fd_flags_of(path: str) -> list[int]:
    """The open flags of each descriptor of this process open on ``path``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                out.append(fcntl.fcntl(int(fd), fcntl.F_GETFL))
        except OSError:
            pass
    return out


def ram(vm) -> list:
    return [r for r in vm.guest_memory.regions]


def nothing_to_honour(model_name: str, field: str, sub: str | None = None) -> Probe:
    """A field that carries nothing pych could ignore: every field of the model it holds is
    refused (``sub``: that model), or its type admits its default only."""
    def check(tmp: Path, mp: pytest.MonkeyPatch) -> None:
        import pych.config
        model = getattr(pych.config, model_name)
        if sub is not None:
            held = getattr(pych.config, sub)
            assert all(isinstance(rule, Refused) for rule in SUPPORT[held].values()), sub
            return
        from pydantic import ValidationError
        default = model.model_fields[field].get_default(call_default_factory=True)
        schema = model.model_json_schema()["properties"][field]
        values = schema.get("enum") or [schema.get("const")]
        assert values == [default], (field, values)
        with pytest.raises(ValidationError):
            model.model_validate({**_MINIMAL.get(model_name, {}), field: f"not-{default}"})
    check.nothing_to_honour = True
    return check


_MINIMAL = {"CpusConfig": {"boot_vcpus": 1, "max_vcpus": 1}}


# ==========================================================================
# VmConfig


@probe("VmConfig.cpus", "CpusConfig.boot_vcpus", "CpusConfig.max_vcpus")
def _cpus(tmp, mp):
    with built_vm(tmp, mp, cpus={"boot_vcpus": 3, "max_vcpus": 5}) as vm:
        assert madt_apic_ids(vm) == [(i, i < 3) for i in range(5)]
        assert sorted(vm.cpus.threads) == [0, 1, 2]
        assert [c[1] for c in vm.kvm_vm.named("create_vcpu")] == [0, 1, 2]


@probe("CpusConfig.topology", "CpuTopology.threads_per_core", "CpuTopology.cores_per_die",
       "CpuTopology.dies_per_package", "CpuTopology.packages")
def _topology(tmp, mp):
    # 2 threads x 3 cores x 2 dies x 2 packages: APIC ids carry 1 thread bit, 2 core bits,
    # 1 die bit; vCPU 23 is thread 1 of core 2 of die 1 of package 1.
    topo = {"threads_per_core": 2, "cores_per_die": 3, "dies_per_package": 2, "packages": 2}
    with built_vm(tmp, mp, cpus={"boot_vcpus": 1, "max_vcpus": 24, "topology": topo},
                  vcpus=False) as vm:
        ids = [apic for apic, _ in madt_apic_ids(vm)]
        assert ids[1] == 1 and ids[2] == 2 and ids[6] == 8 and ids[12] == 16
        assert ids[23] == 1 | 2 << 1 | 1 << 3 | 1 << 4
        vcpu = vm.cpus._create_vcpu(23)
        from pych.arch.x86_64.cpuid import find
        assert find(vcpu.cpuid, 0xB, 0).edx == ids[23]          # x2APIC id
        assert find(vcpu.cpuid, 0xB, 0).ebx == 2                  # threads per core


@probe("CpusConfig.affinity", "CpuAffinity.vcpu", "CpuAffinity.host_cpus")
def _affinity(tmp, mp):
    mp.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    with built_vm(tmp, mp, cpus={"boot_vcpus": 2, "max_vcpus": 4, "affinity": [
            {"vcpu": 1, "host_cpus": [0, 2]}]}) as vm:
        assert vm.cpus.threads[0].host_cpus is None
        assert set(vm.cpus.threads[1].host_cpus) == {0, 2}


PROBES["CpusConfig.features"] = nothing_to_honour("CpusConfig", "features", sub="CpuFeatures")
PROBES["CpusConfig.profile"] = nothing_to_honour("CpusConfig", "profile")
PROBES["VmConfig.debug_console"] = nothing_to_honour("VmConfig", "debug_console",
                                                     sub="DebugConsoleConfig")


# --- payload ---------------------------------------------------------------------------------


@probe("VmConfig.payload", "PayloadConfig.kernel")
def _kernel(tmp, mp):
    from tests.unit.arch.x86_64.test_boot import _fake_elf
    kernel = tmp / "other-vmlinux"
    kernel.write_bytes(_fake_elf(paddr=0x1800000, entry=0x1800042))
    with built_vm(tmp, mp, payload={"kernel": str(kernel)}) as vm:
        assert vm.guest_memory.read(0x1800000, 4) == b"\x90" * 4
        assert vm.guest_memory.read(0x1000000, 4) != b"\x90" * 4


@probe("PayloadConfig.cmdline")
def _cmdline(tmp, mp):
    with built_vm(tmp, mp, payload={"cmdline": "console=hvc0 probe=1"}) as vm:
        assert cmdline(vm) == b"console=hvc0 probe=1"


@probe("PayloadConfig.initramfs")
def _initramfs(tmp, mp):
    initrd = tmp / "initrd"
    initrd.write_bytes(b"070701PROBE" * 100)
    with built_vm(tmp, mp, payload={"initramfs": str(initrd)}) as vm:
        info = vm.guest_memory.read_obj(layout.PVH_INFO_START, boot.hvm_start_info)
        assert info.nr_modules == 1
        module = vm.guest_memory.read_obj(info.modlist_paddr, boot.hvm_modlist_entry)
        assert module.size == 1100
        assert vm.guest_memory.read(module.paddr, 11) == b"070701PROBE"


# --- platform: SMBIOS -------------------------------------------------------------------------

_SMBIOS = {"system_serial_number": "SER-PROBE", "system_manufacturer": "MAKER-PROBE",
           "system_product_name": "PRODUCT-PROBE", "system_version": "VERSION-PROBE",
           "system_family": "FAMILY-PROBE", "system_sku_number": "SKU-PROBE",
           "chassis_asset_tag": "ASSET-PROBE"}


def _smbios_string(field: str, value: str) -> Probe:
    def check(tmp, mp):
        with built_vm(tmp, mp, platform={"num_pci_segments": 2, field: value}) as vm:
            assert value.encode() + b"\0" in smbios_table(vm)
        with built_vm(tmp, mp) as vm:
            assert value.encode() not in smbios_table(vm)
    return check


for _field, _value in _SMBIOS.items():
    PROBES[f"PlatformConfig.{_field}"] = _smbios_string(_field, _value)


@probe("VmConfig.platform", "PlatformConfig.oem_strings")
def _oem_strings(tmp, mp):
    with built_vm(tmp, mp, platform={"oem_strings": ["OEM-ONE", "OEM-TWO"]}) as vm:
        table = smbios_table(vm)
        at = table.index(b"OEM-ONE\0OEM-TWO\0")
        assert table.rfind(bytes([11]), 0, at) >= 0           # a type 11 structure holds them


@probe("PlatformConfig.system_uuid")
def _uuid(tmp, mp):
    import uuid
    given = "4a3f8d6e-94d1-4c6b-8d2e-6f1f2a0b9c11"
    with built_vm(tmp, mp, platform={"system_uuid": given}) as vm:
        assert uuid.UUID(given).bytes_le in smbios_table(vm)


# --- PCI segments -----------------------------------------------------------------------------


@probe("VmConfig.pci_segments", "PciSegmentConfig.pci_segment",
       "PciSegmentConfig.mmio32_aperture_weight")
def _mmio32_weight(tmp, mp):
    def widths(**fields):
        with built_vm(tmp, mp, **fields) as vm:
            return [seg.mem32.size for seg in vm.devices.segments]
    even = widths()
    weighted = widths(pci_segments=[{"pci_segment": 1, "mmio32_aperture_weight": 3}])
    assert even[0] == even[1] and weighted[1] > 2 * weighted[0]


@probe("PciSegmentConfig.mmio64_aperture_weight")
def _mmio64_weight(tmp, mp):
    def widths(**fields):
        with built_vm(tmp, mp, **fields) as vm:
            return [seg.mem64.size for seg in vm.devices.segments]
    even = widths()
    weighted = widths(pci_segments=[{"pci_segment": 0, "mmio64_aperture_weight": 3}])
    assert even[0] == even[1] and weighted[0] == 3 * weighted[1]


# ==========================================================================
# Memory


def _regions(vm) -> dict[str, Any]:
    return {r.name: r for r in vm.guest_memory.regions}


@probe("VmConfig.memory", "MemoryConfig.size")
def _memory_size(tmp, mp):
    with built_vm(tmp, mp, memory={"size": 96 * MiB}) as vm:
        assert sum(r.size for r in vm.guest_memory.regions) == 96 * MiB
        slots = vm.kvm_vm.named("add_memory")
        assert sum(call[2] for call in slots) == 96 * MiB


@probe("MemoryConfig.hotplug_size")
def _memory_hotplug_size(tmp, mp):
    with built_vm(tmp, mp, memory={"size": 32 * MiB, "hotplug_size": 512 * MiB}) as vm:
        assert vm.memory.hotplug_window[1] == 512 * MiB
        assert vm.memory.resize(32 * MiB + 256 * MiB)          # a DIMM fits the window
        assert vm.memory.actual_size == 288 * MiB


@probe("MemoryConfig.hotplug_method")
def _memory_hotplug_method(tmp, mp):
    with built_vm(tmp, mp, memory={"size": 32 * MiB, "hotplug_size": 256 * MiB,
                                   "hotplug_method": "VirtioMem"}) as vm:
        zones = vm.memory.virtio_mem_zones
        assert len(zones) == 1 and zones[0].region.size == 256 * MiB
        assert any(type(d.device).__name__ == "VirtioMem" for d in vm.devices.devices.values())


@probe("MemoryConfig.hotplugged_size")
def _memory_hotplugged_size(tmp, mp):
    with built_vm(tmp, mp, memory={"size": 32 * MiB, "hotplug_size": 256 * MiB,
                                   "hotplug_method": "VirtioMem",
                                   "hotplugged_size": 128 * MiB}) as vm:
        zone = vm.memory.virtio_mem_zones[0]
        assert zone.device.requested_size == 128 * MiB
        assert struct.pack("<Q", 128 * MiB) in zone.device.config_bytes()


@probe("MemoryConfig.mergeable")
def _memory_mergeable(tmp, mp):
    with built_vm(tmp, mp, memory={"size": 32 * MiB, "mergeable": True}) as vm:
        assert all("mg" in vm_flags(r.host_addr)[0] for r in ram(vm))
    with built_vm(tmp, mp) as vm:
        assert not any("mg" in vm_flags(r.host_addr)[0] for r in ram(vm))


@probe("MemoryConfig.shared")
def _memory_shared(tmp, mp):
    """``shared=on`` is what pych always does: guest RAM is a memfd mapped shared."""
    with built_vm(tmp, mp, memory={"size": 32 * MiB, "shared": True}) as vm:
        for region in ram(vm):
            flags, name = vm_flags(region.host_addr)
            assert "sh" in flags and "memfd:" in name, (flags, name)


def _recorded_hugepage_memfds(mp) -> list[tuple]:
    from pych.memory import hugepages

    from tests.unit.memory.test_hugepages import record_hugepage_memfds

    calls = record_hugepage_memfds(mp)
    mp.setattr(hugepages, "host_sizes", lambda sysfs=None: [2 * MiB, GiB])
    mp.setattr(hugepages, "default_size", lambda meminfo=None: 2 * MiB)
    mp.setattr(hugepages, "pool", lambda size, sysfs=None: (4096, 4096, 0))
    return calls


@probe("MemoryConfig.hugepages")
def _memory_hugepages(tmp, mp):
    calls = _recorded_hugepage_memfds(mp)
    with built_vm(tmp, mp, memory={"size": 32 * MiB, "hugepages": True}):
        assert calls == [("pych-mem0", 32 * MiB, 2 * MiB)]


@probe("MemoryConfig.hugepage_size")
def _memory_hugepage_size(tmp, mp):
    calls = _recorded_hugepage_memfds(mp)
    with built_vm(tmp, mp, memory={"size": GiB, "hugepages": True, "hugepage_size": GiB}):
        assert [c[2] for c in calls] == [GiB]


@probe("MemoryConfig.prefault")
def _memory_prefault(tmp, mp):
    with built_vm(tmp, mp, memory={"size": 32 * MiB, "prefault": True}) as vm:
        region = _regions(vm)["ram0"] if "ram0" in _regions(vm) else ram(vm)[0]
        assert resident(region.host_addr, region.size) == region.size // mmap.PAGESIZE
    with built_vm(tmp, mp) as vm:
        region = ram(vm)[-1]
        assert resident(region.host_addr, region.size) < region.size // mmap.PAGESIZE // 2


@probe("MemoryConfig.thp")
def _memory_thp(tmp, mp):
    with built_vm(tmp, mp, memory={"size": 32 * MiB, "thp": False}) as vm:
        assert not any("hg" in vm_flags(r.host_addr)[0] for r in ram(vm))
    with built_vm(tmp, mp) as vm:
        assert all("hg" in vm_flags(r.host_addr)[0] for r in ram(vm))


# --- zones ------------------------------------------------------------------------------------

def _zoned(zone: dict, **memory: Any) -> dict:
    return {"memory": {"size": 0, **memory, "zones": [{"id": "z0", "size": 32 * MiB, **zone}]}}


@probe("MemoryConfig.zones", "MemoryZoneConfig.id", "MemoryZoneConfig.size")
def _zone(tmp, mp):
    with built_vm(tmp, mp, **_zoned({"id": "zprobe", "size": 80 * MiB})) as vm:
        assert sum(r.size for r in ram(vm)) == 80 * MiB
        assert all("pych-zprobe" in vm_flags(r.host_addr)[1] for r in ram(vm))


@probe("MemoryZoneConfig.file")
def _zone_file(tmp, mp):
    backing = tmp / "zone.mem"
    with open(backing, "wb") as f:
        f.truncate(32 * MiB)
        f.write(b"ZONEFILE")
    with built_vm(tmp, mp, **_zoned({"file": str(backing)})) as vm:
        assert vm.guest_memory.read(0, 8) == b"ZONEFILE"
        assert str(backing) in vm_flags(ram(vm)[0].host_addr)[1]


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@probe("MemoryZoneConfig.shared")
def _zone_shared(tmp, mp):
    backing = tmp / "zone.mem"
    with open(backing, "wb") as f:
        f.truncate(32 * MiB)
    with built_vm(tmp, mp, **_zoned({"file": str(backing), "shared": True})) as vm:
        assert "sh" in vm_flags(ram(vm)[0].host_addr)[0]
        vm.guest_memory.write(0x1000, b"WRITTEN")
    assert _read(backing, 0x1000, 7) == b"WRITTEN"      # reached the file
    with built_vm(tmp, mp, **_zoned({"file": str(backing)})) as vm:
        assert "sh" not in vm_flags(ram(vm)[0].host_addr)[0]
        vm.guest_memory.write(0x2000, b"PRIVATE")
    assert _read(backing, 0x2000, 7) == bytes(7)


@probe("MemoryZoneConfig.hugepages")
def _zone_hugepages(tmp, mp):
    calls = _recorded_hugepage_memfds(mp)
    with built_vm(tmp, mp, **_zoned({"hugepages": True})):
        assert calls == [("pych-z0", 32 * MiB, 2 * MiB)]


@probe("MemoryZoneConfig.hugepage_size")
def _zone_hugepage_size(tmp, mp):
    calls = _recorded_hugepage_memfds(mp)
    with built_vm(tmp, mp, **_zoned({"size": GiB, "hugepages": True, "hugepage_size": GiB})):
        assert [c[2] for c in calls] == [GiB]


@probe("MemoryZoneConfig.hotplug_size")
def _zone_hotplug_size(tmp, mp):
    with built_vm(tmp, mp, **_zoned({"hotplug_size": 256 * MiB},
                                    hotplug_method="VirtioMem")) as vm:
        zone, = vm.memory.virtio_mem_zones
        assert zone.id.startswith("_mem") or zone.id
        assert zone.region.size == 256 * MiB


@probe("MemoryZoneConfig.hotplugged_size")
def _zone_hotplugged_size(tmp, mp):
    with built_vm(tmp, mp, **_zoned({"hotplug_size": 256 * MiB, "hotplugged_size": 128 * MiB},
                                    hotplug_method="VirtioMem")) as vm:
        zone, = vm.memory.virtio_mem_zones
        assert zone.device.requested_size == 128 * MiB


@probe("MemoryZoneConfig.prefault")
def _zone_prefault(tmp, mp):
    with built_vm(tmp, mp, **_zoned({"prefault": True})) as vm:
        region = ram(vm)[0]
        assert resident(region.host_addr, region.size) == region.size // mmap.PAGESIZE


@probe("MemoryZoneConfig.mergeable")
def _zone_mergeable(tmp, mp):
    with built_vm(tmp, mp, **_zoned({"mergeable": True})) as vm:
        assert "mg" in vm_flags(ram(vm)[0].host_addr)[0]
    with built_vm(tmp, mp, **_zoned({})) as vm:
        assert "mg" not in vm_flags(ram(vm)[0].host_addr)[0]


# ==========================================================================
# Devices


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield None


# Per device model: the VmConfig field, its list-ness, a minimal instance (given tmp and the
# back-end made for it), and the back-end it needs.
_KINDS: dict[str, tuple[str, bool, Callable[[Path, Any], dict]]] = {
    "DiskConfig": ("disks", True, lambda tmp, b: {"path": image(tmp)}),
    "NetConfig": ("net", True, lambda tmp, b: {}),
    "RngConfig": ("rng", False, lambda tmp, b: {"src": "/dev/urandom"}),
    "BalloonConfig": ("balloon", False, lambda tmp, b: {"size": 0}),
    "ConsoleConfig": ("console", False, lambda tmp, b: {"mode": "Null"}),
    "FsConfig": ("fs", True, lambda tmp, b: {"tag": "probe", "socket": b.path}),
    "PmemConfig": ("pmem", True, lambda tmp, b: {"file": image(tmp, "pmem.img", 2 * MiB)}),
    "VsockConfig": ("vsock", False, lambda tmp, b: {"cid": 3,
                                                    "socket": str(tmp / "vsock.sock")}),
}


def with_device(model: str, given: dict, check: Callable[[Any, str, Any], None], *,
                backend_kw: dict | None = None, **vm_fields: Any) -> Probe:
    """A probe: a VM with one device of ``model`` (its minimal instance plus ``given``), and
    ``check(vm, device id, back-end)``.  Nets are built in a network namespace of their
    own; fs gets a fake vhost-user back-end."""
    field, is_list, minimal = _KINDS[model]

    def run(tmp: Path, mp: pytest.MonkeyPatch) -> None:
        def build() -> None:
            needs = model == "FsConfig" or backend_kw is not None
            with (backend(tmp, **(backend_kw or {})) if needs else _nothing()) as b:
                instance = {**minimal(tmp, b), **(given(tmp, b) if callable(given) else given)}
                fields = {field: [instance] if is_list else instance, **vm_fields}
                with built_vm(tmp, mp, vcpus=False, **fields) as vm:
                    dev_id, = (d for d in vm.devices.devices
                               if d != "__rng" or model == "RngConfig")
                    check(vm, dev_id, b)
        if model == "NetConfig":
            in_netns(build)
        else:
            build()
    return run


_PCI_MODELS = ("DiskConfig", "NetConfig", "RngConfig", "BalloonConfig", "ConsoleConfig",
               "FsConfig", "PmemConfig", "VsockConfig")

for _model in _PCI_MODELS:
    def _id(vm, dev_id, b):
        assert dev_id == "probe-id" and "probe-id" in vm.devices.device_tree()

    def _segment(vm, dev_id, b):
        assert bdf(vm, dev_id) == "0001:00:00.0"
        assert vm.devices.segments[1].bus.device(0) is vm.devices.devices[dev_id]

    def _slot(vm, dev_id, b):
        assert bdf(vm, dev_id) == "0000:00:07.0"

    PROBES[f"{_model}.id"] = with_device(_model, {"id": "probe-id"}, _id)
    PROBES[f"{_model}.pci_segment"] = with_device(_model, {"pci_segment": 1}, _segment)
    PROBES[f"{_model}.pci_device_id"] = with_device(_model, {"pci_device_id": 7}, _slot)


def _kind_is(device_type: str, given: dict | None = None,
             then: Callable[[Any], None] = lambda device: None) -> Callable:
    """The device built is a virtio device of ``device_type`` (and ``then(device)``)."""
    from pych.devices.virtio.device import VirtioDeviceType

    def check(vm, dev_id, b):
        device = vm.devices.devices[dev_id].device
        assert device.device_type == VirtioDeviceType[device_type], device
        then(device)
    return check


def _sink_is_null(console) -> None:
    assert type(console.sink).__name__ == "NullBackend", console.sink


def _src_is_random(rng) -> None:
    assert os.readlink(f"/proc/self/fd/{rng._fd}") == "/dev/random"


# The VmConfig fields that hold devices: a device of the kind is built from a value other
# than the default (rng: another source; console: null instead of tty).
PROBES["VmConfig.disks"] = with_device("DiskConfig", {}, _kind_is("BLOCK"))
PROBES["VmConfig.net"] = with_device("NetConfig", {}, _kind_is("NET"))
PROBES["VmConfig.rng"] = with_device("RngConfig", {"src": "/dev/random"},
                                     _kind_is("RNG", then=_src_is_random))
PROBES["VmConfig.balloon"] = with_device("BalloonConfig", {}, _kind_is("BALLOON"))
PROBES["VmConfig.console"] = with_device("ConsoleConfig", {"mode": "Null"},
                                         _kind_is("CONSOLE", then=_sink_is_null))
PROBES["VmConfig.fs"] = with_device("FsConfig", {}, _kind_is("FS"))
PROBES["VmConfig.pmem"] = with_device("PmemConfig", {}, _kind_is("PMEM"))
PROBES["VmConfig.vsock"] = with_device("VsockConfig", {}, _kind_is("VSOCK"))


def _dev(vm, dev_id):
    return vm.devices.devices[dev_id].device


# --- disks ------------------------------------------------------------------------------------

def _disk(given: dict, check: Callable[[Any], None], **kw: Any) -> Probe:
    return with_device("DiskConfig", given, lambda vm, dev_id, b: check(_dev(vm, dev_id)), **kw)


def _disk_path(tmp, mp):
    other = image(tmp, "other.raw", 3 * MiB)
    with built_vm(tmp, mp, vcpus=False, disks=[{"path": other}]) as vm:
        disk = _dev(vm, "_disk0")
        assert disk.capacity == 3 * MiB // 512
        assert struct.unpack_from("<Q", disk.config_bytes())[0] == 3 * MiB // 512
        assert fd_flags_of(other)


PROBES["DiskConfig.path"] = _disk_path


def _readonly(disk):
    from pych.devices.virtio.block import VIRTIO_BLK_F_RO
    assert disk.avail_features & VIRTIO_BLK_F_RO
    assert all(flags & os.O_ACCMODE == os.O_RDONLY for flags in fd_flags_of(disk.image.path))


def _direct(disk):
    flags = fd_flags_of(disk.image.path)
    assert flags and all(f & os.O_DIRECT for f in flags), flags


def _disk_queues(disk):
    from pych.devices.virtio.block import VIRTIO_BLK_F_MQ
    assert len(disk.queue_max_sizes) == 2 and disk.avail_features & VIRTIO_BLK_F_MQ
    assert struct.unpack_from("<H", disk.config_bytes(), 34)[0] == 2


def _limiter(disk):
    limiter = disk.rate_limiter
    assert limiter.bandwidth.size == 1000 and limiter.bandwidth.refill_time_ms == 10
    assert limiter.bandwidth.one_time_burst == 7 and limiter.ops is None


PROBES["DiskConfig.readonly"] = _disk({"readonly": True}, _readonly)
PROBES["DiskConfig.direct"] = _disk({"direct": True}, _direct)
PROBES["DiskConfig.num_queues"] = _disk({"num_queues": 2}, _disk_queues)
PROBES["DiskConfig.queue_size"] = _disk({"queue_size": 512},
                                        lambda d: d.queue_max_sizes == (512,) or _fail(d))
PROBES["DiskConfig.serial"] = _disk({"serial": "PROBE-SERIAL"},
                                    lambda d: d.serial.startswith(b"PROBE-SERIAL\0") or _fail(d))
for _key in ("DiskConfig.rate_limiter_config", "RateLimiterConfig.bandwidth",
             "TokenBucket.size", "TokenBucket.refill_time", "TokenBucket.one_time_burst"):
    PROBES[_key] = _disk({"rate_limiter_config": {"bandwidth": {
        "size": 1000, "refill_time": 10, "one_time_burst": 7}}}, _limiter)


def _ops(disk):
    assert disk.rate_limiter.ops.size == 50 and disk.rate_limiter.bandwidth is None


PROBES["RateLimiterConfig.ops"] = _disk(
    {"rate_limiter_config": {"ops": {"size": 50, "refill_time": 100}}}, _ops)


def _fail(thing) -> bool:
    raise AssertionError(thing)


@probe("VmConfig.rate_limit_groups", "DiskConfig.rate_limit_group",
       "RateLimitGroupConfig.id", "RateLimitGroupConfig.rate_limiter_config")
def _groups(tmp, mp):
    groups = [{"id": "ga", "rate_limiter_config": {"bandwidth": {"size": 111,
                                                                 "refill_time": 10}}},
              {"id": "gb", "rate_limiter_config": {"ops": {"size": 222, "refill_time": 10}}}]
    disks = [{"path": image(tmp, "a.raw"), "rate_limit_group": "gb"},
             {"path": image(tmp, "b.raw"), "rate_limit_group": "gb"},
             {"path": image(tmp, "c.raw"), "rate_limit_group": "ga"}]
    with built_vm(tmp, mp, vcpus=False, rate_limit_groups=groups, disks=disks) as vm:
        a, b, c = (_dev(vm, f"_disk{i}").rate_limiter for i in range(3))
        assert a is b and a.ops.size == 222 and c.bandwidth.size == 111 and c is not a


def _no_io_engine(name: str) -> Callable[[Any], None]:
    """pych has one I/O engine (preadv/pwritev on the disk's worker): after a request, the
    process has no io_uring instance and no AIO ring."""
    def check(disk):
        from tests.support.virtio import DeviceHarness
        with DeviceHarness(disk, queue_size=16) as h:
            head = h.queue(0).add_chain([struct.pack("<IIQ", 0, 0, 0)], [4096, 1])
            h.kick(0)
            assert h.wait_used(0, 1)[0].id == head
        links = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                 if os.path.exists(f"/proc/self/fd/{fd}")]
        assert not any("io_uring" in link for link in links)
        assert "[aio]" not in Path("/proc/self/maps").read_text()
    return check


PROBES["DiskConfig.disable_io_uring"] = _disk({"disable_io_uring": True},
                                              _no_io_engine("io_uring"))
PROBES["DiskConfig.disable_aio"] = _disk({"disable_aio": True}, _no_io_engine("aio"))

QCOW2 = b"QFI\xfb" + struct.pack(">I", 3)


@probe("DiskConfig.image_type")
def _image_type(tmp, mp):
    from pych.device_manager.manager import DeviceBackendError
    raw = image(tmp, "raw.img")
    with pytest.raises(DeviceBackendError, match="qcow2|Qcow2|QCOW2"):
        with built_vm(tmp, mp, vcpus=False, disks=[{"path": raw, "image_type": "Qcow2"}]):
            pass
    looks_qcow2 = image(tmp, "q.img", head=QCOW2)        # Raw: taken at its word
    with built_vm(tmp, mp, vcpus=False, disks=[{"path": looks_qcow2, "image_type": "Raw"}]) as vm:
        assert type(_dev(vm, "_disk0")).__name__ == "VirtioBlock"


@probe("DiskConfig.lock_granularity")
def _lock_granularity(tmp, mp):
    """``full``: the whole image is locked, so a lock on any byte range conflicts."""
    path = image(tmp)
    with built_vm(tmp, mp, vcpus=False, disks=[{"path": path, "lock_granularity": "Full"}]):
        fd = os.open(path, os.O_RDWR)
        try:
            for start in (0, MiB - 1):
                request = struct.pack("=hh4xqqi4x", fcntl.F_RDLCK, os.SEEK_SET, start, 1, 0)
                with pytest.raises(OSError):
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
        finally:
            os.close(fd)


@probe("DiskConfig.backing_files")
def _backing_files(tmp, mp):
    """``backing_files=on``: a qcow2 image is served by a qemu-storage-daemon, which follows
    its backing file (the daemon's command line and blockdev options show it)."""
    from pych.devices import storage_daemon
    started = []
    mp.setattr(storage_daemon.StorageDaemon, "start", lambda self: started.append(self))
    mp.setattr("pych.devices.storage_daemon.connect_when_listening",
               lambda path: _fail("no daemon runs in a unit test"))
    with pytest.raises(Exception):
        with built_vm(tmp, mp, vcpus=False, disks=[{"path": image(tmp, "q.img", head=QCOW2),
                                                     "backing_files": True}]):
            pass
    command = started[0].command()
    blockdev = json.loads(command[command.index("--blockdev") + 1])
    assert blockdev["driver"] == "qcow2" and "backing" not in blockdev    # followed


# --- nets -------------------------------------------------------------------------------------

def _net(given: dict, check: Callable[[Any], None], **kw: Any) -> Probe:
    return with_device("NetConfig", given, lambda vm, dev_id, b: check(_dev(vm, dev_id)), **kw)


def _link(name: str) -> dict:
    """The host side of the interface ``name`` in this network namespace."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        link = ipr.get_links(index)[0]
        addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                 for a in ipr.get_addr(index=index, family=socket.AF_INET)]
        return {"mac": link.get_attr("IFLA_ADDRESS"), "mtu": link.get_attr("IFLA_MTU"),
                "addrs": addrs}


def _tap_name(net) -> str:
    return net.pairs[0].tap.name


PROBES["NetConfig.tap"] = _net({"tap": "probetap0"},
                               lambda n: _tap_name(n) == "probetap0" or _fail(n))
PROBES["NetConfig.ip"] = PROBES["NetConfig.mask"] = _net(
    {"ip": "192.168.77.1", "mask": "255.255.255.128"},
    lambda n: _link(_tap_name(n))["addrs"] == [("192.168.77.1", 25)] or _fail(n))
PROBES["NetConfig.host_mac"] = _net(
    {"host_mac": "12:34:56:78:9a:bd"},
    lambda n: _link(_tap_name(n))["mac"] == "12:34:56:78:9a:bd" or _fail(n))


def _mtu(net):
    from pych.devices.virtio.net import VIRTIO_NET_F_MTU
    assert net.avail_features & VIRTIO_NET_F_MTU
    assert struct.unpack_from("<H", net.config_bytes(), 10)[0] == 1400
    assert _link(_tap_name(net))["mtu"] == 1400


PROBES["NetConfig.mtu"] = _net({"mtu": 1400}, _mtu)
PROBES["NetConfig.mac"] = _net({"mac": "12:34:56:78:9a:bc"},
                               lambda n: n.config_bytes()[:6] == bytes.fromhex("123456789abc")
                               or _fail(n))


def _pairs(net):
    from pych.devices.virtio.net import VIRTIO_NET_F_MQ
    assert len(net.pairs) == 2 and net.avail_features & VIRTIO_NET_F_MQ
    assert len(net.queue_max_sizes) == 5                      # 2 pairs + the control queue
    assert struct.unpack_from("<H", net.config_bytes(), 8)[0] == 2


PROBES["NetConfig.num_queues"] = _net({"num_queues": 4}, _pairs)
PROBES["NetConfig.queue_size"] = _net(
    {"queue_size": 512}, lambda n: set(n.queue_max_sizes[:2]) == {512} or _fail(n))


def _offloads(off: dict, gone: int) -> Probe:
    def check(net):
        assert not net.avail_features & gone, hex(net.avail_features)
    return _net(off, check)


def _bits(*names: str) -> int:
    from pych.devices.virtio import net
    return sum(getattr(net, name) for name in names)


PROBES["NetConfig.offload_tso"] = _offloads(
    {"offload_tso": False}, _bits("VIRTIO_NET_F_HOST_TSO4", "VIRTIO_NET_F_GUEST_TSO4"))
PROBES["NetConfig.offload_ufo"] = _offloads(
    {"offload_ufo": False}, _bits("VIRTIO_NET_F_HOST_UFO", "VIRTIO_NET_F_GUEST_UFO"))
PROBES["NetConfig.offload_csum"] = _offloads(
    {"offload_csum": False, "offload_tso": False, "offload_ufo": False},
    _bits("VIRTIO_NET_F_CSUM", "VIRTIO_NET_F_GUEST_CSUM"))


def _net_limiter(net):
    pair = net.pairs[0]
    assert pair.rx_rate_limiter.ops.size == 50 and pair.tx_rate_limiter.ops.size == 50
    assert pair.rx_rate_limiter is not pair.tx_rate_limiter


PROBES["NetConfig.rate_limiter_config"] = _net(
    {"rate_limiter_config": {"ops": {"size": 50, "refill_time": 100}}}, _net_limiter)


@probe("NetConfig.fds")
def _net_fds(tmp, mp):
    from pych.devices.net.tap import open_queues

    def run():
        caller = open_queues("givenfd0", 1)
        try:
            cfg = config(tmp, net=[{}])
            cfg.net[0].fds = [caller[0].fd]           # as vm.add-net's SCM_RIGHTS leaves it
            with built_vm(tmp, mp, vcpus=False, _config=cfg) as vm:
                net = _dev(vm, "_net0")
                assert _tap_name(net) == "givenfd0"
                assert os.path.samestat(os.fstat(net.pairs[0].tap.fd),
                                        os.fstat(caller[0].fd))
        finally:
            for tap in caller:
                tap.close()
    in_netns(run)


def _vhost_user_net(given: dict, check) -> Probe:
    from tests.unit.devices.virtio.test_vhost_user_net import DPDK_FEATURES, DPDK_PROTOCOL

    def run(tmp, mp):
        with backend(tmp, features=DPDK_FEATURES, protocol_features=DPDK_PROTOCOL,
                     queue_num=2) as b:
            cfg = {"vhost_user": True, "vhost_socket": b.path, **given}
            with built_vm(tmp, mp, vcpus=False, net=[cfg]) as vm:
                check(vm, _dev(vm, "_net0"), b)
    return run


def _served_by_backend(vm, net, b):
    assert type(net).__name__ == "VhostUserNet"
    assert b.connections == 1 and "GET_FEATURES" in b.requests()


PROBES["NetConfig.vhost_user"] = _vhost_user_net({}, _served_by_backend)
PROBES["NetConfig.vhost_socket"] = _vhost_user_net({}, _served_by_backend)


@probe("NetConfig.vhost_mode")
def _vhost_mode(tmp, mp):
    """``server``: pych listens at the socket (accept_backend) instead of connecting."""
    from tests.unit.devices.virtio.test_vhost_user_net import DPDK_FEATURES, DPDK_PROTOCOL
    from tests.unit.devices.test_vhost_user import FakeBackend

    b = FakeBackend(features=DPDK_FEATURES, protocol_features=DPDK_PROTOCOL, queue_num=2)
    accepted = []

    def accept(path, **kw):
        accepted.append(path)
        return b.frontend()

    mp.setattr("pych.devices.virtio.vhost_user_net.accept_backend", accept)
    try:
        sock = str(tmp / "server.sock")
        with built_vm(tmp, mp, vcpus=False, net=[{"vhost_user": True, "vhost_socket": sock,
                                                  "vhost_mode": "Server"}]):
            assert accepted == [sock]
    finally:
        b.close()


# --- the other devices ------------------------------------------------------------------------

PROBES["RngConfig.src"] = with_device(
    "RngConfig", {"src": "/dev/random"},
    lambda vm, d, b: ("/dev/random" in [os.readlink(f"/proc/self/fd/{_dev(vm, d)._fd}")]
                      or _fail(d)))
PROBES["BalloonConfig.size"] = with_device(
    "BalloonConfig", {"size": 16 * MiB},
    lambda vm, d, b: struct.unpack_from("<I", _dev(vm, d).config_bytes())[0] == 16 * MiB // 4096
    or _fail(d))
PROBES["BalloonConfig.deflate_on_oom"] = with_device(
    "BalloonConfig", {"deflate_on_oom": True},
    lambda vm, d, b: _dev(vm, d).avail_features & (1 << 2) or _fail(d))


def _reporting(vm, d, b):
    balloon = _dev(vm, d)
    assert balloon.avail_features & (1 << 5) and len(balloon.queue_max_sizes) == 3


PROBES["BalloonConfig.free_page_reporting"] = with_device(
    "BalloonConfig", {"free_page_reporting": True}, _reporting)


def _console_file(vm, d, b):
    console = _dev(vm, d)
    console.sink.write(b"probe output\n")
    path = vm.config.console.file
    for _ in range(200):
        if Path(path).read_bytes() == b"probe output\n":
            return
        __import__("time").sleep(0.005)
    raise AssertionError(Path(path).read_bytes())


PROBES["ConsoleConfig.mode"] = PROBES["ConsoleConfig.file"] = with_device(
    "ConsoleConfig", lambda tmp, b: {"mode": "File", "file": str(tmp / "console.out")},
    _console_file)


def _console_socket(vm, d, b):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(vm.config.console.socket)
    finally:
        client.close()


PROBES["ConsoleConfig.socket"] = with_device(
    "ConsoleConfig", lambda tmp, b: {"mode": "Socket", "socket": str(tmp / "console.sock")},
    _console_socket)


def _fs(given: dict, check) -> Probe:
    return with_device("FsConfig", given, lambda vm, d, b: check(_dev(vm, d), b))


PROBES["FsConfig.tag"] = _fs({"tag": "probetag"},
                             lambda fs, b: fs.config_bytes()[:9] == b"probetag\0" or _fail(fs))
PROBES["FsConfig.socket"] = _fs({}, lambda fs, b: b.connections == 1 or _fail(b))
PROBES["FsConfig.num_queues"] = with_device(
    "FsConfig", {"num_queues": 2},
    lambda vm, d, b: (len(_dev(vm, d).queue_max_sizes) == 3
                      and struct.unpack_from("<I", _dev(vm, d).config_bytes(), 36)[0] == 2
                      or _fail(d)), backend_kw={"queue_num": 3})
PROBES["FsConfig.queue_size"] = _fs({"queue_size": 256},
                                    lambda fs, b: set(fs.queue_max_sizes) == {256} or _fail(fs))


def _pmem_file(vm, d, b):
    pmem = _dev(vm, d)
    gpa, size = struct.unpack("<QQ", pmem.config_bytes())
    assert size == 4 * MiB
    slots = [c for c in vm.kvm_vm.named("add_memory") if c[1] == gpa]
    assert slots and slots[0][2] == 4 * MiB
    assert vm_flags(slots[0][3])[1].endswith("big.img")


PROBES["PmemConfig.file"] = with_device(
    "PmemConfig", lambda tmp, b: {"file": image(tmp, "big.img", 4 * MiB)}, _pmem_file)


def _pmem_size(vm, d, b):
    gpa, size = struct.unpack("<QQ", _dev(vm, d).config_bytes())
    assert size == 2 * MiB and os.path.getsize(vm.config.pmem[0].file) == 4 * MiB


PROBES["PmemConfig.size"] = with_device(
    "PmemConfig", lambda tmp, b: {"file": image(tmp, "big.img", 4 * MiB), "size": 2 * MiB},
    _pmem_size)


def _discard_writes(vm, d, b):
    pmem = _dev(vm, d)
    gpa, size = struct.unpack("<QQ", pmem.config_bytes())
    host = next(c[3] for c in vm.kvm_vm.named("add_memory") if c[1] == gpa)
    assert "sh" not in vm_flags(host)[0]                         # a private mapping
    assert fd_flags_of(pmem.path) and all(f & os.O_ACCMODE == os.O_RDONLY
                                          for f in fd_flags_of(pmem.path))


PROBES["PmemConfig.discard_writes"] = with_device(
    "PmemConfig", {"discard_writes": True}, _discard_writes)
PROBES["VsockConfig.cid"] = with_device(
    "VsockConfig", {"cid": 42},
    lambda vm, d, b: _dev(vm, d).config_bytes() == struct.pack("<Q", 42) or _fail(d))


def _vsock_socket(vm, d, b):
    path = vm.config.vsock.socket
    assert path.endswith("other.sock")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)                                    # pych listens there
    finally:
        client.close()


PROBES["VsockConfig.socket"] = with_device(
    "VsockConfig", lambda tmp, b: {"socket": str(tmp / "other.sock")}, _vsock_socket)


@probe("VmConfig.pvpanic")
def _pvpanic(tmp, mp):
    with built_vm(tmp, mp, vcpus=False, pvpanic=True) as vm:
        assert "__pvpanic" in vm.devices.device_tree()
        assert vm.devices.pvpanic.config_read(0, 4) == 0x0011_1B36


def _vhost_user_disk(tmp, mp):
    from tests.unit.devices.virtio.test_vhost_user_blk import (QSD_FEATURES,
                                                               QSD_PROTOCOL_FEATURES, blk_config)
    with backend(tmp, features=QSD_FEATURES, protocol_features=QSD_PROTOCOL_FEATURES,
                 queue_num=4) as b:
        b.config = blk_config()
        with built_vm(tmp, mp, vcpus=False, disks=[{"vhost_user": True,
                                                    "vhost_socket": b.path}]) as vm:
            disk = _dev(vm, "_disk0")
            assert type(disk).__name__ == "VhostUserBlock" and b.connections == 1
            assert "GET_CONFIG" in b.requests()


PROBES["DiskConfig.vhost_user"] = PROBES["DiskConfig.vhost_socket"] = _vhost_user_disk


# --- VFIO (on the fake VFIO kernel of tests/unit/devices/vfio) --------------------------------

@contextlib.contextmanager
def vfio_machine(tmp: Path, platform: dict | None = None,
                 **device: Any) -> Iterator[tuple[Any, Any, str]]:
    """A device manager with one VFIO boot device (``device`` on top of its sysfs path) on
    the fake VFIO kernel: (machine, kernel, device id)."""
    from tests.support.machines import vm_config
    from tests.unit.devices.vfio.test_vfio import FakeVfioKernel, sysfs_device

    from tests.support.fakes import RecordingMemslots
    from tests.support.machines import DeviceManagerMachine
    from tests.unit.devices.vfio.test_vfio import EventfdMsi

    kernel = FakeVfioKernel()
    path = sysfs_device(tmp / "sys")
    m = DeviceManagerMachine(_drop_ignored(vm_config(devices=[{"path": path, **device}],
                                                     platform={"num_pci_segments": 2,
                                                               **(platform or {})})),
                             ram=[(0, 8 * MiB), (1 << 32, 4 * MiB)], msi=EventfdMsi(),
                             memslots=RecordingMemslots(), vfio_kernel=kernel,
                             mmio64=(1 << 40, 1 << 36))
    try:
        dev_id, = m.dm.vfio_devices
        yield m, kernel, dev_id
    finally:
        m.close()


def _vfio(device: dict, check: Callable[[Any, Any, str], None]) -> Probe:
    def run(tmp, mp):
        with vfio_machine(tmp, **device) as (m, kernel, dev_id):
            check(m, kernel, dev_id)
    return run


def _vfio_bdf(m, dev_id) -> str:
    return m.dm.device_tree()[dev_id]["pci_bdf"]


PROBES["VmConfig.devices"] = PROBES["DeviceConfig.path"] = _vfio(
    {}, lambda m, k, d: sorted(k.fds.values()) == ["container", "device", "group"]
    and _vfio_bdf(m, d) == "0000:00:02.0" or _fail((k.fds, _vfio_bdf(m, d))))
PROBES["DeviceConfig.id"] = _vfio(
    {"id": "probe-vfio"}, lambda m, k, d: d == "probe-vfio" and _vfio_bdf(m, d) or _fail(d))
PROBES["DeviceConfig.pci_segment"] = _vfio(
    {"pci_segment": 1}, lambda m, k, d: _vfio_bdf(m, d) == "0001:00:00.0" or _fail(d))
PROBES["DeviceConfig.pci_device_id"] = _vfio(
    {"pci_device_id": 9}, lambda m, k, d: _vfio_bdf(m, d) == "0000:00:09.0" or _fail(d))


@probe("DeviceConfig.x_exclude_mmap_bars")
def _exclude_mmap_bars(tmp, mp):
    with vfio_machine(tmp / "a") as (m, kernel, dev_id):
        mapped = set(m.dm.vfio_devices[dev_id]._mapped)
    assert 2 in mapped                  # BAR 2 is mmapped (BAR 0 holds the MSI-X table)
    with vfio_machine(tmp / "b", x_exclude_mmap_bars=[2]) as (m, kernel, dev_id):
        assert set(m.dm.vfio_devices[dev_id]._mapped) == mapped - {2}


@probe("PlatformConfig.vfio_p2p_dma")
def _vfio_p2p_dma(tmp, mp):
    """``off`` is what pych does: the container maps guest RAM for DMA, no device BAR."""
    with vfio_machine(tmp, platform={"vfio_p2p_dma": False}) as (m, kernel, dev_id):
        assert kernel.dma == {r.gpa: (r.host_addr, r.size) for r in m.mem.regions}


# --- serial port, through the VMM that owns its host end -------------------------------------

def _serial(serial: dict, check: Callable[[Any, Any], None]) -> Probe:
    def run(tmp, mp):
        from tests.unit.vmm.fakes import fake_vmm
        vmm = fake_vmm(mp)
        cfg = _drop_ignored(config(tmp, serial={
            k: (str(tmp / v) if k in ("file", "socket") else v) for k, v in serial.items()}))
        port = vmm._serial_port(cfg)
        try:
            with built_vm(tmp, mp, vcpus=False, serial_port=port, _config=cfg) as vm:
                check(vm, cfg)
        finally:
            if port is not None:
                port.close()
            vmm.close()
    return run


def _uart_writes_file(vm, cfg):
    for byte in b"probe\n":
        vm.pio.write(layout.COM1_PORT, 1, byte)
    for _ in range(400):
        if Path(cfg.serial.file).read_bytes() == b"probe\n":
            return
        __import__("time").sleep(0.005)
    raise AssertionError(Path(cfg.serial.file).read_bytes())


def _uart_serves_socket(vm, cfg):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    try:
        client.connect(cfg.serial.socket)
        __import__("time").sleep(0.05)
        for byte in b"probe\n":
            vm.pio.write(layout.COM1_PORT, 1, byte)
        got = b""
        while not got.endswith(b"probe\n"):
            got += client.recv(64)
    finally:
        client.close()


def _no_uart(vm, cfg):
    assert vm.serial is None and vm.pio.read(layout.COM1_PORT + 5, 1) in (0, 0xFF)
    assert b"COM1" not in acpi_tables(vm)["DSDT"]


PROBES["VmConfig.serial"] = PROBES["SerialConfig.file"] = _serial(
    {"mode": "File", "file": "serial.out"}, _uart_writes_file)
PROBES["SerialConfig.socket"] = _serial({"mode": "Socket", "socket": "serial.sock"},
                                        _uart_serves_socket)
PROBES["SerialConfig.mode"] = _serial({"mode": "Off"}, _no_uart)


# --- landlock -------------------------------------------------------------------------------------

def _landlock_rules(tmp, mp, **fields) -> list:
    """The rules ``pych --landlock`` restricts the process to (restrict recorded)."""
    from pych import landlock
    from pych.cli import process
    recorded: list = []
    mp.setattr(landlock, "restrict", lambda rules: recorded.append(list(rules)))
    cfg = _drop_ignored(config(tmp, **fields))
    assert process._landlock(cfg, None) is None
    return recorded


PROBES["VmConfig.landlock_enable"] = ShownBy(
    "tests/guest/test_memory_backing_landlock.py::"
    "test_the_kernel_denies_pych_a_snapshot_outside_and_allows_one_inside",
    "the kernel itself denies pych, started with --landlock, a path outside its "
    "configuration: only a sandboxed process shows it (the rules it gets: the "
    "VmConfig.landlock_rules probe)")


@probe("VmConfig.landlock_rules", "LandlockConfig.path", "LandlockConfig.access")
def _landlock_rule(tmp, mp):
    allowed = tmp / "allowed"
    allowed.mkdir()
    rules, = _landlock_rules(tmp, mp, landlock_enable=True,
                             landlock_rules=[{"path": str(allowed), "access": "rw"}])
    assert any(rule.path == str(allowed) and rule.access == "rw" for rule in rules)


# ==========================================================================
# The command line: each key lands in the field it fills (whose probe shows the effect)


def _cli_instance(cfg: VmConfig, option: str) -> Any:
    from pych.config import support
    node: Any = cfg
    for name in support.CLI_OPTIONS[option].split("."):
        node = getattr(node, name)
        if isinstance(node, list):
            node = node[-1]
    return node


def _cli_default(model: type, field: str) -> Any:
    from pydantic_core import PydanticUndefined
    default = model.model_fields[field].get_default(call_default_factory=True)
    if default is PydanticUndefined and getattr(model, "CLI_DEFAULT", None):
        default = getattr(model.parse(model.CLI_DEFAULT), field)
    return default


_BUCKETS = {"bw": "bandwidth", "ops": "ops"}


def cli_probe(option: str, key: str) -> Probe:
    """``option key=...`` (test_support's case) lands in its field with the value given: a
    key the parser dropped, or one that filled another field, fails.  The field's own probe
    (required here) shows what pych does with it."""
    def run(tmp: Path, mp: pytest.MonkeyPatch) -> None:
        from pych.cli.main import build_parser, config_from_args
        from pych.config.devices import RATE_LIMITER_KEYS
        from tests.unit.config.test_support import CLI_CASES, _cli_keys, _option_model

        text, extra = CLI_CASES[option, key]
        model = _option_model(option)
        field = _cli_keys(model)[key]
        field_probe = PROBES[f"{model.__name__}.{field}"]
        if getattr(field_probe, "nothing_to_honour", False):
            field_probe(tmp, mp)          # its one value is refused, or is the default
            return
        if key in RATE_LIMITER_KEYS.keys:   # a whole bucket, each key its own value
            prefix = key.split("_")[0]
            text = ",".join(part for part in text.split(",")
                            if part.split("=")[0] not in RATE_LIMITER_KEYS.keys)
            bucket_keys = (f"{prefix}_size=1001,{prefix}_one_time_burst=1002,"
                           f"{prefix}_refill_time=1003")
            text = f"{text},{bucket_keys}" if text else bucket_keys
        argv = ["--kernel", _fake_kernel(tmp),
                *(["--cpus", "boot=2"] if option != "--cpus" else []),
                *(["--platform", "num_pci_segments=2"] if option != "--platform" else []),
                *extra, option, text]
        cfg = config_from_args(build_parser().parse_args(argv))
        instance = _cli_instance(cfg, option)
        value = getattr(instance, field)
        serial_like = model.__name__ in ("SerialConfig", "ConsoleConfig", "DebugConsoleConfig")
        if key in RATE_LIMITER_KEYS.keys:
            prefix, rest = key.split("_", 1)
            bucket = getattr(value, _BUCKETS[prefix])
            expected = {"size": 1001, "one_time_burst": 1002, "refill_time": 1003}[rest]
            assert getattr(bucket, rest) == expected, (key, bucket)
        elif serial_like and key in ("off", "null", "pty", "tty"):
            assert value.lower() == key, (key, value)
        elif serial_like and key in ("file", "socket"):
            assert instance.mode.lower() == key and value, (key, instance)
        else:
            default = _cli_default(model, field)
            assert value is not None and value != default, (option, key, value, default)
    return run


def _cli_cases() -> list[tuple[str, str]]:
    """Every (option, key) whose test_support case the table says works."""
    from pych.config import support
    from tests.unit.config.test_support import CLI_CASES, _cli_keys, _option_model

    found = []
    for option, key in CLI_CASES:
        model = _option_model(option)
        field = _cli_keys(model)[key]
        if (support.option_refusal(option) is None and field is not None
                and (model, key) not in support.CLI_KEYS
                and isinstance(SUPPORT[model][field], support.Works)):
            found.append((option, key))
    return found


for _option, _key in _cli_cases():
    PROBES[f"{_option} {_key}"] = cli_probe(_option, _key)


def _value_option(option: str, argv: list[str], check: Callable[[VmConfig], bool]) -> Probe:
    def run(tmp: Path, mp: pytest.MonkeyPatch) -> None:
        from pych.cli.main import build_parser, config_from_args
        kernel = _fake_kernel(tmp)
        given = [kernel if arg == "KERNEL" else arg for arg in argv]
        if option != "--kernel":
            given = ["--kernel", kernel, *given]
        cfg = config_from_args(build_parser().parse_args(given))
        assert check(cfg), (option, cfg)
    return run


PROBES["--kernel"] = _value_option("--kernel", ["--kernel", "KERNEL"],
                                   lambda c: c.payload.kernel.endswith("vmlinux"))
PROBES["--cmdline"] = _value_option("--cmdline", ["--cmdline", "probe=1"],
                                    lambda c: c.payload.cmdline == "probe=1")
PROBES["--initramfs"] = _value_option("--initramfs", ["--initramfs", __file__],
                                      lambda c: c.payload.initramfs == __file__)
PROBES["--pvpanic"] = _value_option("--pvpanic", ["--pvpanic"], lambda c: c.pvpanic is True)
PROBES["--landlock"] = _value_option("--landlock", ["--landlock"],
                                     lambda c: c.landlock_enable is True)
