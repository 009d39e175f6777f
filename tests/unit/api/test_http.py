"""The REST API server against a fake RequestHandler, in-process, on a temp socket."""

from __future__ import annotations

import http.client
import inspect
import json
import os
import select
import shutil
import socket
import stat
import tempfile
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pych import errors
from pych.api import ApiClient, ApiServer, ApiSocketError, RequestHandler
from pych.api.errors import STATUS
from pych.api.http import MAX_BODY_SIZE, MAX_FDS_PER_REQUEST
from pych.api.routes import ROUTES, Route

from pych import config  # noqa: E402 - a failing import must fail the tests, not skip them

# A valid body for every body model (minimal, per the OpenAPI contract).
VALID_BODIES = {
    "VmConfig": {"payload": {"kernel": "/boot/vmlinux"}},
    "VmResize": {"desired_vcpus": 2},
    "VmResizeZone": {"id": "mem0", "desired_ram": 1 << 30},
    "VmResizeDisk": {"id": "disk0", "desired_size": 1 << 30},
    "DiskConfig": {"path": "/var/lib/images/disk.img"},
    "NetConfig": {"tap": "tap0"},
    "FsConfig": {"tag": "myfs", "socket": "/run/virtiofs.sock"},
    "PmemConfig": {"file": "/var/lib/pmem.img", "size": 2 << 20},
    "VsockConfig": {"cid": 3, "socket": "/run/vsock.sock"},
    "DeviceConfig": {"path": "/sys/bus/pci/devices/0000:01:00.0/"},
    "VdpaConfig": {"path": "/dev/vhost-vdpa-0", "num_queues": 1},
    "UserDeviceConfig": {"socket": "/run/vfio-user.sock"},
    "GenericVhostUserConfig": {
        "socket": "/run/vhost.sock",
        "queue_sizes": [256],
        "device_type": 26,
    },
    "VmRemoveDevice": {"id": "_disk0"},
    "VmSnapshotConfig": {"destination_url": "file:///var/lib/snapshot"},
    "RestoreConfig": {"source_url": "file:///var/lib/snapshot"},
    "VmCoredumpData": {"destination_url": "file:///var/lib/core"},
    "SendMigrationData": {"destination_url": "unix:/run/migration.sock"},
    "ReceiveMigrationData": {"receiver_url": "unix:/run/migration.sock"},
}


PROTOCOL_METHODS = {
    name for name, member in vars(RequestHandler).items()
    if inspect.isfunction(member) and not name.startswith("_")
}
IMPLEMENTED = [route for route in ROUTES if route.implemented]
NOT_IMPLEMENTED = [route for route in ROUTES if not route.implemented]


class _Probe:
    """Records the methods called on it, whatever their name."""

    def __init__(self) -> None:
        self.called: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        return lambda *args: self.called.append((name, args))


def called_method(route: Route, body: object = None, fds: object = None) -> tuple[str, tuple]:
    """The RequestHandler method ``route``'s handler calls, and its arguments."""
    probe = _Probe()
    route.call(probe, body, fds)  # type: ignore[arg-type]
    ((name, args),) = probe.called
    return name, args


class FakeHandler:
    """Implements every RequestHandler method by recording the call; ``outcomes[name]`` is
    returned, or raised if an exception.

    Endpoints taking fds close them unless ``keep_fds`` (then the test owns them)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.outcomes: dict[str, object] = {"vmm_ping": {"version": "v-test"}}
        self.keep_fds = False
        self.lock = threading.Lock()

    def _record(self, name: str, args: tuple) -> object:
        with self.lock:
            self.calls.append((name, args))
        fds = args[-1] if args and isinstance(args[-1], list) else []
        if not self.keep_fds:
            for fd in fds:
                os.close(fd)
        outcome = self.outcomes.get(name)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def last(self, name: str) -> tuple:
        return [args for called, args in self.calls if called == name][-1]


for _name in PROTOCOL_METHODS:
    setattr(FakeHandler, _name, lambda self, *args, _name=_name: self._record(_name, args))


class BareHandler(RequestHandler):
    """Subclasses the protocol and defines nothing: every endpoint is unsupported."""


def _short_tmpdir() -> Path:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="pych-api-", dir="/tmp"))


@pytest.fixture
def sockdir():
    path = _short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _serve(handler: RequestHandler, path: Path) -> ApiServer:
    server = ApiServer(lambda fn: fn(handler), path=path)
    server.start()
    return server


@pytest.fixture
def api(sockdir):
    handler = FakeHandler()
    server = _serve(handler, sockdir / "api.sock")
    yield handler, sockdir / "api.sock"
    server.close()


@pytest.fixture
def client(api):
    with ApiClient(api[1], timeout=5) as c:
        yield c


def raw_exchange(path: Path, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


def assert_error_body(body: bytes) -> list[str]:
    messages = json.loads(body)
    assert isinstance(messages, list) and messages
    assert all(isinstance(line, str) for line in messages)
    return messages


# --------------------------------------------------------------------------
# Route table and statuses


def test_every_route_names_a_handler_method_and_every_endpoint_has_a_route():
    """The route table and the RequestHandler protocol list the same endpoints: each
    implemented route calls one protocol method with its body model (and fds if it takes
    them), each protocol method has exactly one route, each body is a model with a valid
    example here."""
    assert len(ROUTES) == 31
    assert len({route.path for route in ROUTES}) == len(ROUTES)
    assert len({route.remote.name for route in ROUTES}) == len(ROUTES)
    called = []
    for route in ROUTES:
        assert route.method in ("GET", "PUT")
        if route.body is not None:
            assert issubclass(route.body, pydantic.BaseModel), route.endpoint
            assert route.body.__name__ in VALID_BODIES, route.endpoint
            assert getattr(config, route.body.__name__) is route.body  # a public config model
        else:
            assert not route.fds, route.endpoint
        if not route.implemented:
            continue
        body, fds = object(), []
        name, args = called_method(route, body, fds)
        assert name in PROTOCOL_METHODS, f"{route.endpoint} calls {name}, not in the protocol"
        expected = (() if route.body is None else (body, fds) if route.fds else (body,))
        assert args == expected and all(a is b for a, b in zip(args, expected)), route.endpoint
        method = getattr(RequestHandler, name)
        parameters = list(inspect.signature(method).parameters)[1:]
        assert len(parameters) == len(args), route.endpoint
        assert parameters[-1:] == ["fds"] if route.fds else "fds" not in parameters
        if route.body is not None:
            hints = typing.get_type_hints(method, localns=vars(config))
            assert hints[parameters[0]] is route.body, route.endpoint
        called.append(name)
    assert sorted(called) == sorted(PROTOCOL_METHODS)  # each method has exactly one route


def test_the_unimplemented_routes_are_the_ones_pych_does_not_support_yet():
    assert {route.endpoint for route in NOT_IMPLEMENTED} == {
        "vm.add-vdpa", "vm.add-user-device", "vm.add-generic-vhost-user",
        "vm.coredump"}


def test_the_add_routes_match_the_device_kind_registry():
    """Each hot-pluggable kind's add endpoint is a route taking the kind's model."""
    from pych.config.kinds import DEVICE_KINDS

    by_endpoint = {route.endpoint: route for route in ROUTES}
    adds = {route.endpoint for route in ROUTES if route.endpoint.startswith("vm.add-")}
    assert adds == {kind.add_endpoint for kind in DEVICE_KINDS if kind.hotpluggable}
    for kind in DEVICE_KINDS:
        if kind.hotpluggable:
            assert by_endpoint[kind.add_endpoint].body is kind.model, kind.name


@pytest.mark.parametrize("route", IMPLEMENTED, ids=lambda route: route.endpoint)
def test_each_route_succeeds_with_its_method(api, client, route):
    handler, _ = api
    name, _ = called_method(route, object(), [])
    body = VALID_BODIES[route.body.__name__] if route.body else None
    status, _ = client.request(route.method, route.path, body)
    expected = 200 if name in ("vmm_ping", "vmm_shutdown") else 204
    assert (status, handler.calls[-1][0]) == (expected, name)
    if route.body:
        (model, *fds) = handler.last(name)
        assert isinstance(model, route.body)
        assert fds == ([[]] if route.fds else [])


@pytest.mark.parametrize("route", NOT_IMPLEMENTED, ids=lambda route: route.endpoint)
def test_each_unimplemented_route_answers_500_naming_itself(api, client, route):
    handler, _ = api
    status, payload = client.request(route.method, route.path, VALID_BODIES[route.body.__name__])
    assert status == 500
    assert json.loads(payload) == ["Error from API",
                                   f"{route.endpoint} is not supported by pych yet"]
    assert not handler.calls
    # the body is still validated first
    assert client.request(route.method, route.path, b"{")[0] == 400


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.endpoint)
def test_each_route_refuses_other_methods_with_405_and_allow(client, route):
    other = "PUT" if route.method == "GET" else "GET"
    for method in (other, "POST", "DELETE"):
        connection = client._connection
        connection.request(method, route.path)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 405
        assert response.getheader("Allow") == route.method
        assert_error_body(body)


def test_200_carries_compact_json_and_headers(api, client):
    handler, _ = api
    handler.outcomes["vm_add_disk"] = {"id": "_disk0", "bdf": "0000:00:06.0"}
    connection = client._connection
    connection.request("PUT", "/api/v1/vm.add-disk", json.dumps(VALID_BODIES["DiskConfig"]))
    response = connection.getresponse()
    body = response.read()
    assert response.status == 200
    assert body == b'{"id":"_disk0","bdf":"0000:00:06.0"}'
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("Content-Length") == str(len(body))
    assert response.getheader("Server") == "pych API"
    assert not response.will_close


def test_a_returned_model_is_serialised(api, client):
    handler, _ = api
    handler.outcomes["vm_add_disk"] = config.PciDeviceInfo(id="_disk1", bdf="0000:00:07.0")
    status, body = client.put("vm.add-disk", VALID_BODIES["DiskConfig"])
    assert (status, json.loads(body)) == (200, {"id": "_disk1", "bdf": "0000:00:07.0"})


def test_204_has_no_body_and_keeps_the_connection(client):
    connection = client._connection
    for _ in range(3):
        connection.request("PUT", "/api/v1/vm.boot")
        response = connection.getresponse()
        assert (response.status, response.read()) == (204, b"")
        assert response.getheader("Content-Length") is None
        assert not response.will_close


@pytest.mark.parametrize(
    "target", ["/api/v1/vm.nope", "/api/v1/vm.info/", "/api/v2/vm.info", "/", "/vm.info"]
)
def test_unknown_paths_are_404(client, target):
    status, body = client.get(target)
    assert status == 404
    assert assert_error_body(body)[0] == "Not Found"


def test_query_strings_are_ignored(client):
    assert client.get("/api/v1/vmm.ping?verbose=1")[0] == 200


# --------------------------------------------------------------------------
# Bodies


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"not json",
        b'{"desired_vcpus": }',
        b"\xff\xfe",
        b"[1, 2]",
        b'"desired_vcpus"',
        b'{"desired_vcpus": "two"}',
        b'{"desired_vcpus": 2.5}',
        b'{"desired_vcpus": 0}',
        b'{"desired_vcpus": -1}',
        b'{"desired_ram": "1G"}',
        b'{"desired_vcpus": 1e400}',
        b"[" * 100_000,
    ],
)
def test_malformed_or_invalid_bodies_are_400(api, client, body):
    handler, _ = api
    status, payload = client.put("vm.resize", body)
    assert status == 400
    messages = assert_error_body(payload)
    assert messages[0] == "Failed to deserialize JSON" and len(messages) >= 2
    assert not handler.calls


def test_validation_errors_name_the_field(client):
    status, payload = client.put("vm.resize", {"desired_vcpus": "two"})
    assert status == 400
    assert any(line.startswith("desired_vcpus: ") for line in json.loads(payload))


def test_a_body_on_a_bodyless_endpoint_is_400(api, client):
    handler, _ = api
    status, payload = client.put("vm.boot", {"force": True})
    assert status == 400 and assert_error_body(payload)
    assert not handler.calls


def test_a_missing_body_where_one_is_required_is_400(api, client):
    handler, _ = api
    for body in (None, b""):
        status, payload = client.put("vm.resize", body)
        assert status == 400 and assert_error_body(payload)
    assert not handler.calls


# --------------------------------------------------------------------------
# Handler outcomes


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (errors.VmNotCreated("VM is not created"), 404),
        (errors.RetryLater("vCPU removal still pending"), 429),
        (None, 204),
    ],
)
def test_api_errors_keep_their_status(api, client, outcome, status):
    handler, _ = api
    handler.outcomes["vm_resize"] = outcome
    code, payload = client.put("vm.resize", VALID_BODIES["VmResize"])
    assert code == status
    if isinstance(outcome, errors.VmmError):
        assert json.loads(payload) == ["Error from API", *outcome.messages]


DOMAIN_ERRORS = sorted(
    (cls for cls in vars(errors).values()
     if isinstance(cls, type) and issubclass(cls, errors.VmmError) and cls is not errors.VmmError),
    key=lambda cls: cls.__name__)


def test_every_domain_error_has_a_status():
    assert DOMAIN_ERRORS and all(cls in STATUS for cls in DOMAIN_ERRORS)


@pytest.mark.parametrize(
    ("error", "status"),
    [(errors.VmNotCreated, 404), (errors.VmAlreadyCreated, 409), (errors.InvalidState, 405),
     (errors.InvalidRequest, 400), (errors.NotFound, 404), (errors.Conflict, 409),
     (errors.RetryLater, 429), (errors.BackendError, 400), (errors.Unsupported, 500),
     (errors.InternalError, 500)],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_each_domain_error_answers_its_status_and_chain(api, client, error, status):
    handler, _ = api
    handler.outcomes["vm_add_disk"] = error("Error adding device to the VM", "the reason")
    code, payload = client.put("vm.add-disk", VALID_BODIES["DiskConfig"])
    assert (code, json.loads(payload)) == (
        status, ["Error from API", "Error adding device to the VM", "the reason"])


def test_config_conflict_is_409_and_config_error_400(api, client):
    handler, _ = api
    handler.outcomes["vm_add_disk"] = config.ConfigConflict("Identifier _disk0 is not unique")
    status, payload = client.put("vm.add-disk", VALID_BODIES["DiskConfig"])
    assert (status, json.loads(payload)) == (
        409,
        ["Error from API", "Identifier _disk0 is not unique"],
    )
    handler.outcomes["vm_add_disk"] = config.ConfigError("Queue size must be a power of 2")
    assert client.put("vm.add-disk", VALID_BODIES["DiskConfig"])[0] == 400


def test_the_cause_chain_is_reported_outermost_first(api, client):
    handler, _ = api
    try:
        try:
            raise FileNotFoundError(2, "No such file or directory")
        except OSError as error:
            raise errors.InternalError("The disk could not be added") from error
    except errors.InternalError as error:
        handler.outcomes["vm_add_disk"] = error
    status, payload = client.put("vm.add-disk", VALID_BODIES["DiskConfig"])
    assert status == 500
    assert json.loads(payload) == [
        "Error from API",
        "The disk could not be added",
        "[Errno 2] No such file or directory",
    ]


def test_an_unexpected_exception_is_500_and_the_server_lives_on(api, client):
    handler, _ = api
    handler.outcomes["vm_info"] = KeyError("config")
    status, payload = client.get("vm.info")
    assert status == 500
    assert json.loads(payload) == ["Error from API", "KeyError: 'config'"]
    assert client.get("vmm.ping") == (200, b'{"version":"v-test"}')


def test_an_unserialisable_result_is_500(api, client):
    handler, _ = api
    handler.outcomes["vm_counters"] = {"disk": object()}
    status, payload = client.get("vm.counters")
    assert status == 500 and assert_error_body(payload)


def test_unimplemented_endpoints_answer_500_naming_the_endpoint(sockdir):
    server = _serve(BareHandler(), sockdir / "api.sock")
    try:
        with ApiClient(sockdir / "api.sock", timeout=5) as client:
            status, payload = client.put("vm.resize", VALID_BODIES["VmResize"])
    finally:
        server.close()
    assert status == 500
    assert json.loads(payload) == ["Error from API", "vm.resize is not supported by pych yet"]


# --------------------------------------------------------------------------
# Framing and misbehaving clients


def test_a_huge_content_length_is_refused_without_reading_the_body(api):
    _, path = api
    raw = raw_exchange(
        path,
        b"PUT /api/v1/vm.resize HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: %d\r\n\r\n{" % (MAX_BODY_SIZE + 1),
    )
    status, headers, body = parse_response(raw)
    assert status == 413 and headers["Connection"] == "close"
    assert assert_error_body(body)


def test_a_huge_body_announced_with_expect_100_is_refused_before_it_is_sent(api):
    _, path = api
    raw = raw_exchange(
        path,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1000000000\r\n\r\n",
    )
    assert parse_response(raw)[0] == 413


def test_expect_100_continue_is_honoured(api):
    _, path = api
    body = json.dumps(VALID_BODIES["VmResize"]).encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(os.fspath(path))
        sock.sendall(
            b"PUT /api/v1/vm.resize HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 204 ")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"Transfer-Encoding: chunked\r\n", 411),
        (b"Content-Length: abc\r\n", 400),
        (b"Content-Length: -1\r\n", 400),
        (b"Content-Length: 2\r\nContent-Length: 3\r\n", 400),
    ],
)
def test_undelimitable_bodies_are_refused_and_the_connection_closed(api, headers, status):
    _, path = api
    raw = raw_exchange(path, b"PUT /api/v1/vm.resize HTTP/1.1\r\n" + headers + b"\r\n{}")
    code, response_headers, body = parse_response(raw)
    assert (code, response_headers["Connection"]) == (status, "close")
    assert assert_error_body(body)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"GET /api/v1/vmm.ping HTTP/9.9\r\n\r\n",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
    ],
)
def test_garbage_gets_a_json_error_and_the_server_survives(api, client, garbage):
    raw = raw_exchange(api[1], garbage)
    status, _, body = parse_response(raw)
    assert status in (400, 414, 431, 505)
    assert assert_error_body(body)
    assert client.get("vmm.ping")[0] == 200


def test_a_client_vanishing_mid_request_does_not_hurt(api, client):
    _, path = api
    for partial in (
        b'PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"desired',
        b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Le",
        b"GET /api/v1/vm",
    ):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(os.fspath(path))
            sock.sendall(partial)
    assert client.get("vmm.ping")[0] == 200


def test_fifty_concurrent_keepalive_clients(api):
    handler, path = api
    handler.outcomes["vm_info"] = {"state": "Running"}

    def session(n: int) -> list[int]:
        with ApiClient(path, timeout=10) as c:
            statuses = [c.get("vm.info")[0] for _ in range(3)]
            statuses.append(c.put("vm.resize", {"desired_vcpus": n + 1})[0])
            statuses.append(c.get("vmm.ping")[0])
            return statuses

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(session, range(50)))
    assert results == [[200, 200, 200, 204, 200]] * 50
    resized = sorted(args[0].desired_vcpus for name, args in handler.calls if name == "vm_resize")
    assert resized == list(range(1, 51))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    endpoint=st.sampled_from(["vm.resize", "vm.add-disk"]),
    body=st.one_of(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=12,
        ),
        st.dictionaries(
            st.sampled_from(
                [
                    "desired_vcpus",
                    "desired_ram",
                    "desired_balloon",
                    "path",
                    "readonly",
                    "num_queues",
                    "queue_size",
                    "id",
                    "rate_limiter_config",
                    "pci_segment",
                ]
            ),
            st.none()
            | st.booleans()
            | st.integers()
            | st.text(max_size=8)
            | st.lists(st.integers(), max_size=3),
            max_size=5,
        ),
    ),
)
def test_arbitrary_json_never_causes_a_server_error(client, endpoint, body):
    status, payload = client.put(endpoint, json.dumps(body))
    assert status in (204, 400), payload
    if status == 400:
        assert_error_body(payload)


# --------------------------------------------------------------------------
# File descriptors (SCM_RIGHTS)


def _send_with_fds(path: Path, request: bytes, fds: list[int]) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(os.fspath(path))
        socket.send_fds(sock, [request], fds)
        return sock.recv(65536)


def _closed_elsewhere(read_end: int) -> bool:
    """True once every write end of the pipe is closed (the reader sees EOF)."""
    return select.select([read_end], [], [], 5)[0] != [] and os.read(read_end, 1) == b""


def test_an_fd_sent_with_add_net_reaches_the_handler(api):
    handler, path = api
    handler.keep_fds = True
    read_end, write_end = os.pipe()
    body = json.dumps(VALID_BODIES["NetConfig"]).encode()
    try:
        response = _send_with_fds(
            path,
            b"PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            [write_end],
        )
        assert response.startswith(b"HTTP/1.1 204 ")
        config_arg, fds = handler.last("vm_add_net")
        assert config_arg.tap == "tap0" and len(fds) == 1 and fds[0] != write_end
        os.write(fds[0], b"tap!")
        assert os.read(read_end, 4) == b"tap!"
        os.close(fds[0])
    finally:
        os.close(read_end)
        os.close(write_end)


def test_fds_sent_with_the_request_line_only_belong_to_that_request(api):
    """ch-remote sends the fds with the request line, the rest separately, and
    clients may pipeline: the fds must go to the request they came with."""
    handler, path = api
    handler.keep_fds = True
    read_end, write_end = os.pipe()
    body = json.dumps(VALID_BODIES["DeviceConfig"]).encode()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(os.fspath(path))
            sock.sendall(b"PUT /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\n\r\n")
            socket.send_fds(sock, [b"PUT /api/v1/vm.add-device HTTP/1.1\r\n"], [write_end])
            sock.sendall(b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            responses = b""
            while chunk := sock.recv(65536):
                responses += chunk
        assert responses.count(b"HTTP/1.1 204 ") == 2
        assert handler.last("vm_boot") == ()
        _, fds = handler.last("vm_add_device")
        assert len(fds) == 1
        os.close(fds[0])
    finally:
        os.close(read_end)
        os.close(write_end)


def test_too_many_fds_are_refused_and_none_kept(api):
    handler, path = api
    read_end, write_end = os.pipe()
    body = json.dumps(VALID_BODIES["NetConfig"]).encode()
    try:
        response = _send_with_fds(
            path,
            b"PUT /api/v1/vm.add-net HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
            [write_end] * (MAX_FDS_PER_REQUEST + 1),
        )
        assert response.startswith(b"HTTP/1.1 400 ")
        assert not handler.calls
        os.close(write_end)
        write_end = -1
        assert _closed_elsewhere(read_end)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@pytest.mark.parametrize(
    "request_line", [b"PUT /api/v1/vm.boot", b"PUT /api/v1/vm.nope", b"GET /api/v1/vm.add-net"]
)
def test_fds_sent_where_none_are_taken_are_closed(api, request_line):
    _, path = api
    read_end, write_end = os.pipe()
    try:
        response = _send_with_fds(
            path, request_line + b" HTTP/1.1\r\nConnection: close\r\n\r\n", [write_end]
        )
        assert response.startswith(b"HTTP/1.1 ")
        os.close(write_end)
        write_end = -1
        assert _closed_elsewhere(read_end)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@pytest.mark.parametrize(
    ("endpoint", "model"),
    [("vm.add-net", "NetConfig"),            # a protocol method the handler does not define
     ("vm.restore", "RestoreConfig"),        # routes without a handler
     ("vm.receive-migration", "ReceiveMigrationData"),   # BareHandler: refused, fds closed
     ("vm.snapshot", "VmSnapshotConfig")],
)
def test_fds_refused_by_an_unimplemented_endpoint_are_closed(sockdir, endpoint, model):
    server = _serve(BareHandler(), sockdir / "api.sock")
    read_end, write_end = os.pipe()
    body = json.dumps(VALID_BODIES[model]).encode()
    try:
        response = _send_with_fds(
            sockdir / "api.sock",
            b"PUT /api/v1/%s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
            % (endpoint.encode(), len(body), body),
            [write_end],
        )
        assert response.startswith(b"HTTP/1.1 500 ")
        os.close(write_end)
        write_end = -1
        assert _closed_elsewhere(read_end)
    finally:
        server.close()
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


# --------------------------------------------------------------------------
# The socket file


def test_the_socket_is_created_private_and_removed_on_close(sockdir):
    path = sockdir / "api.sock"
    old_umask = os.umask(0)  # even a permissive umask must not widen it
    try:
        server = _serve(FakeHandler(), path)
    finally:
        os.umask(old_umask)
    mode = os.lstat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    server.close()
    assert not path.exists()
    server.close()  # idempotent


def test_a_stale_socket_is_replaced(sockdir):
    path = sockdir / "api.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(path))
    stale.close()  # bound, never listening: what a crashed VMM leaves behind
    server = _serve(FakeHandler(), path)
    try:
        with ApiClient(path, timeout=5) as client:
            assert client.get("vmm.ping")[0] == 200
    finally:
        server.close()


def test_a_live_socket_is_not_taken_over(sockdir):
    path = sockdir / "api.sock"
    first = _serve(FakeHandler(), path)
    try:
        with pytest.raises(ApiSocketError, match="in use"):
            _serve(FakeHandler(), path)
        with ApiClient(path, timeout=5) as client:
            assert client.get("vmm.ping")[0] == 200
    finally:
        first.close()


def test_a_path_that_is_not_a_socket_is_refused_and_left_alone(sockdir):
    path = sockdir / "api.sock"
    path.write_text("precious")
    with pytest.raises(ApiSocketError, match="not a socket"):
        _serve(FakeHandler(), path)
    assert path.read_text() == "precious"


def test_a_symlink_is_never_followed(sockdir):
    target = sockdir / "target"
    link = sockdir / "api.sock"
    link.symlink_to(target)
    with pytest.raises(ApiSocketError, match="symbolic link"):
        _serve(FakeHandler(), link)
    assert link.is_symlink() and not target.exists()


def test_close_leaves_a_socket_that_replaced_ours_alone(sockdir):
    path = sockdir / "api.sock"
    server = _serve(FakeHandler(), path)
    os.unlink(path)
    newcomer = _serve(FakeHandler(), path)
    try:
        server.close()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        newcomer.close()


def test_an_inherited_listening_fd_is_served(sockdir):
    path = sockdir / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.fspath(path))
    listener.listen()
    server = ApiServer(lambda fn: fn(FakeHandler()), fd=listener.detach())
    server.start()
    try:
        with ApiClient(path, timeout=5) as client:
            assert client.get("vmm.ping")[0] == 200
    finally:
        server.close()
    assert path.exists()  # not ours to remove


def test_a_non_listening_fd_is_refused(sockdir):
    with socket.socket(socket.AF_UNIX) as unbound:
        with pytest.raises(ApiSocketError, match="not listening"):
            ApiServer(lambda fn: fn(FakeHandler()), fd=unbound.fileno()).start()
        unbound.getsockname()  # still open: a refused fd stays the caller's
    with open(os.devnull) as file, pytest.raises(ApiSocketError, match="not a socket"):
        ApiServer(lambda fn: fn(FakeHandler()), fd=file.fileno()).start()


def test_exactly_one_of_path_and_fd():
    with pytest.raises(ValueError):
        ApiServer(lambda fn: fn(FakeHandler()))
    with pytest.raises(ValueError):
        ApiServer(lambda fn: fn(FakeHandler()), path="/tmp/x.sock", fd=3)


def test_close_disconnects_idle_keepalive_clients(sockdir):
    path = sockdir / "api.sock"
    server = _serve(FakeHandler(), path)
    connection = http.client.HTTPConnection("localhost", timeout=5)
    connection.sock = socket.socket(socket.AF_UNIX)
    connection.sock.connect(os.fspath(path))
    connection.request("GET", "/api/v1/vmm.ping")
    assert connection.getresponse().read()
    server.close()
    assert connection.sock.recv(1) == b""  # the server hung up
    connection.close()


def test_close_lets_a_request_in_flight_answer(sockdir):
    """The VMM closes the server right after vmm.shutdown returns: the client
    must still get its 200."""
    path = sockdir / "api.sock"
    entered, release = threading.Event(), threading.Event()
    handler = FakeHandler()

    def slow_shutdown() -> None:
        entered.set()
        release.wait(5)

    handler.vmm_shutdown = slow_shutdown
    server = _serve(handler, path)
    answers = []

    def shutdown_vmm() -> None:
        with ApiClient(path, timeout=5) as client:
            answers.append(client.put("vmm.shutdown"))

    requester = threading.Thread(target=shutdown_vmm)
    requester.start()
    assert entered.wait(5)
    closer = threading.Thread(target=server.close)
    closer.start()
    time.sleep(0.1)  # close() is now waiting for the request in flight
    release.set()
    closer.join(5)
    requester.join(5)
    assert answers == [(200, b"")]
    assert not path.exists()


# --------------------------------------------------------------------------
# Bounded connections and idle timeout


def test_connections_over_the_limit_are_turned_away_and_idle_ones_time_out(sockdir):
    path = sockdir / "bounded.sock"
    server = ApiServer(lambda fn: fn(FakeHandler()), path=path, max_connections=3,
                       idle_timeout=0.5)
    server.start()
    idle = []
    try:
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(path))
            idle.append(sock)
        time.sleep(0.1)                       # the three are being served (each its thread)
        with socket.socket(socket.AF_UNIX) as fourth:   # 503 at once, without a request
            fourth.settimeout(5)
            fourth.connect(str(path))
            answer = b""
            while chunk := fourth.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        assert answer.endswith(b'["Service Unavailable","pych serves at most 3 API '
                               b'connections at once"]')
        for sock in idle:                     # idle past the timeout: closed by pych
            sock.settimeout(5)
            assert sock.recv(1) == b""
        with ApiClient(path, timeout=5) as c:  # and their places are free again
            assert c.get("vmm.ping")[0] == 200
    finally:
        for sock in idle:
            sock.close()
        server.close()


def test_a_busy_connection_is_not_an_idle_one(sockdir):
    """The timeout is per wait for the client's bytes: keep-alive requests spaced closer than
    it keep the connection."""
    path = sockdir / "keepalive.sock"
    server = ApiServer(lambda fn: fn(FakeHandler()), path=path, idle_timeout=2.0)
    server.start()
    try:
        with ApiClient(path, timeout=5) as c:
            for _ in range(4):
                assert c.get("vmm.ping")[0] == 200
                time.sleep(0.5)
            assert c.get("vmm.ping")[0] == 200       # 2.5 s on one connection
    finally:
        server.close()


def test_many_idle_connections_cost_no_more_threads_than_the_limit(sockdir):
    """400 clients connect and say nothing: pych serves 64 (a thread each) and answers the
    rest 503 at once; its threads stay bounded and it still answers once they leave."""
    path = sockdir / "crowd.sock"
    server = ApiServer(lambda fn: fn(FakeHandler()), path=path, max_connections=64)
    server.start()
    before = threading.active_count()
    crowd = []
    try:
        for _ in range(400):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(path))
            crowd.append(sock)
        time.sleep(0.5)
        assert threading.active_count() - before <= 64
        turned_away = 0
        for sock in crowd[64:]:
            sock.settimeout(5)
            turned_away += sock.recv(64).startswith(b"HTTP/1.1 503")
        assert turned_away == 400 - 64
    finally:
        for sock in crowd:
            sock.close()
    try:
        with ApiClient(path, timeout=5) as c:
            assert c.get("vmm.ping")[0] == 200
    finally:
        server.close()


def test_after_response_is_called_once_each_answer_is_written(sockdir):
    """``after_response``: the server's signal that a response has gone out (the VMM then
    sets going what the request left for after its answer), once per response, error
    answers included, and only once the client can read it (were it called before the
    write, the client would still be waiting for its answer when it is checked)."""
    received = threading.Semaphore(0)
    seen: list[bool] = []

    def after():
        seen.append(received.acquire(timeout=3))

    server = ApiServer(lambda fn: fn(FakeHandler()), path=sockdir / "api.sock",
                       after_response=after)
    server.start()
    try:
        with ApiClient(sockdir / "api.sock", timeout=10) as c:
            assert c.get("vmm.ping")[0] == 200
            received.release()
            assert c.get("vm.no-such-endpoint")[0] == 404
            received.release()
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [True, True]
    finally:
        server.close()
