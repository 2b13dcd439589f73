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
before the ping is back; a ping not back in 2 s is sent again, its age kept). While the
connection is down nothing is measured (no request can arrive), and what was measured on a
connection since lost counts for nothing: the measure starts afresh on the new one. Connections are
told apart by an epoch the caller passes in (the bus counts its disconnections), so a ping lost with
a connection that came back within ``PING_RESEND_S`` cannot age into a refusal of every request after
the reconnect.

While that delay is over ``max_queue_ms`` (the contract's "waited longer than max_queue_ms before
it could start"), every new request is refused with ``OVERLOADED`` at admission: a refusal costs a
fraction of serving, so the backlog drains, the delay falls, and requests are admitted again. An
admitted request is dated back by the delay (when it reached nats-server, as far as the ping tells),
so its wait for a worker inside the instance has only what is left of ``max_queue_ms`` (checked when
it starts). The successful replies then wait at most about ``max_queue_ms`` in all plus their own
service time, and nothing queues without bound. (A smoother rule that admitted a shrinking share of
requests from a quarter of ``max_queue_ms`` on was measured worse: at twice the sustainable rate 2.5 %
of requests succeeded against 12 %, and at 75 % of it, with no overload at all, it refused 2,094 requests.)

Pure: the service passes the clock in.
"""

from __future__ import annotations


class QueueDelay:
    __slots__ = ("limit_s", "rtt_s", "sent_at", "pings", "epoch")

    def __init__(self, max_queue_s: float) -> None:
        self.limit_s = max_queue_s
        self.rtt_s = 0.0  # the last ping's round trip
        self.sent_at: float | None = None  # the ping out now, if one is
        self.pings = 0
        self.epoch = 0  # the connection the measure was taken on

    def sent(self, now: float, epoch: int = 0) -> None:
        """A ping went out on connection ``epoch``; one sent again while the last is still out on the same
        connection keeps the older time (conservative)."""
        if epoch != self.epoch:
            self.reset()
            self.epoch = epoch
        if self.sent_at is None:
            self.sent_at = now
        self.pings += 1

    def received(self, now: float) -> None:
        if self.sent_at is not None:
            self.rtt_s = now - self.sent_at
            self.sent_at = None

    def reset(self) -> None:
        """Forget what was measured (the connection was lost: the queue in front of it is gone)."""
        self.rtt_s, self.sent_at = 0.0, None

    def delay(self, now: float, epoch: int = 0) -> float:
        """What a request arriving now on connection ``epoch`` has waited: the last round trip, or the age of
        the ping out now; nothing known if those were measured on an earlier connection."""
        if epoch != self.epoch:
            return 0.0
        return self.rtt_s if self.sent_at is None else max(self.rtt_s, now - self.sent_at)

    def admits(self, now: float, epoch: int = 0) -> bool:
        """Whether a request arriving now is admitted: the queue in front is within ``max_queue_ms``."""
        return self.delay(now, epoch) <= self.limit_s
