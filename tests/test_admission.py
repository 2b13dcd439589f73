"""Load shedding's decisions (``llmsrv/admission.py``) on synthetic clocks: no event loop."""

from __future__ import annotations

import pytest

from llmsrv import admission
from llmsrv.admission import QueueDelay


def test_the_delay_is_the_last_round_trip_or_the_age_of_the_ping_out() -> None:
    q = QueueDelay(1.0)
    assert q.delay(5.0) == 0.0  # nothing measured yet
    q.sent(10.0)
    assert q.delay(10.3) == pytest.approx(0.3)  # out for 0.3 s already
    q.received(10.4)
    assert q.rtt_s == pytest.approx(0.4) and q.delay(99.0) == pytest.approx(0.4)
    q.sent(11.0)
    assert q.delay(11.1) == pytest.approx(0.4)  # the last round trip while the new ping is younger


def test_a_ping_sent_again_keeps_the_older_time() -> None:
    q = QueueDelay(1.0)
    q.sent(0.0)
    q.sent(2.0)  # the first may be lost: another goes out, the wait since 0.0 still counts
    assert q.delay(2.5) == pytest.approx(2.5)
    q.received(3.0)
    assert q.rtt_s == pytest.approx(3.0) and q.pings == 2


def test_over_max_queue_everything_is_refused() -> None:
    q = QueueDelay(1.0)
    q.sent(0.0)
    assert q.admits(0.5)
    assert not any(q.admits(1.0 + i / 1000) for i in range(1, 100))  # a ping out for over 1 s
    q.received(1.2)  # it came back: 1.2 s round trip, still over
    assert not q.admits(1.3)


def admitted(q: QueueDelay, n: int, now: float) -> int:
    return sum(q.admits(now) for _ in range(n))


def test_slow_round_trips_shrink_the_share_admitted_and_fast_ones_restore_it() -> None:
    q = QueueDelay(1.0)
    t = 0.0
    for _ in range(3):  # three round trips of 0.3 s: over a quarter of max_queue_ms
        q.sent(t)
        t += 0.3
        q.received(t)
    assert q.share == pytest.approx(admission.DECREASE ** 2)  # the first slow one alone changes nothing
    assert admitted(q, 1000, t) == pytest.approx(1000 * q.share, abs=1)  # spread evenly, no randomness
    while q.share < 1.0:  # round trips back under a quarter: the share climbs back
        q.sent(t)
        t += 0.01
        q.received(t)
    assert admitted(q, 100, t) == 100


def test_the_share_never_reaches_zero() -> None:
    q = QueueDelay(1.0)
    for i in range(100):
        q.sent(float(i))
        q.received(i + 0.9)
        assert q.share > 0
    assert q.share == admission.MIN_SHARE
    assert admitted(q, 1000, 100.0) == pytest.approx(1000 * admission.MIN_SHARE, abs=1)


def test_one_slow_round_trip_between_fast_ones_is_a_burst_not_overload() -> None:
    q = QueueDelay(1.0)
    for i, rtt in enumerate([0.01, 0.5, 0.01, 0.6, 0.02, 0.4]):
        q.sent(float(i))
        q.received(i + rtt)
    assert q.share == 1.0
