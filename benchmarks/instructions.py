"""
Instructions (and cache misses) per operation of each server, counted by callgrind.

    .venv/bin/python benchmarks/instructions.py [--servers pop3d,twisted,floor]
        [--only login-storm,retr-1] [--sessions 1000] [--messages 500] [--cache]
        [--json out.json] [--pop3d-args "..."] [--python-malloc malloc] [--keep]

CPU time on a shared machine swings by a third or more from one run to the
next, so a change that saves 5% cannot be seen in benchmarks/run.py's rates.
Valgrind's callgrind counts the instructions a process executes, nearly the
same count on every run: this tool compares servers, or two versions of
pop3d, by that count per operation.  See benchmarks/README.rst ("Counting
instructions") for when to use it and what it does not see.

Each server is made exactly as run.py makes it (``run.make_server``: the
same test maildrops from ``run.build_dataset``, the same commands from
servers.py, the same readiness test, its log saying it listens), except that
its Python interpreter runs under ``valgrind --tool=callgrind
--instr-atstart=no --trace-children=yes``: nothing is counted while Python
starts, imports and the clients warm up.  The workload is driven by run.py's
load generator (benchmarks/loadgen.py: every reply checked, every RETR byte
compared):

``login-storm``
    run.py's storm clients (each its own maildrop of 20 messages, 50 at a
    time), each doing connect, USER, PASS, STAT, QUIT; after one warm-up
    session per client, ``--sessions`` sessions (default 1,000) are
    counted: per session.
``retr-1``
    one client logged in to run.py's 2,000-message retr-1 maildrop RETRs
    20 messages to warm up, then ``--messages`` more (default 500), one at
    a time: per message (login and QUIT are not counted).

Once every client is parked after the warm-up and the server has used no
CPU for a second (what it does after the last reply, closing connections
and logging them, belongs to the warm-up), instrumentation is switched on
in every process of the server (``vgdb --pid=PID instrumentation on``,
which is what ``callgrind_control -i on PID`` runs); after the counted
operations, once the server is idle again, it is switched off and the
counters are dumped (``vgdb --pid=PID dump``).  The server is stopped and
the totals of every callgrind file of every process are summed, so that
``pop3d-auto`` (a parent and one worker per core, started by spawnProcess:
hence ``--trace-children=yes``) and ``floor`` (forked workers) count their
workers.  vgdb is called with the server's own process IDs only:
``callgrind_control`` given a PID it does not know applies the command to
every callgrind process on the machine, another developer's too.

``--cache`` adds ``--cache-sim=yes --branch-sim=yes``: simulated L1
instruction and data cache misses and conditional and indirect branch
mispredictions (callgrind's model of a generic CPU, not this machine's
caches and predictors), at about twice the run time.

Python's allocator: the servers run with pymalloc, Python's default and
what production runs.  ``--python-malloc malloc`` sets PYTHONMALLOC=malloc
for them, as the prototype of this tool did: measured (login-storm, 500
sessions, twice each), that adds 5-7% to every count (glibc's malloc
executes more instructions than pymalloc) and makes the counts no more
repeatable; only memcheck needs it, to see inside pymalloc's arenas.

Not supported: ``dovecot``.  Dovecot forks a pop3 process per session,
which under ``--instr-atstart=no`` starts with instrumentation off (it
would count nothing, and its start-up is much of what a Dovecot session
costs), and runs it as ``nobody``, which cannot write the callgrind files of
a root-owned run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import run
import servers
from loadgen import LINE, PARK, RETR, LoadGenerator, ParkingLot, Script, SessionError, expect_ok
from maildrops import Maildrop
from servers import Server

#: The servers callgrind can count (run.py's, but Dovecot: see the docstring).
UNSUPPORTED = {
    "dovecot": (
        "Dovecot forks a pop3 process per session, which starts with callgrind's "
        "instrumentation off, and runs it as another user: not supported "
        "(see benchmarks/README.rst, 'Counting instructions')"
    ),
}
KINDS = tuple(kind for kind in run.SERVERS if kind not in UNSUPPORTED)
WORKLOADS = ("login-storm", "retr-1")
#: RETRs before counting starts (retr-1).
RETR_WARMUP = 20
#: (callgrind event, column title) shown per operation; the JSON has every event.
EVENTS = (("Ir", "instructions"),)
CACHE_EVENTS = (
    ("Ir", "instructions"),
    ("I1mr", "I1 misses"),
    ("D1mr", "D1 read misses"),
    ("D1mw", "D1 write misses"),
    ("Bcm", "cond. mispredicts"),
    ("Bim", "indirect mispredicts"),
)
_VGDB_PID = re.compile(r"^use --pid=(\d+) for ", re.MULTILINE)


@dataclass(frozen=True)
class Options:
    sessions: int
    messages: int
    cache: bool
    python_malloc: str
    #: Where each server's callgrind files go (a subdirectory per run).
    output: Path


@dataclass
class Count:
    """What callgrind counted over the measured operations of one server."""

    operations: int
    #: Event name -> total over every process of the server.
    events: dict[str, int] = field(default_factory=dict)
    #: Server processes whose counters were switched on and summed.
    processes: int = 0
    #: Wall time of the counted operations (slow under callgrind: not a rate).
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def per_operation(self) -> dict[str, float]:
        return {name: total / self.operations for name, total in self.events.items()}


# -- valgrind ------------------------------------------------------------------------


def valgrind_prefix(output: Path, cache: bool) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--trace-children=yes",
        *(["--cache-sim=yes", "--branch-sim=yes"] if cache else []),
        f"--callgrind-out-file={output}/callgrind.out.%p",
    ]


def under_valgrind(argv: list[str], prefix: list[str]) -> list[str]:
    """
    ``argv`` (a command of servers.py) with the Python interpreter run under
    ``prefix``; what comes before it (the open-files limit of servers.py's
    ``sh -c`` wrapper, which execs the rest) stays outside valgrind.
    """
    try:
        at = argv.index(sys.executable)
    except ValueError:
        raise RuntimeError(f"no {sys.executable} in the server's command: {argv}") from None
    return [*argv[:at], *prefix, *argv[at:]]


def callgrind_pids(server: Server) -> list[int]:
    """The server's processes that run under valgrind (vgdb lists them)."""
    listing = subprocess.run(["vgdb", "-l"], capture_output=True, text=True, check=False)
    under = {int(pid) for pid in _VGDB_PID.findall(listing.stdout)}
    # The server's process (valgrind replaced the sh -c wrapper) and its workers.
    pids = [pid for pid in servers._process_tree(server.pid) if pid in under]
    if server.pid not in pids:
        raise RuntimeError(f"{server.name}: process {server.pid} is not under valgrind")
    return pids


def vgdb(pids: list[int], *command: str) -> None:
    """A callgrind monitor command, sent to each process (woken up if it waits)."""
    for pid in pids:
        result = subprocess.run(
            ["vgdb", f"--pid={pid}", *command],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"vgdb --pid={pid} {' '.join(command)}: {result.stderr or result.stdout}"
            )


def wait_until_idle(server: Server, quiet: float = 1.0, timeout: float = 120.0) -> None:
    """
    Until the server's processes have used no CPU for ``quiet`` seconds:
    what it does after the last reply a client saw (closing connections,
    logging them, timers) belongs to the operations before, not after.
    """
    deadline = time.monotonic() + timeout
    last, since = server.sample().cpu, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)  # polling a measured state (CPU time), not waiting blindly
        now = server.sample().cpu
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise RuntimeError(f"{server.name} still busy after {timeout} s without clients")


def read_totals(output: Path) -> dict[str, int]:
    """Every event's total, summed over every callgrind file in ``output``."""
    totals: dict[str, int] = {}
    for path in sorted(output.glob("callgrind.out.*")):
        events: list[str] = []
        values: list[str] = []
        with open(path) as profile:
            for line in profile:
                if line.startswith("events:"):
                    events = line.split()[1:]
                elif line.startswith("totals:"):
                    # At the end; the "summary:" line at the top says 0 when
                    # instrumentation started off (callgrind 3.19).
                    values = line.split()[1:]
        for name, value in zip(events, values, strict=False):
            totals[name] = totals.get(name, 0) + int(value)
    return totals


# -- workloads -----------------------------------------------------------------------


Workload = Callable[[run.Dataset, str, Options, ParkingLot], tuple[list[tuple[str, Script]], int]]


def _session(drop: Maildrop, stat: bytes) -> Script:
    yield from run._login(drop)
    reply = yield (LINE, b"STAT\r\n")
    if reply != stat:
        raise SessionError(f"STAT: expected {stat!r}, got {reply!r}")
    yield from run._quit()


def login_storm(
    data: run.Dataset, speaks_as: str, options: Options, lot: ParkingLot
) -> tuple[list[tuple[str, Script]], int]:
    """run.py's storm clients: one warm-up session each, then ``sessions`` in all."""
    left = [options.sessions]

    def script(drop: Maildrop) -> Script:
        stat = b"+OK %d %d" % (drop.count, sum(drop.sizes(speaks_as)))
        yield from _session(drop, stat)
        yield (PARK, lot)
        while left[0] > 0:
            left[0] -= 1
            yield from _session(drop, stat)
        yield (PARK, lot)

    return [(drop.user, script(drop)) for drop in data.storm], options.sessions


def retr_one(
    data: run.Dataset, speaks_as: str, options: Options, lot: ParkingLot
) -> tuple[list[tuple[str, Script]], int]:
    """run.py's retr-1 client: RETR_WARMUP messages, then ``messages`` more."""
    drop, bodies = data.retr[0], data.retr_bodies

    def retr(index: int) -> Script:
        index %= len(bodies)
        expect_ok((yield (RETR, run.command("RETR", index + 1), bodies[index])), "RETR")

    def script() -> Script:
        yield from run._login(drop)
        for index in range(RETR_WARMUP):
            yield from retr(index)
        yield (PARK, lot)
        for index in range(RETR_WARMUP, RETR_WARMUP + options.messages):
            yield from retr(index)
        yield (PARK, lot)
        yield from run._quit()

    return [(drop.user, script())], options.messages


WORKLOAD_RUNNERS: dict[str, Workload] = {"login-storm": login_storm, "retr-1": retr_one}
OPERATION = {
    "login-storm": "session (connect, USER, PASS, STAT, QUIT)",
    "retr-1": "RETR of a 20 KB message",
}


def count(kind: str, workload: str, data: run.Dataset, cfg: run.Config, options: Options) -> Count:
    """Start ``kind`` under callgrind, run ``workload``, return what was counted."""
    output = options.output / f"{workload}-{kind}"
    output.mkdir(parents=True)
    server = run.make_server(kind, data, cfg, workload)
    server.argv = under_valgrind(server.argv, valgrind_prefix(output, options.cache))
    lot = ParkingLot()
    scripts, operations = WORKLOAD_RUNNERS[workload](
        data, run.SPEAKS_AS.get(kind, kind), options, lot
    )
    result = Count(operations)
    server.start(timeout=900)
    try:
        lg = LoadGenerator(("127.0.0.1", server.port), step_timeout=300)
        deadline = time.monotonic() + 3600
        lg.start(scripts, max_active=cfg.storm_clients)
        lg.run(deadline)  # warmed up, parked
        if not lg.errors:
            pids = callgrind_pids(server)
            result.processes = len(pids)
            wait_until_idle(server)
            vgdb(pids, "instrumentation", "on")
            started = time.monotonic()
            lg.release(lot)
            lg.run(deadline)  # counted, parked again
            wait_until_idle(server)
            result.seconds = time.monotonic() - started
            vgdb(pids, "instrumentation", "off")
            vgdb(pids, "dump")
            lg.release(lot)
            lg.run(deadline)
        result.errors = lg.errors[:5]
        lg.close_all()
    finally:
        server.stop(timeout=300)
    problems = server.log_problems()
    if problems:
        result.errors += [f"server log: {line}" for line in problems[:5]]
    result.events = read_totals(output)
    if not result.errors and not result.events.get("Ir"):
        result.errors.append(f"no callgrind counts in {output}; log:\n{server.log_tail()}")
    return result


# -- report --------------------------------------------------------------------------


def _figure(value: float) -> str:
    return f"{value / 1000:,.1f}k" if value >= 10_000 else f"{value:,.1f}"


def render(workload: str, counts: dict[str, Count], options: Options) -> str:
    """One row per server: each event per operation, and its ratio to the first server."""
    events = CACHE_EVENTS if options.cache else EVENTS
    first = next((c for c in counts.values() if not c.errors), None)
    header = ["server", *(part for _, title in events for part in (title, "ratio"))]
    rows = [header]
    for kind, result in counts.items():
        if result.errors:
            rows.append([run.SERVER_TITLES[kind], "ERRORS (below)"])
            continue
        mine, cells = result.per_operation(), [run.SERVER_TITLES[kind]]
        for name, _ in events:
            theirs = first.per_operation().get(name) if first else None
            value = mine.get(name, 0.0)
            cells += [_figure(value), f"{value / theirs:.3f}x" if theirs else "-"]
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(header))]
    lines = [
        f"{workload}: per {OPERATION[workload]}, "
        f"{next(iter(counts.values())).operations} counted"
        + (f", {run.Config.storm_clients} clients at a time" if workload == "login-storm" else "")
    ]
    for row in rows:
        lines.append(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            ).rstrip()
        )
    for kind, result in counts.items():
        if result.processes > 1:
            lines.append(f"  ({run.SERVER_TITLES[kind]}: {result.processes} processes summed)")
    return "\n".join(lines)


def valgrind_version() -> str:
    result = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument(
        "--servers",
        default="pop3d,twisted",
        help=f"comma-separated, of: {', '.join(KINDS)}; ratios are to the first "
        "(default: pop3d,twisted)",
    )
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help=f"comma-separated, of: {', '.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--sessions", type=int, default=1000, help="login-storm sessions counted (default 1000)"
    )
    parser.add_argument(
        "--messages", type=int, default=500, help="retr-1 RETRs counted (default 500)"
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="also simulate caches and branch prediction (--cache-sim=yes --branch-sim=yes)",
    )
    parser.add_argument(
        "--python-malloc",
        choices=("pymalloc", "malloc"),
        default="pymalloc",
        help="Python's allocator in the servers (default pymalloc, Python's default)",
    )
    parser.add_argument("--json", type=Path, help="also write the counts as JSON here")
    parser.add_argument(
        "--pop3d-args", default="", help="more options for twistd pop3d, as one string"
    )
    parser.add_argument("--tmpdir", type=Path, help="where to build the test maildrops")
    parser.add_argument("--keep", action="store_true", help="keep maildrops, logs, callgrind files")
    options = parser.parse_args(argv)

    kinds = [s.strip() for s in options.servers.split(",") if s.strip()]
    for kind in kinds:
        if kind in UNSUPPORTED:
            parser.error(f"{kind}: {UNSUPPORTED[kind]}")
        if kind not in KINDS:
            parser.error(f"unknown server {kind!r}: of {', '.join(KINDS)}")
    workloads = [w.strip() for w in options.only.split(",") if w.strip()]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown or not workloads or not kinds:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}; of {', '.join(WORKLOADS)}")
    if options.sessions < 1 or options.messages < 1:
        parser.error("--sessions and --messages must be at least 1")
    if shutil.which("valgrind") is None or shutil.which("vgdb") is None:
        parser.error("valgrind (with vgdb) is not installed: apt-get install valgrind")

    cfg = run.Config.make(True, tuple(shlex.split(options.pop3d_args)), servers=tuple(kinds))
    if options.python_malloc == "malloc":
        os.environ["PYTHONMALLOC"] = "malloc"  # read by the servers, not by this process
    else:
        os.environ.pop("PYTHONMALLOC", None)
    signal.signal(signal.SIGTERM, _interrupt)
    servers.raise_fd_limit()
    machine = run.machine_info()
    print(f"machine: {run.describe_machine(machine)}, {valgrind_version()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="pop3d-icount-", dir=options.tmpdir))
    settings = Options(
        options.sessions, options.messages, options.cache, options.python_malloc, root / "callgrind"
    )
    results: dict[str, dict[str, Count]] = {}
    try:
        data = run.build_dataset(root, cfg, workloads)
        for workload in workloads:
            results[workload] = {}
            for kind in kinds:
                began = time.monotonic()
                result = count(kind, workload, data, cfg, settings)
                results[workload][kind] = result
                per = result.per_operation().get("Ir", 0.0)
                print(
                    f"{workload:<12} {run.SERVER_TITLES[kind]:<21} "
                    f"{_figure(per)} instructions per operation"
                    f"{'  ERRORS: ' + '; '.join(result.errors) if result.errors else ''}"
                    f" [{time.monotonic() - began:.0f} s]",
                    flush=True,
                )
    except KeyboardInterrupt:
        print("interrupted; stopping the servers", file=sys.stderr)
        return 130
    finally:
        run.end_run(root, options.keep)

    print()
    print(
        f"callgrind counts per operation ({'with' if options.cache else 'without'} cache and "
        f"branch simulation; Python allocator: {options.python_malloc}"
        + (f"; pop3d options: {shlex.join(cfg.pop3d_args)}" if cfg.pop3d_args else "")
        + ")"
    )
    for workload, counts in results.items():
        print()
        print(render(workload, counts, settings))
    if options.json:
        document: dict[str, Any] = {
            "machine": machine,
            "valgrind": valgrind_version(),
            "cache_simulation": options.cache,
            "python_malloc": options.python_malloc,
            "pop3d_args": list(cfg.pop3d_args),
            "results": {
                workload: {
                    kind: {
                        "operations": c.operations,
                        "processes": c.processes,
                        "seconds": round(c.seconds, 1),
                        "totals": c.events,
                        "per_operation": {k: round(v, 1) for k, v in c.per_operation().items()},
                        "errors": c.errors,
                    }
                    for kind, c in counts.items()
                }
                for workload, counts in results.items()
            },
        }
        options.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nJSON written to {options.json}")
    return 1 if any(c.errors for counts in results.values() for c in counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
