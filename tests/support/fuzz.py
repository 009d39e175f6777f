"""Fuzz a running pych through its API socket, then check that the VMM and its guest lived.

``make fuzz`` (scripts/fuzz.py) runs this in full against the real test guest;
tests/guest/test_fuzz.py runs a short variant in CI. One run, in order:

1. **Lifecycle, deliberately.** What random requests would do badly or not at all: pause and
   resume (and their 405s), the 409s of a second create/boot, a real disk hot added and
   removed at once; with ``full`` also a pmem and a vsock device in the run's directory
   (random bodies would create files and sockets at random paths), and ``vm.reboot`` with the
   wait for the guest to come back.
2. **Generated requests** (schemathesis + hypothesis), valid and schema-violating bodies, for
   every operation of the API (:data:`SPEC`) that pych implements, minus
   the ones that end the VM (step 1 and 5 cover them) and the ones whose generated bodies would
   make pych create host objects at random paths (``vm.add-net``: taps; ``vm.add-pmem``,
   ``vm.add-vsock``: files and sockets). Bounded by a request count and a deadline.
3. **Raw HTTP abuse** on the socket: truncated requests, wrong/negative/huge/conflicting
   Content-Length, slow clients trickling bytes (and a client that never reads), binary
   garbage, bodies over 4 MiB (refused from their Content-Length, before a byte is read),
   oversized request lines and headers, pipelining, 100 concurrent keep-alive clients and
   100 idle connections; then pych must be back to the threads and fds it had before.
4. **Survival**: pych is alive, ``vmm.ping`` answers, ``vm.info`` says Running, the guest
   has ejected every device it was asked to remove, it runs a shell command on its serial
   console, and pych's log holds no traceback.
5. **Teardown, deliberately**: ``vm.shutdown``, generated requests against the shut-down VM,
   ``vm.delete``, generated requests with no VM, then either ``vmm.shutdown`` (pych exits 0)
   or, with ``full``, ``vm.create`` with the original configuration, ``vm.boot``, a shell
   command in the new guest and ``vm.power-button`` (the guest powers off, pych exits 0).

The endpoints that end the VM (``vm.shutdown``, ``vm.delete``, ``vmm.shutdown``,
``vm.reboot``, ``vm.power-button``) are therefore never generated at random but exercised in
steps 1 and 5; ``vm.pause`` and ``vm.resume`` are generated too (a VM left paused is resumed
before step 3). ``vm.add-net`` is only left out (tests/guest/test_devices.py covers it in a
network namespace).

What counts as a failure: a 5xx answer, a status that is neither documented for the operation
nor one of the API-wide answers below, a body that does not match the operation's response
schema or pych's error format (a JSON array of strings), a malformed HTTP response, no answer
at all where one is due, a deliberate check that does not hold, and anything in step 4.
Statuses the spec does not list per operation but the reference answers everywhere (see the
reference notes beside the repository, ``../shared/notes/ch-hotplug-reference.md`` §6.3): 400
for a body that does not deserialize or validate (every operation with a body), 404 for "VM is
not created" (every ``vm.*``), 409 for ``vm.create``/``vm.boot`` of a VM that exists/runs, 405
for ``vm.counters``/``vm.nmi`` of a VM that is not running, 200 with an empty body for
``vmm.shutdown``. One 5xx is right: 505 for a request in HTTP/2 (RFC 9110 §15.6.6).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import socket
import subprocess
import threading
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from pych.api.client import ApiClient
from tests.support.guest import REPO, PychGuest
from tests.support.uds_requests import unix_session

# The reference's API spec, beside the repository (where CI has it), not part of it.
# The statuses each operation may answer come from the reference's spec where it sits beside
# the repository (as in CI): it lists them per operation. Elsewhere the project's own
# document, whose error answers are one "default" response (any 4xx is then accepted).
REFERENCE_SPEC = REPO.parent / "shared" / "spec" / "cloud-hypervisor.yaml"
SPEC = REFERENCE_SPEC if REFERENCE_SPEC.exists() else REPO / "docs" / "openapi.json"
BASE_URL = "http://localhost/api/v1"
REQUEST_TIMEOUT = 60.0      # s; a request pych does not answer in this time is a failure
MAX_BODY = 4 << 20          # pych's (and the reference's) request body limit

# Operations never generated at random: they end or replace the VM (exercised deliberately
# instead), or random bodies would make pych create taps, files or sockets on the host
# (vm.add-pmem and vm.add-vsock are exercised deliberately in the run's directory).
ENDS_THE_VM = {"/vmm.shutdown", "/vm.shutdown", "/vm.delete", "/vm.reboot", "/vm.power-button"}
HOST_SIDE_EFFECTS = {"/vm.add-net", "/vm.add-pmem", "/vm.add-vsock"}

# Statuses answered by pych (and the reference) that the spec does not list for the operation.
_EXTRA_STATUSES = {"/vm.create": {409}, "/vm.boot": {409}, "/vm.counters": {405},
                   "/vm.resize-disk": {405},       # a disk of a VM that is not running
                   "/vm.receive-migration": {409},  # into a pych that already has a VM
                   "/vm.send-migration": {405},    # of a VM that is not running
                   "/vm.nmi": {405}, "/vmm.shutdown": {200}}


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

@dataclass
class Report:
    """Counts of everything sent and answered, and every failure (kept up to ``max_kept``)."""

    requests: Counter = field(default_factory=Counter)     # (phase, "METHOD /path", status)
    raw: Counter = field(default_factory=Counter)          # (scenario, status or "no answer")
    checks: list[str] = field(default_factory=list)        # deliberate checks that held
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0
    notes: list[str] = field(default_factory=list)
    max_kept: int = 200

    def fail(self, message: str) -> None:
        self.failure_count += 1
        if len(self.failures) < self.max_kept:
            self.failures.append(message)

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.checks.append(what)
        else:
            self.fail(f"{what}: {detail}" if detail else what)
        return ok

    @property
    def generated(self) -> int:
        return sum(n for (phase, _, _), n in self.requests.items() if phase != "deliberate")

    def table(self) -> str:
        lines = []
        ops = sorted({op for _, op, _ in self.requests})
        phases = sorted({p for p, _, _ in self.requests})
        lines.append("requests per operation (all phases) and their status codes")
        lines.append(f"  {'operation':<34}{'total':>7}  " + "  ".join(f"{p:>10}" for p in phases)
                     + "  statuses")
        for op in ops:
            per_phase = [sum(n for (p, o, _), n in self.requests.items() if o == op and p == ph)
                         for ph in phases]
            statuses = _sum_by(self.requests, lambda k: k[2], lambda k, op=op: k[1] == op)
            lines.append(f"  {op:<34}{sum(per_phase):>7}  "
                         + "  ".join(f"{n:>10}" for n in per_phase) + "  "
                         + " ".join(f"{s}:{n}" for s, n in sorted(statuses.items(), key=str)))
        hist = _sum_by(self.requests, lambda k: k[2])
        lines.append(f"  {'all API requests':<34}{sum(hist.values()):>7}  status histogram: "
                     + " ".join(f"{s}:{n}" for s, n in sorted(hist.items(), key=str)))
        lines.append("raw HTTP abuse: connections per scenario and what they got back")
        for scenario in sorted({s for s, _ in self.raw}):
            answers = _sum_by(self.raw, lambda k: k[1], lambda k, s=scenario: k[0] == s)
            lines.append(f"  {scenario:<44}{sum(answers.values()):>7}  "
                         + " ".join(f"{a}:{n}" for a, n in sorted(answers.items(), key=str)))
        rhist = _sum_by(self.raw, lambda k: k[1])
        lines.append(f"  {'all raw connections':<44}{sum(rhist.values()):>7}  "
                     + " ".join(f"{a}:{n}" for a, n in sorted(rhist.items(), key=str)))
        lines.append(f"deliberate checks passed: {len(self.checks)}")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append(f"failures: {self.failure_count}")
        lines.extend(f"  FAIL {f}" for f in self.failures)
        if self.failure_count > len(self.failures):
            lines.append(f"  ... and {self.failure_count - len(self.failures)} more")
        return "\n".join(lines)


def _sum_by(counter: Counter, key: Callable, where: Callable = lambda k: True) -> Counter:
    out: Counter = Counter()
    for k, n in counter.items():
        if where(k):
            out[key(k)] += n
    return out


def _short(data: Any, limit: int = 240) -> str:
    text = data if isinstance(data, str) else (
        data.decode(errors="replace") if isinstance(data, (bytes, bytearray)) else
        json.dumps(data, default=str))
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def error_body_problem(body: bytes) -> str | None:
    """pych's (and the reference's) error body is a JSON array of strings."""
    try:
        value = json.loads(body)
    except ValueError:
        return f"error body is not JSON: {_short(body)}"
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return f"error body is not a JSON array of strings: {_short(body)}"
    return None


# --------------------------------------------------------------------------------------------
# Generated requests
# --------------------------------------------------------------------------------------------

def implemented_paths() -> set[str]:
    """Paths of the routes pych implements (the others answer 500)."""
    from pych.api.routes import ROUTES

    return {f"/{route.endpoint}" for route in ROUTES if route.implemented}


class Generator:
    """schemathesis cases for the spec's operations, sent over one keep-alive connection,
    every answer checked and counted into the report."""

    def __init__(self, api_path: str, report: Report, seed: int):
        import schemathesis

        self.report = report
        self.seed = seed
        self.api_path = api_path
        self.session = unix_session(api_path)
        schema = schemathesis.openapi.from_path(SPEC)
        self.operations = {op.path: op for op in (r.ok() for r in schema.get_all_operations())}
        self.implemented = implemented_paths() & set(self.operations)
        self._round = 0

    # --- what is fuzzed where ------------------------------------------------------------------
    def random_paths(self, state: str) -> list[str]:
        """Operations generated at random while the VM is ``state`` (``Running``,
        ``Shutdown`` or ``NotCreated``)."""
        paths = self.implemented - ENDS_THE_VM - HOST_SIDE_EFFECTS
        if state == "Shutdown":
            paths -= {"/vm.boot"}           # would boot whatever random config edits left
        elif state == "NotCreated":
            paths -= {"/vm.create"}         # would create (and let vm.boot boot) a random VM
        return sorted(paths)

    def allowed_statuses(self, path: str) -> set[int]:
        op = self.operations[path]
        responses = op.definition.raw["responses"]
        allowed = {int(code) for code in responses if str(code).isdigit()}
        if "default" in responses:
            allowed |= set(range(400, 500))
        if "requestBody" in op.definition.raw:
            allowed.add(400)
        if path.startswith("/vm."):
            allowed.add(404)
        return allowed | _EXTRA_STATUSES.get(path, set())

    # --- sending and checking ---------------------------------------------------------------------
    def send(self, path: str, body: Any = None, *, phase: str = "deliberate"):
        """One request built from ``body`` (not generated), checked like the generated ones;
        returns the response (None if there was none)."""
        op = self.operations[path]
        kwargs = {} if body is None else {"body": body, "media_type": "application/json"}
        return self._send(op.Case(**kwargs), phase)

    def _send(self, case, phase: str):
        op = case.operation
        name = f"{op.method.upper()} {op.path}"
        try:
            response = case.call(base_url=BASE_URL, session=self.session, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as e:
            self.report.requests[(phase, name, "no answer")] += 1
            self.report.fail(f"{name} {_short(_body_of(case))}: no answer ({e})")
            return None
        self.report.requests[(phase, name, response.status_code)] += 1
        for problem in self.problems(case, response):
            self.report.fail(f"[{phase}] {name} {_short(_body_of(case))} -> "
                             f"{response.status_code} {_short(response.content)}: {problem}")
        return response

    def problems(self, case, response) -> list[str]:
        from schemathesis.specs.openapi.checks import (content_type_conformance,
                                                       response_schema_conformance)

        status, path = response.status_code, case.operation.path
        found = []
        if status >= 500:
            found.append("server error")
        elif status not in self.allowed_statuses(path):
            found.append(f"status not documented (allowed: {sorted(self.allowed_statuses(path))})")
        if status == 204:
            if response.content:
                found.append("204 with a body")
        elif status >= 400:
            problem = error_body_problem(response.content)
            if problem:
                found.append(problem)
        try:
            case.validate_response(response, checks=[response_schema_conformance,
                                                     content_type_conformance])
        except BaseExceptionGroup as group:
            found.extend(_failure_title(e) for e in group.exceptions)
        except AssertionError as e:
            found.append(_failure_title(e))
        return found

    def run(self, paths: Iterable[str], *, requests: int, deadline: float, phase: str,
            stop: Callable[[], bool] = lambda: False) -> int:
        """Generate and send up to ``requests`` requests over ``paths``, round robin in
        batches (valid bodies, then schema-violating ones, per operation; at most 20 examples
        a batch, fewer when the count is small so that every operation gets its turn), until
        the count or ``deadline`` (time.monotonic) is reached or ``stop()``. Returns the
        number sent."""
        from hypothesis import HealthCheck, Phase, given, seed, settings
        from schemathesis.generation import GenerationMode

        paths = list(paths)
        batch = max(1, min(20, requests // (2 * max(len(paths), 1))))
        sent = 0

        def exhausted() -> bool:
            return sent >= requests or time.monotonic() >= deadline or stop()

        while paths and not exhausted():
            sent_before = sent
            self._round += 1
            order = paths[:]
            random.Random(self.seed + self._round).shuffle(order)
            for path in order:
                op = self.operations[path]
                modes = [GenerationMode.POSITIVE]
                if "requestBody" in op.definition.raw:
                    modes.append(GenerationMode.NEGATIVE)
                for mode in modes:
                    if exhausted():
                        return sent

                    @seed(self.seed * 1_000_003 + self._round * 7919
                          + zlib.crc32(f"{path} {mode.value}".encode()))
                    @settings(max_examples=batch, deadline=None, database=None,
                              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
                    @given(case=op.as_strategy(generation_mode=mode))
                    def one(case):
                        nonlocal sent
                        if exhausted():
                            return
                        sent += 1
                        self._send(case, phase)

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        try:
                            one()
                        except Exception as e:  # noqa: BLE001 - generation itself failed
                            if "Unsatisfiable" not in type(e).__name__:
                                self.report.notes.append(
                                    f"generation for {path} ({mode.value}) stopped: "
                                    f"{type(e).__name__}: {_short(str(e), 160)}")
            if sent == sent_before:
                break                       # nothing could be generated
        return sent

    def close(self) -> None:
        self.session.close()


def _body_of(case) -> Any:
    from schemathesis.core import NotSet

    return "" if isinstance(case.body, NotSet) else case.body


def _failure_title(e: BaseException) -> str:
    title = getattr(e, "title", None) or type(e).__name__
    message = getattr(e, "message", "") or str(e)
    return f"{title}: {_short(message, 200)}"


# --------------------------------------------------------------------------------------------
# Raw HTTP abuse
# --------------------------------------------------------------------------------------------

@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ([^\r\n]*)")


def parse_responses(data: bytes) -> tuple[list[RawResponse], bytes]:
    """Split what the server sent into responses; returns them and any bytes that do not
    form a complete response."""
    out = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        head, rest = data[:end].split(b"\r\n"), data[end + 4:]
        m = _STATUS_LINE.fullmatch(head[0])
        if not m:
            break
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode(errors="replace")] = value.strip().decode(
                errors="replace")
        status = int(m.group(1))
        length = int(headers.get("content-length", "0") or 0) if status != 204 else 0
        if status != 100 and len(rest) < length:
            break
        out.append(RawResponse(status, m.group(2).decode(errors="replace"), headers,
                               rest[:length]))
        data = rest[length:]
    return out, data


def response_problems(r: RawResponse) -> list[str]:
    """What is wrong with one raw response (empty if nothing)."""
    found = []
    if r.status >= 500:
        found.append(f"server error {r.status}")
    if r.status in (100, 204):
        if "content-length" in r.headers and r.status == 204:
            found.append("204 with a Content-Length")
        return found
    if r.headers.get("content-type") != "application/json":
        found.append(f"Content-Type {r.headers.get('content-type')!r}")
    if "content-length" not in r.headers:
        found.append("no Content-Length")
    if r.status >= 400:
        problem = error_body_problem(r.body)
        if problem:
            found.append(problem)
    else:
        try:
            json.loads(r.body)
        except ValueError:
            found.append(f"body is not JSON: {_short(r.body)}")
    return found


def raw_exchange(path: str, chunks: Iterable[bytes], *, pause: Callable[[], float] | None = None,
                 half_close: bool = True, timeout: float = 20.0) -> tuple[bytes, bool]:
    """Send ``chunks`` (sleeping ``pause()`` s between them), half-close, read until the
    server closes. Returns (what it sent back, whether it closed within ``timeout``)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    data = bytearray()
    try:
        s.connect(path)
        try:
            for chunk in chunks:
                s.sendall(chunk)
                if pause:
                    time.sleep(pause())
        except (BrokenPipeError, ConnectionResetError):
            pass            # the server stopped listening to us; its answer may be waiting
        if half_close:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                b = s.recv(65536)
            except TimeoutError:
                return bytes(data), False
            except ConnectionResetError:
                return bytes(data), True
            if not b:
                return bytes(data), True
            data += b
    finally:
        s.close()


def _request(method: str, target: str, body: bytes | None = None, headers: Iterable[str] = (),
             length: str | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", *headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    elif body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


PING = _request("GET", "/api/v1/vmm.ping")
INFO = _request("GET", "/api/v1/vm.info")
BAD_RESIZE = _request("PUT", "/api/v1/vm.resize", b'{"desired_vcpus": "many"}')


class Abuse:
    """The raw scenarios; ``scale`` multiplies how many connections each one opens."""

    def __init__(self, api_path: str, report: Report, seed: int, scale: float = 1.0):
        self.path = api_path
        self.report = report
        self.rng = random.Random(seed)
        self.scale = scale

    def n(self, full: int, least: int = 1) -> int:
        return max(least, int(full * self.scale))

    # --- bookkeeping -----------------------------------------------------------------------------
    def record(self, scenario: str, data: bytes, closed: bool, *,
               expect: set[int | None] | None = None, allow: set[int] = frozenset(),
               responses: int | None = None) -> list[RawResponse]:
        """Check what one connection got back. ``expect``: the allowed statuses of the first
        response (None: no response at all); ``allow``: 5xx statuses that are correct here."""
        got, rest = parse_responses(data)
        what = f"[{scenario}]"
        self.report.raw[(scenario, got[0].status if got else "no answer")] += 1
        if not closed:
            self.report.fail(f"{what} pych neither answered nor closed the connection after the "
                             f"client's end of input (got {_short(data)})")
        if rest:
            self.report.fail(f"{what} malformed response bytes: {_short(rest)}")
        for r in got:
            for problem in response_problems(r):
                if not (r.status in allow and problem.startswith("server error")):
                    self.report.fail(f"{what} {r.status} {_short(r.body)}: {problem}")
        if expect is not None:
            first = got[0].status if got else None
            if first not in expect:
                self.report.fail(f"{what} expected {sorted(expect, key=str)}, got {first} "
                                 f"{_short(got[0].body) if got else ''}")
        if responses is not None and len(got) != responses:
            self.report.fail(f"{what} expected {responses} responses, got {len(got)}")
        return got

    def run_all(self) -> None:
        for scenario in (self.truncated, self.content_length, self.oversized, self.limits,
                         self.garbage, self.misc, self.slow_clients, self.slow_reader,
                         self.concurrent, self.idle_connections):
            try:
                scenario()
            except Exception as e:  # noqa: BLE001 - a scenario that breaks is a failure
                self.report.fail(f"[{scenario.__name__}] the scenario itself failed: "
                                 f"{type(e).__name__}: {e}")

    # --- scenarios ---------------------------------------------------------------------------------
    def truncated(self) -> None:
        """Every request cut short at many points, then the client's end of input."""
        base = [PING, _request("PUT", "/api/v1/vm.resize", b'{"desired_vcpus": 1}'),
                _request("PUT", "/api/v1/vm.add-disk", b'{"path": "/nonexistent/disk.raw"}')]
        for req in base:
            cuts = sorted(self.rng.sample(range(1, len(req)), min(len(req) - 1, self.n(40))))
            for cut in cuts:
                data, closed = raw_exchange(self.path, [req[:cut]])
                self.record("truncated request", data, closed)

    def content_length(self) -> None:
        ping = "/api/v1/vmm.ping"
        resize = "/api/v1/vm.resize"
        body = b'{"desired_vcpus": 1}'
        cases = [
            ("negative", _request("PUT", resize, body, length="-1"), {400}),
            ("not a number", _request("PUT", resize, body, length="twenty"), {400}),
            ("hex", _request("PUT", resize, body, length="0x14"), {400}),
            ("signed", _request("PUT", resize, body, length="+20"), {400}),
            ("float", _request("PUT", resize, body, length="2e1"), {400}),
            ("huge", _request("PUT", resize, body, length="9" * 40), {413}),
            ("conflicting", _request("PUT", resize, body, headers=["Content-Length: 3"]), {400}),
            ("shorter than the body", _request("PUT", resize, body, length="5"), {400}),
            ("longer than the body", _request("PUT", resize, body, length="500"), {None}),
            ("chunked", _request("PUT", resize, b"14\r\n" + body + b"\r\n0\r\n\r\n",
                                 headers=["Transfer-Encoding: chunked"], length=None), {411}),
            ("body on a GET", _request("GET", ping, b"{}"), {400}),
        ]
        for name, req, expect in cases:
            data, closed = raw_exchange(self.path, [req])
            self.record(f"Content-Length: {name}", data, closed, expect=expect)

    def oversized(self) -> None:
        """Bodies over 4 MiB: refused from the Content-Length alone."""
        head = _request("PUT", "/api/v1/vm.create", None, length=str(MAX_BODY + 1))
        # (a) the body is never sent: an answer proves pych did not wait to read it
        data, closed = raw_exchange(self.path, [head], half_close=False, timeout=10)
        self.record("body > 4 MiB, announced only", data, closed, expect={413})
        # (b) the body is sent anyway
        body = b"[" + b"1," * ((MAX_BODY + 4096) // 2) + b"1]"
        data, closed = raw_exchange(self.path, [_request("PUT", "/api/v1/vm.create", body)])
        self.record("body > 4 MiB, sent", data, closed, expect={413})
        # (c) Expect: 100-continue: refused before the client sends the body
        req = _request("PUT", "/api/v1/vm.create", None, headers=["Expect: 100-continue"],
                       length=str(8 * MAX_BODY))
        data, closed = raw_exchange(self.path, [req], half_close=False, timeout=10)
        got = self.record("body > 4 MiB, Expect: 100-continue", data, closed, expect={413})
        self.report.check(all(r.status != 100 for r in got),
                          "no 100 Continue for an oversized body")
        # (d) bodies of exactly 4 MiB are read and judged: a disk that cannot be opened
        # (padded with an unknown field), 4 MiB of nested brackets, a 4-million-digit number
        head, tail = b'{"path": "/nonexistent/fuzz.raw", "pad": "', b'"}'
        bodies = [("padded add-disk", "/api/v1/vm.add-disk",
                   head + b"a" * (MAX_BODY - len(head) - len(tail)) + tail),
                  ("nested brackets", "/api/v1/vm.resize", b"[" * MAX_BODY),
                  ("huge number", "/api/v1/vm.resize",
                   b'{"desired_vcpus": ' + b"9" * (MAX_BODY - 20) + b"}")]
        for name, target, body in bodies:
            assert len(body) <= MAX_BODY
            data, closed = raw_exchange(self.path, [_request("PUT", target, body)])
            self.record(f"4 MiB body: {name}", data, closed, expect={400})

    def limits(self) -> None:
        long_target = "/api/v1/" + "a" * (70 * 1024)
        data, closed = raw_exchange(self.path, [_request("GET", long_target)])
        self.record("request line > 64 KiB", data, closed, expect={414})
        req = _request("GET", "/api/v1/vmm.ping", headers=[f"X-Big: {'b' * (70 * 1024)}"])
        data, closed = raw_exchange(self.path, [req])
        self.record("header line > 64 KiB", data, closed, expect={431})
        req = _request("GET", "/api/v1/vmm.ping", headers=[f"X-H{i}: {i}" for i in range(150)])
        data, closed = raw_exchange(self.path, [req])
        self.record("150 headers", data, closed, expect={431})

    def garbage(self) -> None:
        """Random bytes, alone and after a valid request on the same connection."""
        sizes = [1, 2, 16, 100, 1000, 4096, 65536 + 100, 300_000]
        for i in range(self.n(60, least=len(sizes))):
            size = sizes[i % len(sizes)]
            junk = self.rng.randbytes(size)
            data, closed = raw_exchange(self.path, [junk])
            self.record("binary garbage", data, closed)
        for _ in range(self.n(20)):
            junk = self.rng.randbytes(self.rng.choice(sizes))
            data, closed = raw_exchange(self.path, [PING + junk])
            got = self.record("garbage after a valid request", data, closed)
            self.report.check(bool(got) and got[0].status == 200,
                              "a valid request before garbage is answered",
                              f"got {[r.status for r in got]}")
        for line in (b"\x00" * 64 + b"\r\n\r\n", b"GET \x00\xff\xfe HTTP/1.1\r\n\r\n",
                     b"GET /api/v1/vmm.ping HTTP/1.1\r\nX\x00: \xff\r\n\r\n",
                     "GET /api/v1/vm.info\u2603 HTTP/1.1\r\n\r\n".encode()):
            data, closed = raw_exchange(self.path, [line])
            self.record("garbage in the request line or headers", data, closed)

    def misc(self) -> None:
        cases = [
            ("HTTP/0.9", b"GET /api/v1/vmm.ping\r\n", {400}, set()),
            ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {505}, {505}),
            ("unknown method", _request("BREW", "/api/v1/vmm.ping"), {405}, set()),
            ("wrong method", _request("DELETE", "/api/v1/vm.info"), {405}, set()),
            ("absolute URI", _request("GET", "http://localhost/api/v1/vmm.ping"), {200}, set()),
            ("query string", _request("GET", "/api/v1/vmm.ping?x=1&y"), {200}, set()),
            ("dot segments", _request("GET", "/api/v1/../v1/vmm.ping"), {404}, set()),
            ("no path", _request("GET", "*"), {404}, set()),
            ("unknown path", _request("PUT", "/api/v2/vm.boot"), {404}, set()),
            ("bare LF line ends", b"GET /api/v1/vmm.ping HTTP/1.1\nHost: x\n\n", {200}, set()),
        ]
        for name, req, expect, allow in cases:
            data, closed = raw_exchange(self.path, [req])
            self.record(name, data, closed, expect=expect, allow=allow)
        data, closed = raw_exchange(self.path, [PING + INFO + BAD_RESIZE + PING])
        got = self.record("4 pipelined requests", data, closed, responses=4)
        self.report.check([r.status for r in got] == [200, 200, 400, 200],
                          "pipelined requests are answered in order", str([r.status for r in got]))

    def slow_clients(self) -> None:
        """Clients trickling their request a byte or two at a time, some giving up half way,
        while another client's pings must still be answered promptly."""
        results: list[tuple[str, bytes, bool, set]] = []
        lock = threading.Lock()

        def trickle(req: bytes, abandon: bool, expect: set, seed: int) -> None:
            rng = random.Random(seed)
            part = req[: len(req) // 2] if abandon else req
            chunks, i = [], 0
            while i < len(part):
                step = rng.randint(1, 3)
                chunks.append(part[i:i + step])
                i += step
            if abandon:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.path)
                for c in chunks:
                    s.sendall(c)
                    time.sleep(rng.uniform(0.02, 0.15))
                s.close()
                with lock:
                    results.append(("slow client, gives up half way", b"", True, {None}))
                return
            data, closed = raw_exchange(self.path, chunks, pause=lambda: rng.uniform(0.02, 0.15),
                                        timeout=60)
            with lock:
                results.append(("slow client", data, closed, expect))

        requests_ = [(PING, {200}), (INFO, {200}), (BAD_RESIZE, {400})]
        threads = []
        for i in range(self.n(30, least=6)):
            req, expect = requests_[i % len(requests_)]
            threads.append(threading.Thread(target=trickle, args=(req, i % 4 == 3, expect, i)))
        for t in threads:
            t.start()
        worst = 0.0
        client = ApiClient(self.path, timeout=REQUEST_TIMEOUT)
        while any(t.is_alive() for t in threads):
            t0 = time.monotonic()
            status, _ = client.get("vmm.ping")
            worst = max(worst, time.monotonic() - t0)
            self.report.raw[("ping while slow clients trickle", status)] += 1
            time.sleep(0.2)
        client.close()
        for t in threads:
            t.join()
        for scenario, data, closed, expect in results:
            if scenario.endswith("half way"):
                self.report.raw[(scenario, "no answer")] += 1
                continue
            self.record(scenario, data, closed, expect=expect)
        self.report.check(worst < 5.0, "pings are answered promptly while slow clients trickle",
                          f"slowest ping took {worst:.1f} s")
        self.report.notes.append(f"slowest ping while slow clients trickled: {worst * 1000:.0f} ms")

    def slow_reader(self) -> None:
        """A client pipelining many requests and reading none of the answers, then leaving."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        s.settimeout(5)
        with contextlib.suppress(OSError):
            s.sendall(INFO * 400)
        time.sleep(2)
        s.close()
        status, _ = ApiClient(self.path, timeout=REQUEST_TIMEOUT).get("vmm.ping")
        self.report.raw[("client that never reads its answers", "no answer")] += 1
        self.report.check(status == 200, "pych answers others while a client does not read",
                          f"ping got {status}")

    def concurrent(self, clients: int = 100, rounds: int = 3) -> None:
        """``clients`` keep-alive clients at once, each sending a few requests."""
        barrier = threading.Barrier(clients)
        got: Counter = Counter()
        wrong: list[str] = []
        lock = threading.Lock()
        expected = [("GET", "vmm.ping", None, 200), ("GET", "vm.info", None, 200),
                    ("PUT", "vm.resize", b'{"desired_vcpus": 0.5}', 400),
                    ("GET", "vm.nope", None, 404)]

        def client_thread() -> None:
            client = ApiClient(self.path, timeout=REQUEST_TIMEOUT)
            try:
                client.connect()
                barrier.wait(timeout=60)
                for _ in range(rounds):
                    for method, endpoint, body, status in expected:
                        answer, reply = client.request(method, endpoint, body)
                        ok = answer == status and (status < 400 or error_body_problem(reply) is None)
                        with lock:
                            got[answer] += 1
                            if not ok:
                                wrong.append(f"{method} {endpoint} -> {answer} {_short(reply)}")
            except Exception as e:  # noqa: BLE001
                with lock:
                    wrong.append(f"client failed: {type(e).__name__}: {e}")
            finally:
                client.close()

        threads = [threading.Thread(target=client_thread) for _ in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        for status, n in got.items():
            self.report.raw[(f"{clients} concurrent keep-alive clients", status)] += n
        for w in wrong[:20]:
            self.report.fail(f"[{clients} concurrent clients] {w}")
        self.report.check(not wrong and sum(got.values()) == clients * rounds * len(expected),
                          f"{clients} concurrent clients all answered right",
                          f"{len(wrong)} wrong of {sum(got.values())}")
        self.report.notes.append(f"{clients} concurrent clients x {rounds * len(expected)} "
                                 f"requests: {took:.1f} s")

    def idle_connections(self, count: int = 100) -> None:
        """``count`` connections held open and silent must not stop others being served."""
        socks = []
        try:
            for _ in range(count):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.path)
                socks.append(s)
            status, _ = ApiClient(self.path, timeout=REQUEST_TIMEOUT).get("vmm.ping")
            self.report.raw[(f"{count} idle connections, then a ping", status)] += 1
            self.report.check(status == 200, f"a ping is answered with {count} idle connections")
            for s in socks[::10]:
                s.settimeout(REQUEST_TIMEOUT)
                s.sendall(PING)
                s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                self.record(f"{count} idle connections, then a ping", data, True, expect={200})
        finally:
            for s in socks:
                s.close()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

@dataclass
class Plan:
    requests: int = 10_000          # generated requests in the main phase
    minutes: float = 20.0           # deadline of the generated-request phases
    side_requests: int = 300        # generated requests against a shut-down / absent VM
    full: bool = True               # reboot, recreate + boot, power button (three more boots)
    abuse_scale: float = 1.0
    seed: int = 0


class FuzzTarget:
    """A pych process with an API socket and a booted VM: the test guest (with its serial
    shell), or with ``micro`` a few-instruction guest that halts (no shell; for developing
    the fuzzer itself, since it boots in milliseconds)."""

    def __init__(self, guest: PychGuest | None = None, *, micro: "_MicroPych | None" = None):
        self.guest, self.micro = guest, micro
        owner = guest or micro
        self.api_path, self.proc, self.log_path = owner.api_path, owner.proc, owner.log_path

    @property
    def has_shell(self) -> bool:
        return self.guest is not None

    def mark(self) -> int:
        return len(self.guest.console.buf) if self.guest else 0

    def wait_booted(self, mark: int) -> None:
        if self.guest:
            self.guest.wait_ready(start=mark)

    def shell(self, cmd: str, timeout: float = 300) -> tuple[int, str]:
        return self.guest.run(cmd, timeout=timeout)

    def stop(self) -> None:
        (self.guest or self.micro).stop()


class _MicroPych:
    """pych with only --api-socket, then vm.create + vm.boot of a halting microguest."""

    def __init__(self, workdir: Path):
        from tests.support.microguest import build_elf

        self.api_path = str(workdir / "api.sock")
        self.log_path = workdir / "pych.log"
        kernel = workdir / "halt.elf"
        kernel.write_bytes(build_elf(b"\xfa\xf4\xeb\xfd"))        # cli; hlt; jmp hlt
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "pych"),
                                      "--api-socket", self.api_path],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.api_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pych did not start: {self.log_path.read_text()}")
            time.sleep(0.05)
        client = ApiClient(self.api_path)
        for path, body in (("vm.create", {"payload": {"kernel": str(kernel)},
                                          "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
                                          "memory": {"size": 64 << 20},
                                          "serial": {"mode": "Null"}, "console": {"mode": "Off"}}),
                           ("vm.boot", None)):
            status, reply = client.put(path, body)
            if status != 204:
                raise RuntimeError(f"{path}: {status} {reply!r}")
        client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self._log.close()


def _threads_and_fds(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def run(target: FuzzTarget, plan: Plan, workdir: Path, report: Report | None = None,
        log: Callable[[str], None] = lambda s: None) -> Report:
    """The whole run (see the module docstring) against ``target``; returns the report."""
    report = report or Report()
    workdir = Path(workdir)
    gen = Generator(target.api_path, report, plan.seed)
    client = ApiClient(target.api_path, timeout=REQUEST_TIMEOUT)
    alive = lambda: target.proc.poll() is None  # noqa: E731
    started = time.monotonic()
    deadline = started + plan.minutes * 60
    try:
        status, body = client.get("vm.info")
        if not report.check(status == 200, "vm.info of the booted VM", f"{status} {body!r}"):
            return report
        original = json.loads(body)["config"]

        log("lifecycle: pause/resume, conflicts, hot add and remove")
        _lifecycle(gen, client, target, workdir, report, plan)

        log(f"generated requests: up to {plan.requests} in {plan.minutes:g} min")
        t0 = time.monotonic()
        n = gen.run(gen.random_paths("Running"), requests=plan.requests, deadline=deadline,
                    phase="running", stop=lambda: not alive())
        rate = n / max(time.monotonic() - t0, 1e-9)
        report.notes.append(f"{n} generated requests against the running VM at {rate:.0f}/s")
        if not alive():
            report.fail("pych died during the generated requests")
            return report
        state = json.loads(client.get("vm.info")[1])["state"]
        if state == "Paused":                       # vm.pause is among the generated requests
            gen.send("/vm.resume")
        gen.close()

        log("raw HTTP abuse")
        before = _threads_and_fds(target.proc.pid)
        Abuse(target.api_path, report, plan.seed, plan.abuse_scale).run_all()
        _check_no_leak(target.proc.pid, before, report)

        log("survival checks")
        _survival(gen, client, target, report)

        log("teardown: shutdown, delete and what follows")
        _teardown(gen, client, target, report, plan, original, deadline)
    finally:
        gen.close()
        client.close()
        report.notes.append(f"run took {time.monotonic() - started:.0f} s "
                            f"(boot not included), seed {plan.seed}")
    return report


def _expect(gen: Generator, report: Report, path: str, body: Any, statuses: set[int],
            what: str):
    """Send one deliberate request; its answer must be one of ``statuses``."""
    r = gen.send(path, body)
    report.check(r is not None and r.status_code in statuses, what,
                 f"{path} got {r.status_code if r is not None else 'no answer'} "
                 f"{_short(r.content) if r is not None else ''}")
    return r


def _lifecycle(gen: Generator, client: ApiClient, target: FuzzTarget, workdir: Path,
               report: Report, plan: Plan) -> None:
    expect = functools.partial(_expect, gen, report)

    def state() -> str:
        return json.loads(client.get("vm.info")[1]).get("state")

    expect("/vm.pause", None, {204}, "vm.pause pauses")
    report.check(state() == "Paused", "vm.info says Paused")
    expect("/vm.pause", None, {405}, "a second vm.pause is 405")
    expect("/vm.counters", None, {200}, "vm.counters of a paused VM")
    expect("/vm.resume", None, {204}, "vm.resume resumes")
    expect("/vm.resume", None, {405}, "a second vm.resume is 405")
    report.check(state() == "Running", "vm.info says Running")
    expect("/vm.boot", None, {409}, "vm.boot of a running VM is 409")
    config = json.loads(client.get("vm.info")[1])["config"]
    expect("/vm.create", config, {409}, "vm.create while a VM exists is 409")

    # Hot add, then remove at once (before the guest has probed the device).
    disk = workdir / "fuzz-disk.raw"
    disk.write_bytes(bytes(1 << 20))
    r = expect("/vm.add-disk", {"path": str(disk)}, {200}, "vm.add-disk of a real file")
    expect("/vm.add-disk", {"path": str(disk)}, {400},
           "the same disk path again is 400 (its image is locked)")
    if r is not None and r.status_code == 200:
        dev = r.json()["id"]
        expect("/vm.remove-device", {"id": dev}, {204}, "vm.remove-device of the new disk")
    expect("/vm.remove-device", {"id": "_no_such_device"}, {404}, "removing an unknown id is 404")
    if plan.full:
        pmem = workdir / "fuzz-pmem.raw"
        pmem.write_bytes(bytes(2 << 20))
        r = expect("/vm.add-pmem", {"file": str(pmem)}, {200}, "vm.add-pmem of a real file")
        if r is not None and r.status_code == 200:
            expect("/vm.remove-device", {"id": r.json()["id"]}, {204}, "removing the pmem")
        r = expect("/vm.add-vsock", {"cid": 3, "socket": str(workdir / "fuzz-vsock.sock")},
                   {200}, "vm.add-vsock")
        if r is not None and r.status_code == 200:
            expect("/vm.remove-device", {"id": r.json()["id"]}, {204}, "removing the vsock")
        expect("/vm.add-vsock", {"cid": 2, "socket": str(workdir / "v2.sock")}, {400},
               "vm.add-vsock with a reserved cid is 400")
        mark = target.mark()
        expect("/vm.reboot", None, {204}, "vm.reboot")
        target.wait_booted(mark)
        report.check(state() == "Running", "the rebooted VM is Running")


def _check_no_leak(pid: int, before: tuple[int, int], report: Report) -> None:
    deadline = time.monotonic() + 20
    while True:
        now = _threads_and_fds(pid)
        if now[0] <= before[0] and now[1] <= before[1]:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    report.notes.append(f"pych threads/fds before the abuse {before}, after {now}")
    report.check(now[0] <= before[0] and now[1] <= before[1],
                 "pych is back to its threads and fds after the abuse",
                 f"before {before}, after {now}")


def _survival(gen: Generator, client: ApiClient, target: FuzzTarget, report: Report) -> None:
    if not report.check(target.proc.poll() is None, "pych is alive",
                        f"exit code {target.proc.returncode}"):
        return
    r = gen.send("/vmm.ping")
    report.check(r is not None and r.status_code == 200, "vmm.ping answers")
    info = json.loads(client.get("vm.info")[1])
    report.check(info.get("state") == "Running", "the VM is Running", str(info.get("state")))
    if target.has_shell:
        deadline = time.monotonic() + 180
        while (pending := info.get("devices_pending_removal")) and time.monotonic() < deadline:
            time.sleep(2)
            info = json.loads(client.get("vm.info")[1])
        report.check(not pending, "the guest ejected every device it was asked to remove",
                     f"still pending: {pending}")
        rc, out = target.shell("echo fuzz-$((6*7))")
        report.check(rc == 0 and _last_line(out) == "fuzz-42", "the guest runs a shell command",
                     f"rc {rc}, output {out!r}")
    else:
        report.notes.append("microguest: no guest shell to check")
    log = Path(target.log_path).read_text(errors="replace")
    report.check("Traceback" not in log, "pych logged no traceback",
                 _short(log[log.find("Traceback"):], 1500))


def _last_line(output: str) -> str:
    """The command's own output follows any kernel messages the console interleaved (e.g.
    the guest reporting the NMIs that vm.nmi injected)."""
    lines = output.strip().splitlines()
    return lines[-1].strip() if lines else ""


def _teardown(gen: Generator, client: ApiClient, target: FuzzTarget, report: Report,
              plan: Plan, original: dict, deadline: float) -> None:
    expect = functools.partial(_expect, gen, report)

    expect("/vm.shutdown", None, {204}, "vm.shutdown")
    report.check(json.loads(client.get("vm.info")[1])["state"] == "Shutdown",
                 "vm.info says Shutdown")
    expect("/vm.shutdown", None, {405}, "a second vm.shutdown is 405")
    gen.run(gen.random_paths("Shutdown"), requests=plan.side_requests, deadline=deadline + 300,
            phase="shut down")
    expect("/vm.delete", None, {204}, "vm.delete")
    expect("/vm.info", None, {404}, "vm.info without a VM is 404")
    gen.run(gen.random_paths("NotCreated"), requests=plan.side_requests,
            deadline=deadline + 300, phase="no VM")
    expect("/vm.delete", None, {204}, "vm.delete without a VM is 204")
    if not report.check(target.proc.poll() is None, "pych is alive after the teardown requests"):
        return
    if plan.full:
        expect("/vm.create", original, {204}, "vm.create with the original configuration")
        mark = target.mark()
        expect("/vm.boot", None, {204}, "vm.boot")
        target.wait_booted(mark)
    if plan.full and target.has_shell:
        rc, out = target.shell("echo again-$((6*7))")
        report.check(rc == 0 and _last_line(out) == "again-42",
                     "the recreated guest runs a command", f"rc {rc}, output {out!r}")
        expect("/vm.power-button", None, {204}, "vm.power-button")
        what = "the guest powers off on the power button and pych exits 0"
    else:
        expect("/vmm.shutdown", None, {200}, "vmm.shutdown")
        what = "pych exits 0 after vmm.shutdown"
    try:
        code = target.proc.wait(300)
    except subprocess.TimeoutExpired:
        code = None
    report.check(code == 0, what, f"exit code {code}")


def boot_guest(workdir: Path, **kwargs) -> FuzzTarget:
    """Boot the test guest under pych for fuzzing (1 vCPU, up to 2: vm.resize can hot plug)."""
    g = PychGuest(Path(workdir), cpus="boot=1,max=2", memory="size=256M", **kwargs)
    try:
        g.start()
        g.wait_ready()
    except BaseException:
        g.stop()
        raise
    return FuzzTarget(g)


def boot_microguest(workdir: Path) -> FuzzTarget:
    return FuzzTarget(micro=_MicroPych(Path(workdir)))


__all__ = ["Abuse", "FuzzTarget", "Generator", "Plan", "Report", "boot_guest", "boot_microguest",
           "run"]
