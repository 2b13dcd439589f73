"""llmsrv vs a bare asyncio echo responder: request/reply throughput and latency over NATS.

    python bench/run_bench.py [--duration S] [--warmup S] [--concurrency 1,10,100] [--rounds N]
                              [--base-tree DIR]

``--base-tree DIR`` adds the target ``llmsrv-base``: the llmsrv of another checkout (e.g. ``git
worktree add /tmp/base <commit>``), measured in the same rounds, for before/after ratios.

One nats-server for the whole run. Each round starts the echo responder, measures every
concurrency with the load generator, stops it; then does the same with ``python -m llmsrv serve``.
Every component is its own process. Prints a table of medians over rounds, writes
``bench/results/latest.json`` and per-process logs to ``bench/results/logs/``. Exits non-zero only
if something failed to run (a process did not start, died, did not stop, or the load generator
failed), never because of the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import loadgen

from llmsrv.natsserver import NatsServer, find_binary

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs"
TARGETS = ("echo", "llmsrv", "llmsrv-bare")
# llmsrv-bare: the same server with the resilience layer off (no breaker, limits, bulkhead, retries)
TARGET_ENV = {"llmsrv-bare": {"LLMSRV__ROUTING__RESILIENCE": "false"}}
BASE_TREE: Path | None = None  # --base-tree: where llmsrv-base runs from
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0


def targets() -> tuple[str, ...]:
    return TARGETS + (("llmsrv-base",) if BASE_TREE else ())


def target_command(target: str, url: str) -> list[str]:
    if target == "echo":
        return [sys.executable, str(BENCH / "echo_responder.py"), "--nats-url", url]
    return [sys.executable, "-m", "llmsrv", "serve", "--nats-url", url]


def target_env(target: str) -> dict[str, str]:
    """The environment without inherited llmsrv settings, plus the benchmark's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSRV")}
    env.update({"LLMSRV__SERVER__HTTP_PORT": "0", "LLMSRV__SERVER__LOG_LEVEL": "warning",
                "PYTHONUNBUFFERED": "1", **TARGET_ENV.get(target, {})})
    return env


@dataclasses.dataclass(frozen=True)
class Point:
    """One measurement: the load generator's result and the server's CPU time per request."""

    load: loadgen.LoadResult
    cpu_us_per_req: float | None  # user+system CPU of the server process / replies; None off Linux


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Target:
    """One server under test as a child process, its stdout and stderr in a log file."""

    def __init__(self, name: str, url: str, log_path: Path) -> None:
        self.name, self.url, self.log_path = name, url, log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(target_command(name, url), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=target_env(name),
                                     cwd=BASE_TREE if name == "llmsrv-base" else BENCH.parent)

    def wait_ready(self) -> None:
        """Wait for the ready line, then for a correct answer to a real request."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while b": ready on" not in self.log_path.read_bytes():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no ready line within {READY_TIMEOUT_S}s")
            time.sleep(0.05)
        asyncio.run(loadgen.probe(self.url, within_s=max(1.0, deadline - time.monotonic())))

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM and wait; raise if it had died already or does not stop in time."""
        try:
            self.check_alive()
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"{self.name} did not stop within {STOP_TIMEOUT_S}s of SIGTERM; "
                                   "killed") from None
            if code != 0:
                raise RuntimeError(f"{self.name} exited with {code} after SIGTERM; see {self.log_path}")
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


def run_target(name: str, url: str, rnd: int, concurrencies: list[int], args: argparse.Namespace,
               problems: list[str]) -> dict[int, Point]:
    results: dict[int, Point] = {}
    target = Target(name, url, LOGS / f"{name}-round{rnd}.log")
    failed = False
    try:
        target.wait_ready()
        for c in concurrencies:
            cpu_before = cpu_seconds(target.proc.pid)
            r = loadgen.measure(url, c, args.duration, args.warmup, args.timeout)
            cpu_after = cpu_seconds(target.proc.pid)
            target.check_alive()
            cpu = None
            if cpu_before is not None and cpu_after is not None and r.replies:
                cpu = (cpu_after - cpu_before) * 1e6 / r.replies
            results[c] = Point(r, cpu)
            print(f"  round {rnd} {name:6} c={c:<4} {r.rps:7.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
                  f"p99 {r.p99_ms:6.2f} ms  p99.9 {r.p999_ms:6.2f} ms  errors {r.error_total}  "
                  f"cpu {cpu or -1:4.0f} us/req", flush=True)
    except Exception as exc:  # recorded and reported; the other targets and rounds still run
        failed = True
        problems.append(f"round {rnd} {name}: {exc}")
        print(f"  round {rnd} {name}: FAILED: {exc}", flush=True)
    finally:
        try:
            target.stop()
        except RuntimeError as exc:
            if not failed:  # after a failure the process is gone or killed: already reported
                problems.append(f"round {rnd} {name}: {exc}")
                print(f"  round {rnd} {name}: {exc}", flush=True)
    return results


def summarise(runs: dict[str, list[dict[int, Point]]],
              concurrencies: list[int]) -> dict[str, dict[str, dict[str, float | int]]]:
    """Per concurrency and target: medians over rounds of rps/p50/p99/p99.9/CPU; errors summed."""
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for c in concurrencies:
        row: dict[str, dict[str, float | int]] = {}
        for name in targets():
            points = [r[c] for r in runs[name] if c in r]
            if not points:
                continue
            got = [pt.load for pt in points]
            cpus = [pt.cpu_us_per_req for pt in points if pt.cpu_us_per_req is not None]
            row[name] = {"rounds": len(got), "ok": sum(r.ok for r in got),
                         "errors": sum(r.error_total for r in got),
                         **{f: statistics.median(getattr(r, f) for r in got)
                            for f in ("rps", "p50_ms", "p99_ms", "p999_ms")},
                         "cpu_us_per_req": statistics.median(cpus) if cpus else -1.0}
        keys = {"rps": "rps", "p99": "p99_ms", "cpu": "cpu_us_per_req"}
        for name, base in (("llmsrv", "echo"), ("llmsrv-bare", "echo"), ("llmsrv-base", "echo"),
                           ("llmsrv", "llmsrv-bare"), ("llmsrv", "llmsrv-base")):
            if name in row and base in row and all(row[base][k] > 0 for k in keys.values()):
                row[f"{name}/{base}"] = {n: row[name][k] / row[base][k] for n, k in keys.items()}
        out[str(c)] = row
    return out


def table(summary: dict[str, dict[str, dict[str, float | int]]]) -> str:
    head = (f"{'conc':>5} {'target':<11} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8}"
            f" {'errors':>6}"
            f" {'cpu us/req':>10} | ratio vs echo: {'req/s':>5} {'p99':>5} {'cpu':>5}")
    lines = [head, "-" * len(head)]
    for c, row in summary.items():
        for name in targets():
            s = row.get(name)
            if s is None:
                lines.append(f"{c:>5} {name:<7} {'(failed)':>7}")
                continue
            ratio = row.get(f"{name}/echo")
            tail = " |"
            if ratio:
                tail += f" {'':14} {ratio['rps']:4.2f}x {ratio['p99']:4.2f}x {ratio['cpu']:4.2f}x"
            lines.append(f"{c:>5} {name:<11} {s['rps']:>7.0f} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} "
                         f"{s['p999_ms']:>8.2f} {s['errors']:>6} {s['cpu_us_per_req']:>10.0f}{tail}")
        before = row.get("llmsrv/llmsrv-base")
        if before:
            lines.append(f"{c:>5} this tree vs --base-tree: req/s {before['rps']:4.2f}x, p99 {before['p99']:4.2f}x, "
                         f"cpu/req {before['cpu']:4.2f}x")
        layer = row.get("llmsrv/llmsrv-bare")
        if layer:
            lines.append(f"{c:>5} resilience layer on/off: req/s {layer['rps']:4.2f}x, p99 {layer['p99']:4.2f}x, "
                         f"cpu/req {layer['cpu']:4.2f}x")
    return "\n".join(lines)


def git_state() -> dict[str, object]:
    """The commit measured and any uncommitted changes under llmsrv/ (they are measured too)."""
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=BENCH.parent)
        return done.stdout.rstrip() if done.returncode == 0 else ""
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": git("status", "--porcelain", "--", "llmsrv").splitlines()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per point (default 8)")
    p.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds per point (default 1.5)")
    p.add_argument("--concurrency", default="1,10,100", help="comma-separated (default 1,10,100)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds (default 10)")
    p.add_argument("--base-tree", type=Path, help="another checkout to measure as llmsrv-base")
    args = p.parse_args()
    global BASE_TREE
    BASE_TREE = args.base_tree
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    LOGS.mkdir(parents=True, exist_ok=True)
    command = ("python bench/run_bench.py " + shlex.join(sys.argv[1:])).strip()
    started = dt.datetime.now(dt.UTC)
    runs: dict[str, list[dict[int, Point]]] = {name: [] for name in targets()}
    problems: list[str] = []

    with NatsServer() as nats_server:
        print(f"nats-server on {nats_server.url}; {args.rounds} round(s) x {concurrencies} x "
              f"({args.warmup}s warm-up + {args.duration}s)", flush=True)
        for rnd in range(1, args.rounds + 1):
            for name in targets():
                runs[name].append(run_target(name, nats_server.url, rnd, concurrencies, args, problems))

    summary = summarise(runs, concurrencies)
    nats_version = subprocess.run([find_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    report = {
        "date": started.isoformat(timespec="seconds"), "command": command,
        "elapsed_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
                     "concurrency": concurrencies, "timeout_s": args.timeout,
                     "request_bytes": len(loadgen.PAYLOAD)},
        "git": git_state(),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "nats_server": nats_version},
        "summary": summary,
        "rounds": {name: [{str(c): {**dataclasses.asdict(pt.load), "cpu_us_per_req": pt.cpu_us_per_req}
                           for c, pt in rnd.items()} for rnd in runs[name]]
                   for name in targets()},
        "problems": problems,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{command}   ({report['date']}, {report['elapsed_s']} s; medians over {args.rounds} round(s), "
          f"errors summed)\n")
    print(table(summary))
    print(f"\nresults: {RESULTS / 'latest.json'}")
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
