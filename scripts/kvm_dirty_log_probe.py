"""Whether this host's /dev/kvm logs the pages a guest writes (``KVM_MEM_LOG_DIRTY_PAGES`` on a
memslot, read with ``KVM_GET_DIRTY_LOG``): live migration's pre-copy needs it.

Boots a few-instruction guest that increments two words, at 0x400000 and 0x405000, in a loop,
turns dirty logging on for its RAM slot, and reads the log twice: both pages (and no page
the guest did not write) must be reported each time, and the counters must move. Run as
``PYTHONPATH=. .venv/bin/python scripts/kvm_dirty_log_probe.py``; docs/snapshot.md quotes it.
"""

from __future__ import annotations

import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pych.config import VmConfig  # noqa: E402
from pych.cpu.vcpu import install_kick_handler  # noqa: E402
from pych.vm import Vm  # noqa: E402
from tests.support.microguest import build_elf  # noqa: E402

PAGES = (0x400000, 0x405000)
# inc dword [0x400000]; inc dword [0x405000]; jmp back
CODE = b"".join(b"\xff\x05" + struct.pack("<I", a) for a in PAGES) + b"\xeb\xf2"


def dirty_pages(bitmap: bytes) -> list[int]:
    bits = int.from_bytes(bitmap, "little")
    return [n for n in range(len(bitmap) * 8) if bits >> n & 1]


def main() -> int:
    install_kick_handler()
    with tempfile.TemporaryDirectory() as tmp:
        kernel = Path(tmp) / "loop.elf"
        kernel.write_bytes(build_elf(CODE))
        config = VmConfig.model_validate({"payload": {"kernel": str(kernel)},
                                          "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
                                          "memory": {"size": 64 << 20},
                                          "console": {"mode": "Off"}, "serial": {"mode": "Null"}})
        vm = Vm(config, kvm := __import__("pych.hypervisor.kvm", fromlist=["Kvm"]).Kvm(),
                on_exit=lambda kind, detail: print("guest exit", kind, detail))
        vm.boot()
        try:
            region = vm.guest_memory.regions[0]
            time.sleep(0.2)
            vm.kvm_vm.set_dirty_logging(region.slot, True)
            ok = True
            for round_ in (1, 2):
                before = vm.guest_memory.read_u32(PAGES[0])
                time.sleep(0.2)
                pages = dirty_pages(vm.kvm_vm.get_dirty_log(region.slot))
                after = vm.guest_memory.read_u32(PAGES[0])
                expected = [a // 4096 for a in PAGES]
                print(f"round {round_}: counter {before} -> {after}; dirty pages "
                      f"{[hex(p * 4096) for p in pages]}")
                ok &= after != before and pages == expected
            vm.kvm_vm.set_dirty_logging(region.slot, False)
            print("dirty logging works" if ok else "dirty logging DOES NOT work on this host")
            return 0 if ok else 1
        finally:
            vm.close()
            kvm.close()


if __name__ == "__main__":
    sys.exit(main())
