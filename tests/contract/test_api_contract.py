"""Contract tests: schemathesis generates requests from pych's own OpenAPI document
(docs/openapi.json, generated from the route table) and sends them to a running pych whose
VM is a booted few-instruction guest (so each case costs milliseconds). Checks: no 5xx for
any generated input, and every documented response body conforms to the document.

What runs comes from the route table: every route pych implements (those without a handler
answer a documented 500 naming themselves), minus EXCLUDED, each exclusion with its reason.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from pych.api.client import ApiClient
from pych.api.routes import ROUTES

from tests.support.microguest import build_elf
from tests.support.uds_requests import unix_session

pytestmark = pytest.mark.guest

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
schema = schemathesis.openapi.from_path(DOCUMENT)

EXCLUDED = {
    "vmm.shutdown": "ends the VMM the other cases test (tests/guest/test_api.py covers it)",
    "vm.shutdown": "ends the VM the other cases test (tests/guest/test_api.py covers it)",
    "vm.delete": "ends the VM the other cases test (tests/guest/test_api.py covers it)",
    "vm.add-net": "would create host taps",
    "vm.add-pmem": "would create host files at generated paths",
    "vm.add-vsock": "would create host sockets at generated paths",
}
RUN = {f"/{route.endpoint}" for route in ROUTES if route.implemented} - {
    f"/{endpoint}" for endpoint in EXCLUDED}
OPERATIONS = [op.ok() for op in schema.get_all_operations() if op.ok().path in RUN]
# Operations that can never succeed on this VM: generated requests must be refused (4xx).
NEVER_SUCCEED = {
    "/vm.add-fs": "no vhost-user back-end listens at a generated socket path",
}
HALT_LOOP = b"\xfa\xf4\xeb\xfd"          # cli; hlt; jmp hlt


@pytest.fixture(scope="module")
def pych(tmp_path_factory):
    d = tmp_path_factory.mktemp("contract")
    sock = str(d / "api.sock")
    kernel = d / "idle.elf"
    kernel.write_bytes(build_elf(HALT_LOOP))
    log = open(d / "pych.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pych", "--api-socket", sock],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not Path(sock).exists():
        assert proc.poll() is None and time.monotonic() < deadline, (d / "pych.log").read_text()
        time.sleep(0.05)
    client = ApiClient(sock)
    assert client.put("vm.create", {"payload": {"kernel": str(kernel)}, "memory": {"size": 64 << 20},
                                    "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
                                    "serial": {"mode": "Null"}, "console": {"mode": "Off"}})[0] == 204
    assert client.put("vm.boot")[0] == 204
    yield {"proc": proc, "session": unix_session(sock), "client": client}
    proc.terminate()
    proc.wait(30)
    log.close()


def test_every_implemented_route_runs_or_is_excluded_for_a_reason():
    implemented = {route.endpoint for route in ROUTES if route.implemented}
    assert set(EXCLUDED) <= implemented and all(EXCLUDED.values())
    assert {op.path for op in OPERATIONS} == RUN
    assert {f"/{endpoint}" for endpoint in implemented} == RUN | {
        f"/{endpoint}" for endpoint in EXCLUDED}
    assert set(NEVER_SUCCEED) <= RUN


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: f"{op.method.upper()} {op.path}")
def test_generated_requests_get_no_5xx_and_conforming_bodies(pych, operation):
    @given(case=operation.as_strategy())
    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call_and_validate(
            base_url="http://localhost/api/v1", session=pych["session"],
            checks=[not_a_server_error, response_schema_conformance])
        if operation.path in NEVER_SUCCEED:
            assert 400 <= response.status_code < 500, (response.status_code, response.text)

    run()
    assert pych["proc"].poll() is None
    # the VMM still answers, and its VM still exists
    assert pych["client"].get("vmm.ping")[0] == 200
    assert pych["client"].get("vm.info")[0] == 200
