"""Child processes of a bench run: nats-server, ``python -m llmsrv serve``, the bare responder.

Each child runs in its own session (a terminal's Ctrl-C reaches only the bench, which then stops
them in order), writes stdout and stderr to a log file (never a pipe nobody reads), counts as up
once it printed its ready line *and* answered a real benchmark request correctly, and is stopped
with SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``. Use them as context managers (or an
``ExitStack``) so every one is stopped in a ``finally``, also on KeyboardInterrupt.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from bench.loadgen import CONNECT, CONTENT, ERROR_HEADER, MODEL, payload
from llmsrv.natsserver import NatsServer, find_binary

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
__all__ = ["Child", "NatsServer", "cpu_seconds", "llmsrv", "nats_version", "probe", "responder"]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux ``/proc/<pid>/stat``, clock ticks), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nats_version() -> str:
    done = subprocess.run([find_binary(), "--version"], capture_output=True, text=True, timeout=10)
    return done.stdout.strip()


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without inherited llmsrv settings, plus the bench's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSRV")}
    env.update({"LLMSRV__SERVER__HTTP_PORT": "0", "LLMSRV__SERVER__LOG_LEVEL": "warning",
                "PYTHONUNBUFFERED": "1", **(extra or {})})
    return env


class Child:
    """A server under test: started at once, ``wait_ready()``, ``stop()`` (idempotent)."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
                 ready: bytes = b": ready on", cwd: Path | None = None) -> None:
        self.name, self.log_path, self.ready = name, log_path, ready
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env or clean_env(), cwd=cwd or ROOT, start_new_session=True)
        self.stopped = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.proc.pid)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")

    def wait_line(self, timeout_s: float = READY_TIMEOUT_S) -> bytes:
        """Wait for the ready line; return the output so far."""
        deadline = time.monotonic() + timeout_s
        while self.ready not in (said := self.log_path.read_bytes()):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no ready line within {timeout_s:.0f}s; see {self.log_path}")
            time.sleep(0.02)
        return said

    def wait_ready(self, url: str, subject: str, timeout_s: float = READY_TIMEOUT_S, model: str = MODEL) -> int:
        """Wait for the ready line, then a correct echo of a request for ``model`` on ``subject``; return the
        reply's size."""
        deadline = time.monotonic() + timeout_s
        self.wait_line(timeout_s)
        return probe(url, subject, max(1.0, deadline - time.monotonic()), model)

    def stop(self) -> None:
        """SIGTERM and wait; raise if it had died already, failed, or did not stop in time (then killed)."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.check_alive()
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{self.name} did not stop within {STOP_TIMEOUT_S:.0f}s of SIGTERM; killed") \
                    from None
            if code != 0:
                raise RuntimeError(f"{self.name} exited with {code} after SIGTERM; see {self.log_path}")
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if t is None:
            self.stop()
        else:  # already failing: stop it, but do not hide the first error behind a second
            try:
                self.stop()
            except RuntimeError:
                pass


def llmsrv(url: str, prefix: str, log_dir: Path, env: dict[str, str] | None = None,
           name: str = "llmsrv", tree: Path | None = None) -> Child:
    """``python -m llmsrv serve`` on ``<prefix>.request`` (``mock:echo`` is built in); from another
    checkout's ``llmsrv/`` when ``tree`` is given (a before/after comparison in the same run)."""
    extra = {"PYTHONPATH": str(tree)} if tree else {}
    return Child(name, [sys.executable, "-m", "llmsrv", "serve", "--nats-url", url], log_dir / f"{name}.log",
                 clean_env({"LLMSRV__NATS__SUBJECT_PREFIX": prefix, **extra, **(env or {})}), cwd=tree)


def responder(url: str, prefix: str, log_dir: Path, reply_bytes: int | None = None,
              name: str = "responder", stack: str = "asyncio") -> Child:
    """The bare responder (``bench/responder.py``) on ``<prefix>.request``, on ``stack`` (its ``--stack``)."""
    cmd = [sys.executable, "-m", "bench.responder", "--nats-url", url, "--prefix", prefix, "--stack", stack]
    if reply_bytes is not None:
        cmd += ["--reply-bytes", str(reply_bytes)]
    return Child(name, cmd, log_dir / f"{name}.log")


def probe(url: str, subject: str, within_s: float = 20.0, model: str = MODEL) -> int:
    """Return the size of the first correct echo reply on ``subject``; raise RuntimeError after ``within_s``."""
    return asyncio.run(_probe(url, subject, within_s, model))


async def _probe(url: str, subject: str, within_s: float, model: str) -> int:
    import msgspec
    import nats
    import nats.errors

    nc = await nats.connect(url, name="bench-probe", **CONNECT)
    last = "no attempt"
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            try:
                reply = await nc.request(subject, payload(model), timeout=1.0)
                if reply.headers and ERROR_HEADER in reply.headers:
                    last = f"error reply {reply.headers}: {reply.data[:200]!r}"
                elif msgspec.json.decode(reply.data).get("text") == CONTENT:
                    return len(reply.data)
                else:
                    last = f"unexpected reply {reply.data[:200]!r}"
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    raise RuntimeError(f"no correct reply on {subject} within {within_s:.0f}s (last: {last})")
