"""Guest physical address layout for x86_64 (the reference's layout, see
../shared/notes/ch-hotplug-reference.md §1.5).

Every fixed guest address pych uses lives here, so that the boot code, the ACPI
tables and the device buses agree by construction.
"""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# --- Low memory used by the boot protocols -------------------------------------------
BOOT_GDT_START = 0x500          # GDT for the 64-bit (bzImage) and PVH entries
BOOT_IDT_START = 0x520
PVH_INFO_START = 0x6000         # struct hvm_start_info
MODLIST_START = 0x6040          # struct hvm_modlist_entry[] (initramfs)
MEMMAP_START = 0x7000           # struct hvm_memmap_table_entry[]
ZERO_PAGE_START = 0x7000        # struct boot_params (bzImage); PVH uses MEMMAP here instead
BOOT_STACK_POINTER = 0x8ff0
PML4_START = 0x9000             # identity page tables for the 64-bit entry
PDPTE_START = 0xA000
PDE_START = 0xB000
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000
MPTABLE_START = 0x9FC00         # MP floating pointer: the last KiB of base memory (mptable.py)
EBDA_START = 0xA0000            # also where the ACPI tables start (RSDP first)
RSDP_POINTER = EBDA_START
SMBIOS_START = 0xF0000
HIGH_RAM_START = 0x100000       # kernels are loaded at 1 MiB or above

# --- RAM and the 32-bit device hole ---------------------------------------------------
MEM_32BIT_RESERVED_START = 0xC000_0000     # RAM below 3 GiB ...
MEM_32BIT_RESERVED_SIZE = 1 * GiB          # ... then a 1 GiB hole up to 4 GiB
MEM_32BIT_DEVICES_START = MEM_32BIT_RESERVED_START
MEM_32BIT_DEVICES_SIZE = 640 * MiB         # 32-bit PCI BARs: 0xC000_0000 .. 0xE7FF_FFFF
PCI_MMCONFIG_START = 0xE800_0000           # ECAM, 1 MiB per segment (one bus each)
PCI_MMCONFIG_SIZE = 256 * MiB
PCI_MMIO_CONFIG_SIZE_PER_SEGMENT = 1 * MiB
RAM_64BIT_START = 4 * GiB

# Platform MMIO registers (ACPI hot plug controllers, GED).  The reference allocates these
# top-down from the end of the physical address space; their addresses only reach the guest
# through AML, so pych pins them to a fixed, page-aligned block in the 32-bit hole.
PLATFORM_DEVICE_AREA_START = 0xFEB0_0000
ACPI_GED_ADDR = PLATFORM_DEVICE_AREA_START              # 1 byte (GED event bitmap)
ACPI_CPU_HOTPLUG_ADDR = PLATFORM_DEVICE_AREA_START + 0x1000   # 0x0C bytes (\_SB_.PRES)
ACPI_MEM_HOTPLUG_ADDR = PLATFORM_DEVICE_AREA_START + 0x2000   # 0x18 bytes (\_SB_.MHPC)
ACPI_PCI_HOTPLUG_ADDR = PLATFORM_DEVICE_AREA_START + 0x3000   # 0x10 bytes (\_SB_.PHPR)
PLATFORM_DEVICE_AREA_SIZE = 1 * MiB

IOAPIC_START = 0xFEC0_0000
IOAPIC_SIZE = 0x20
APIC_START = 0xFEE0_0000           # also the MSI address window (destination in bits 12-19)

# KVM's own pages for real-mode guests on VMX: the TSS (3 pages) and the EPT identity map
# (1 page), just below the firmware ROM area at the top of the 4 GiB space.
TSS_ADDRESS = 0xFFFB_D000
IDENTITY_MAP_ADDRESS = 0xFFFB_C000

# --- Fixed legacy I/O ports -----------------------------------------------------------
ACPI_SHUTDOWN_PORT = 0x600      # sleep control/status and reset register (1 byte)
ACPI_PM_TIMER_PORT = 0x608      # 32-bit PM timer, 3.579545 MHz
PCI_CONFIG_IO_PORT = 0xCF8
PCI_CONFIG_IO_PORT_SIZE = 8
COM1_PORT = 0x3F8
I8042_PORT = 0x60               # data 0x60, command/status 0x64
CMOS_PORT = 0x70
DEBUG_PORT = 0x80

# --- Interrupts (GSIs on the in-kernel IOAPIC, 24 pins) ------------------------------
SERIAL_IRQ = 4
PCI_INTX_IRQ_BASE = 5           # slot i -> 5 + (i % 8)
PCI_INTX_IRQ_COUNT = 8
GED_IRQ = 13
IOAPIC_NUM_PINS = 24
MSI_DELIVERY_NMI = 0b100 << 8   # MSI data: delivery mode NMI


def ram_regions(size: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes of boot RAM around the 32-bit hole: [(gpa, length), ...]."""
    if size <= MEM_32BIT_RESERVED_START:
        return [(0, size)]
    return [(0, MEM_32BIT_RESERVED_START),
            (RAM_64BIT_START, size - MEM_32BIT_RESERVED_START)]


def pci_intx_irq(slot: int) -> int:
    """The GSI a PCI slot's INTx pins are routed to: the one rule behind the DSDT's ``_PRT``,
    the devices' interrupt line register and the IOAPIC pin the device manager drives."""
    return PCI_INTX_IRQ_BASE + slot % PCI_INTX_IRQ_COUNT


def ecam_base(segment: int) -> int:
    """Guest address of PCI segment ``segment``'s ECAM window (one bus, 1 MiB): where the
    device manager maps it and what the MCFG and the host bridge's ``_CRS`` advertise."""
    return PCI_MMCONFIG_START + segment * PCI_MMIO_CONFIG_SIZE_PER_SEGMENT


MMIO64_WINDOW_SIZE = 64 * GiB

# PCI segments share the 32-bit device hole and the 64-bit window as the reference carves them
# (its create_mmio_allocators): equal shares (per weight) aligned to these, the last segment
# taking what alignment leaves over. 64 GiB in 4 GiB shares is what bounds the segment count.
PCI_SEGMENT_MMIO32_ALIGNMENT = 4 * KiB
PCI_SEGMENT_MMIO64_ALIGNMENT = 4 * GiB
MAX_PCI_SEGMENTS = MMIO64_WINDOW_SIZE // PCI_SEGMENT_MMIO64_ALIGNMENT      # 16


def mmio64_window(ram_end: int, hotplug_size: int = 0) -> tuple[int, int]:
    """The 64-bit PCI MMIO window: after RAM and the memory hot plug window, 1 GiB aligned."""
    start = max(RAM_64BIT_START, ram_end) + hotplug_size
    start = (start + GiB - 1) & ~(GiB - 1)
    return start, MMIO64_WINDOW_SIZE


def pci_segment_windows(base: int, size: int, weights: list[int],
                        alignment: int) -> list[tuple[int, int]]:
    """The share ``(base, size)`` of the window ``[base, base + size)`` each PCI segment gets,
    for segments with these ``weights``: the reference's rule (``create_mmio_allocators``):
    a unit of ``size / sum(weights)`` rounded down to ``alignment``, segment *i* starting at
    ``base + unit * sum(weights[:i])`` and taking ``unit * weights[i]``, the last segment
    taking everything up to the window's end. Raises ValueError if a segment would get
    nothing."""
    unit = size // (alignment * sum(weights)) * alignment
    shares, start = [], base
    for i, weight in enumerate(weights):
        share = base + size - start if i == len(weights) - 1 else unit * weight
        if share <= 0:
            raise ValueError(f"PCI segment {i} would get no MMIO space: a window of {size:#x} "
                             f"bytes in shares aligned to {alignment:#x} for weights {weights}")
        shares.append((start, share))
        start += share
    return shares
