"""The style rules of STYLE.md, enforced: ruff (with ASYNC, B, UP) and mypy --strict."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_ruff() -> None:
    proc = _run("ruff", "check", "llmsrv", "tests", "bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict() -> None:
    proc = _run("mypy", "llmsrv")
    assert proc.returncode == 0, proc.stdout + proc.stderr
