"""Retry delays: exponential, capped, fully jittered, and reproducible with a seed."""

from __future__ import annotations

import random

import pytest

from edge_runtime.agent import backoff_cap, backoff_ceiling, backoff_delay, jittered_interval, stream_url


def test_it_grows_the_backoff_ceiling_exponentially_up_to_the_cap() -> None:
    assert [backoff_ceiling(n, cap=60) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    # Very long outages neither overflow nor exceed the cap.
    assert backoff_ceiling(10_000, cap=60) == 60


def test_it_caps_the_backoff_at_six_intervals_and_at_most_a_minute() -> None:
    assert backoff_cap(1.0) == 6.0
    assert backoff_cap(5.0) == 30.0
    assert backoff_cap(10.0) == 60.0
    assert backoff_cap(3600.0) == 60.0


def test_it_jitters_every_delay_between_zero_and_the_ceiling() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        samples = [backoff_delay(attempt, rng, cap=6.0) for _ in range(200)]
        ceiling = backoff_ceiling(attempt, cap=6.0)
        assert all(0.0 <= s <= ceiling for s in samples)
        # Full jitter: the samples spread over the whole range, not one fixed value.
        assert max(samples) - min(samples) > 0.8 * ceiling
        assert len(set(samples)) == len(samples)


def test_it_makes_delays_grow_on_average() -> None:
    rng = random.Random(1)
    means = [sum(backoff_delay(a, rng, cap=60) for _ in range(2000)) / 2000 for a in range(7)]
    assert means == sorted(means)
    assert means[0] == pytest.approx(0.5, rel=0.1)
    assert means[6] == pytest.approx(30.0, rel=0.1)


def test_it_is_deterministic_with_a_seeded_rng() -> None:
    first = [backoff_delay(a, random.Random(42), cap=60) for a in range(10)]
    again = [backoff_delay(a, random.Random(42), cap=60) for a in range(10)]
    other = [backoff_delay(a, random.Random(43), cap=60) for a in range(10)]
    assert first == again
    assert first != other


def test_it_jitters_the_sync_interval_by_ten_percent() -> None:
    rng = random.Random(3)
    samples = [jittered_interval(10.0, rng) for _ in range(1000)]
    assert all(9.0 <= s <= 11.0 for s in samples)
    assert min(samples) < 9.2 and max(samples) > 10.8


def test_it_refuses_a_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt must be 0 or more"):
        backoff_ceiling(-1)


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://cp.example:8000", "ws://cp.example:8000/agent/v1/nodes/n1/stream"),
        ("https://cp.example/", "wss://cp.example/agent/v1/nodes/n1/stream"),
        ("https://cp.example/edgewise", "wss://cp.example/edgewise/agent/v1/nodes/n1/stream"),
    ],
)
def test_it_derives_the_stream_url_from_the_control_plane_url(base: str, expected: str) -> None:
    assert stream_url(base, "n1") == expected


def test_it_refuses_a_control_plane_url_that_is_not_http() -> None:
    with pytest.raises(ValueError, match="must be http:// or https://"):
        stream_url("ftp://cp.example", "n1")
