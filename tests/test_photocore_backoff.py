"""photocore.backoff: exponential waits with full jitter, capped; Retry-After parsing."""
from __future__ import annotations

import random

import pytest

from photocore.backoff import Backoff, retry_after_seconds


def test_without_jitter_waits_double_up_to_the_cap() -> None:
    b = Backoff(0.5, 4.0, jitter=False)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.attempt == 6


def test_reset_starts_over() -> None:
    b = Backoff(1.0, 60.0, jitter=False)
    b.next(), b.next(), b.next()
    b.reset()
    assert b.attempt == 0
    assert b.next() == 1.0


def test_full_jitter_stays_within_zero_and_the_limit_and_spreads() -> None:
    b = Backoff(1.0, 8.0, rng=random.Random(7))
    seen = []
    for _ in range(200):
        limit = b.limit()
        wait = b.next()
        assert 0.0 <= wait <= limit <= 8.0
        seen.append(wait)
    late = seen[10:]
    assert max(late) > 6.0 and min(late) < 2.0  # full jitter, not a fixed wait


def test_same_seed_same_waits() -> None:
    a = Backoff(1.0, 30.0, rng=random.Random(3))
    b = Backoff(1.0, 30.0, rng=random.Random(3))
    assert [a.next() for _ in range(5)] == [b.next() for _ in range(5)]


def test_many_attempts_do_not_overflow() -> None:
    b = Backoff(1.0, 10.0, jitter=False)
    b.attempt = 5000
    assert b.next() == 10.0


@pytest.mark.parametrize("base,cap", [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (1.0, float("inf")), (float("nan"), 1.0)])
def test_bad_parameters_are_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base, cap)


def test_retry_after_delta_seconds() -> None:
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(" 2.5 ") == 2.5
    assert retry_after_seconds("-3") == 0.0


def test_retry_after_http_date() -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry_after_seconds("Wed, 21 Oct 2015 07:29:00 GMT", now=now) == 60.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:29:00 -0000", now=now) == 60.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:00:00 GMT", now=now) == 0.0


def test_retry_after_is_capped() -> None:
    assert retry_after_seconds("999999") == 3600.0
    assert retry_after_seconds("999999", cap=30.0) == 30.0
    assert retry_after_seconds("Wed, 21 Oct 2099 07:29:00 GMT", now=0.0, cap=5.0) == 5.0


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "nan", "inf", "Wed, 99 Foo"])
def test_retry_after_unreadable_is_none(value: str | None) -> None:
    assert retry_after_seconds(value) is None
