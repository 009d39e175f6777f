"""``pych-remote``: drive a running VMM over its API socket, like ``ch-remote``.

Same subcommands, arguments and output as Cloud Hypervisor's ``ch-remote``:
device configurations use the CLI's ``key=value,...`` grammar and are turned
into JSON here, on the client side; tap or VFIO fds named in them
(``add-net fd=[3,4]``, ``add-device fd=5``) are open fds of this process, passed
to the VMM with SCM_RIGHTS.  On success the response body, if any, goes to
stdout and the exit status is 0; otherwise the error chain goes to stderr, in
``ch-remote``'s format, and the exit status is 1.

The subcommands come from the API's route table (:data:`pych.api.routes.ROUTES`): each
route names its subcommand and help; one that takes no body, one configuration in the CLI
grammar or one URL is built from that alone, the others (``create``, ``resize``, ...) by
:data:`SPECIAL_COMMANDS`.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import http.client
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TextIO

from pych.api.client import ApiClient
from pych.api.routes import ROUTES, Route
from pych.cli import without_pydantic_plugins
from pych.config import VmResize, support
from pych.config.grammar import parse_byte_size

PROG = "pych-remote"


@dataclass(frozen=True)
class _Request:
    route: Route
    body: Any = None
    fds: tuple[int, ...] = ()
    # Run after a successful response with the API socket path; returns the exit status.
    follow_up: Callable[[str], int] | None = None


class _UsageError(Exception):
    """The command line cannot be turned into a request; the args are the chain."""


Builder = Callable[[argparse.Namespace], _Request]
"""Turns a subcommand's parsed arguments into its request."""


def _size(text: str, what: str) -> int:
    try:
        return parse_byte_size(text)
    except ValueError as error:
        raise _UsageError(f"Error parsing {what} size", str(error)) from None


# --------------------------------------------------------------------------
# Subcommands built from the route table: no argument, one configuration, one URL


def _bodyless(route: Route, sub: argparse.ArgumentParser) -> Builder:
    return lambda args: _Request(route)


def _configured(route: Route, sub: argparse.ArgumentParser) -> Builder:
    """One positional argument in the CLI grammar, parsed with the body model's ``parse``."""
    assert route.body is not None and route.remote.syntax is not None
    model, what = route.body, route.remote.syntax
    sub.add_argument("config", metavar=f"<{model.__name__}>",
                     help=f"{what} options: key=value,...")

    def build(args: argparse.Namespace) -> _Request:
        try:
            support.check_cli_keys(model, args.config)  # type: ignore[arg-type]
            config = model.parse(args.config)  # type: ignore[attr-defined]
        except ValueError as error:
            raise _UsageError(f"Error parsing {what} syntax", str(error)) from None
        # Fds are only meaningful in this process: they travel with SCM_RIGHTS.
        fields = type(config).model_fields
        fds: list[int] = []
        if "fds" in fields and config.fds:
            fds = list(config.fds)
        elif "fd" in fields and config.fd is not None:
            fds = [config.fd]
        body = config.model_dump_json(exclude_none=True, exclude={"fds", "fd"})
        return _Request(route, body, tuple(fds))

    return build


def _url(route: Route, sub: argparse.ArgumentParser) -> Builder:
    sub.add_argument("url", metavar="<destination_url>")
    return lambda args: _Request(route, {"destination_url": args.url})


# --------------------------------------------------------------------------
# Subcommands with arguments of their own


def _create(route: Route, sub: argparse.ArgumentParser) -> Builder:
    sub.add_argument("path", nargs="?", default="-",
                     help="JSON VmConfig file, or - for stdin (default)")

    def build(args: argparse.Namespace) -> _Request:
        try:
            if args.path == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(args.path, "rb") as file:
                    data = file.read()
        except OSError as error:
            raise _UsageError("Error reading from file", str(error)) from None
        return _Request(route, data)  # sent as is: the VMM validates it

    return build


DEFAULT_VCPU_WAIT_SECONDS = 120.0
SETTLED_VCPU_STATES = {"absent", "ejected"}   # what vm.info calls a vCPU that is not plugged


def _resize(route: Route, sub: argparse.ArgumentParser) -> Builder:
    sub.add_argument("--balloon", help="New balloon size in bytes (supports K/M/G suffix)")
    sub.add_argument("--cpus", help="New vCPUs count")
    sub.add_argument("--memory", help="New memory size in bytes (supports K/M/G suffix)")
    sub.add_argument(
        "--wait", nargs="?", type=float, const=DEFAULT_VCPU_WAIT_SECONDS, metavar="SECONDS",
        help="With --cpus: return once the guest has seen every added vCPU or ejected every "
        f"removed one; fail after SECONDS (default {DEFAULT_VCPU_WAIT_SECONDS:g})")

    def build(args: argparse.Namespace) -> _Request:
        try:
            resize = VmResize.from_remote_args(args.cpus, args.memory, args.balloon)
        except ValueError as error:
            raise _UsageError("Error parsing resize arguments", str(error)) from None
        follow_up = None
        if args.wait is not None:
            if resize.desired_vcpus is None:
                raise _UsageError("Error parsing resize arguments", "--wait needs --cpus")
            if args.wait <= 0:
                raise _UsageError("Error parsing resize arguments",
                                  "--wait needs a positive timeout")
            desired, timeout = resize.desired_vcpus, args.wait
            follow_up = functools.partial(
                _wait_command, wait=lambda client: wait_for_vcpus(client, desired, timeout),
                what="the vCPU resize")
        return _Request(route, resize.model_dump_json(exclude_none=True), follow_up=follow_up)

    return build


def _poll_vm_info(client: ApiClient, behind: Callable[[dict], str | None], timeout: float,
                  interval: float, waiting_for: str) -> None:
    """Poll ``vm.info`` until ``behind(info)`` returns None (the guest has caught up).

    Returns at once if the VM is not running (the request then only edited the
    configuration). Raises ``TimeoutError`` with ``behind``'s last answer after ``timeout``
    seconds, and ``RuntimeError`` if ``vm.info`` fails.
    """
    deadline = time.monotonic() + timeout
    while True:
        status, body = client.get("vm.info")
        if status != 200:
            raise RuntimeError(f"vm.info answered {status}: {body.decode(errors='replace')}")
        info = json.loads(body)
        if info.get("state") not in ("Running", "Paused"):
            return
        pending = behind(info)
        if pending is None:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {waiting_for}: {pending}")
        time.sleep(interval)


def _wait_command(socket_path: str, wait: Callable[[ApiClient], None], what: str) -> int:
    """Run a ``--wait`` poller after a successful request; 1 with an error chain on failure."""
    with ApiClient(socket_path) as client:
        try:
            wait(client)
        except (OSError, RuntimeError, http.client.HTTPException) as error:
            # TimeoutError is an OSError: its message says what is still pending.
            _print_chain([f"Error waiting for {what}", str(error)], sys.stderr)
            return 1
    return 0


def wait_for_vcpus(client: ApiClient, desired: int, timeout: float = DEFAULT_VCPU_WAIT_SECONDS,
                   *, interval: float = 0.25) -> None:
    """Wait until the guest has caught up with a ``vm.resize`` to ``desired`` vCPUs:
    vCPUs 0..desired-1 are ``present`` (running, and the guest evaluated their ``_STA``)
    and every other one is ``absent`` or ``ejected``. Raises as :func:`_poll_vm_info`, and
    ``RuntimeError`` if ``vm.info`` has no per-vCPU ``cpus`` list (the VMM is not pych)."""

    def behind(info: dict) -> str | None:
        cpus = info.get("cpus")
        if cpus is None:
            raise RuntimeError("vm.info reports no per-vCPU states: the VMM is not pych")
        late = [f"vCPU {cpu['id']} is {cpu['state']}" for cpu in cpus
                if cpu["state"] != "present" and cpu["id"] < desired
                or cpu["state"] not in SETTLED_VCPU_STATES and cpu["id"] >= desired]
        return ", ".join(late) or None

    _poll_vm_info(client, behind, timeout, interval, f"the guest to reach {desired} vCPUs")


def _resize_zone(route: Route, sub: argparse.ArgumentParser) -> Builder:
    sub.add_argument("--id", required=True, help="Memory zone identifier")
    sub.add_argument("--size", required=True,
                     help="New memory zone size in bytes (supports K/M/G suffix)")
    return lambda args: _Request(
        route, {"id": args.id, "desired_ram": _size(args.size, "memory")})


def _resize_disk(route: Route, sub: argparse.ArgumentParser) -> Builder:
    sub.add_argument("--disk", required=True, help="Disk identifier")
    sub.add_argument("--size", required=True, help="New disk size")
    return lambda args: _Request(
        route, {"id": args.disk, "desired_size": _size(args.size, "disk")})


DEFAULT_REMOVAL_WAIT_SECONDS = 120.0


def _remove_device(route: Route, sub: argparse.ArgumentParser) -> Builder:
    sub.add_argument("id", metavar="<device_id>")
    sub.add_argument(
        "--wait", nargs="?", type=float, const=DEFAULT_REMOVAL_WAIT_SECONDS, metavar="SECONDS",
        help="Return once the guest has ejected the device; fail after SECONDS "
        f"(default {DEFAULT_REMOVAL_WAIT_SECONDS:g})")

    def build(args: argparse.Namespace) -> _Request:
        follow_up = None
        if args.wait is not None:
            if args.wait <= 0:
                raise _UsageError("Error parsing remove-device arguments",
                                  "--wait needs a positive timeout")
            dev_id, timeout = args.id, args.wait
            follow_up = functools.partial(
                _wait_command,
                wait=lambda client: wait_for_device_removal(client, dev_id, timeout),
                what="the device removal")
        return _Request(route, {"id": args.id}, follow_up=follow_up)

    return build


def wait_for_device_removal(client: ApiClient, dev_id: str,
                            timeout: float = DEFAULT_REMOVAL_WAIT_SECONDS, *,
                            interval: float = 0.25) -> None:
    """Wait until the guest has ejected device ``dev_id``: neither it nor its
    ``_virtio-pci-`` node is left in ``device_tree`` (which keeps a device until the
    eject). Raises as :func:`_poll_vm_info`."""

    def behind(info: dict) -> str | None:
        tree = info.get("device_tree") or {}
        return "still present" if dev_id in tree or f"_virtio-pci-{dev_id}" in tree else None

    _poll_vm_info(client, behind, timeout, interval, f"the guest to eject device {dev_id}")


def _migration(url_field: str, local: bool) -> Callable[[Route, argparse.ArgumentParser], Builder]:
    """``send-migration [--local] <url>`` / ``receive-migration <url>`` (ch-remote's forms),
    or the one ``key=value,...`` argument (``destination_url=unix:/m,local=on``)."""

    def arguments(route: Route, sub: argparse.ArgumentParser) -> Builder:
        configured = _configured(route, sub)       # the one argument: a URL or key=value,...
        if local:
            sub.add_argument("--local", action="store_true",
                             help="pass guest memory by file descriptor (needs --memory "
                                  "shared=on and a unix: URL)")

        def build(args: argparse.Namespace) -> _Request:
            if "=" not in args.config:
                args.config = f"{url_field}={args.config}"
            request = configured(args)
            if getattr(args, "local", False):
                body = json.loads(request.body)
                body["local"] = True
                request = _Request(route, json.dumps(body), request.fds)
            return request

        return build

    return arguments


# Subcommands whose arguments are their own (not one configuration or URL), by name.
SPECIAL_COMMANDS: dict[str, Callable[[Route, argparse.ArgumentParser], Builder]] = {
    "create": _create,
    "resize": _resize,
    "resize-zone": _resize_zone,
    "resize-disk": _resize_disk,
    "remove-device": _remove_device,
    "send-migration": _migration("destination_url", local=True),
    "receive-migration": _migration("receiver_url", local=False),
}


def _arguments(route: Route) -> Callable[[Route, argparse.ArgumentParser], Builder]:
    """How the subcommand of ``route`` takes its arguments."""
    if route.remote.name in SPECIAL_COMMANDS:
        return SPECIAL_COMMANDS[route.remote.name]
    if route.remote.syntax is not None:
        return _configured
    if route.remote.url:
        return _url
    if route.body is None:
        return _bodyless
    raise ValueError(f"{route.endpoint} takes a body but pych-remote has no way to build it")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Remotely control a pych (or cloud-hypervisor) VMM."
    )
    parser.add_argument("--api-socket", help="HTTP API socket path (UNIX domain socket).")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for route in sorted(ROUTES, key=lambda route: route.remote.name):
        about = route.remote.help
        sub = commands.add_parser(route.remote.name, help=about, description=about)
        sub.set_defaults(build=_arguments(route)(route, sub))
    return parser


class _Unnumbered(str):
    """A line of an error chain printed without its level (ch-remote's ``X: ...`` line)."""


def _print_chain(lines: Sequence[str], stderr: TextIO) -> None:
    """ch-remote's error chain: one line per level, outermost first."""
    print(f"Error: {PROG} exited with the following chain of errors:", file=stderr)
    for level, line in enumerate(lines):
        print(f"  {line}" if isinstance(line, _Unnumbered) else f"  {level}: {line}", file=stderr)


# ch-remote's names for the statuses it knows (its api_client StatusCode, printed with
# Debug); it calls every other status ``Unknown``, where pych adds the number and phrase.
_STATUS_NAMES = {
    100: "Continue", 200: "Ok", 204: "NoContent", 400: "BadRequest", 404: "NotFound",
    429: "TooManyRequests", 500: "InternalServerError", 501: "NotImplemented",
}


def _status_name(status: int) -> str:
    if status in _STATUS_NAMES:
        return _STATUS_NAMES[status]
    try:
        return f"Unknown ({status} {HTTPStatus(status).phrase})"
    except ValueError:
        return f"Unknown ({status})"


def _server_error_chain(status: int, body: bytes) -> list[str]:
    """The chain ch-remote prints for an error response: the status, then the error body's
    lines (a JSON array of strings); a body that is not one replaces both with an ``X``
    line quoting it, as ch-remote does."""
    text = body.decode(errors="replace")
    try:
        messages = json.loads(text)
        if not (isinstance(messages, list) and all(isinstance(m, str) for m in messages)):
            raise ValueError("not a JSON array of strings")
    except ValueError as error:
        return ["http client error", _Unnumbered(
            f"X: Can't get remote's error messages from JSON response: {error}: body='{text}'")]
    return ["http client error", f"Server responded with {_status_name(status)}", *messages]


def main(argv: Sequence[str] | None = None) -> int:
    without_pydantic_plugins()
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has reported
        return stop.code if isinstance(stop.code, int) else 1
    if args.api_socket is None:
        print(f"Error: {PROG}: please provide the --api-socket option", file=sys.stderr)
        return 1
    try:
        request = args.build(args)
    except _UsageError as error:
        _print_chain(error.args, sys.stderr)
        return 1

    with ApiClient(args.api_socket) as client:
        try:
            client.connect()
        except OSError as error:
            print(
                f"Error: {PROG}: cannot open HTTP socket {args.api_socket}: "
                f"{error.strerror or error}",
                file=sys.stderr,
            )
            return 1
        for fd in request.fds:
            try:
                fcntl.fcntl(fd, fcntl.F_GETFD)
            except OSError as error:  # ch-remote fails the same way, at sendmsg()
                _print_chain(["http client error", "Error sending file descriptors",
                              f"{error.strerror} (os error {error.errno})"], sys.stderr)
                return 1
        try:
            status, body = client.request(
                request.route.method, request.route.endpoint, request.body, request.fds
            )
        except (OSError, http.client.HTTPException) as error:
            _print_chain(["http client error", "Error writing to or reading from HTTP socket",
                          str(error)], sys.stderr)
            return 1

    if 200 <= status < 300:
        if body:
            sys.stdout.write(body.decode(errors="replace") + "\n")
        return request.follow_up(args.api_socket) if request.follow_up else 0
    _print_chain(_server_error_chain(status, body), sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
