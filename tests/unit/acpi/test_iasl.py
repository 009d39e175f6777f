"""Round trips through ACPICA's iasl, the reference AML toolchain.

Our DSDT must disassemble without complaint, its disassembly must recompile without errors
into the namespace we meant, and (compiled with optimisations off) the recompiled AML must be
byte-for-byte what we emitted. The data tables must disassemble with correct checksums.

iasl is required: these tests fail, not skip, without it (CI installs acpica-tools).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path as FsPath

import pytest

from pych.acpi import tables
from pych.acpi.aml import (
    Acquire, Add, Aml, AddressSpace, And, Arg, Buffer, Cacheability, Concat, CreateDWordField,
    CreateField, CreateQWordField, Decrement, DeRefOf, Device, EISAName, Else, Equal,
    ExtendedInterrupt, Field, FieldAccess, FieldUpdate, GreaterEqual, GreaterThan, If,
    Increment, Index, IO, LAnd, LessEqual, LessThan, Local, LNot, LOr, Memory32Fixed, Method,
    MethodCall, Mod, Multiply, Mutex, Name, Named, Nand, Nor, Notify, NotEqual, ObjectType,
    Offset, ONES, OpRegion, Or, Package, Path, RegionSpace, Release, Reserved,
    ResourceTemplate, Return, Scope, ShiftLeft, ShiftRight, SizeOf, Sleep, Store, String,
    Subtract, ToBuffer, ToInteger, Uuid, While, Xor,
)
from pych.arch.x86_64 import layout
from pych.cpu.hotplug import CpuHotplugController
from pych.device_manager.hotplug import PciHotplugController, PciHotplugSlots
from pych.memory.hotplug import HOTPLUG_SLOTS, MemoryHotplugController, memory_hotplug_stub_aml
from pych.devices.acpi import (
    AcpiGedDevice, MmioWindow, build_dsdt_body, com1_aml, pci_ecam_reservation_aml,
    pci_segment_aml, power_button_aml, s5_aml,
)

from tests.support.fakes import RecordingIrq

IASL_MISSING = ("iasl (ACPICA) is not installed: install acpica-tools "
                "(Debian/Ubuntu: apt-get install acpica-tools) to run the ACPI round-trip tests")


def iasl(*args: str, cwd: FsPath) -> str:
    """Run iasl; fail the test (never skip) if it is missing or exits non-zero."""
    exe = shutil.which("iasl")
    if exe is None:
        pytest.fail(IASL_MISSING, pytrace=False)
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"iasl {' '.join(args)} exited {proc.returncode}:\n{output}"
    return output


def disassemble(table: bytes, name: str, workdir: FsPath) -> str:
    """``iasl -d`` of ``table``; asserts a clean run and returns the .dsl text."""
    (workdir / f"{name}.dat").write_bytes(table)
    output = iasl("-d", f"{name}.dat", cwd=workdir)
    problems = [line for line in output.splitlines()
                if re.search(r"error|warning|failure|AE_", line, re.IGNORECASE)]
    assert not problems, f"iasl -d {name}.dat reported:\n{output}"
    return (workdir / f"{name}.dsl").read_text()


def compile_asl(source: str, workdir: FsPath, *flags: str) -> str:
    """Compile ``source`` (a .dsl in ``workdir``) to ``<prefix>.aml``; asserts zero errors."""
    output = iasl(*flags, source, cwd=workdir)
    match = re.search(r"(\d+) Errors", output)
    assert match and match.group(1) == "0", f"iasl {source} reported errors:\n{output}"
    return output


def namespace(nsp: str) -> dict[str, str]:
    """Full path -> object type, from an iasl namespace listing (``-ln``)."""
    objects, stack = {}, []
    for depth, name, kind in re.findall(r"^\s*\d+\s+\[(\d+)\]\s+(\S{4}) - (\w+)", nsp, re.M):
        stack[int(depth) - 1:] = [name]
        objects["\\" + ".".join(stack)] = kind
    return objects


def asl_spelling(path: str) -> str:
    """How iasl prints a path: padding underscores dropped (``\\_SB_.GED_`` -> ``\\_SB.GED``)."""
    return ".".join(seg.rstrip("_") if seg.strip("\\_") else seg for seg in path.split("."))


def platform_dsdt(*extra: Aml) -> bytes:
    """The DSDT pych boots with: the reference's fixed devices, the PCI hot plug controller
    with its slots, and the CPU and memory hot plug controllers (then ``extra``, e.g. a
    test's method)."""
    mmio32 = MmioWindow(layout.MEM_32BIT_DEVICES_START, layout.MEM_32BIT_DEVICES_SIZE)
    mmio64 = MmioWindow(0x1_0000_0000_00, 0x10_0000_0000)
    ged = AcpiGedDevice(RecordingIrq(), layout.ACPI_GED_ADDR)
    phpr = PciHotplugController(layout.ACPI_PCI_HOTPLUG_ADDR, on_eject=lambda seg, slot: None)
    body = build_dsdt_body(
        phpr,
        pci_segment_aml(0, mmio32, mmio64, PciHotplugSlots()),
        pci_ecam_reservation_aml(),
        com1_aml(),
        s5_aml(),
        power_button_aml(),
        ged,
        CpuHotplugController(layout.ACPI_CPU_HOTPLUG_ADDR, 4, 2, is_active=lambda cpu: True,
                             eject=lambda cpu: True, apic_id=lambda cpu: cpu),
        MemoryHotplugController(layout.ACPI_MEM_HOTPLUG_ADDR),
        *extra,
    )
    return tables.dsdt(body)


EXPECTED_OBJECTS = {
    "\\_SB_.PHPR": "Device", "\\_SB_.PHPR.PSCN": "Method", "\\_SB_.PHPR.PCEJ": "Method",
    "\\_SB_.PHPR.BLCK": "Mutex", "\\_SB_.PHPR.PCST": "Region",
    **{f"\\_SB_.PHPR.{f}": "RegionField" for f in ("PCIU", "PCID", "B0EJ", "PSEG")},
    "\\_SB_.PC00.DVNT": "Method", "\\_SB_.PC00.PCNT": "Method",
    **{f"\\_SB_.PC00.S{slot:03d}": "Device" for slot in (0, 2, 31)},
    **{f"\\_SB_.PC00.S002.{n}": kind for n, kind in
       (("_SUN", "Integer"), ("_ADR", "Integer"), ("_EJ0", "Method"))},
    "\\_SB_.PC00": "Device", "\\_SB_.PC00._SEG": "Integer", "\\_SB_.PC00._UID": "Integer",
    "\\_SB_.PC00._CRS": "Buffer", "\\_SB_.PC00._PRT": "Package",
    "\\_SB_.MBRD": "Device", "\\_SB_.MBRD._CRS": "Buffer",
    "\\_SB_.COM1": "Device", "\\_SB_.COM1._CRS": "Buffer",
    "\\_S5_": "Package",
    "\\_SB_.PWRB": "Device",
    "\\_SB_.GEC_": "Device", "\\_SB_.GEC_.GDST": "Region", "\\_SB_.GEC_.GDAT": "RegionField",
    "\\_SB_.GEC_.ESCN": "Method",
    "\\_SB_.GED_": "Device", "\\_SB_.GED_._HID": "String", "\\_SB_.GED_._CRS": "Buffer",
    "\\_SB_.GED_._EVT": "Method",
    "\\_SB_.PRES": "Device", "\\_SB_.PRES.CPLK": "Mutex", "\\_SB_.PRES.PRST": "Region",
    **{f"\\_SB_.PRES.{f}": "RegionField"
       for f in ("CPEN", "CINS", "CRMV", "CEJ0", "CCMD", "CSEL", "CDAT")},
    "\\_SB_.CPUS": "Device", "\\_SB_.CPUS._HID": "String", "\\_SB_.CPUS._CID": "Integer",
    **{f"\\_SB_.CPUS.{m}": "Method" for m in ("CSTA", "CTFY", "CEJ0", "CSCN")},
    **{f"\\_SB_.CPUS.C00{cpu}": "Device" for cpu in range(4)},
    **{f"\\_SB_.CPUS.C003.{n}": kind for n, kind in
       (("_HID", "String"), ("_UID", "Integer"), ("_STA", "Method"), ("_PXM", "Method"),
        ("_MAT", "Buffer"), ("_EJ0", "Method"))},
    "\\_SB_.MHPC": "Device", "\\_SB_.MHPC.MLCK": "Mutex", "\\_SB_.MHPC.MHPR": "Region",
    **{f"\\_SB_.MHPC.{f}": "RegionField" for f in (
        "MHBL", "MHBH", "MHLL", "MHLH", "MHPX", "MEN_", "MINS", "MRMV", "MEJ0", "MSEL", "MOEV",
        "MOSC")},
    **{f"\\_SB_.MHPC.{m}": "Method" for m in ("MSCN", "MTFY", "MSTA", "MCRS", "MEJC", "MOST")},
    **{f"\\_SB_.MHPC.M{slot:03d}": "Device" for slot in (0, 9, HOTPLUG_SLOTS - 1)},
    **{f"\\_SB_.MHPC.M009.{n}": kind for n, kind in
       (("_HID", "Integer"), ("_UID", "Integer"), ("_STA", "Method"), ("_CRS", "Method"),
        ("_EJ0", "Method"), ("_OST", "Method"))},
}


def test_platform_dsdt_disassembles_cleanly(tmp_path):
    dsl = disassemble(platform_dsdt(), "dsdt", tmp_path)
    assert "External (" not in dsl, "every referenced name must be defined in the DSDT"
    for device in ("\\_SB_.PHPR", "\\_SB_.PC00", "\\_SB_.MBRD", "\\_SB_.COM1", "\\_SB_.PWRB",
                   "\\_SB_.GEC_", "\\_SB_.GED_", "\\_SB_.CPUS", "\\_SB_.MHPC"):
        assert f"Device ({asl_spelling(device)})" in dsl
    for text in ("Method (ESCN, 0, Serialized)", "Method (_EVT, 1, Serialized)",
                 "\\_SB.GEC.ESCN ()", "\\_SB.CPUS.CSCN ()", "\\_SB.MHPC.MSCN ()",
                 "\\_SB.PHPR.PSCN ()", "Notify (\\_SB.PWRB, 0x80)",
                 'Name (_HID, "ACPI0013"', "Name (_S5, Package (0x04)",
                 "OperationRegion (GDST, SystemMemory, 0xFEB00000, One)",
                 "Field (GDST, ByteAcc, NoLock, WriteAsZeros)",
                 "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
                 "0x0000000D,", 'EisaId ("PNP0A08")', 'EisaId ("PNP0C0C")'):
        assert text in dsl, text


def test_pci_hotplug_aml_reads_as_the_reference_flow(tmp_path):
    """PSCN -> PCNT: select the segment, notify PCIU slots with 1 and PCID slots with 3;
    each slot's _EJ0 -> PCEJ writes the slot's bit to B0EJ; no _OSC (so acpiphp drives it)."""
    dsl = disassemble(platform_dsdt(), "dsdt", tmp_path)
    for text in ("OperationRegion (PCST, SystemMemory, 0xFEB03000, 0x10)",
                 "Field (PCST, DWordAcc, NoLock, WriteAsZeros)",
                 "Method (PCEJ, 2, Serialized)", "PSEG = Arg1", "B0EJ = (One << Arg0)",
                 "\\_SB.PC00.PCNT ()", "\\_SB.PHPR.PSEG = _SEG",
                 "Local0 = \\_SB.PHPR.PCIU", "Local1 = \\_SB.PHPR.PCID",
                 "DVNT (Local0, One)", "DVNT (Local1, 0x03)",
                 "Name (_SUN, 0x1F)", "Name (_ADR, 0x001F0000)", "Notify (S031, Arg1)",
                 "While (Arg0)", "Local0 = (Arg0 & (Zero - Arg0))", "Arg0 ^= Local0",
                 "If ((Local0 < 0x00010000))", "ElseIf ((Local0 < 0x80000000))"):
        assert text in dsl, text
    assert dsl.count("\\_SB.PHPR.PCEJ (_SUN, _SEG)") == 32
    assert "_OSC" not in dsl


def acpiexec(table: FsPath, command: str) -> str:
    """Run one acpiexec (ACPICA's interpreter, acpica-tools with iasl) command on the AML
    file ``table``; fail the test (never skip) if it is missing."""
    exe = shutil.which("acpiexec")
    if exe is None:
        pytest.fail(IASL_MISSING, pytrace=False)
    proc = subprocess.run([exe, "-b", command, str(table)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"acpiexec {command} exited {proc.returncode}:\n{proc.stdout}"
    return proc.stdout + proc.stderr


def test_pci_dvnt_notifies_exactly_the_slots_whose_bits_are_set_as_acpica_runs_it(tmp_path):
    """DVNT takes the set bits one at a time and finds each one's slot by a binary search
    (a short path for the guest's slow interpreter); run by ACPICA's own interpreter, it
    notifies each slot whose bit is set, once, with the event given, and no other; PCNT
    calls it only for a bitmap that has a bit."""
    table = tmp_path / "dsdt.aml"
    table.write_bytes(platform_dsdt())
    for bitmap in (*(1 << slot for slot in range(32)), 0x8000_0004, 0xFFFF_FFFF, 0x0001_8001,
                   0x5555_AAAA):
        out = acpiexec(table, f"execute \\_SB.PC00.DVNT {bitmap:#x} 3")
        notified = re.findall(r"Received a System Notify on \[S(\d{3})\].*Value 0x03", out)
        assert sorted(map(int, notified)) == [s for s in range(32) if bitmap >> s & 1], \
            (hex(bitmap), out)
    out = acpiexec(table, "execute \\_SB.PC00.PCNT")   # both bitmaps read 0 here
    assert "Notify" not in out and "AE_" not in out.replace("AE_OK", ""), out


def test_cpu_hotplug_aml_reads_as_the_reference_flow(tmp_path):
    """CSCN selects each CPU, notifies CINS ones with 1 and CRMV ones with 3 and acks; CSTA
    reports 0xF while CPEN is set; each Cxxx's _EJ0 -> CEJ0 writes the eject bit; _MAT is an
    enabled x2APIC entry (reference §3.1-3.2)."""
    dsl = disassemble(platform_dsdt(), "dsdt", tmp_path)
    for text in ("OperationRegion (PRST, SystemMemory, 0xFEB01000, 0x0C)",
                 "Field (PRST, ByteAcc, NoLock, WriteAsZeros)",
                 "Field (PRST, DWordAcc, NoLock, Preserve)",
                 'Name (_UID, "CPU Hotplug Controller")', 'Name (_HID, "ACPI0010"',
                 'EisaId ("PNP0A05")', "Method (CSTA, 1, Serialized)",
                 "If ((\\_SB.PRES.CPEN == One))", "Local0 = 0x0F",
                 "Method (CTFY, 2, Serialized)", "Notify (C003, Arg1)",
                 "Method (CEJ0, 1, Serialized)", "\\_SB.PRES.CEJ0 = One",
                 "Method (CSCN, 0, Serialized)", "While ((Local0 < 0x04))",
                 "\\_SB.PRES.CSEL = Local0", "CTFY (Local0, One)", "\\_SB.PRES.CINS = One",
                 "CTFY (Local0, 0x03)", "\\_SB.PRES.CRMV = One",
                 "Return (CSTA (0x03))", "CEJ0 (0x03)",
                 "0x09, 0x10, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00",
                 "0x01, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00"):
        assert text in dsl, text
    assert dsl.count('Name (_HID, "ACPI0007"') == 4
    assert dsl.count("Acquire (\\_SB.PRES.CPLK, 0xFFFF)") == 3


def test_memory_hotplug_aml_reads_as_the_reference_flow(tmp_path):
    """MSCN selects each slot, notifies MINS ones with 1 and MRMV ones with 3 and acks; MSTA
    reports 0xF while MEN_ is set; MCRS returns the selected DIMM as a cacheable QWordMemory
    range; one PNP0C80 Mnnn per slot (reference §4.1); beyond the reference, each slot's _EJ0
    writes MEJ0 and its _OST writes MOEV and MOSC for the slot (live DIMM removal)."""
    dsl = disassemble(platform_dsdt(), "dsdt", tmp_path)
    for text in ('Name (_UID, "Memory Hotplug Controller")', "Mutex (MLCK, 0x00)",
                 "OperationRegion (MHPR, SystemMemory, 0xFEB02000, 0x18)",
                 "Field (MHPR, ByteAcc, NoLock, WriteAsZeros)", "Offset (0x14),",
                 "Method (MSCN, 0, Serialized)", f"While ((Local0 < 0x{HOTPLUG_SLOTS:02X}))",
                 "MSEL = Local0", "MTFY (Local0, One)", "MINS = One", "MTFY (Local0, 0x03)",
                 "MRMV = One", "Method (MSTA, 1, Serialized)", "If ((MEN == One))",
                 "Local0 = 0x0F", "Method (MCRS, 1, Serialized)", "MINL = MHBL", "MINH = MHBH",
                 "LENL = MHLL", "LENH = MHLH", "MAXL = (MINL + LENL)", "MAXL -= One",
                 "Return (MR64)", "Notify (M031, Arg1)", "Return (MSTA (0x1F))",
                 "Return (MCRS (0x1F))", "Method (MEJC, 1, Serialized)", "MEJ0 = One",
                 "Method (MOST, 3, Serialized)", "MOEV = Arg1", "MOSC = Arg2",
                 "MEJC (0x1F)", "MOST (0x1F, Arg0, Arg1)"):
        assert text in dsl, text
    assert dsl.count('EisaId ("PNP0C80")') == HOTPLUG_SLOTS
    assert dsl.count("Acquire (MLCK, 0xFFFF)") == dsl.count("Release (MLCK)") == 5


def test_memory_hotplug_stub_recompiles_byte_for_byte(tmp_path):
    """Without ACPI memory hot plug the DSDT carries the reference's MHPC stub instead."""
    dsdt = tables.dsdt(build_dsdt_body(memory_hotplug_stub_aml()))
    disassemble(dsdt, "dsdt", tmp_path)
    compile_asl("dsdt.dsl", tmp_path, "-oa", "-p", "recompiled")
    assert (tmp_path / "recompiled.aml").read_bytes()[36:] == dsdt[36:]


def test_platform_dsdt_recompiles_to_the_intended_namespace(tmp_path):
    disassemble(platform_dsdt(), "dsdt", tmp_path)
    compile_asl("dsdt.dsl", tmp_path, "-ln", "-p", "recompiled")
    objects = namespace((tmp_path / "recompiled.nsp").read_text())
    assert {path: objects.get(path) for path in EXPECTED_OBJECTS} == EXPECTED_OBJECTS


def test_platform_dsdt_recompiles_byte_for_byte(tmp_path):
    dsdt = platform_dsdt()
    disassemble(dsdt, "dsdt", tmp_path)
    compile_asl("dsdt.dsl", tmp_path, "-oa", "-p", "recompiled")
    assert (tmp_path / "recompiled.aml").read_bytes()[36:] == dsdt[36:]


def every_construct() -> Scope:
    """A namespace that uses every construct of the encoder at least once."""
    return Scope(
        "\\_SB_",
        Device(
            "TST0",
            Name("_HID", EISAName("PNP0C02")),
            Name("_UID", String("Encoder coverage")),
            Name("BUF0", Buffer(bytes(range(16)))),
            Name("PKG0", Package(1, 0x1234, 0x1234_5678, 1 << 40, ONES, String("x"), Package(3))),
            Name("UUID", Uuid("E5C937D0-3553-4D7A-9117-EA4D19C3434D")),
            Name("_CRS", ResourceTemplate(
                Memory32Fixed(0xFEB0_1000, 0x1000, read_write=False),
                AddressSpace.memory(1 << 32, (1 << 33) - 1,
                                    cacheability=Cacheability.PREFETCHABLE),
                AddressSpace.memory(0xC000_0000, 0xC0FF_FFFF, width=32, read_write=False),
                AddressSpace.io(0x1000, 0x10FF, width=32),
                AddressSpace.bus_number(0, 0xFF),
                IO(0x600, 0x600, 1, 8),
                ExtendedInterrupt(9, edge=False, active_low=True, shared=True),
            )),
            Mutex("MTX0", 3),
            OpRegion("REG0", RegionSpace.SYSTEM_MEMORY, 0xFEB0_1000, 0x10),
            Field("REG0", Named("RSEL", 32), Reserved(32), Named("RDAT", 32),
                  access=FieldAccess.DWORD, lock=True),
            Field("REG0", Offset(12), Named("RST0", 1), Named("RST1", 1), Reserved(6),
                  Named("RCMD", 8), access=FieldAccess.BYTE, update=FieldUpdate.WRITE_AS_ONES),
            OpRegion("REG1", RegionSpace.SYSTEM_IO, 0x600, 1),
            Field("REG1", Named("PORT", 8), access=FieldAccess.BYTE,
                  update=FieldUpdate.WRITE_AS_ZEROS),
            OpRegion("REG2", RegionSpace.PCI_CONFIG, 0, 0x100),
            Field("REG2", Named("VEND", 16), Named("DEVI", 16)),
            Method(
                "TST1", 2,
                Acquire("MTX0", 0xFFFF),
                Store(Arg(0), "RSEL"),
                Store(0, Local(0)),
                Store(0, Local(1)),
                Store(0, Local(2)),
                While(LessThan(Local(0), Arg(1)),
                      If(LAnd(Equal(Local(0), 3), LNot(Equal(Local(1), 4))),
                         Notify("\\_SB_.TST0", 1)),
                      If(NotEqual(Local(0), 5), Increment(Local(0))),
                      Else(Add(Local(0), 2, Local(0)), Decrement(Local(2)))),
                ShiftLeft(1, Arg(0), Local(1)),
                ShiftRight(Local(1), 1, Local(1)),
                Subtract(Local(1), 1, Local(1)),
                Or(Local(1), 2, Local(1)),
                And(Local(1), 0xFF, Local(1)),
                Multiply(Local(1), 3, Local(1)),
                Xor(Local(1), 0x55, Local(1)),
                Mod(Local(1), 7, Local(1)),
                Nand(Local(1), 1, Local(3)),
                Nor(Local(1), 1, Local(3)),
                Concat(String("a"), String("b"), Local(2)),
                Store(SizeOf("PKG0"), Local(3)),
                Store(DeRefOf(Index(Path("PKG0"), 1)), Local(4)),
                Store(ObjectType(Local(4)), Local(5)),
                Store(ToInteger(Local(4)), Local(6)),
                ToBuffer(Local(6), Local(7)),
                CreateDWordField(Path("BUF0"), 0, "DW00"),
                CreateQWordField(Path("BUF0"), 4, "QW00"),
                CreateField(Path("BUF0"), 96, 8, "FD00"),
                Store(0x1234, "DW00"),
                Store(Path("^RDAT"), Local(0)),
                If(GreaterThan(Local(0), 1), Sleep(1)),
                If(LOr(LessEqual(Local(0), 2), GreaterEqual(Local(0), 9)), Store(1, "RST0")),
                Release("MTX0"),
                Return(ONES),
                serialized=True,
            ),
            Method("TST2", 0, Return(MethodCall("TST1", 1, 2))),
        ),
    )


def test_every_construct_recompiles_byte_for_byte(tmp_path):
    dsdt = tables.dsdt(every_construct().to_aml())
    disassemble(dsdt, "dsdt", tmp_path)
    compile_asl("dsdt.dsl", tmp_path, "-oa", "-p", "recompiled")
    assert (tmp_path / "recompiled.aml").read_bytes()[36:] == dsdt[36:]


def test_fadt_disassembles_with_the_intended_fields(tmp_path):
    dsl = disassemble(tables.fadt(0xA0024), "facp", tmp_path)
    assert "Incorrect checksum" not in dsl
    for field in (r"Hardware Reduced \(V5\) : 1", r"Reset Register Supported \(V2\) : 1",
                  r"32-bit PM Timer \(V1\) : 1", r"FADT Minor Revision : 03",
                  r"DSDT Address : 00000000000A0024", r"Value to cause reset : 01"):
        assert re.search(field, dsl), field


def test_madt_disassembles_with_one_x2apic_per_possible_cpu(tmp_path):
    dsl = disassemble(tables.madt(boot_vcpus=2, max_vcpus=4), "apic", tmp_path)
    assert "Incorrect checksum" not in dsl
    assert len(re.findall(r"Subtable Type : 09 \[Processor Local x2APIC\]", dsl)) == 4
    assert re.findall(r"Processor Enabled : (\d)", dsl) == ["1", "1", "0", "0"]
    assert "Subtable Type : 01 [I/O APIC]" in dsl
    assert "Subtable Type : 02 [Interrupt Source Override]" in dsl


@pytest.mark.parametrize("name", ["mcfg", "xsdt"])
def test_other_tables_disassemble_cleanly(tmp_path, name):
    table = tables.mcfg() if name == "mcfg" else tables.xsdt([0xA1000, 0xA2000])
    dsl = disassemble(table, name, tmp_path)
    assert "Incorrect checksum" not in dsl


@pytest.mark.parametrize("events", [0b0001, 0b0010, 0b0100, 0b1000, 0b0101, 0b1100, 0b1111, 0])
def test_ged_event_runs_exactly_the_scans_of_its_bits_as_acpica_runs_it(tmp_path, events):
    """ESCN (a PCI event alone goes straight to PSCN; any other mix tests each bit) runs
    the CPU, memory and PCI scans and the power button's Notify for exactly the bits the
    GED register returns. acpiexec backs each register block with plain memory, so one
    method latches the event and makes every scan find something to notify: CINS (all
    CPUs), MINS (all DIMM slots), PCID bit 2 (slot 2)."""
    setup = Method("TEVT", 0,
                   Store(events, "\\_SB_.GEC_.GDAT"), Store(1, "\\_SB_.PRES.CINS"),
                   Store(1, "\\_SB_.MHPC.MINS"), Store(1 << 2, "\\_SB_.PHPR.PCID"),
                   MethodCall("\\_SB_.GED_._EVT", layout.GED_IRQ))
    table = tmp_path / "dsdt.aml"
    table.write_bytes(platform_dsdt(setup))
    out = acpiexec(table, "execute \\TEVT")
    assert "AE_" not in out.replace("AE_OK", ""), out
    notified = sorted(re.findall(r"Received a \w+ Notify on \[(\w{4})\]", out))
    expected = sorted([*(["C000", "C001", "C002", "C003"] if events & 1 else []),
                       *([f"M{slot:03d}" for slot in range(HOTPLUG_SLOTS)] if events & 2 else []),
                       *(["S002"] if events & 4 else []), *(["PWRB"] if events & 8 else [])])
    assert notified == expected, out          # each once: no scan runs twice
