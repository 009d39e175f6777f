"""Which KVM state ioctls this host's /dev/kvm answers, for a vCPU of a running pych VM.

Boots a few-instruction guest (a 64-bit-capable PVH entry that loops on ``hlt``) with pych's
own VM assembly, runs it, pauses it, then calls each state ioctl snapshots need, GET then SET
with what GET gave, and prints one line each with the errno of a failure. Used to write the
table in docs/snapshot.md; run as ``PYTHONPATH=. .venv/bin/python scripts/kvm_state_probe.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pych.config import VmConfig  # noqa: E402
from pych.cpu.vcpu import install_kick_handler  # noqa: E402
from pych.hypervisor.kvm import Kvm, KvmError  # noqa: E402
from pych.hypervisor.kvm.kvm import VCPU_STATE  # noqa: E402
from pych.vm import Vm  # noqa: E402
from tests.support.microguest import build_elf  # noqa: E402


def main() -> int:
    install_kick_handler()
    with tempfile.TemporaryDirectory() as tmp:
        kernel = Path(tmp) / "loop.elf"
        kernel.write_bytes(build_elf(b"\xf4\xeb\xfd"))          # hlt; jmp hlt
        config = VmConfig.model_validate({"payload": {"kernel": str(kernel)},
                                          "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                                          "memory": {"size": 64 << 20},
                                          "console": {"mode": "Off"}, "serial": {"mode": "Null"}})
        kvm = Kvm()
        vm = Vm(config, kvm, on_exit=lambda kind, detail: print("guest exit", kind, detail))
        vm.boot()
        time.sleep(0.5)
        vm.pause()
        ok = True
        vcpu = vm.cpus.vcpus[0]
        for name in VCPU_STATE:
            ok &= _probe(f"vCPU {name}", lambda n=name: vcpu.get_state(n),
                         lambda data, n=name: vcpu.set_state(n, data))
        indices = kvm.msr_index_list()
        print(f"MSR index list: {len(indices)} MSRs")
        got = {}
        try:
            got = vcpu.get_msrs(indices)
            print(f"KVM_GET_MSRS: {len(got)} of {len(indices)} read")
        except KvmError as e:
            print(f"KVM_GET_MSRS: FAILED {e}")
        readable = _readable_msrs(vcpu, indices)
        print(f"  readable one by one: {len(readable)} of {len(indices)}; "
              f"not: {[hex(i) for i in indices if i not in readable]}")
        n = vcpu.set_msrs(readable)
        print(f"KVM_SET_MSRS of the readable ones: {n} of {len(readable)} accepted"
              + ("" if n == len(readable) else f", stopped at {hex(list(readable)[n])}"))
        for chip in (0, 1, 2):
            ok &= _probe(f"VM irqchip {['PIC master', 'PIC slave', 'IOAPIC'][chip]}",
                         lambda c=chip: vm.kvm_vm.get_irqchip(c), vm.kvm_vm.set_irqchip)
        ok &= _probe("VM PIT2", vm.kvm_vm.get_pit2, vm.kvm_vm.set_pit2)
        ok &= _probe("VM clock", vm.kvm_vm.get_clock, vm.kvm_vm.set_clock)
        vm.resume()
        vm.close()
    return 0 if ok else 1


def _readable_msrs(vcpu, indices):
    out = {}
    for i in indices:
        try:
            out.update(vcpu.get_msrs([i]))
        except KvmError:
            pass
    return out


def _probe(what, get, set_) -> bool:
    try:
        data = get()
    except KvmError as e:
        print(f"{what}: GET FAILED {e}")
        return False
    try:
        set_(data)
    except KvmError as e:
        print(f"{what}: GET ok, SET FAILED {e}")
        return False
    print(f"{what}: GET and SET ok")
    return True


if __name__ == "__main__":
    sys.exit(main())
