"""What every bench smoke test checks besides its own figures: no child process is left running."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def children() -> list[int]:
    """Live (not zombie) child processes of this test process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    before = set(children())
    yield
    assert set(children()) <= before, "a scenario left a child process running"
