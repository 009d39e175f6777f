"""ApiClient against the real ApiServer on a temp socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from pych.api import ApiClient, ApiServer, RequestHandler
from pych.config import DiskConfig, NetConfig, PciDeviceInfo, VmResize


class Handler(RequestHandler):
    def __init__(self) -> None:
        self.resizes: list[VmResize] = []
        self.nets: list[tuple[NetConfig, list[int]]] = []

    def vmm_ping(self) -> dict:
        return {"version": "v-test"}

    def vm_info(self) -> dict:
        return {"state": "Running"}

    def vm_resize(self, resize: VmResize) -> None:
        self.resizes.append(resize)

    def vm_add_disk(self, config: DiskConfig) -> PciDeviceInfo:
        return PciDeviceInfo(id=config.id or "_disk0", bdf="0000:00:06.0")

    def vm_add_net(self, config: NetConfig, fds: list[int]) -> None:
        self.nets.append((config, fds))


@pytest.fixture
def served():
    directory = Path(tempfile.mkdtemp(prefix="pych-client-", dir="/tmp"))
    handler = Handler()
    server = ApiServer(lambda fn: fn(handler), path=directory / "api.sock")
    server.start()
    yield handler, server, directory / "api.sock"
    server.close()
    shutil.rmtree(directory, ignore_errors=True)


def test_get_and_put_round_trip(served):
    handler, _, path = served
    with ApiClient(path, timeout=5) as client:
        assert client.get("vmm.ping") == (200, b'{"version":"v-test"}')
        assert client.request("GET", "/api/v1/vm.info") == (200, b'{"state":"Running"}')
        assert client.put("vm.resize", {"desired_vcpus": 3}) == (204, b"")
        assert client.put("vm.resize", VmResize(desired_ram=1 << 30))[0] == 204
        assert client.put("vm.resize", '{"desired_balloon": 0}')[0] == 204
        assert client.put("vm.resize", b'{"desired_vcpus": 1}')[0] == 204
        status, body = client.put("vm.add-disk", DiskConfig(path="/img", id="data"))
    assert (status, json.loads(body)) == (200, {"id": "data", "bdf": "0000:00:06.0"})
    assert [(r.desired_vcpus, r.desired_ram, r.desired_balloon) for r in handler.resizes] == [
        (3, None, None),
        (None, 1 << 30, None),
        (None, None, 0),
        (1, None, None),
    ]


def test_errors_are_returned_not_raised(served):
    _, _, path = served
    with ApiClient(path, timeout=5) as client:
        status, body = client.put("vm.resize", {"desired_vcpus": 0})
        assert status == 400 and isinstance(json.loads(body), list)
        assert client.get("vm.nope")[0] == 404
        assert client.put("vm.boot")[0] == 500  # not implemented by this handler


def test_one_connection_is_kept_alive(served):
    _, _, path = served
    with ApiClient(path, timeout=5) as client:
        client.get("vmm.ping")
        first = client._connection.sock
        for _ in range(5):
            client.put("vm.resize", {"desired_vcpus": 2})
        assert client._connection.sock is first


def test_the_client_reconnects_to_a_restarted_server(served):
    handler, server, path = served
    with ApiClient(path, timeout=5) as client:
        assert client.get("vmm.ping")[0] == 200
        server.close()  # hangs up on the idle keep-alive connection
        with ApiServer(lambda fn: fn(handler), path=path):
            assert client.get("vmm.ping")[0] == 200


def test_a_connection_dropped_while_idle_is_reopened(served):
    _, _, path = served
    with ApiClient(path, timeout=5) as client:
        client.get("vmm.ping")
        client._connection.sock.shutdown(socket.SHUT_RDWR)  # as if the server went away
        assert client.get("vmm.ping")[0] == 200


def test_fds_travel_with_scm_rights(served):
    handler, _, path = served
    read_end, write_end = os.pipe()
    try:
        with ApiClient(path, timeout=5) as client:
            status, _ = client.put("vm.add-net", {"tap": "tap0"}, fds=[write_end])
            assert status == 204
            # The fds are not sent again with later requests.
            assert client.put("vm.add-net", {"tap": "tap1"})[0] == 204
        (first, (received,)), (second, no_fds) = handler.nets
        assert (first.tap, second.tap, no_fds) == ("tap0", "tap1", [])
        os.write(received, b"ok")
        os.close(received)
        assert os.read(read_end, 2) == b"ok"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_clients_in_threads(served):
    handler, _, path = served

    def work(n: int) -> None:
        with ApiClient(path, timeout=5) as client:
            for _ in range(4):
                assert client.put("vm.resize", {"desired_vcpus": n + 1})[0] == 204

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(handler.resizes) == 32


def test_connect_reports_a_missing_socket(tmp_path):
    client = ApiClient(tmp_path / "absent.sock")
    with pytest.raises(FileNotFoundError):
        client.connect()
    client.close()
