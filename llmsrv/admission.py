"""Load shedding: how long a request waits before llmsrv even sees it, measured with a self-ping.

Theory of operation
-------------------
``max_inflight`` bounds memory, not time. Past what the CPU can serve, requests do not wait
inside llmsrv but in front of it: in nats-server's outbound buffer for this connection and in
the socket, where no timestamp shows how long they have waited (measured at twice the sustainable
rate: replies 6-10 s late, nothing refused, then nats-server cut the connection as a slow
consumer). So the service measures that wait: every ``interval`` it publishes a ping to an inbox
of its own over the same connection and notes when it comes back. The ping travels the same
queues as a request (the reply pump, nats-server, the inbound buffer behind every request
already waiting, the parser, the event loop), so its round trip is what a request arriving now
waits before its admission. While a ping is out, its age so far counts too (a stall shows
before the ping is back; a ping lost in a reconnect is sent again, its age kept).

Admission from that delay (``max_queue_ms`` is the contract's "waited longer than max_queue_ms
before it could start"):

* a request arriving while the delay is over ``max_queue_ms`` is refused with ``OVERLOADED``;
* below it, a share of new requests is admitted (evenly spread: every 1/share-th), the rest
  refused. Each returning ping moves the share: a round trip over a quarter of ``max_queue_ms``
  right after another one multiplies it by ``DECREASE`` (not below ``MIN_SHARE``: a burst that
  clears within one slow round trip is not shed), one under adds ``INCREASE`` (up to 1).

Refusing costs a fraction of serving, so the backlog drains and the successful replies wait
about ``max_queue_ms`` / 4 plus their service time, while the instance stays busy serving (an
all-or-nothing rule at ``max_queue_ms`` alone swung between refusing everything and a backlog).

Pure: the service passes the clock in.
"""

from __future__ import annotations

DECREASE = 0.7
INCREASE = 0.05
MIN_SHARE = 0.02


class QueueDelay:
    __slots__ = ("limit_s", "target_s", "rtt_s", "sent_at", "pings", "share", "_credit", "_slow")

    def __init__(self, max_queue_s: float) -> None:
        self.limit_s, self.target_s = max_queue_s, max_queue_s / 4
        self.share = 1.0  # of new requests admitted while the delay is under the limit
        self._credit = 0.0
        self._slow = False  # the last round trip was over the target
        self.rtt_s = 0.0  # the last ping's round trip
        self.sent_at: float | None = None  # the ping out now, if one is
        self.pings = 0

    def sent(self, now: float) -> None:
        """A ping went out; one sent again while the last is still out keeps the older time (conservative)."""
        if self.sent_at is None:
            self.sent_at = now
        self.pings += 1

    def received(self, now: float) -> None:
        if self.sent_at is not None:
            self.rtt_s = now - self.sent_at
            self.sent_at = None
            slow = self.rtt_s > self.target_s
            if slow and self._slow:
                self.share = max(MIN_SHARE, self.share * DECREASE)
            elif not slow:
                self.share = min(1.0, self.share + INCREASE)
            self._slow = slow

    def delay(self, now: float) -> float:
        """What a request arriving now has waited: the last round trip, or the age of the ping out now."""
        return self.rtt_s if self.sent_at is None else max(self.rtt_s, now - self.sent_at)

    def admits(self, now: float) -> bool:
        """Whether a request arriving now is admitted (see the module doc); call once per request."""
        if self.delay(now) > self.limit_s:
            return False
        if self.share >= 1.0:
            return True
        self._credit += self.share
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False
