"""The sending side of a live migration: pre-copy of guest RAM while the guest runs, then a
short stop-and-copy of what is still dirty and of the VM's state.

:func:`send` drives a :class:`Source` (the running VM, :class:`pych.migration.vm_side.VmSource`;
a fake in unit tests) over a :class:`~pych.migration.protocol.Channel`:

1. HELLO (format and version), CONFIG (the configuration and RAM layout; the receiver maps
   guest RAM — with ``local``, the sender's own memfds, passed by SCM_RIGHTS).
2. Without ``local``: dirty logging on (KVM's for the vCPUs' writes, the VMM's own for device
   writes), every allocated non-zero chunk of RAM sent; then rounds of the pages written
   since the last round, until a round is small enough to send within ``downtime_ms`` (at the
   rate measured so far) or ``MAX_ROUNDS`` are done.
3. Pause (the downtime starts), the last dirty pages (again until no device wrote any, a few
   rounds at most); with ``verify``, VERIFY (:func:`_verify`); the state of every vCPU and
   device; disk image locks handed over; STATE.
   The taps are handed over with STATE: their fds (``local``), or closed here (made
   persistent, so they outlive it) for the receiver to open by name.
4. The receiver has built the VM, paused: the host ends of the serial port are handed over,
   COMPLETE; the receiver resumes the guest and answers (the downtime ends).

A failure before COMPLETE leaves the source as it was: dirty logging off, disk locks and taps
taken again, the guest resumed if it was paused here. A failure after COMPLETE was sent (the
receiver's answer lost) cannot tell whether the receiver runs the guest: the source stays
paused and says so.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from pych.migration.protocol import (MAX_MEMORY, Channel, MigrationError, Msg, PeerRefused,
                                     block_sums, hello)

log = logging.getLogger(__name__)

MAX_ROUNDS = 30            # pre-copy rounds after the first full pass
FINAL_ROUNDS = 4           # dirty rounds once paused (device workers may still write)
RUN = MAX_MEMORY            # the most bytes one MEMORY message carries


class Source(Protocol):
    """What the sender needs of the VM it migrates."""

    def config(self) -> dict: ...
    def layout(self) -> dict: ...
    def shared_memory(self) -> tuple[dict, list[int]]: ...
    def start_dirty_log(self) -> None: ...
    def stop_dirty_log(self) -> None: ...
    def all_memory(self) -> list[tuple[int, object]]: ...
    def dirty_memory(self, final: bool = False) -> list[tuple[int, object]]: ...
    def blocks(self) -> list[tuple[int, int]]: ...
    def view(self, gpa: int, length: int): ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def save_state(self) -> dict: ...
    def release_backends(self, local: bool) -> tuple[dict, list[int]]: ...
    def retake_backends(self) -> None: ...
    def hand_over_console(self) -> None: ...
    def retake_console(self) -> None: ...


@dataclass
class Stats:
    """What a migration measured (the ``migrated`` event's properties)."""

    local: bool = False
    rounds: int = 0
    memory_bytes: int = 0          # RAM bytes sent (0 with local)
    total_ms: float = 0.0
    downtime_ms: float = 0.0
    last_round_bytes: int = 0
    verified: bool = False         # VERIFY ran
    unlogged_bytes: int = 0        # found by VERIFY: written without the dirty log seeing it
    rounds_bytes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"local": self.local, "rounds": self.rounds, "memory_bytes": self.memory_bytes,
                "total_ms": round(self.total_ms, 1), "downtime_ms": round(self.downtime_ms, 1),
                "last_round_bytes": self.last_round_bytes, "verified": self.verified,
                "unlogged_bytes": self.unlogged_bytes}


class OutcomeUnknown(MigrationError):
    """COMPLETE was sent and no answer came: the receiver may be running the guest."""


def _send_runs(channel: Channel, runs) -> int:
    total = 0
    for gpa, view in runs:
        for at in range(0, len(view), RUN):
            part = view[at:at + RUN]
            channel.send_memory(gpa + at, part)
            total += len(part)
    return total


def send(channel: Channel, source: Source, *, local: bool = False, downtime_ms: int = 300,
         timeout_s: float = 3600, verify: bool = False, clock=time.monotonic) -> Stats:
    """Migrate ``source`` over ``channel`` (see the module docstring); the statistics.

    ``verify``: once paused, check every allocated block of RAM on both sides and send again
    what differs (:func:`_verify`). Every writer of guest RAM that a migratable VM has is
    logged (KVM logs the vCPUs' writes and its own, ``GuestMemory`` the device models'), so
    this checks that claim rather than being needed: it costs a scan of the guest's RAM on
    each side while the guest is paused (most of the downtime), and is off unless asked for."""
    stats = Stats(local=local)
    started = clock()
    paused = released = logging_on = console_given = False
    try:
        channel.request(Msg.HELLO, hello(local))
        body = {"config": source.config(), "layout": source.layout(), "shared": None}
        fds: list[int] = []
        if local:
            body["shared"], fds = source.shared_memory()
        channel.request(Msg.CONFIG, body, fds)
        if not local:
            source.start_dirty_log()
            logging_on = True
            t0 = clock()
            sent = _send_runs(channel, source.all_memory())
            stats.memory_bytes += sent
            rate = sent / max(clock() - t0, 1e-3)          # bytes per second
            stats.rounds = 1
            stats.rounds_bytes.append(sent)
            budget = max(downtime_ms / 1000 * rate, 0)
            while stats.rounds <= MAX_ROUNDS:
                if clock() - started > timeout_s:
                    raise MigrationError(f"the migration did not converge within timeout_s "
                                         f"({timeout_s} s)")
                runs = source.dirty_memory()
                pending = sum(len(view) for _, view in runs)
                if pending <= budget:
                    break
                t0 = clock()
                sent = _send_runs(channel, runs)
                elapsed = clock() - t0
                if elapsed > 1e-3:
                    rate = 0.5 * rate + 0.5 * sent / elapsed
                    budget = downtime_ms / 1000 * rate
                stats.memory_bytes += sent
                stats.rounds += 1
                stats.rounds_bytes.append(sent)
            else:
                runs = []
        # stop and copy
        paused_at = clock()
        source.pause()
        paused = True
        if not local:
            last = _send_runs(channel, runs) if runs else 0
            for _ in range(FINAL_ROUNDS):       # until the device workers wrote nothing more
                sent = _send_runs(channel, source.dirty_memory())
                last += sent
                if not sent:
                    break
            last += _send_runs(channel, source.dirty_memory(final=True))
            if verify:
                last += _verify(channel, source, stats)
            stats.memory_bytes += last
            stats.last_round_bytes = last
        state = source.save_state()
        if source.layout() != body["layout"]:
            raise MigrationError("the VM's memory or devices changed during the migration "
                                 "(a hot plug or removal the guest completed): retry")
        released = True
        backends, backend_fds = source.release_backends(local)
        channel.request(Msg.STATE, {"state": state, "backends": backends}, backend_fds)
        source.hand_over_console()
        console_given = True
        try:
            answer = channel.request(Msg.COMPLETE, {})
        except PeerRefused:
            raise
        except MigrationError as e:
            raise OutcomeUnknown(f"{e}; the receiver may be running the guest: the source "
                                 "VM is left paused") from None
        now = clock()
        stats.downtime_ms = (now - paused_at) * 1000
        resumed = answer.get("resumed_at")
        if clock is time.monotonic and isinstance(resumed, (int, float)) \
                and paused_at <= resumed <= now:
            # the receiver is on this host (its monotonic clock is ours): downtime ends when
            # its vCPUs were let run, not when its answer came back
            stats.downtime_ms = (resumed - paused_at) * 1000
        stats.total_ms = (clock() - started) * 1000
        if logging_on:
            source.stop_dirty_log()
        return stats
    except OutcomeUnknown:
        raise
    except BaseException as error:
        if isinstance(error, MigrationError):
            try:
                channel.send(Msg.ABANDON, {"reason": str(error)})
            except MigrationError:
                pass
        _undo(source, logging_on=logging_on, released=released, paused=paused,
              console_given=console_given)
        raise


def _verify(channel: Channel, source: Source, stats: Stats) -> int:
    """VERIFY (the source paused, every dirty page sent): what the receiver holds is checked
    against the source block by block, a CRC each side, both at once (zlib releases the GIL;
    the receiver answers its sums). A block that differs was written without the dirty log
    seeing it, and is sent again. Returns the bytes sent again."""
    blocks = source.blocks()
    ours: list = []
    summing = threading.Thread(target=lambda: ours.extend(block_sums(blocks, source.view)),
                               name="migration-sums")
    summing.start()
    try:
        answer = channel.request(Msg.VERIFY, {"blocks": [[g, n] for g, n in blocks]})
    finally:
        summing.join()
    theirs = answer.get("sums")
    if not isinstance(theirs, list) or len(theirs) != len(ours):
        raise MigrationError("the receiver's answer to VERIFY does not match the blocks")
    stats.verified = True
    differ = [(g, n) for (g, n, crc), other in zip(ours, theirs) if crc != other]
    stats.unlogged_bytes = sum(n for _, n in differ)
    if not differ:
        return 0
    log.warning("migration: %d KiB in %d blocks differed from what was sent (written without "
                "the dirty log seeing it): sent again", stats.unlogged_bytes >> 10, len(differ))
    return _send_runs(channel, [(g, source.view(g, n)) for g, n in differ])


def _undo(source: Source, *, logging_on: bool, released: bool, paused: bool,
          console_given: bool) -> None:
    """Leave the source as it was before the migration began (each step on its own: one that
    fails is logged, the others still run)."""
    steps = []
    if logging_on:
        steps.append(("turn dirty logging off", source.stop_dirty_log))
    if released:
        steps.append(("take the disk image locks and the taps again", source.retake_backends))
    if console_given:
        steps.append(("open the serial port again", source.retake_console))
    if paused:
        steps.append(("resume the guest", source.resume))
    for what, step in steps:
        try:
            step()
        except Exception:  # noqa: BLE001 - the others must still run
            log.exception("migration abandoned: cannot %s", what)
