import ctypes

import pytest

from pych.hypervisor.kvm import bindings as b


@pytest.mark.parametrize("name", sorted(b.SIZED_IOCTLS))
def test_struct_size_matches_ioctl_encoding(name):
    request, struct, kernel_size = b.SIZED_IOCTLS[name]
    assert ctypes.sizeof(struct) == kernel_size, f"{struct.__name__} layout differs from <linux/kvm.h>"
    assert b.ioc_size(request) == kernel_size


@pytest.mark.parametrize("name", sorted(b.KNOWN_REQUEST_VALUES))
def test_request_numbers_match_kernel_headers(name):
    computed, expected = b.KNOWN_REQUEST_VALUES[name]
    assert computed == expected, f"{name}: {computed:#x} != {expected:#x}"


def test_nested_struct_sizes():
    assert ctypes.sizeof(b.kvm_segment) == 24
    assert ctypes.sizeof(b.kvm_dtable) == 16
    assert ctypes.sizeof(b.kvm_cpuid_entry2) == 40
    assert ctypes.sizeof(b.kvm_msr_entry) == 16
    assert ctypes.sizeof(b.kvm_irq_routing_entry) == 48
    assert b.kvm_vcpu_events.exception_payload.offset == 56
