"""pych-remote against an in-process ApiServer: requests built, output, exit codes."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from pych.api import ApiServer, RequestHandler
from pych.api.routes import ROUTES
from pych.cli import remote as remote_cli
from pych.cli.remote import main
from pych.config import ConfigConflict, PciDeviceInfo, VmResizeDisk, VmSnapshotConfig
from pych.errors import BackendError, VmNotCreated
from tests.support.host import fd_is_open


class Handler(RequestHandler):
    """Records (endpoint, arguments) and answers like a running VM."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def vmm_ping(self):
        return {"build_version": "v0", "version": "0.1.0", "pid": 42, "features": []}

    def vm_boot(self):
        self.calls.append(("vm_boot", ()))

    def vm_pause(self):
        raise VmNotCreated("VM is not created")

    def vm_resize(self, resize):
        self.calls.append(("vm_resize", (resize,)))

    def vm_resize_zone(self, resize):
        self.calls.append(("vm_resize_zone", (resize,)))

    def vm_resize_disk(self, resize):
        self.calls.append(("vm_resize_disk", (resize,)))

    def vm_create(self, config):
        self.calls.append(("vm_create", (config,)))

    def vm_add_disk(self, config):
        if config.id == "taken":
            raise ConfigConflict("Identifier taken is not unique")
        self.calls.append(("vm_add_disk", (config,)))
        return PciDeviceInfo(id=config.id or "_disk0", bdf="0000:00:06.0")

    def vm_add_net(self, config, fds):
        self.calls.append(("vm_add_net", (config, fds)))
        if fds:
            return None                         # as a created, not running VM: 204
        return PciDeviceInfo(id=config.id or "_net1", bdf="0000:00:07.0")

    def vm_add_pmem(self, config):
        if config.file == "/missing":
            raise BackendError("Error adding device to the VM", "No such file: /missing")
        self.calls.append(("vm_add_pmem", (config,)))
        return PciDeviceInfo(id=config.id or "_pmem2", bdf="0000:00:08.0")

    def vm_add_vsock(self, config):
        self.calls.append(("vm_add_vsock", (config,)))
        return PciDeviceInfo(id=config.id or "_vsock3", bdf="0000:00:09.0")

    def vm_add_fs(self, config):
        self.calls.append(("vm_add_fs", (config,)))
        return PciDeviceInfo(id=config.id or "_fs4", bdf="0000:00:0a.0")

    def vm_add_device(self, config, fds):
        self.calls.append(("vm_add_device", (config, fds)))
        return PciDeviceInfo(id=config.id or "_vfio5", bdf="0000:00:0b.0")

    def vm_remove_device(self, request):
        self.calls.append(("vm_remove_device", (request,)))


@pytest.fixture
def vmm():
    directory = Path(tempfile.mkdtemp(prefix="pych-remote-", dir="/tmp"))
    handler = Handler()
    with ApiServer(lambda fn: fn(handler), path=directory / "api.sock"):
        yield handler, os.fspath(directory / "api.sock")
    shutil.rmtree(directory, ignore_errors=True)


def remote(socket_path: str, *args: str) -> int:
    return main(["--api-socket", socket_path, *args])


def test_ping_prints_the_body(vmm, capsys):
    _, path = vmm
    assert remote(path, "ping") == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"build_version": "v0", "version": "0.1.0", "pid": 42, "features": []}
    assert out.endswith("}\n") and err == ""


def test_a_204_prints_nothing(vmm, capsys):
    handler, path = vmm
    assert remote(path, "boot") == 0
    assert capsys.readouterr() == ("", "")
    assert handler.calls == [("vm_boot", ())]


def test_a_server_error_prints_the_chain_and_exits_1(vmm, capsys):
    _, path = vmm
    assert remote(path, "pause") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "Error: pych-remote exited with the following chain of errors:",
        "  0: http client error",
        "  1: Server responded with NotFound",
        "  2: Error from API",
        "  3: VM is not created",
    ]


def test_an_unimplemented_endpoint_exits_1(vmm, capsys):
    _, path = vmm
    assert remote(path, "nmi") == 1
    err = capsys.readouterr().err
    assert "  1: Server responded with InternalServerError\n" in err
    assert "vm.nmi is not supported by pych yet" in err


def test_add_disk_sends_the_parsed_config_and_prints_the_pci_info(vmm, capsys):
    handler, path = vmm
    assert remote(path, "add-disk", "path=/img/data.raw,readonly=on,id=data") == 0
    assert json.loads(capsys.readouterr().out) == {"id": "data", "bdf": "0000:00:06.0"}
    ((_, (config,)),) = handler.calls
    assert (config.path, config.readonly, config.id) == ("/img/data.raw", True, "data")


def test_a_conflict_is_reported_as_409(vmm, capsys):
    _, path = vmm
    assert remote(path, "add-disk", "path=/img/x.raw,id=taken") == 1
    err = capsys.readouterr().err
    assert "  1: Server responded with Unknown (409 Conflict)\n" in err
    assert "Identifier taken is not unique" in err


def test_add_net_passes_its_fds_with_scm_rights(vmm, capsys):
    handler, path = vmm
    read_end, write_end = os.pipe()
    spare_read, spare_write = os.pipe()
    try:
        assert remote(path, "add-net", f"fd=[{write_end},{spare_write}],num_queues=4") == 0
        ((_, (config, fds)),) = handler.calls
        assert config.fds is None and len(fds) == 2  # the numbers never travel in the JSON
        os.write(fds[0], b"!")
        assert os.read(read_end, 1) == b"!"
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (read_end, write_end, spare_read, spare_write):
            os.close(fd)


def test_resize_bodies(vmm, wire, capsys):
    handler, path = vmm
    assert remote(path, "resize", "--cpus", "4", "--memory", "3G") == 0
    assert remote(path, "resize-zone", "--id", "mem1", "--size", "512M") == 0
    assert remote(path, "resize-disk", "--disk", "_disk0", "--size", "2G") == 0
    (resize, zone, grown) = [args[0] for _, args in handler.calls]
    assert (resize.desired_vcpus, resize.desired_ram, resize.desired_balloon) == (4, 3 << 30, None)
    assert (zone.id, zone.desired_ram) == ("mem1", 512 << 20)
    assert (grown.id, grown.desired_size) == ("_disk0", 2 << 30)
    method, endpoint, body, _ = wire[-1]
    disk = VmResizeDisk.model_validate(body)
    assert (method, endpoint) == ("PUT", "vm.resize-disk")
    assert (disk.id, disk.desired_size) == ("_disk0", 2 << 30)


def test_remove_device_and_snapshot_bodies(vmm, wire, capsys):
    handler, path = vmm
    assert remote(path, "remove-device", "_net2") == 0
    ((_, (remove,)),) = handler.calls
    assert remove.id == "_net2"
    # pych does not implement vm.snapshot: the request goes out all the same
    assert remote(path, "snapshot", "file:///var/snap") == 1
    assert "vm.snapshot is not supported by pych yet" in capsys.readouterr().err
    method, endpoint, body, _ = wire[-1]
    snapshot = VmSnapshotConfig.model_validate(body)
    assert (method, endpoint) == ("PUT", "vm.snapshot")
    assert snapshot.destination_url == "file:///var/snap"


def test_create_from_a_file_and_from_stdin(vmm, tmp_path, monkeypatch):
    handler, path = vmm
    config = {"payload": {"kernel": "/boot/vmlinux"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 4}}
    (tmp_path / "vm.json").write_text(json.dumps(config))
    assert remote(path, "create", os.fspath(tmp_path / "vm.json")) == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(json.dumps(config).encode())))
    assert remote(path, "create") == 0
    assert [args[0].cpus.max_vcpus for _, args in handler.calls] == [4, 4]


@pytest.mark.parametrize(
    ("args", "heading"),
    [
        (["add-disk", "path=/x,bogus=1"], "Error parsing disk syntax"),
        (["resize", "--cpus", "many"], "Error parsing resize arguments"),
        (["resize", "--memory", "3T"], "Error parsing resize arguments"),
        (["resize-zone", "--id", "z", "--size", "big"], "Error parsing memory size"),
        (["add-net", "tap=t0,bogus=1"], "Error parsing network syntax"),
        (["add-net", "fd=[x]"], "Error parsing network syntax"),
        (["add-pmem", "file=/p,size=big"], "Error parsing persistent memory syntax"),
        (["add-vsock", "cid=three,socket=/v"], "Error parsing vsock syntax"),
        (["add-fs", "tag=t,sock=/s"], "Error parsing filesystem syntax"),
        (["add-device", "path=/sys/x,bogus=1"], "Error parsing device syntax"),
    ],
)
def test_bad_arguments_exit_1_before_any_request(vmm, capsys, args, heading):
    handler, path = vmm
    assert remote(path, *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: pych-remote exited with the following chain of errors:\n")
    assert f"  0: {heading}\n" in err
    assert handler.calls == []


def test_a_missing_socket_is_one_clear_line(tmp_path, capsys):
    assert remote(os.fspath(tmp_path / "absent.sock"), "ping") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "absent.sock" in err and "No such file" in err


def test_usage_errors(capsys):
    assert main(["ping"]) == 1  # no --api-socket
    assert "--api-socket" in capsys.readouterr().err
    assert main(["--api-socket", "/x"]) == 2  # no subcommand
    assert main(["--api-socket", "/x", "frobnicate"]) == 2


@pytest.fixture
def wire(monkeypatch):
    """The (method, endpoint, JSON body, fd count) of every request pych-remote sends."""
    sent = []
    request = remote_cli.ApiClient.request

    def record(self, method, path, body=None, fds=()):
        if isinstance(body, (str, bytes)):
            body = json.loads(body)
        sent.append((method, path, body, len(fds)))
        return request(self, method, path, body, fds)

    monkeypatch.setattr(remote_cli.ApiClient, "request", record)
    return sent


@pytest.mark.parametrize(
    ("args", "endpoint", "body", "reply"),
    [
        (["add-net", "tap=chtap0,mac=12:34:56:78:9a:bc,ip=192.168.10.1,mask=255.255.255.0"],
         "vm.add-net",
         {"tap": "chtap0", "mac": "12:34:56:78:9a:bc", "ip": "192.168.10.1",
          "mask": "255.255.255.0"},
         {"id": "_net1", "bdf": "0000:00:07.0"}),
        (["add-pmem", "file=/img/pmem.raw,size=4M,discard_writes=on,id=pm"], "vm.add-pmem",
         {"file": "/img/pmem.raw", "size": 4 << 20, "discard_writes": True, "id": "pm"},
         {"id": "pm", "bdf": "0000:00:08.0"}),
        (["add-vsock", "cid=3,socket=/run/vsock.sock"], "vm.add-vsock",
         {"cid": 3, "socket": "/run/vsock.sock"}, {"id": "_vsock3", "bdf": "0000:00:09.0"}),
        (["add-fs", "tag=myfs,socket=/run/virtiofs.sock"], "vm.add-fs",
         {"tag": "myfs", "socket": "/run/virtiofs.sock"}, {"id": "_fs4", "bdf": "0000:00:0a.0"}),
        (["add-device", "path=/sys/bus/pci/devices/0000:01:00.0/"], "vm.add-device",
         {"path": "/sys/bus/pci/devices/0000:01:00.0/"}, {"id": "_vfio5", "bdf": "0000:00:0b.0"}),
    ],
)
def test_add_commands_take_one_positional_config_and_print_the_reply(
        vmm, wire, capsys, args, endpoint, body, reply):
    """ch-remote's grammar: ``add-<kind> <key=value,...>``; the config goes out as JSON
    with unset options left out, and the reply body is printed with a newline."""
    _, path = vmm
    assert remote(path, *args) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.endswith("\n") and json.loads(out) == reply
    method, sent_endpoint, sent, fds = wire[0]
    assert (method, sent_endpoint, fds) == ("PUT", endpoint, 0)
    for key, value in body.items():
        assert sent[key] == value, (key, sent)
    assert not [k for k, v in sent.items() if v is None]


def test_add_net_fd_sends_one_fd_and_no_fds_field(vmm, wire, capsys):
    handler, path = vmm
    read_end, write_end = os.pipe()
    try:
        assert remote(path, "add-net", f"fd=[{write_end}],mac=12:34:56:78:9a:bc") == 0
        assert capsys.readouterr() == ("", "")          # 204: nothing printed
        ((_, endpoint, body, fds),) = wire
        assert (endpoint, fds) == ("vm.add-net", 1)
        assert "fds" not in body and "fd" not in body and body["mac"] == "12:34:56:78:9a:bc"
        ((_, (config, received)),) = handler.calls
        os.write(received[0], b"?")
        assert os.read(read_end, 1) == b"?"
        os.close(received[0])
    finally:
        os.close(read_end)
        os.close(write_end)


def test_add_net_with_a_closed_fd_fails_before_sending(vmm, capsys):
    handler, path = vmm
    closed = next(fd for fd in range(900, 1000) if not fd_is_open(fd))
    assert remote(path, "add-net", f"fd=[{closed}]") == 1
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        "Error: pych-remote exited with the following chain of errors:",
        "  0: http client error",
        "  1: Error sending file descriptors",
        "  2: Bad file descriptor (os error 9)",
    ]
    assert handler.calls == []


def test_a_400_is_a_bad_request(vmm, capsys):
    _, path = vmm
    assert remote(path, "add-pmem", "file=/missing") == 1
    assert capsys.readouterr().err.splitlines()[1:] == [
        "  0: http client error",
        "  1: Server responded with BadRequest",
        "  2: Error from API",
        "  3: Error adding device to the VM",
        "  4: No such file: /missing",
    ]


def test_remove_device_takes_the_id_as_its_positional_argument(vmm, wire, capsys):
    handler, path = vmm
    assert remote(path, "remove-device", "_pmem2") == 0
    assert capsys.readouterr() == ("", "")
    assert wire == [("PUT", "vm.remove-device", {"id": "_pmem2"}, 0)]
    assert main(["--api-socket", path, "remove-device"]) == 2          # the id is required


@pytest.mark.parametrize(("response", "lines"), [
    (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops",
     ["  0: http client error",
      "  X: Can't get remote's error messages from JSON response: "
      "Expecting value: line 1 column 1 (char 0): body='oops'"]),
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 8\r\n\r\n[\"busy\"]",
     ["  0: http client error",
      "  1: Server responded with Unknown (503 Service Unavailable)",
      "  2: busy"]),
])
def test_error_replies_of_another_server(tmp_path, capsys, response, lines):
    """What ch-remote prints for an error status whose body is not an error chain (an X
    line quoting the body) and for a status it has no name for."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.fspath(tmp_path / "api.sock"))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(response)
    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        assert remote(os.fspath(tmp_path / "api.sock"), "info") == 1
    finally:
        thread.join(10)
        server.close()
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[1:] == lines


# --------------------------------------------------------------------------
# The subcommands are the route table's


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = remote_cli._parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_route_has_its_subcommand_and_no_other_exists():
    commands = _subcommands()
    assert set(commands) == {route.remote.name for route in ROUTES}
    assert set(remote_cli.SPECIAL_COMMANDS) <= set(commands)
    for route in ROUTES:
        sub = commands[route.remote.name]
        assert sub.description == route.remote.help
        positional = [a.dest for a in sub._actions if not a.option_strings]
        if route.remote.name in remote_cli.SPECIAL_COMMANDS:
            continue
        if route.remote.syntax is not None:
            assert route.body is not None and callable(getattr(route.body, "parse", None))
            assert positional == ["config"]
        elif route.remote.url:
            assert route.body is not None and set(route.body.model_fields) == {"destination_url"}
            assert positional == ["url"]
        else:
            assert route.body is None and positional == [], route.endpoint


# One command line per subcommand; each must reach its route's endpoint with its method.
COMMAND_LINES = {
    "add-device": ["path=/sys/bus/pci/devices/0000:01:00.0/"],
    "add-disk": ["path=/img/disk.raw"],
    "add-fs": ["tag=myfs,socket=/run/virtiofs.sock"],
    "add-generic-vhost-user": ["socket=/run/vhost.sock,queue_sizes=[256],device_type=26"],
    "add-net": ["tap=tap0"],
    "add-pmem": ["file=/img/pmem.raw,size=4M"],
    "add-user-device": ["socket=/run/vfio-user.sock"],
    "add-vdpa": ["path=/dev/vhost-vdpa-0,num_queues=1"],
    "add-vsock": ["cid=3,socket=/run/vsock.sock"],
    "coredump": ["file:///var/core"],
    "receive-migration": ["receiver_url=unix:/run/migration.sock"],
    "remove-device": ["_disk0"],
    "resize": ["--cpus", "2"],
    "resize-disk": ["--disk", "_disk0", "--size", "2G"],
    "resize-zone": ["--id", "mem0", "--size", "1G"],
    "restore": ["source_url=file:///var/snap"],
    "send-migration": ["destination_url=unix:/run/migration.sock"],
    "snapshot": ["file:///var/snap"],
}


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.remote.name)
def test_each_subcommand_sends_its_routes_request(vmm, wire, tmp_path, monkeypatch, capsys, route):
    _, path = vmm
    if route.remote.name == "create":
        (tmp_path / "vm.json").write_text('{"payload": {"kernel": "/boot/vmlinux"}}')
        args = [os.fspath(tmp_path / "vm.json")]
    else:
        args = COMMAND_LINES.get(route.remote.name, [])
    status = remote(path, route.remote.name, *args)
    err = capsys.readouterr().err
    ((method, endpoint, body, _),) = wire
    assert (method, endpoint) == (route.method, route.endpoint)
    assert (body is None) == (route.body is None)
    if route.body is not None:
        route.body.model_validate(body)
    if not route.implemented:
        assert status == 1 and f"{route.endpoint} is not supported by pych yet" in err


@pytest.mark.parametrize(("args", "body"), [
    (["send-migration", "unix:/run/m.sock"], {"destination_url": "unix:/run/m.sock"}),
    (["send-migration", "--local", "unix:/run/m.sock"],
     {"destination_url": "unix:/run/m.sock", "local": True}),
    (["send-migration", "destination_url=tcp:127.0.0.1:6000,downtime_ms=50"],
     {"destination_url": "tcp:127.0.0.1:6000", "downtime_ms": 50}),
    (["receive-migration", "tcp:127.0.0.1:6000"], {"receiver_url": "tcp:127.0.0.1:6000"}),
])
def test_migration_subcommands_take_ch_remotes_url_form_and_the_key_value_form(vmm, wire, args,
                                                                               body):
    _, path = vmm
    remote(path, *args)
    ((method, endpoint, sent, _),) = wire
    assert (method, endpoint) == ("PUT", f"vm.{args[0]}")
    assert {k: v for k, v in sent.items() if k in body} == body
