"""pych.devices.rate_limiter: token buckets on a fake clock."""

from __future__ import annotations

import pytest

from pych.config.devices import RateLimiterConfig
from pych.devices.rate_limiter import RateLimiter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_starts_full_then_refills_at_size_per_refill_time():
    clock = Clock()
    bucket = TokenBucket(1000, 100, clock=clock)         # 10,000 tokens/s
    limiter = RateLimiter(bucket)
    assert limiter.consume(600) == 0
    assert limiter.consume(400) == 0
    wait = limiter.consume(500)
    assert wait == pytest.approx(0.05)                    # 500 tokens at 10,000/s
    clock.now += 0.049
    assert limiter.consume(500) > 0
    clock.now += 0.002
    assert limiter.consume(500) == 0
    clock.now += 10                                       # refills to size, not beyond
    assert limiter.consume(1000) == 0 and limiter.consume(1) > 0


def test_one_time_burst_is_spent_first_and_never_refilled():
    clock = Clock()
    limiter = RateLimiter(TokenBucket(100, 1000, one_time_burst=300, clock=clock))
    assert limiter.consume(400) == 0                      # burst 300 + budget 100
    assert limiter.consume(1) > 0
    clock.now += 1                                        # a full refill: budget only
    assert limiter.consume(100) == 0 and limiter.consume(1) > 0


def test_an_oversized_request_passes_on_a_full_bucket_and_leaves_a_debt():
    clock = Clock()
    limiter = RateLimiter(TokenBucket(1000, 1000, clock=clock))   # 1000 tokens/s
    assert limiter.consume(4000) == 0
    assert limiter.consume(1) == pytest.approx(3.001)     # 3000 in debt, then 1 token
    clock.now += 2.0
    assert limiter.consume(4000) > 0                      # the bucket must be full again
    clock.now += 2.0
    assert limiter.consume(4000) == 0


def test_both_buckets_must_have_the_tokens_and_a_refusal_takes_nothing():
    clock = Clock()
    limiter = RateLimiter(TokenBucket(1000, 1000, clock=clock),
                          TokenBucket(2, 1000, clock=clock))
    assert limiter.consume(100) == 0 and limiter.consume(100) == 0
    assert limiter.consume(100) == pytest.approx(0.5)     # ops empty: 1 op at 2/s
    assert limiter.bandwidth.budget == pytest.approx(800)   # nothing taken
    clock.now += 0.5
    assert limiter.consume(100) == 0


def test_receive_waits_while_empty_and_charges_afterwards():
    clock = Clock()
    limiter = RateLimiter(TokenBucket(1000, 1000, clock=clock))
    assert limiter.blocked() == 0
    limiter.charge(1500)                                  # a frame read: into debt
    assert limiter.blocked() == pytest.approx(0.501)
    clock.now += 0.6
    assert limiter.blocked() == 0


@pytest.mark.parametrize("config", [
    None, {}, {"bandwidth": {"size": 0, "refill_time": 10}},
    {"ops": {"size": 10, "refill_time": 0}}])
def test_a_configuration_that_limits_nothing_builds_no_limiter(config):
    model = None if config is None else RateLimiterConfig.model_validate(config)
    assert RateLimiter.from_config(model) is None


def test_from_config_builds_each_bucket():
    limiter = RateLimiter.from_config(RateLimiterConfig.model_validate(
        {"bandwidth": {"size": 1 << 20, "one_time_burst": 4096, "refill_time": 1000},
         "ops": {"size": 100, "refill_time": 10}}))
    assert (limiter.bandwidth.size, limiter.bandwidth.one_time_burst,
            limiter.bandwidth.refill_time_ms) == (1 << 20, 4096, 1000)
    assert (limiter.ops.size, limiter.ops.refill_time_ms) == (100, 10)
