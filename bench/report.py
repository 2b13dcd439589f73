"""What people see: progress bars while a scenario runs, then ``<out>/<scenario>.json``, ``.md`` and PNGs.

The JSON holds the run's context (date, command, git commit and uncommitted llmsrv files, machine,
options) next to the scenario's ``figures``, ``series`` and ``problems``; the Markdown is the
scenario's summary with the same context in one line, and is printed too. The PNGs (``bench/plots.py``)
carry the commit and date under their titles; a plot that cannot be drawn never fails the run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from bench import plots
from bench.scenario import Options, Result

ROOT = Path(__file__).resolve().parent.parent


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...
    def set_postfix_str(self, s: str) -> object: ...


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


@contextmanager
def progress(opts: Options, total: int, desc: str) -> Iterator[Progress]:
    """A tqdm bar on stderr (``update()`` per finished step), or nothing with ``--no-progress``/smoke."""
    if not opts.progress or opts.smoke:
        yield _Silent()
        return
    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra is not installed: run without a bar
        yield _Silent()
        return
    with tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar


def git_state() -> dict[str, Any]:
    """The commit measured and any uncommitted changes under llmsrv/ (they are measured too)."""
    def git(*cmd: str) -> str:
        try:
            done = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.rstrip() if done.returncode == 0 else ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": git("status", "--porcelain", "--", "llmsrv").splitlines()}


def context(opts: Options, started: dt.datetime) -> dict[str, Any]:
    return {
        "date": started.isoformat(timespec="seconds"),
        "elapsed_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
        "command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
        "git": git_state(),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(opts).items()},
    }


def to_json(result: Result, ctx: dict[str, Any]) -> str:
    return json.dumps({"scenario": result.scenario, **ctx, "figures": result.figures,
                       "series": {k: [list(p) for p in v] for k, v in result.series.items()},
                       "problems": result.problems}, indent=2) + "\n"


def to_markdown(result: Result, ctx: dict[str, Any]) -> str:
    head = (f"## {result.scenario}\n\n`{ctx['command']}` on {ctx['date']}, commit `{ctx['git']['commit']}`"
            f"{' (llmsrv/ modified)' if ctx['git']['dirty'] else ''}, {ctx['machine']['cpus']} CPUs, "
            f"Python {ctx['machine']['python']}, {ctx['elapsed_s']} s\n\n")
    tail = "".join(f"- {p}\n" for p in result.problems)
    return head + result.summary_md.rstrip() + "\n" + (f"\n**Problems**\n\n{tail}" if tail else "")


def write(result: Result, opts: Options, started: dt.datetime) -> tuple[Path, Path]:
    """Write ``<out>/<scenario>.json``, ``.md`` and (unless ``--no-plots``) the PNGs, print the Markdown;
    return the JSON and Markdown paths."""
    ctx = context(opts, started)
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{result.scenario}.json", out / f"{result.scenario}.md"
    json_path.write_text(to_json(result, ctx))
    md = to_markdown(result, ctx)
    md_path.write_text(md)
    print(md)
    pngs = write_plots(result, out, ctx) if opts.plots else []
    print("results: " + ", ".join(map(str, [json_path, md_path, *pngs])))
    return json_path, md_path


def write_plots(result: Result, out: Path, ctx: dict[str, Any]) -> list[Path]:
    """The PNGs, or none and one line saying why: plotting never fails a run."""
    git = ctx["git"]
    note = (f"commit {git['commit'] or 'unknown'}{' + llmsrv/ changes' if git['dirty'] else ''}, {ctx['date']}"
            f"{', smoke run' if ctx['options']['smoke'] else ''}")
    try:
        return plots.write(result, out, note)
    except ImportError:
        print("no plots: matplotlib is not installed (pip install -e '.[plot]')")
    except Exception as exc:  # a bad plot must not cost the run its results
        print(f"no plots: {type(exc).__name__}: {exc}")
    return []


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats get a sensible number of digits."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
        return f"{v:,}" if isinstance(v, int) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
