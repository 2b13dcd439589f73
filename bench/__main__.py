"""``python -m bench``: run one scenario, write ``<out>/<scenario>.json``, ``.md`` and PNG plots, print the Markdown.

    python -m bench --list
    python -m bench SCENARIO [--smoke] [--rounds N] [--duration S] [--warmup S] [--nats-url URL]
                             [--out DIR] [--no-progress] [--peers] [--no-plots] [--base-tree DIR]

Exits 1 only if something failed to run (a process did not start, answer, survive or stop; the
generator failed), never because of the numbers; problems the scenario measured are in its results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import sys
import traceback
from pathlib import Path

from bench.report import write
from bench.scenario import Options
from bench.scenarios import SCENARIOS


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", nargs="?", help="one of --list")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--smoke", action="store_true", help="seconds, not minutes (what the tests run)")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"interleaved repetitions (default {d.rounds})")
    p.add_argument("--duration", type=float, default=d.duration_s, help=f"measured s per point ({d.duration_s})")
    p.add_argument("--warmup", type=float, default=d.warmup_s, help=f"unmeasured s before each point ({d.warmup_s})")
    p.add_argument("--nats-url", help="load a running deployment instead of starting our own")
    p.add_argument("--out", type=Path, default=d.out_dir, help=f"results directory (default {d.out_dir})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--peers", action="store_true",
                   help="peers: install LiteLLM into bench/.peers-venv if it is not there (a download)")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots (they need the plot extra: matplotlib)")
    p.add_argument("--base-tree", type=Path, help="overhead, latency, observability: also load llmsrv from this "
                   "checkout (e.g. `git worktree add /tmp/base HEAD~3`), as target llmsrv@base in the same rounds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.list or not args.scenario:
        width = max(map(len, SCENARIOS))
        for name, mod in SCENARIOS.items():
            print(f"{name:<{width}}  {mod.SUMMARY}")
        return 0 if args.list else 2
    mod = SCENARIOS.get(args.scenario)
    if mod is None:
        print(f"unknown scenario {args.scenario!r}; --list shows them", file=sys.stderr)
        return 2
    opts = Options(smoke=args.smoke, rounds=args.rounds, duration_s=args.duration, warmup_s=args.warmup,
                   nats_url=args.nats_url, out_dir=args.out, progress=not args.no_progress, peers=args.peers,
                   plots=not args.no_plots, base_tree=args.base_tree)
    started = dt.datetime.now(dt.UTC)
    # SIGTERM (and a SIGINT a parent shell set to "ignore") unwinds like Ctrl-C, so every child is stopped
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            result = mod.run(opts)
        except BaseExceptionGroup as group:  # trio nurseries wrap a Ctrl-C too
            interrupt, _ = group.split(KeyboardInterrupt)
            if interrupt is None:
                raise
            raise KeyboardInterrupt from group
    except KeyboardInterrupt:
        print("interrupted: every process this run started has been stopped", file=sys.stderr)
        return 130
    except Exception:  # a failure to run, not a measurement: say what and exit 1
        traceback.print_exc()
        return 1
    write(result, opts, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
