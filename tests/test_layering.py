"""The package's layout holds: pure modules do no I/O, each foreign library stays behind its one edge,
no import cycle, no class over 300 lines, every module says in its first sentence what it owns."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).parent.parent / "llmsrv"
IO_LIBRARIES = {"trio", "trio_asyncio", "asyncio", "anyio", "outcome", "httpx", "httpx_sse", "httpcore", "httpx2",
                "httpcore2", "h11", "nats", "redis", "socket", "subprocess", "hypercorn"}
# decisions and wire shapes only: a request description in, events folded out; no I/O, no clock
PURE = ["errors", "messages", "config", "routing", "redact", "admission", "worker_wire", "providers",
        "providers.codecs", "providers.codecs.anthropic", "providers.codecs.gemini", "providers.codecs.openai_chat",
        "providers.codecs.openai_responses", "providers.codecs.stream_json", "providers.codecs.cli_dialects",
        "openai_wire"]
# each foreign library and the one module allowed to import it
EDGES = {"httpx2": {"providers.http"}, "httpcore2": {"providers.http", "providers.pool"}, "httpx": set(),
         "httpx_sse": set(), "httpcore": set(), "nats": {"bus"}, "trio_asyncio": {"bus"},
         "asyncio": {"bus"}, "redis": {"resilience.fleet"}, "h11": set(), "hypercorn": {"httpapi"},
         "prometheus_client": {"ops"},
         "purgatory": {"resilience.breaker"}, "limits": {"resilience.limiter"}}
MAX_CLASS_LINES = 300


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(foreign top-level packages, llmsrv modules) that module ``name`` imports anywhere in its text
    (``TYPE_CHECKING`` blocks and function bodies included)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    foreign: set[str] = set()
    local: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, _, rest = alias.name.partition(".")
                if top == "llmsrv":
                    local.add(rest)
                else:
                    foreign.add(top)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            if node.level == 0:
                top, _, rest = (node.module or "").partition(".")
                if top != "llmsrv":
                    foreign.add(top)
                    continue
                base = rest.split(".") if rest else []
            else:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            for alias in node.names:  # `from . import errors` imports the module llmsrv.errors
                candidate = ".".join([*base, alias.name])
                local.add(candidate if candidate in MODULES else ".".join(base))
    local.discard(name)
    return foreign, local


def test_the_listed_modules_exist() -> None:
    listed = set(PURE) | {m for users in EDGES.values() for m in users}
    assert listed <= set(MODULES), sorted(listed - set(MODULES))


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_no_io(module: str) -> None:
    foreign, local = _imports(module)
    assert not foreign & IO_LIBRARIES, f"{module} imports {sorted(foreign & IO_LIBRARIES)}"
    assert local <= set(PURE), f"{module} imports the impure {sorted(local - set(PURE))}"


@pytest.mark.parametrize("library", sorted(EDGES))
def test_each_library_has_one_edge(library: str) -> None:
    users = {name for name in MODULES if library in _imports(name)[0]}
    assert users <= EDGES[library], f"{library} imported by {sorted(users - EDGES[library])}"


def test_no_import_cycle() -> None:
    graph = {name: _imports(name)[1] & set(MODULES) for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in MODULES:
        visit(name, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_classes_stay_small(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    big = {node.name: (node.end_lineno or node.lineno) - node.lineno + 1 for node in ast.walk(tree)
           if isinstance(node, ast.ClassDef) and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_CLASS_LINES}
    assert not big, f"classes over {MAX_CLASS_LINES} lines in {module}: {big}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_says_what_it_owns(module: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[module].read_text()))
    assert doc and doc.split("\n")[0].strip(), f"{module} has no opening sentence"
