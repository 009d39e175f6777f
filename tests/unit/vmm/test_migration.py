"""``vm.send-migration`` and ``vm.receive-migration`` at the VMM: what is refused at once (400
naming the field, the device or why; the VM untouched and running), in which states, and
that a receiver left with a broken migration keeps no VM (the migration itself:
tests/unit/migration, tests/guest/test_migration.py)."""

from __future__ import annotations

import os
import re
import threading
import time
from types import SimpleNamespace

import pytest

from pych.api.errors import status_of
from pych.config import ReceiveMigrationData, SendMigrationData
from pych.errors import VmmError
from pych.migration import protocol
from pych.vmm import Vmm
from pych.vmm.state import VmState
from tests.support.machines import BootedVm, DeviceManagerMachine, run_as_booted, vm_config


def error_of(call) -> tuple[int, list[str]]:
    with pytest.raises(VmmError) as e:
        call()
    return int(status_of(e.value)), e.value.messages


def booted(**fields) -> Vmm:
    vmm = Vmm()
    vmm.vm_create(vm_config(**fields))
    machine = DeviceManagerMachine(vmm.config)
    memory = SimpleNamespace(check_saveable=lambda: None, actual_size=vmm.config.memory.size)
    run_as_booted(vmm, BootedVm(machine=machine, memory=memory))
    return vmm


def send(vmm: Vmm, **body):
    return lambda: vmm.vm_send_migration(SendMigrationData.model_validate(body))


def test_send_needs_a_running_vm(tmp_path):
    vmm = Vmm()
    assert error_of(send(vmm, destination_url=f"unix:{tmp_path}/m"))[0] == 404
    vmm.vm_create(vm_config())
    assert error_of(send(vmm, destination_url=f"unix:{tmp_path}/m"))[0] == 405


@pytest.mark.parametrize(("body", "words"), [
    ({"tls_dir": "/etc/tls"}, "vm.send-migration tls_dir is not supported by pych"),
    ({"memory_mode": "Postcopy"}, "memory_mode is not supported by pych"),
    ({"connections": 4}, "connections is not supported by pych"),
    ({"preserve_source": True}, "preserve_source is not supported by pych"),
    ({"timeout_strategy": "Ignore"}, "timeout_strategy is not supported by pych"),
    ({"destination_url": "tcp:127.0.0.1:5000", "local": True}, "local migration needs a unix: URL"),
    ({"local": True}, "start the VM with --memory shared=on"),
    ({"destination_url": "http://x"}, "pych migrates over unix:<path> or tcp:<host>:<port>"),
])
def test_send_refuses_what_pych_does_not_do_by_name(tmp_path, body, words):
    vmm = booted()
    status, messages = error_of(send(vmm, **{"destination_url": f"unix:{tmp_path}/m", **body}))
    assert status == 400 and words in messages[-1], messages
    assert vmm.state is VmState.Running


def test_devices_the_snapshot_refuses_are_refused_for_migration_by_name(tmp_path):
    vmm = booted(vsock={"cid": 3, "socket": str(tmp_path / "vsock")})
    status, messages = error_of(send(vmm, destination_url=f"unix:{tmp_path}/m"))
    assert status == 400 and "pych cannot snapshot vsock devices" in messages[-1], messages
    assert vmm.state is VmState.Running


@pytest.mark.parametrize(("net", "words"), [
    ({"fds": [7]}, "device _net0: its tap came as fds (fd=), which only a local migration"),
])
def test_nets_pych_cannot_hand_over_are_refused_by_name(tmp_path, net, words):
    from pych.vmm.vmm import InvalidRequest, _check_send_migration
    config = vm_config(net=[{"id": "_net0", **net}])
    request = SendMigrationData(destination_url=f"unix:{tmp_path}/m")
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        _check_send_migration(request, config, vm=None)


def test_a_net_on_a_tap_by_name_or_by_fd_with_local_is_not_refused(tmp_path):
    from pych.vmm.vmm import _check_send_migration
    checked = []
    vm = SimpleNamespace(memory=SimpleNamespace(check_saveable=lambda: checked.append("mem")),
                         devices=SimpleNamespace(
                             check_saveable=lambda local_migration: checked.append("dev")))
    for net, local in (({"tap": "vmtap9"}, False), ({"fds": [7]}, True)):
        config = vm_config(net=[{"id": "_net0", **net}], memory={"size": 1 << 28,
                                                                  "shared": True})
        request = SendMigrationData(destination_url=f"unix:{tmp_path}/m", local=local)
        assert _check_send_migration(request, config, vm).kind == "unix"
    assert checked == ["mem", "dev", "mem", "dev"]


def test_a_destination_nobody_listens_on_is_400_and_the_vm_runs_on(tmp_path):
    vmm = booted()
    status, messages = error_of(send(vmm, destination_url=f"unix:{tmp_path}/nobody"))
    assert status == 400 and messages[0] == "Error sending migration", messages
    assert f"cannot connect to unix:{tmp_path}/nobody" in messages[-1]
    assert vmm.state is VmState.Running and vmm.exit_code is None


def receive(vmm: Vmm, fds=(), **body):
    return lambda: vmm.vm_receive_migration(ReceiveMigrationData.model_validate(body), list(fds))


@pytest.mark.parametrize(("body", "words"), [
    ({"tls_dir": "/etc/tls"}, "vm.receive-migration tls_dir is not supported by pych"),
    ({"memory_mode": "Postcopy"}, "memory_mode is not supported"),
    ({"iommufd_fd": 3}, "iommufd_fd is not supported"),
    ({"zone_updates": [{"id": "z", "host_numa_node": 0}]}, "zone_updates is not supported"),
    ({"receiver_url": "file:///x"}, "pych migrates over unix:<path> or tcp:<host>:<port>"),
])
def test_receive_refuses_what_pych_does_not_do_by_name(tmp_path, body, words):
    vmm = Vmm()
    status, messages = error_of(receive(vmm, **{"receiver_url": f"unix:{tmp_path}/m", **body}))
    assert status == 400 and words in messages[-1], messages
    assert not (tmp_path / "m").exists()


def test_receive_needs_a_pych_without_a_vm_and_closes_fds(tmp_path):
    vmm = Vmm()
    vmm.vm_create(vm_config())
    r, w = os.pipe()
    status, messages = error_of(receive(vmm, [w], receiver_url=f"unix:{tmp_path}/m"))
    assert (status, messages) == (409, ["VM is already created"])
    assert os.read(r, 1) == b""                           # w was closed
    os.close(r)


def receiving(tmp_path) -> tuple[Vmm, threading.Thread, list, protocol.Channel]:
    """A pych without a VM receiving at ``unix:<tmp_path>/m`` on a thread (the errors it
    answers collect in the list), and a sender's channel to it, past HELLO."""
    vmm = Vmm()
    url = f"unix:{tmp_path}/m"
    errors: list = []

    def run():
        try:
            vmm.vm_receive_migration(ReceiveMigrationData(receiver_url=url), [])
        except VmmError as e:
            errors.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while True:                          # the socket file exists from bind(), before listen()
        try:
            channel = protocol.Channel(protocol.connect(protocol.parse_url(url)))
            break
        except protocol.MigrationError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    channel.request(protocol.Msg.HELLO, protocol.hello(False))
    return vmm, thread, errors, channel


def test_a_receiver_fed_a_truncated_stream_keeps_no_vm(tmp_path):
    vmm, thread, errors, channel = receiving(tmp_path)
    channel.close()                                     # gone before CONFIG
    thread.join(10)
    assert int(status_of(errors[0])) == 500 and "truncated" in errors[0].messages[-1]
    assert vmm.config is None and vmm.vm is None and vmm.state is VmState.NotCreated
    assert not (tmp_path / "m").exists()                # the socket file is removed


def test_a_receiver_refuses_a_bad_configuration_by_what_is_wrong_and_keeps_no_vm(tmp_path):
    """The receiver validates the sender's configuration itself (with the models it loads on
    first use: the receiver started with no VM has none loaded yet)."""
    vmm, thread, errors, channel = receiving(tmp_path)
    with pytest.raises(protocol.PeerRefused) as refused:
        channel.request(protocol.Msg.CONFIG, {"config": {"cpus": {"boot_vcpus": 0}},
                                              "layout": {}, "shared": {}})
    channel.close()
    thread.join(10)
    assert "boot_vcpus" in str(refused.value) and "not defined" not in str(refused.value)
    assert vmm.config is None and vmm.vm is None and vmm.state is VmState.NotCreated


def test_virtio_fs_is_refused_naming_virtiofsd_unless_the_migration_is_local(tmp_path):
    from tests.unit.devices.test_vhost_user import FakeBackend
    backend = FakeBackend(tmp_path / "virtiofsd.sock")
    try:
        vmm = booted(fs=[{"tag": "share", "socket": backend.path}],
                     memory={"size": 1 << 28, "shared": True})
        status, messages = error_of(send(vmm, destination_url=f"unix:{tmp_path}/m"))
        assert status == 400 and messages[-1].startswith("device _fs0: the state of virtio-fs "
                                                         "_fs0 lives in its back-end"), messages
        assert "virtiofsd cannot save it or hand it to another virtiofsd" in messages[-1]
        assert vmm.state is VmState.Running
        # local: past every check (nobody listens there: that is all that is wrong)
        status, messages = error_of(send(vmm, destination_url=f"unix:{tmp_path}/m",
                                         local=True))
        assert status == 400 and "cannot connect" in messages[-1], messages
        assert vmm.state is VmState.Running and not backend.eof
    finally:
        backend.close()
