"""The receiving side of a live migration (see :mod:`pych.migration.sender` for the exchange).

:func:`receive` reads the sender's messages in order and drives a :class:`Target` (the VM
being built, :class:`pych.migration.vm_side.VmTarget`; a fake in unit tests): CONFIG maps
guest RAM, MEMORY writes into it, STATE builds the devices and vCPUs (paused), COMPLETE
resumes the guest. Anything else — a message out of order, a stream that breaks off, a
refusal of the target, ABANDON — closes what was built (nothing is left half-built) and is a
:class:`~pych.migration.protocol.MigrationError`; the sender is told why when it can be.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

from pych.migration.protocol import Channel, MigrationError, Msg, block_sums, check_hello

log = logging.getLogger(__name__)


class Target(Protocol):
    """The VM a migration builds."""

    def view(self, gpa: int, length: int): ...
    def finish(self, state: dict, backends: dict, fds: list[int]) -> None: ...
    def resume(self) -> None: ...
    def close(self) -> None: ...


class Refused(MigrationError):
    """The receiver refused what the sender sent (told to the sender as ERROR)."""


def receive(channel: Channel, build: Callable[[dict, list[int]], Target]) -> tuple[Target, dict]:
    """Receive a VM over ``channel``; ``build(config_message, fds)`` maps its RAM (the fds
    are the sender's memfds with ``local``; ``build`` owns them). Returns the running target
    and what was received (``{"local", "memory_bytes"}``)."""
    target: Target | None = None
    stats = {"local": False, "memory_bytes": 0}
    try:
        kind, body, fds = channel.receive()
        _close_unexpected(fds)
        _expect(kind, Msg.HELLO, body)
        try:
            check_hello(body)
        except MigrationError as e:
            raise Refused(str(e)) from None
        stats["local"] = bool(body.get("local"))
        channel.answer_ok()

        kind, body, fds = channel.receive()
        if kind is not Msg.CONFIG:
            _close_unexpected(fds)
            _expect(kind, Msg.CONFIG, body)
        if bool(fds) != stats["local"]:
            _close_unexpected(fds)
            raise Refused("a local migration passes guest RAM's file descriptors with CONFIG"
                          if stats["local"] else "file descriptors came with a migration that "
                          "is not local")
        try:
            target = build(body, fds)
        except MigrationError:
            raise
        except Exception as e:  # noqa: BLE001 - the target's own refusal, told to the sender
            raise Refused(f"cannot build the VM: {e}") from e
        channel.answer_ok()

        while True:
            kind, length, fds = channel.receive_header()
            if kind is not Msg.STATE:
                _close_unexpected(fds)
            if kind is Msg.MEMORY:
                if stats["local"]:
                    raise Refused("guest RAM was sent in a local migration")
                stats["memory_bytes"] += channel.receive_memory(length, target.view)
                continue
            try:
                body = channel.receive_json(length, kind)
            except BaseException:
                _close_unexpected(fds if kind is Msg.STATE else [])
                raise
            if kind is Msg.VERIFY and not stats["local"]:
                blocks = body.get("blocks")
                if not isinstance(blocks, list):
                    raise Refused("VERIFY message without blocks")
                try:
                    mine = block_sums([(int(g), int(n)) for g, n in blocks], target.view)
                except (TypeError, ValueError) as e:
                    raise Refused(f"VERIFY message with malformed blocks: {e}") from None
                channel.answer_ok({"sums": [crc for _, _, crc in mine]})
                continue
            _expect(kind, Msg.STATE, body)
            break
        if bool(fds) and not stats["local"]:
            _close_unexpected(fds)
            raise Refused("file descriptors came with a migration that is not local")
        try:
            target.finish(body["state"], body.get("backends") or {}, fds)
        except Exception as e:  # noqa: BLE001
            raise Refused(f"cannot restore the VM's state: {e}") from e
        channel.answer_ok()

        kind, body, fds = channel.receive()
        _close_unexpected(fds)
        _expect(kind, Msg.COMPLETE, body)
        target.resume()
        # when the vCPUs were let run (CLOCK_MONOTONIC: the sender's own clock on this host)
        channel.answer_ok({"resumed_at": time.monotonic()})
        return target, stats
    except BaseException as error:
        # what was built goes first, then the sender is told: it takes back what it handed
        # over (a vhost-user back-end's call eventfds, which a kernel lets only one VM hold
        # as an irqfd at a time) once this VM has let go of it
        if target is not None:
            try:
                target.close()
            except Exception:  # noqa: BLE001
                log.exception("cannot close the VM of a failed migration")
        if isinstance(error, Refused):
            channel.answer_error(str(error))
        raise


def _expect(kind: Msg, wanted: Msg, body: dict) -> None:
    if kind is Msg.ABANDON:
        raise MigrationError(f"the sender abandoned the migration: "
                             f"{body.get('reason', 'no reason given')}")
    if kind is not wanted:
        raise Refused(f"{kind.name} message where {wanted.name} was expected")


def _close_unexpected(fds: list[int]) -> None:
    import os
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
