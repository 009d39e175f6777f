"""KVM ABI for x86_64: ioctl numbers and ctypes structures (from <linux/kvm.h>).

Every structure whose size is encoded in an ioctl number is checked against it by
``tests/unit/hypervisor/kvm/test_bindings.py``; get a layout wrong and that test names it.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64

# --- ioctl number encoding (asm-generic/ioctl.h) --------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ, typ, nr, ctypes.sizeof(struct))


def _IOW(typ: int, nr: int, struct) -> int:
    return _IOC(_IOC_WRITE, typ, nr, ctypes.sizeof(struct))


def _IOWR(typ: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, ctypes.sizeof(struct))


def ioc_size(request: int) -> int:
    return (request >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


KVMIO = 0xAE


# --- structures --------------------------------------------------------------------------
class Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_
                           if not name.startswith("pad"))
        return f"{type(self).__name__}({fields})"


class kvm_userspace_memory_region(Struct):
    _fields_ = [("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
                ("memory_size", c_uint64), ("userspace_addr", c_uint64)]


class kvm_dirty_log(Struct):
    """``struct kvm_dirty_log``: a memslot and the address of the bitmap KVM fills (one bit
    per 4 KiB page of the slot, in 64-bit words)."""
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class kvm_regs(Struct):
    _fields_ = [(n, c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(Struct):
    _fields_ = [("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16),
                ("type", c_uint8), ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8),
                ("s", c_uint8), ("l", c_uint8), ("g", c_uint8), ("avl", c_uint8),
                ("unusable", c_uint8), ("padding", c_uint8)]


class kvm_dtable(Struct):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class kvm_sregs(Struct):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", c_uint64), ("cr2", c_uint64), ("cr3", c_uint64), ("cr4", c_uint64),
                ("cr8", c_uint64), ("efer", c_uint64), ("apic_base", c_uint64),
                ("interrupt_bitmap", c_uint64 * 4)]


class kvm_fpu(Struct):
    _fields_ = [("fpr", c_uint8 * 128), ("fcw", c_uint16), ("fsw", c_uint16),
                ("ftwx", c_uint8), ("pad1", c_uint8), ("last_opcode", c_uint16),
                ("last_ip", c_uint64), ("last_dp", c_uint64), ("xmm", c_uint8 * 256),
                ("mxcsr", c_uint32), ("pad2", c_uint32)]


class kvm_msr_entry(Struct):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(Struct):
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]   # + kvm_msr_entry[nmsrs]


class kvm_msr_list(Struct):
    _fields_ = [("nmsrs", c_uint32)]                      # + u32[nmsrs]


class kvm_cpuid_entry2(Struct):
    _fields_ = [("function", c_uint32), ("index", c_uint32), ("flags", c_uint32),
                ("eax", c_uint32), ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32),
                ("padding", c_uint32 * 3)]


class kvm_cpuid2(Struct):
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]  # + kvm_cpuid_entry2[nent]


class kvm_irq_level(Struct):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_irqfd(Struct):
    _fields_ = [("fd", c_uint32), ("gsi", c_uint32), ("flags", c_uint32),
                ("resamplefd", c_uint32), ("pad", c_uint8 * 16)]


class kvm_ioeventfd(Struct):
    _fields_ = [("datamatch", c_uint64), ("addr", c_uint64), ("len", c_uint32),
                ("fd", c_int32), ("flags", c_uint32), ("pad", c_uint8 * 36)]


class kvm_msi(Struct):
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32),
                ("flags", c_uint32), ("devid", c_uint32), ("pad", c_uint8 * 12)]


class kvm_irq_routing_irqchip(Struct):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_msi(Struct):
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32),
                ("devid", c_uint32)]


class _kvm_irq_routing_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi),
                ("pad", c_uint32 * 8)]


class kvm_irq_routing_entry(Struct):
    _fields_ = [("gsi", c_uint32), ("type", c_uint32), ("flags", c_uint32),
                ("pad", c_uint32), ("u", _kvm_irq_routing_u)]


class kvm_irq_routing(Struct):
    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]   # + kvm_irq_routing_entry[nr]


class kvm_pit_config(Struct):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_lapic_state(Struct):
    _fields_ = [("regs", c_uint8 * 1024)]


class kvm_mp_state(Struct):
    _fields_ = [("mp_state", c_uint32)]


class kvm_enable_cap(Struct):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4),
                ("pad", c_uint8 * 64)]


class kvm_translation(Struct):
    _fields_ = [("linear_address", c_uint64), ("physical_address", c_uint64),
                ("valid", c_uint8), ("writeable", c_uint8), ("usermode", c_uint8),
                ("pad", c_uint8 * 5)]


class kvm_vcpu_events(Struct):
    _fields_ = [("exception_injected", c_uint8), ("exception_nr", c_uint8),
                ("exception_has_error_code", c_uint8), ("exception_pending", c_uint8),
                ("exception_error_code", c_uint32),
                ("interrupt_injected", c_uint8), ("interrupt_nr", c_uint8),
                ("interrupt_soft", c_uint8), ("interrupt_shadow", c_uint8),
                ("nmi_injected", c_uint8), ("nmi_pending", c_uint8), ("nmi_masked", c_uint8),
                ("nmi_pad", c_uint8),
                ("sipi_vector", c_uint32), ("flags", c_uint32),
                ("smi_smm", c_uint8), ("smi_pending", c_uint8), ("smi_smm_inside_nmi", c_uint8),
                ("smi_latched_init", c_uint8),
                ("reserved", c_uint8 * 27), ("exception_has_payload", c_uint8),
                ("exception_payload", c_uint64)]


class kvm_clock_data(Struct):
    _fields_ = [("clock", c_uint64), ("flags", c_uint32), ("pad0", c_uint32),
                ("realtime", c_uint64), ("host_tsc", c_uint64), ("pad", c_uint32 * 4)]


class kvm_signal_mask(Struct):
    _fields_ = [("len", c_uint32)]


# State that snapshots save and restore opaquely (the bytes of KVM's x86 ABI structures).
class kvm_xsave(Struct):
    _fields_ = [("region", c_uint32 * 1024)]


class kvm_xcr(Struct):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(Struct):
    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", kvm_xcr * 16),
                ("padding", c_uint64 * 16)]


class kvm_debugregs(Struct):
    _fields_ = [("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64),
                ("flags", c_uint64), ("reserved", c_uint64 * 9)]


class kvm_irqchip(Struct):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", c_uint8 * 512)]


class kvm_pit_channel_state(Struct):
    _fields_ = [("count", c_uint32), ("latched_count", c_uint16), ("count_latched", c_uint8),
                ("status_latched", c_uint8), ("status", c_uint8), ("read_state", c_uint8),
                ("write_state", c_uint8), ("write_latch", c_uint8), ("rw_mode", c_uint8),
                ("mode", c_uint8), ("bcd", c_uint8), ("gate", c_uint8),
                ("count_load_time", ctypes.c_int64)]


class kvm_pit_state2(Struct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", c_uint32),
                ("reserved", c_uint32 * 9)]


# --- ioctls ------------------------------------------------------------------------------
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)

KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, kvm_irq_routing)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, kvm_clock_data)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, kvm_msi)

KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, kvm_translation)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_SET_SIGNAL_MASK = _IOW(KVMIO, 0x8B, kvm_signal_mask)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)       # sic: _IOR in <linux/kvm.h>
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, kvm_pit_state2)

# Ioctls whose argument is a structure, for the size check in the unit tests.
SIZED_IOCTLS = {
    "KVM_GET_MSR_INDEX_LIST": (KVM_GET_MSR_INDEX_LIST, kvm_msr_list, 4),
    "KVM_GET_SUPPORTED_CPUID": (KVM_GET_SUPPORTED_CPUID, kvm_cpuid2, 8),
    "KVM_SET_USER_MEMORY_REGION": (KVM_SET_USER_MEMORY_REGION, kvm_userspace_memory_region, 32),
    "KVM_GET_DIRTY_LOG": (KVM_GET_DIRTY_LOG, kvm_dirty_log, 16),
    "KVM_IRQ_LINE": (KVM_IRQ_LINE, kvm_irq_level, 8),
    "KVM_SET_GSI_ROUTING": (KVM_SET_GSI_ROUTING, kvm_irq_routing, 8),
    "KVM_IRQFD": (KVM_IRQFD, kvm_irqfd, 32),
    "KVM_CREATE_PIT2": (KVM_CREATE_PIT2, kvm_pit_config, 64),
    "KVM_IOEVENTFD": (KVM_IOEVENTFD, kvm_ioeventfd, 64),
    "KVM_ENABLE_CAP": (KVM_ENABLE_CAP, kvm_enable_cap, 104),
    "KVM_GET_CLOCK": (KVM_GET_CLOCK, kvm_clock_data, 48),
    "KVM_SIGNAL_MSI": (KVM_SIGNAL_MSI, kvm_msi, 32),
    "KVM_GET_REGS": (KVM_GET_REGS, kvm_regs, 144),
    "KVM_GET_SREGS": (KVM_GET_SREGS, kvm_sregs, 312),
    "KVM_TRANSLATE": (KVM_TRANSLATE, kvm_translation, 24),
    "KVM_GET_MSRS": (KVM_GET_MSRS, kvm_msrs, 8),
    "KVM_SET_SIGNAL_MASK": (KVM_SET_SIGNAL_MASK, kvm_signal_mask, 4),
    "KVM_GET_FPU": (KVM_GET_FPU, kvm_fpu, 416),
    "KVM_GET_LAPIC": (KVM_GET_LAPIC, kvm_lapic_state, 1024),
    "KVM_SET_CPUID2": (KVM_SET_CPUID2, kvm_cpuid2, 8),
    "KVM_GET_MP_STATE": (KVM_GET_MP_STATE, kvm_mp_state, 4),
    "KVM_GET_VCPU_EVENTS": (KVM_GET_VCPU_EVENTS, kvm_vcpu_events, 64),
    "KVM_GET_DEBUGREGS": (KVM_GET_DEBUGREGS, kvm_debugregs, 128),
    "KVM_GET_XSAVE": (KVM_GET_XSAVE, kvm_xsave, 4096),
    "KVM_GET_XCRS": (KVM_GET_XCRS, kvm_xcrs, 392),
    "KVM_GET_IRQCHIP": (KVM_GET_IRQCHIP, kvm_irqchip, 520),
    "KVM_GET_PIT2": (KVM_GET_PIT2, kvm_pit_state2, 112),
}
# Known request values from <linux/kvm.h>, cross-checking the encoder itself.
KNOWN_REQUEST_VALUES = {
    "KVM_RUN": (KVM_RUN, 0xAE80),
    "KVM_CREATE_VM": (KVM_CREATE_VM, 0xAE01),
    "KVM_GET_REGS": (KVM_GET_REGS, 0x8090AE81),
    "KVM_SET_USER_MEMORY_REGION": (KVM_SET_USER_MEMORY_REGION, 0x4020AE46),
    "KVM_GET_DIRTY_LOG": (KVM_GET_DIRTY_LOG, 0x4010AE42),
    "KVM_GET_SUPPORTED_CPUID": (KVM_GET_SUPPORTED_CPUID, 0xC008AE05),
    "KVM_SET_CPUID2": (KVM_SET_CPUID2, 0x4008AE90),
    "KVM_IRQFD": (KVM_IRQFD, 0x4020AE76),
    "KVM_IOEVENTFD": (KVM_IOEVENTFD, 0x4040AE79),
    "KVM_GET_IRQCHIP": (KVM_GET_IRQCHIP, 0xC208AE62),
    "KVM_SET_IRQCHIP": (KVM_SET_IRQCHIP, 0x8208AE63),
    "KVM_GET_PIT2": (KVM_GET_PIT2, 0x8070AE9F),
    "KVM_GET_XSAVE": (KVM_GET_XSAVE, 0x9000AEA4),
}

# --- capabilities -------------------------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT2 = 33
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_HALT_POLL = 182

# --- constants ------------------------------------------------------------------------------
KVM_API_VERSION = 12

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4

KVM_PIT_SPEAKER_DUMMY = 1

# kvm_run layout (x86_64): offsets into the vCPU's shared mmap
RUN_REQUEST_INTERRUPT_WINDOW = 0
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_EXIT_UNION = 32
