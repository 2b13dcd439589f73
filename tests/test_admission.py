"""Load shedding's decisions (``llmsrv/admission.py``) on synthetic clocks: no event loop."""

from __future__ import annotations

import pytest

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


def test_admission_follows_the_delay_both_ways() -> None:
    q = QueueDelay(1.0)
    q.sent(0.0)
    q.received(0.9)  # 0.9 s behind other requests: still admitted
    assert q.admits(1.0)
    q.sent(1.0)
    q.received(2.5)  # 1.5 s: refused until a ping comes back faster
    assert not q.admits(2.6)
    q.sent(2.6)
    q.received(2.62)
    assert q.admits(2.7)


def test_reset_forgets_what_was_measured() -> None:
    q = QueueDelay(1.0)
    q.sent(0.0)
    assert not q.admits(5.0)  # out for 5 s: the connection is down, say
    q.reset()
    assert q.admits(5.0) and q.delay(5.0) == 0.0


def test_a_ping_lost_with_a_connection_counts_for_nothing_on_the_next() -> None:
    q = QueueDelay(1.0)
    q.sent(0.0, epoch=0)  # goes out, then the connection dies under it; nats-py is back 0.3 s later
    assert not q.admits(1.5, epoch=0)  # on the old connection it would have aged into a refusal
    assert q.admits(1.5, epoch=1) and q.delay(1.5, epoch=1) == 0.0  # the new one has measured nothing yet
    q.sent(1.5, epoch=1)
    assert q.delay(1.6, epoch=1) == pytest.approx(0.1)  # the new ping's age, not the lost one's
    q.received(1.62)
    assert q.rtt_s == pytest.approx(0.12) and q.admits(9.0, epoch=1)
