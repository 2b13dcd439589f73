"""Start-up imports only what a command needs: each command runs in a fresh interpreter, which then
reports the modules it loaded (``sys.modules``). No wall-time assertions: the machine is noisy,
and what a command imports is what its start-up costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

import trio

from llmsrv import __version__

from .conftest import running

# Runs one command the way the ``llmsrv`` script does, then prints the loaded modules as the last line.
PROBE = """
import sys
from llmsrv.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
modules = sorted(sys.modules)
import json
print(json.dumps({"code": code, "modules": modules}))
"""
# What no command but ``serve`` needs: the server side and its libraries.
SERVER_SIDE = {"prometheus_client", "purgatory", "limits", "redis",
               "llmsrv.service", "llmsrv.pipeline", "llmsrv.router", "llmsrv.ops", "llmsrv.resilience",
               "llmsrv.workers", "llmsrv.streaming", "llmsrv.natsserver"}
# What argument parsing alone must not pull in.
HTTP = {"httpx", "httpx_sse", "httpcore", "httpx2", "httpcore2"}
HEAVY = SERVER_SIDE | HTTP | {"trio", "trio_asyncio", "asyncio", "nats", "msgspec",
                              "llmsrv.bus", "llmsrv.client", "llmsrv.config", "llmsrv.providers"}


def _loaded(modules: Sequence[str], names: set[str]) -> list[str]:
    """The ``names`` that are among ``modules``, a package counting as loaded with any submodule."""
    return sorted(m for m in modules if m in names or any(m.startswith(f"{n}.") for n in names))


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[object, list[str], str]:
    """(exit code, loaded modules, output) of ``llmsrv <args>`` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LLMSRV_CONFIG": "", **(env or {})})
    *output, last = proc.stdout.splitlines() or [""]
    assert last.startswith("{"), proc.stdout + proc.stderr
    report = json.loads(last)
    return report["code"], report["modules"], "\n".join(output)


def test_importing_the_cli_loads_nothing_heavy() -> None:
    proc = subprocess.run([sys.executable, "-c", "import sys, llmsrv.cli; print(' '.join(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=60, check=True)
    modules = proc.stdout.split()
    assert "llmsrv.cli" in modules
    assert not _loaded(modules, HEAVY)


def test_version_and_help_load_nothing_heavy() -> None:
    code, modules, output = _run("--version")
    assert code == 0 and output == f"llmsrv {__version__}"
    assert [m for m in modules if m.startswith("llmsrv")] == ["llmsrv", "llmsrv.cli"]
    assert not _loaded(modules, HEAVY)
    code, modules, output = _run("--help")
    assert code == 0 and "usage: llmsrv" in output
    assert not _loaded(modules, HEAVY)


def test_check_loads_no_nats_and_no_server_side() -> None:
    code, modules, output = _run("check")
    assert code == 0 and output.startswith("config: ok")
    assert "llmsrv.providers.registry" in modules  # it did build the providers
    assert not _loaded(modules, SERVER_SIDE | {"nats", "trio_asyncio", "llmsrv.bus", "llmsrv.client"})


async def test_ask_loads_the_client_path_only(nats_url: str) -> None:
    async with running(nats_url) as h:
        env = {"LLMSRV__NATS__SUBJECT_PREFIX": h.prefix}
        code, modules, output = await trio.to_thread.run_sync(
            lambda: _run("ask", "--nats-url", nats_url, "--model", "mock:echo", "hi there", env=env))
    assert code == 0 and output == "hi there"
    assert {"llmsrv.client", "llmsrv.bus", "nats"} <= set(modules)  # it did go over NATS
    assert not _loaded(modules, SERVER_SIDE | HTTP | {"llmsrv.providers"})
