"""A hung test ends the run within pytest's ``timeout``, its trio tasks printed (tests/hangs.py): run for real,
a pytest in a subprocess on a test that waits forever inside an ``async with``."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

HUNG = textwrap.dedent("""
    import asyncio
    import contextlib
    import logging
    import socket
    import trio
    import trio_asyncio

    @contextlib.asynccontextmanager
    async def holding():
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep_forever()  # a teardown that never ends, as a hang looks

    async def test_waits_forever():
        logging.getLogger("hung").warning("about to hang")
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        peer = server.accept()[0]
        peer.sendall(b"PONG\\r\\n")  # 6 bytes the client never reads
        async with trio_asyncio.open_loop() as loop:
            loop.create_task(asyncio.sleep(3600), name="aio-sleeper")  # nats-py's side of a hang
            async with holding():
                pass
""")


def test_a_hung_test_ends_the_run_with_its_trio_tasks(tmp_path: Path) -> None:
    (tmp_path / "test_hung.py").write_text(HUNG)
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_timeout_set_timer, "
                                          "pytest_timeout_cancel_timer  # noqa: F401\n")
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "trio", "-o", "trio_mode=true",
                          "--timeout", "4", "-o", "timeout_method=thread", "--rootdir", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=root)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "Timeout" in out, out  # pytest-timeout's own report
    assert "==== trio tasks, the test's timeout near ====" in out, out
    dump = out[out.index("==== trio tasks"):]
    assert "task <test 'test_waits_forever'>" in dump, dump  # the test's task, waiting in its `async with` exit
    line = next(i for i, text in enumerate(HUNG.splitlines(), 1) if "sleep_forever" in text)
    assert "async generator holding\n" in dump and f"test_hung.py:{line} holding" in dump, dump  # and where
    assert "WARNING hung: about to hang" in dump, dump
    assert "trio epoll registrations:\n    fd " in dump and "read <TrioToken.run_sync_soon task>" in dump, dump
    assert re.search(r"fd \d+: \d+ -> \d+ state 01, send/unread 00000000:00000006", dump), dump  # the client's
    assert "asyncio task aio-sleeper sleep" in dump and "trio-asyncio loop: closed False, running True" in dump, dump
