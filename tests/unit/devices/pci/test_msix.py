import pytest

from pych.devices.pci import MsixController, PciConfiguration
from pych.devices.pci.config import CapabilityId
from pych.devices.pci.msix import MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK

from tests.support.fakes import FakeMsiInterruptManager

ADDRESS = 0xFEE0_1000


@pytest.fixture
def setup():
    group = FakeMsiInterruptManager().create_msix_group(3)
    msix = MsixController(group.vectors, bar=2, table_offset=0x4000, pba_offset=0x5000)
    config = PciConfiguration(vendor_id=0x1AF4, device_id=0x1041, class_code=2, subclass=0)
    cap = msix.install(config)
    return msix, config, cap, group.vectors


def set_control(msix, config, cap, value):
    config.write(cap + 2, 2, value)
    msix.config_written(config, cap + 2, 2)


def program(msix, vector, address, data, masked):
    base = 16 * vector
    msix.write_table(base, 4, address & 0xFFFF_FFFF)
    msix.write_table(base + 4, 4, address >> 32)
    msix.write_table(base + 8, 4, data)
    msix.write_table(base + 12, 4, int(masked))


def test_capability_layout(setup):
    msix, config, cap, _ = setup
    assert config.capability_offsets(CapabilityId.MSIX) == [cap]
    assert config.read(cap, 1) == 0x11
    assert config.read(cap + 2, 2) == 2                 # table size N-1, disabled, unmasked
    assert config.read(cap + 4, 4) == 0x4000 | 2        # offset | BIR
    assert config.read(cap + 8, 4) == 0x5000 | 2
    config.write(cap + 4, 4, 0)                          # table location is read-only
    assert config.read(cap + 4, 4) == 0x4002
    assert (msix.table_size, msix.pba_size) == (48, 8)


def test_entries_start_masked_and_read_back(setup):
    msix, _, _, vectors = setup
    assert msix.read_table(12, 4) == 1
    program(msix, 1, ADDRESS, 0x4041, masked=True)
    assert msix.read_table(16, 8) == ADDRESS
    assert msix.read_table(24, 4) == 0x4041
    assert msix.entry(1) == (ADDRESS, 0x4041, True)
    assert vectors[1].masked


def test_trigger_is_ignored_while_msix_is_disabled(setup):
    msix, _, _, vectors = setup
    program(msix, 0, ADDRESS, 0x30, masked=False)
    msix.trigger(0)
    assert vectors[0].triggers == 0 and not msix.is_pending(0)
    assert vectors[0].masked                             # disabled counts as masked for the route


def test_delivery_masking_and_pending_bit(setup):
    msix, config, cap, vectors = setup
    set_control(msix, config, cap, MSIX_CONTROL_ENABLE)
    assert msix.enabled
    program(msix, 0, ADDRESS, 0x30, masked=False)
    assert vectors[0].updates[-1] == (ADDRESS, 0x30, False)
    msix.trigger(0)
    assert vectors[0].triggers == 1

    msix.write_table(12, 4, 1)                           # mask entry 0
    assert vectors[0].updates[-1] == (ADDRESS, 0x30, True)
    msix.trigger(0)
    msix.trigger(0)
    assert vectors[0].triggers == 1
    assert msix.is_pending(0) and msix.read_pba(0, 8) == 1
    msix.write_table(12, 4, 0)                           # unmask: the pending message goes out once
    assert vectors[0].triggers == 2
    assert msix.read_pba(0, 8) == 0


def test_function_mask(setup):
    msix, config, cap, vectors = setup
    set_control(msix, config, cap, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
    program(msix, 2, ADDRESS, 0x31, masked=False)
    assert msix.is_masked(2)
    msix.trigger(2)
    assert vectors[2].triggers == 0 and msix.read_pba(0, 1) == 0b100
    set_control(msix, config, cap, MSIX_CONTROL_ENABLE)
    assert vectors[2].triggers == 1 and not msix.is_pending(2)
    assert vectors[2].updates[-1] == (ADDRESS, 0x31, False)


def test_enable_pushes_routes_once(setup):
    msix, config, cap, vectors = setup
    program(msix, 0, ADDRESS, 0x30, masked=False)
    n = len(vectors[0].updates)
    set_control(msix, config, cap, MSIX_CONTROL_ENABLE)
    assert vectors[0].updates[n:] == [(ADDRESS, 0x30, False)]
    set_control(msix, config, cap, MSIX_CONTROL_ENABLE)  # no change, no route update
    assert len(vectors[0].updates) == n + 1


def test_out_of_range_accesses_are_harmless(setup):
    msix, _, _, vectors = setup
    msix.write_table(48, 4, 0xFFFF_FFFF)
    assert msix.read_table(48, 4) == 0
    msix.write_pba(0, 8, 0xFF)
    assert msix.read_pba(0, 8) == 0
    msix.trigger(7)
    assert all(v.triggers == 0 for v in vectors)


def test_vector_count_limits():
    with pytest.raises(ValueError):
        MsixController([], bar=0, table_offset=0, pba_offset=0x800)
