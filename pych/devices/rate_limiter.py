"""I/O rate limiting: token buckets as Firecracker and Cloud Hypervisor define them.

A :class:`TokenBucket` holds up to ``size`` tokens and refills completely every
``refill_time`` ms, continuously (``size / refill_time`` tokens per ms); it starts full, plus
a ``one_time_burst`` of tokens that are spent first and never refilled.  A
:class:`RateLimiter` has up to two buckets, bytes (``bandwidth``) and operations (``ops``);
a request passes when both have its tokens.  A request larger than a bucket (a 1 MiB write
against a 64 KiB bucket) passes once the bucket is full and leaves it in debt, so the long
run rate holds whatever the request sizes.

Devices hold a limiter optionally: without one there is no check per request at all.  A
device whose request is refused keeps the request, stops serving that queue and asks its
worker to wake it after :meth:`RateLimiter.consume`'s answer (a poll timeout, see
:class:`~pych.devices.virtio.device.VirtioDevice`): no busy loop, no timer thread.
A limiter shared by several disks (``rate_limit_groups``) is the same object in each; its
lock makes a check-and-take atomic across their workers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["RateLimiter", "TokenBucket"]


class TokenBucket:
    """``size`` tokens refilled every ``refill_time_ms``; ``one_time_burst`` extra once."""

    def __init__(self, size: int, refill_time_ms: int, one_time_burst: int = 0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if size <= 0 or refill_time_ms <= 0:
            raise ValueError("a token bucket needs a size and a refill time above 0")
        self.size = size
        self.refill_time_ms = refill_time_ms
        self.one_time_burst = one_time_burst
        self.budget = float(size)               # may go below 0: the debt of an oversized request
        self._per_second = size * 1000.0 / refill_time_ms
        self._clock = clock
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        self._last = now
        if elapsed > 0:
            self.budget = min(float(self.size), self.budget + elapsed * self._per_second)

    def wait_for(self, tokens: int) -> float:
        """Seconds until ``tokens`` can be taken (0 if now).  Takes nothing."""
        self._refill()
        available = self.one_time_burst + self.budget
        needed = min(tokens, self.size + self.one_time_burst)   # oversized: a full bucket
        if available >= needed:
            return 0.0
        return (needed - available) / self._per_second

    def take(self, tokens: int) -> None:
        """Take ``tokens``, burst first; the budget may go into debt."""
        burst = min(self.one_time_burst, tokens)
        self.one_time_burst -= burst
        self.budget -= tokens - burst


class RateLimiter:
    """A bandwidth (bytes) and an ops bucket, either absent; thread safe."""

    def __init__(self, bandwidth: TokenBucket | None = None,
                 ops: TokenBucket | None = None) -> None:
        self.bandwidth = bandwidth
        self.ops = ops
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config) -> RateLimiter | None:
        """A limiter for a ``RateLimiterConfig`` (None for ``None`` or one that limits
        nothing: a bucket of size 0 or refill time 0 is no bucket, as in the reference)."""
        if config is None:
            return None

        def bucket(cfg) -> TokenBucket | None:
            if cfg is None or cfg.size == 0 or cfg.refill_time == 0:
                return None
            return TokenBucket(cfg.size, cfg.refill_time, cfg.one_time_burst or 0)

        limiter = cls(bucket(config.bandwidth), bucket(config.ops))
        if limiter.bandwidth is None and limiter.ops is None:
            return None
        return limiter

    def consume(self, nbytes: int, ops: int = 1) -> float:
        """Take ``nbytes`` and ``ops`` tokens if both buckets have them and return 0;
        otherwise take nothing and return the seconds to wait before asking again."""
        with self._lock:
            wait = 0.0
            if self.bandwidth is not None:
                wait = self.bandwidth.wait_for(nbytes)
            if self.ops is not None:
                wait = max(wait, self.ops.wait_for(ops))
            if wait:
                return wait
            if self.bandwidth is not None:
                self.bandwidth.take(nbytes)
            if self.ops is not None:
                self.ops.take(ops)
            return 0.0

    def blocked(self) -> float:
        """Seconds until a request of any size may start (a byte and an op available);
        for a receive path that learns a frame's size only once it has read it."""
        with self._lock:
            wait = 0.0
            for bucket in (self.bandwidth, self.ops):
                if bucket is not None:
                    wait = max(wait, bucket.wait_for(1))
            return wait

    def charge(self, nbytes: int, ops: int = 1) -> None:
        """Take tokens for what was already done (the budget may go into debt)."""
        with self._lock:
            if self.bandwidth is not None:
                self.bandwidth._refill()
                self.bandwidth.take(nbytes)
            if self.ops is not None:
                self.ops._refill()
                self.ops.take(ops)
