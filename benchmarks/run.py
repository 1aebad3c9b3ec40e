"""
pop3d, twisted.mail.pop3, Dovecot and the CPython+Twisted floor, side by side, in one run.

    .venv/bin/python benchmarks/run.py [--quick] [--json out.json]
    .venv/bin/python benchmarks/run.py --profile retr-1

Builds test maildrops in a temporary directory, starts each server fresh for
each workload (pop3d as ``twistd -n --pidfile= pop3d``, Twisted's server
through benchmarks/twisted_pop3_server.py, Dovecot as ``dovecot -F`` with a
configuration written by benchmarks/servers.py, the floor of CPython +
Twisted through benchmarks/floor_server.py), drives it with the load
generator of benchmarks/loadgen.py (which checks every byte it receives),
and prints a table (the servers, pop3d/twisted and pop3d/Dovecot, the
targets of issue #14, whether pop3d and the floor meet them), the CPU used
by the servers and by the load generator, and the machine.  See
benchmarks/README.rst.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import maildrops
import servers
from loadgen import (
    CLOSE,
    CONNECT,
    LINE,
    MULTI,
    PARK,
    RETR,
    WAIT,
    LoadGenerator,
    ParkingLot,
    Script,
    SessionError,
    cpu_seconds,
    expect_ok,
)
from maildrops import Maildrop
from servers import Server

from pop3d.stores.locations import MaildirLocation
from pop3d.tap import parse_counting_processes

SERVERS = ("pop3d", "pop3d-auto", "twisted", "dovecot", "floor")
SERVER_TITLES = {
    "pop3d": "pop3d",
    "pop3d-auto": "pop3d --workers auto",
    "twisted": "twisted.mail.pop3",
    "dovecot": "Dovecot 2.3",
    "floor": "CPython+Twisted floor",
}
#: The options each kind of pop3d runs with (after --pop3d-args).
POP3D_KINDS = {"pop3d": (), "pop3d-auto": ("--workers", "auto")}
#: Whose replies a server gives (sizes, UIDLs): every pop3d gives pop3d's,
#: and so does the floor (benchmarks/floor_server.py).
SPEAKS_AS = {"pop3d-auto": "pop3d", "floor": "pop3d"}
WORKLOADS = ("login-storm", "retr-1", "retr-8", "huge", "many", "idle")
MB = 1_000_000


# -- configuration -------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    quick: bool
    storm_clients: int = 50
    storm_messages: int = 20
    storm_seconds: float = 15.0
    warmup_seconds: float = 1.0
    retr_messages: int = 2000
    retr_size: int = 20 * 1024
    retr_clients: int = 8
    retr_seconds: float = 10.0
    huge_size: int = 200 * MB
    huge_repeats: int = 3
    many_messages: int = 100_000
    many_size: int = 3000
    #: Later logins to the 100k Maildir in each case (after RETR and QUIT,
    #: after deliveries); the median is reported.
    later_logins: int = 3
    #: Messages delivered before each later login of the second case.
    many_deliveries: int = 5
    idle_checkpoints: tuple[int, ...] = (2000, 10_000)
    #: More options for ``twistd pop3d`` (--pop3d-args).
    pop3d_args: tuple[str, ...] = ()
    #: Runs of each throughput workload per server; the median is kept.
    rounds: int = 3
    #: The servers to run (--servers; all of them by default).
    servers: tuple[str, ...] = SERVERS

    @classmethod
    def make(
        cls,
        quick: bool,
        pop3d_args: tuple[str, ...] = (),
        rounds: int | None = None,
        servers: tuple[str, ...] = SERVERS,
    ) -> Config:
        if not quick:
            return cls(quick=False, pop3d_args=pop3d_args, rounds=rounds or 3, servers=servers)
        return cls(
            quick=True,
            rounds=rounds or 1,
            pop3d_args=pop3d_args,
            servers=servers,
            storm_seconds=3.0,
            warmup_seconds=0.5,
            retr_seconds=3.0,
            huge_repeats=1,
            many_messages=10_000,
            idle_checkpoints=(2000,),
        )


# -- test data -------------------------------------------------------------------


@dataclass
class Dataset:
    root: Path
    mail: Path
    storm: list[Maildrop] = field(default_factory=list)
    retr: list[Maildrop] = field(default_factory=list)
    retr_bodies: list[bytes] = field(default_factory=list)
    huge: Maildrop | None = None
    huge_body: bytes = b""
    many: Maildrop | None = None
    #: A small maildrop whose logins are timed while "many" is read.
    many_probe: Maildrop | None = None
    #: The messages "many" is made of (message n is ``many_pool[n * 7 % 250]``).
    many_pool: list[bytes] = field(default_factory=list)
    #: Messages of "many" retrieved so far, over every server and round: each
    #: later login retrieves one never retrieved before, so its QUIT flags it.
    many_retrieved: int = 0
    idle: list[Maildrop] = field(default_factory=list)
    idle_warmup: Maildrop | None = None
    passwd: dict[str, Path] = field(default_factory=dict)
    #: Dovecot's index and control files (outside the Maildirs).
    dovecot_meta: Path | None = None

    def all_drops(self) -> Iterator[Maildrop]:
        yield from self.storm
        yield from self.retr
        yield from (
            d for d in (self.huge, self.many, self.many_probe, self.idle_warmup) if d is not None
        )
        yield from self.idle


def build_dataset(root: Path, cfg: Config, workloads: list[str]) -> Dataset:
    data = Dataset(root, root / "mail")
    data.mail.mkdir()
    started = time.monotonic()
    if "login-storm" in workloads:
        messages = [
            maildrops.mime_message(n, 2000 + (n * 997) % 10_000, seed=1)
            for n in range(cfg.storm_messages)
        ]
        first = maildrops.write_maildrop("storm00", data.mail / "storm00", messages)
        data.storm = [first] + [
            maildrops.link_maildrop(f"storm{k:02d}", data.mail / f"storm{k:02d}", first)
            for k in range(1, cfg.storm_clients)
        ]
    if "retr-1" in workloads or "retr-8" in workloads:
        messages = [maildrops.mime_message(n, cfg.retr_size) for n in range(cfg.retr_messages)]
        first = maildrops.write_maildrop("retr0", data.mail / "retr0", messages)
        data.retr_bodies = [maildrops.retr_bytes(m) for m in messages]
        del messages
        data.retr = [first] + [
            maildrops.link_maildrop(f"retr{k}", data.mail / f"retr{k}", first)
            for k in range(1, cfg.retr_clients)
        ]
    if "huge" in workloads:
        message = maildrops.huge_message(cfg.huge_size)
        data.huge = maildrops.write_maildrop("huge", data.mail / "huge", [message])
        data.huge_body = maildrops.retr_bytes(message)
        del message
    if "many" in workloads:
        pool = [maildrops.mime_message(n, cfg.many_size, seed=3) for n in range(250)]
        messages = [pool[(n * 7) % len(pool)] for n in range(cfg.many_messages)]
        data.many = maildrops.write_maildrop("many", data.mail / "many", messages)
        data.many_pool = pool
        data.many_probe = maildrops.write_maildrop("manyprobe", data.mail / "manyprobe", pool[:3])
    if "idle" in workloads:
        template = maildrops.write_maildrop(
            "idlewarm", data.mail / "idlewarm", [maildrops.mime_message(0, 3000, seed=5)]
        )
        data.idle_warmup = template
        data.idle = [
            maildrops.link_maildrop(f"idle{k:05d}", data.mail / f"idle{k:05d}", template)
            for k in range(max(cfg.idle_checkpoints))
        ]
    pop3d_passwd, twisted_passwd = maildrops.write_passwd_files(root, list(data.all_drops()))
    # Dovecot reads the same passwd-file as pop3d.
    data.passwd = {
        "pop3d": pop3d_passwd,
        "twisted": twisted_passwd,
        "dovecot": pop3d_passwd,
        "floor": pop3d_passwd,
    }
    if "dovecot" in cfg.servers:
        data.dovecot_meta = servers.prepare_for_dovecot(root, data.mail)
    os.sync()  # no write-back during the measurements
    print(f"test maildrops built in {time.monotonic() - started:.1f} s under {root}", flush=True)
    return data


def start_server(
    kind: str, data: Dataset, cfg: Config, label: str, profile: Path | None = None
) -> Server:
    server = make_server(kind, data, cfg, label, profile)
    server.start()
    return server


def make_server(
    kind: str, data: Dataset, cfg: Config, label: str, profile: Path | None = None
) -> Server:
    """
    The server of ``kind`` as start_server starts it, not started yet (so that
    benchmarks/instructions.py can run its ``argv`` under valgrind).
    """
    log = data.root / f"{label}-{kind}.log"
    if kind == "dovecot":
        assert data.dovecot_meta is not None
        port = servers.free_port()
        config = servers.write_dovecot_config(
            data.root, data.mail, data.dovecot_meta, data.passwd["dovecot"], port, label
        )
        server = Server(
            kind,
            servers.dovecot_command(config),
            log,
            data.root,
            port=port,
            ready=servers.DOVECOT_READY,
        )
    else:
        # --workers auto: one per core, as twistd pop3d counts them (and
        # the floor); the server is ready once every worker listens.
        workers = (os.cpu_count() or 1) if "auto" in POP3D_KINDS.get(kind, ()) else 0
        if kind in POP3D_KINDS:
            argv = servers.pop3d_command(
                data.mail, data.passwd["pop3d"], profile, cfg.pop3d_args + POP3D_KINDS[kind]
            )
        elif kind == "floor":
            workers = os.cpu_count() or 1
            argv = servers.floor_command(data.mail, data.passwd["floor"], workers)
        else:
            argv = servers.twisted_command(data.mail, data.passwd["twisted"])
        # pop3d of one process on 2+ cores starts a counting helper
        # (--counting-processes auto): the server is whole once it has.
        helper = (
            kind in POP3D_KINDS
            and not workers
            # pop3d's own rule for 'auto' (it inherits this process's cores).
            and parse_counting_processes("auto", one_process=True, store=MaildirLocation()) > 0
            and not any(a.startswith("--counting-processes") for a in cfg.pop3d_args)
        )
        also_ready = servers.COUNTING_READY if helper else None
        server = Server(kind, argv, log, data.root, workers=workers, also_ready=also_ready)
    return server


# -- measuring ---------------------------------------------------------------------


@dataclass
class Window:
    """Wall time and CPU time of the server and of the load generator."""

    wall: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    #: CPU time of the whole machine (all processes), to see other load.
    machine_cpu: float = 0.0
    #: How many server processes were summed (a pop3d with --workers: the
    #: parent and its workers; Dovecot: its master and what it forked).
    server_processes: int = 0

    def figures(self) -> dict[str, float]:
        wall = self.wall or 1e-9
        other = max(0.0, self.machine_cpu - self.server_cpu - self.client_cpu)
        return {
            "seconds": round(self.wall, 3),
            "server_cpu_s": round(self.server_cpu, 3),
            "server_cores": round(self.server_cpu / wall, 3),
            "client_cpu_s": round(self.client_cpu, 3),
            "client_cores": round(self.client_cpu / wall, 3),
            "other_cores": round(other / wall, 3),
            "server_processes": self.server_processes,
        }


def machine_cpu_seconds() -> float:
    """Busy CPU time of the whole machine so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is in user)
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class Meter:
    def __init__(self, server: Server) -> None:
        self.server = server
        self._start = (0.0, 0.0, 0.0, 0.0)

    def start(self) -> None:
        self._start = (
            time.monotonic(),
            self.server.sample().cpu,
            cpu_seconds(),
            machine_cpu_seconds(),
        )

    def stop(self) -> Window:
        wall, server_cpu, client_cpu, machine_cpu = self._start
        # Every process of the server: with --workers, the workers do the work.
        sample = self.server.sample()
        return Window(
            time.monotonic() - wall,
            sample.cpu - server_cpu,
            cpu_seconds() - client_cpu,
            machine_cpu_seconds() - machine_cpu,
            sample.processes,
        )


@dataclass
class Phases:
    """Shared by the scripts of a timed workload; the runner moves it along."""

    lot: ParkingLot = field(default_factory=ParkingLot)
    stop_at: float = 0.0
    finished: bool = False
    count: int = 0
    octets: int = 0


def run_timed(
    lg: LoadGenerator, server: Server, phases: Phases, durations: list[float], budget: float
) -> Window:
    """
    Scripts park in ``phases.lot`` when ready and after each phase; every
    phase runs until ``phases.stop_at``; the last phase is measured.
    """
    deadline = time.monotonic() + budget
    lg.run(deadline)  # connected, logged in, parked
    window = Window()
    meter = Meter(server)
    for duration in durations:
        if lg.errors:
            break
        phases.count = phases.octets = 0
        meter.start()
        phases.stop_at = time.monotonic() + duration
        lg.release(phases.lot)
        lg.run(deadline)
        window = meter.stop()
    phases.finished = True
    lg.release(phases.lot)
    lg.run(deadline)
    return window


def command(verb: str, argument: str | int = "") -> bytes:
    return f"{verb} {argument}".strip().encode() + b"\r\n"


def _login(drop: Maildrop) -> Script:
    """connect, greeting, USER, PASS (a sub-script: ``yield from``)."""
    expect_ok((yield (CONNECT,)), "greeting")
    expect_ok((yield (LINE, command("USER", drop.user))), "USER")
    expect_ok((yield (LINE, command("PASS", drop.password))), "PASS")


def _quit() -> Script:
    expect_ok((yield (LINE, b"QUIT\r\n")), "QUIT")
    yield (CLOSE,)


def _finish(result: dict[str, Any], lg: LoadGenerator) -> dict[str, Any]:
    if lg.errors:
        result["errors"] = lg.errors[:5] + (
            [f"... and {len(lg.errors) - 5} more"] if len(lg.errors) > 5 else []
        )
    lg.close_all()
    return result


# -- workloads -------------------------------------------------------------------------


def login_storm(server: Server, kind: str, data: Dataset, cfg: Config) -> dict[str, Any]:
    """50 clients, each: connect, USER, PASS, STAT, QUIT, again and again."""
    phases = Phases()

    def script(drop: Maildrop) -> Script:
        stat = b"+OK %d %d" % (drop.count, sum(drop.sizes(kind)))
        while True:
            yield (PARK, phases.lot)
            if phases.finished:
                return
            while time.monotonic() < phases.stop_at:
                yield from _login(drop)
                reply = yield (LINE, b"STAT\r\n")
                if reply != stat:
                    raise SessionError(f"STAT: expected {stat!r}, got {reply!r}")
                yield from _quit()
                phases.count += 1

    lg = LoadGenerator(("127.0.0.1", server.port))
    lg.start([(d.user, script(d)) for d in data.storm])
    window = run_timed(
        lg, server, phases, [cfg.warmup_seconds, cfg.storm_seconds], cfg.storm_seconds + 60
    )
    result = {
        "clients": len(data.storm),
        "messages_per_maildrop": data.storm[0].count,
        "sessions": phases.count,
        "sessions_per_s": round(phases.count / window.wall, 1) if window.wall else 0.0,
        **window.figures(),
    }
    return _finish(result, lg)


def _retr(server: Server, kind: str, data: Dataset, cfg: Config, clients: int) -> dict[str, Any]:
    phases = Phases()
    bodies = data.retr_bodies
    commands = [command("RETR", n + 1) for n in range(len(bodies))]

    def script(drop: Maildrop, first: int) -> Script:
        yield from _login(drop)
        index = first
        while True:
            yield (PARK, phases.lot)
            if phases.finished:
                break
            while time.monotonic() < phases.stop_at:
                expect_ok((yield (RETR, commands[index], bodies[index])), "RETR")
                phases.count += 1
                phases.octets += len(bodies[index])
                index = (index + 1) % len(bodies)
        yield from _quit()

    lg = LoadGenerator(("127.0.0.1", server.port))
    drops = data.retr[:clients]
    lg.start([(d.user, script(d, k * len(bodies) // clients)) for k, d in enumerate(drops)])
    window = run_timed(
        lg, server, phases, [cfg.warmup_seconds, cfg.retr_seconds], cfg.retr_seconds + 120
    )
    result = {
        "clients": clients,
        "messages": phases.count,
        "octets": phases.octets,
        "mb_per_s": round(phases.octets / MB / window.wall, 2) if window.wall else 0.0,
        **window.figures(),
    }
    return _finish(result, lg)


def retr_one(server: Server, kind: str, data: Dataset, cfg: Config) -> dict[str, Any]:
    """One client RETRs 20 KB messages one after another."""
    return _retr(server, kind, data, cfg, 1)


def retr_eight(server: Server, kind: str, data: Dataset, cfg: Config) -> dict[str, Any]:
    """Eight clients, each on its own maildrop, RETR 20 KB messages."""
    return _retr(server, kind, data, cfg, cfg.retr_clients)


def huge(server: Server, kind: str, data: Dataset, cfg: Config) -> dict[str, Any]:
    """RETR of one 200 MB message: throughput, and how much memory that costs."""
    assert data.huge is not None
    drop, body = data.huge, data.huge_body
    phases = Phases()
    login_ms: list[float] = []

    def script() -> Script:
        expect_ok((yield (CONNECT,)), "greeting")
        expect_ok((yield (LINE, command("USER", drop.user))), "USER")
        started = time.monotonic()
        expect_ok((yield (LINE, command("PASS", drop.password))), "PASS")
        login_ms.append((time.monotonic() - started) * 1000)
        while True:
            yield (PARK, phases.lot)
            if phases.finished:
                break
            for _ in range(cfg.huge_repeats):
                expect_ok((yield (RETR, b"RETR 1\r\n", body)), "RETR")
                phases.count += 1
                phases.octets += len(body)
        yield from _quit()

    lg = LoadGenerator(("127.0.0.1", server.port), step_timeout=120)
    before = server.sample()
    lg.start([(drop.user, script())])
    window = run_timed(lg, server, phases, [0.0], 600)
    after = server.sample()
    result = {
        "message_octets": len(body),
        "retrieved": phases.count,
        "mb_per_s": round(phases.octets / MB / window.wall, 2) if window.wall else 0.0,
        "login_ms": round(login_ms[0], 1) if login_ms else None,
        "rss_before_kib": before.rss_kib,
        "peak_rss_kib": after.hwm_kib,
        "peak_rss_growth_mb": round((after.hwm_kib - before.rss_kib) * 1024 / MB, 2),
        **window.figures(),
    }
    return _finish(result, lg)


def _many_message(data: Dataset, number: int) -> bytes:
    return data.many_pool[(number * 7) % len(data.many_pool)]


def _deliver_many(data: Dataset, count: int) -> None:
    """
    Deliver ``count`` more messages to the 100k Maildir as an MTA does
    (written in tmp/, renamed into new/), with unique names that sort after
    every message there; the expected listing grows with them.
    """
    drop = data.many
    assert drop is not None
    for _ in range(count):
        number = drop.count
        message = _many_message(data, number)
        name = maildrops.unique_name(number)
        temporary = drop.path / "tmp" / name
        temporary.write_bytes(message)
        os.rename(temporary, drop.path / "new" / name)
        drop.wire_sizes.append(maildrops.wire_size(message))
        drop.file_sizes.append(len(message))
        drop.file_names.append(name)


def many(server: Server, kind: str, data: Dataset, cfg: Config) -> dict[str, Any]:
    """
    A Maildir of 100,000 messages: the first login (PASS to STAT), then
    later logins (PASS to STAT, LIST, UIDL), each timed by the client, in
    the two cases of issue 14: right after a session that retrieved a
    message and quit (so the server moved messages from new/ to cur/ and
    flagged one seen: the first login retrieves one too), and right after
    ``many_deliveries`` new messages were delivered into new/.  While the
    first login runs, another client logs in to a small maildrop again and
    again (connect to STAT): how long a fresh session waits.  Every reply
    is checked, byte for byte where the server's answer is known.
    """
    assert data.many is not None and data.many_probe is not None
    drop = data.many
    probe_drop = data.many_probe
    probe_stat = b"+OK %d %d" % (probe_drop.count, sum(probe_drop.sizes(kind)))
    probe_ms: list[float] = []
    first_done = [False]
    cases = ("first", "later", "delivered")
    times: dict[str, list[float]] = {
        f"{case}_{verb}": [] for case in cases for verb in ("stat", "list", "uidl")
    }

    def expected() -> tuple[bytes, bytes, bytes | None]:
        sizes = drop.sizes(kind)
        stat = b"+OK %d %d" % (drop.count, sum(sizes))
        listing = b"".join(b"%d %d\r\n" % (n + 1, size) for n, size in enumerate(sizes))
        uidls = (
            None
            if kind == "dovecot"
            else b"".join(
                b"%d %s\r\n" % (n + 1, u.encode()) for n, u in enumerate(drop.uidls(kind))
            )
        )
        return stat, listing, uidls

    def timed_login(case: str, retrieve: bool) -> Script:
        stat, listing, uidls = expected()
        expect_ok((yield (CONNECT,)), "greeting")
        expect_ok((yield (LINE, command("USER", drop.user))), "USER")
        started = time.monotonic()
        expect_ok((yield (LINE, command("PASS", drop.password))), "PASS")
        reply = yield (LINE, b"STAT\r\n")
        times[f"{case}_stat"].append((time.monotonic() - started) * 1000)
        first_done[0] = True
        if reply != stat:
            raise SessionError(f"STAT: expected {stat!r}, got {reply[:100]!r}")
        if case != "first":
            for verb, body_expected in (("list", listing), ("uidl", uidls)):
                started = time.monotonic()
                status, body = yield (MULTI, command(verb.upper()))
                times[f"{case}_{verb}"].append((time.monotonic() - started) * 1000)
                expect_ok(status, verb.upper())
                if body_expected is None:
                    _check_uidl_form(body, drop.count)
                elif body != body_expected:
                    raise SessionError(f"{verb.upper()}: {_first_difference(body_expected, body)}")
        if retrieve:
            # One not retrieved before (of those first delivered to new/,
            # without the S flag): QUIT moves and flags it.
            number = 2 * data.many_retrieved
            data.many_retrieved += 1
            body_expected = maildrops.retr_bytes(_many_message(data, number))
            expect_ok((yield (RETR, command("RETR", number + 1), body_expected)), "RETR")
        yield from _quit()

    def script() -> Script:
        yield from timed_login("first", retrieve=True)
        for _ in range(cfg.later_logins):
            yield from timed_login("later", retrieve=True)
        for _ in range(cfg.later_logins):
            _deliver_many(data, cfg.many_deliveries)
            yield from timed_login("delivered", retrieve=False)

    def probe() -> Script:
        while not first_done[0]:
            # Paced like users arriving (50 logins/s), not a flood that
            # would itself be the load.
            yield (WAIT, 0.02)
            started = time.monotonic()
            yield from _login(probe_drop)
            reply = yield (LINE, b"STAT\r\n")
            if reply != probe_stat:
                raise SessionError(f"STAT: expected {probe_stat!r}, got {reply[:100]!r}")
            probe_ms.append((time.monotonic() - started) * 1000)
            yield from _quit()

    lg = LoadGenerator(("127.0.0.1", server.port), step_timeout=300)
    meter = Meter(server)
    meter.start()
    lg.start([(drop.user, script()), (probe_drop.user, probe())])
    lg.run(time.monotonic() + 900)
    window = meter.stop()

    def ms(values: list[float]) -> float | None:
        return round(statistics.median(values), 1) if values else None

    result: dict[str, Any] = {
        "messages": drop.count,
        "first_login_ms": ms(times["first_stat"]),
        "later_logins": len(times["later_stat"]),
        "deliveries_before_each": cfg.many_deliveries,
    }
    for case in ("later", "delivered"):
        for verb in ("stat", "list", "uidl"):
            values = times[f"{case}_{verb}"]
            result[f"{case}_{verb}_ms"] = ms(values)
            result[f"{case}_{verb}_each_ms"] = [round(value, 1) for value in values]
    result.update(
        {
            "fresh_sessions": len(probe_ms),
            "fresh_session_median_ms": ms(probe_ms),
            "fresh_session_max_ms": round(max(probe_ms), 1) if probe_ms else None,
            "fresh_session_slowest_ms": [
                (n, round(t, 1)) for n, t in sorted(enumerate(probe_ms), key=lambda x: -x[1])[:5]
            ],
            **window.figures(),
        }
    )
    return _finish(result, lg)


def _check_uidl_form(body: bytes, count: int) -> None:
    """
    A UIDL listing whose unique-ids the server chose (Dovecot's): one line
    per message, numbered 1..count, each id 1-70 characters 0x21-0x7E
    (RFC 1939 section 7), no id twice.
    """
    lines = body.split(b"\r\n")
    if lines[-1] != b"":
        raise SessionError("UIDL: listing does not end with CRLF")
    seen: set[bytes] = set()
    for number, line in enumerate(lines[:-1], 1):
        parts = line.split(b" ")
        if len(parts) != 2 or parts[0] != b"%d" % number:
            raise SessionError(f"UIDL: line {number}: {line[:80]!r}")
        uid = parts[1]
        if not 1 <= len(uid) <= 70 or any(not 0x21 <= c <= 0x7E for c in uid) or uid in seen:
            raise SessionError(f"UIDL: line {number}: bad or repeated id {uid[:80]!r}")
        seen.add(uid)
    if len(seen) != count:
        raise SessionError(f"UIDL: {len(seen)} lines, expected {count}")


def _first_difference(expected: bytes, got: bytes) -> str:
    expected_lines, got_lines = expected.split(b"\r\n"), got.split(b"\r\n")
    for number, (want, have) in enumerate(zip(expected_lines, got_lines, strict=False), 1):
        if want != have:
            return f"line {number}: expected {want!r}, got {have!r}"
    return f"{len(got_lines) - 1} lines, expected {len(expected_lines) - 1}"


@dataclass
class IdleCounts:
    held: int = 0
    failed: int = 0
    answered: int = 0
    last_failure: str = ""


#: Warm-up sessions of the idle workload, one after another (see `idle`).
IDLE_WARMUPS = 16


def idle(server: Server, kind: str, data: Dataset, cfg: Config) -> dict[str, Any]:
    """
    Authenticated sessions that do nothing: server memory per session, and
    how many are held (each then has to answer NOOP).
    """
    warmup_drop = data.idle_warmup
    assert warmup_drop is not None
    counts = IdleCounts()
    hold, done = ParkingLot(), ParkingLot()

    def warmup() -> Script:
        # What a session needs loaded before measuring (the passwd table,
        # the store), in every process that serves: one session at a time
        # on one maildrop, so each lands on a worker the kernel picks (all
        # on one of two: 1 in 32,768).
        for _ in range(IDLE_WARMUPS):
            yield from _login(warmup_drop)
            yield from _quit()

    def script(drop: Maildrop) -> Script:
        if counts.failed >= 50:
            return  # the server is at its limit: do not hammer it
        try:
            yield from _login(drop)
        except SessionError as error:
            counts.failed += 1
            counts.last_failure = str(error)
            yield (CLOSE,)
            return
        counts.held += 1
        yield (PARK, hold)
        try:
            expect_ok((yield (LINE, b"NOOP\r\n")), "NOOP")
            counts.answered += 1
        except SessionError as error:
            counts.last_failure = str(error)
        yield (PARK, done)

    deadline = time.monotonic() + 300
    lg = LoadGenerator(("127.0.0.1", server.port), step_timeout=20)
    lg.start([("warmup", warmup())])
    lg.run(deadline)
    base = server.sample(pss=True)
    checkpoints: dict[str, dict[str, Any]] = {}
    started = 0
    for target in cfg.idle_checkpoints:
        drops = data.idle[started:target]
        # 32 logins under way at a time: under the listen backlog (50).
        lg.start([(d.user, script(d)) for d in drops], max_active=32)
        started = target
        lg.run(deadline)
        sample = server.sample(pss=True)
        growth = sample.rss_kib - base.rss_kib
        pss_growth = sample.pss_kib - base.pss_kib
        checkpoints[str(target)] = {
            "attempted": started,
            "held": counts.held,
            "processes": sample.processes,
            "rss_growth_kib": growth,
            "kib_per_session": round(growth / counts.held, 2) if counts.held else None,
            "pss_growth_kib": pss_growth,
            "pss_kib_per_session": round(pss_growth / counts.held, 2) if counts.held else None,
        }
        if counts.held < target:
            break
    lg.release(hold)
    lg.run(deadline)
    result = {
        "base_rss_kib": base.rss_kib,
        "base_pss_kib": base.pss_kib,
        "base_processes": base.processes,
        "open_files_limit": server.open_files_limit(),
        "checkpoints": checkpoints,
        "held": counts.held,
        "answered_noop": counts.answered,
        "failed_logins": counts.failed,
        "last_failure": counts.last_failure,
    }
    if counts.answered != counts.held:
        lg.errors.append(f"{counts.held - counts.answered} held sessions did not answer NOOP")
    return _finish(result, lg)


RUNNERS: dict[str, Callable[[Server, str, Dataset, Config], dict[str, Any]]] = {
    "login-storm": login_storm,
    "retr-1": retr_one,
    "retr-8": retr_eight,
    "huge": huge,
    "many": many,
    "idle": idle,
}


def summary_line(workload: str, result: dict[str, Any]) -> str:
    figures = {
        "login-storm": lambda r: f"{r['sessions_per_s']} sessions/s",
        "retr-1": lambda r: f"{r['mb_per_s']} MB/s",
        "retr-8": lambda r: f"{r['mb_per_s']} MB/s",
        "huge": lambda r: f"{r['mb_per_s']} MB/s, peak RSS +{r['peak_rss_growth_mb']} MB",
        "many": lambda r: (
            f"first {r['first_login_ms']} ms; after RETR+QUIT: STAT {r['later_stat_ms']} ms, "
            f"LIST {r['later_list_ms']} ms, UIDL {r['later_uidl_ms']} ms; "
            f"after {r['deliveries_before_each']} deliveries: "
            f"STAT {r['delivered_stat_ms']} ms, "
            f"LIST {r['delivered_list_ms']} ms, UIDL {r['delivered_uidl_ms']} ms; "
            f"meanwhile {r['fresh_sessions']} fresh sessions, "
            f"median {r['fresh_session_median_ms']} ms, max {r['fresh_session_max_ms']} ms"
        ),
        "idle": lambda r: ", ".join(
            f"{c['held']} held: {c['kib_per_session']} KiB RSS, "
            f"{c['pss_kib_per_session']} KiB PSS each ({c['processes']} processes)"
            for c in r["checkpoints"].values()
        ),
    }
    text = figures[workload](result)
    if "server_cores" in result and workload != "idle":
        text += (
            f" (server {result['server_cores']:.2f} cores,"
            f" load generator {result['client_cores']:.2f} cores,"
            f" other processes {result['other_cores']:.2f} cores)"
        )
    if result.get("errors"):
        text += f"  ERRORS: {result['errors']}"
    return text


#: The figure that picks the median round of a repeated workload.
PRIMARY = {
    "login-storm": "sessions_per_s",
    "retr-1": "mb_per_s",
    "retr-8": "mb_per_s",
    "huge": "mb_per_s",
    "many": "first_login_ms",
}


def _forget_sizes(data: Dataset) -> None:
    """
    Make the next login to the 100k Maildir a first login again: a fresh
    server has no listing in memory, and without pop3d's size file it reads
    every message (twisted.mail.pop3 keeps nothing); without its index and
    UID list, Dovecot reads every message too (and assigns new UIDs).
    """
    assert data.many is not None
    (data.many.path / "pop3d-sizes").unlink(missing_ok=True)
    if data.dovecot_meta is not None:
        for kind in ("index", "control"):
            shutil.rmtree(data.dovecot_meta / kind / data.many.user, ignore_errors=True)


def _read_into_memory(maildir: Path) -> None:
    """
    Every message of ``maildir`` read once, so that each server's first
    login finds them in the page cache, as a mail server in use does: a
    virtual machine here drops the cache of files unread for a few minutes,
    and whichever server went first was timed on the disk.
    """
    flags = os.O_RDONLY | os.O_NOATIME | os.O_CLOEXEC
    for subdirectory in ("new", "cur"):
        directory = os.open(maildir / subdirectory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in os.listdir(directory):
                fd = os.open(name, flags, dir_fd=directory)
                try:
                    while os.read(fd, 1 << 20):
                        pass
                finally:
                    os.close(fd)
        finally:
            os.close(directory)


def _before_many(data: Dataset) -> None:
    assert data.many is not None
    _forget_sizes(data)
    _read_into_memory(data.many.path)


#: What each round of a workload needs undone from the round before.
BEFORE_ROUND: dict[str, Callable[[Dataset], None]] = {"many": _before_many}


def run_workload(workload: str, data: Dataset, cfg: Config) -> dict[str, dict[str, Any]]:
    """
    Each server in turn, on a fresh process.  Workloads with a `PRIMARY`
    figure are repeated ``cfg.rounds`` times, alternating the servers, and
    the round with the median figure is kept (with every round's figure);
    `BEFORE_ROUND` undoes what a round leaves behind (the size file of the
    100k Maildir).  ``idle`` runs once.
    """
    rounds = cfg.rounds if workload in PRIMARY else 1
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in cfg.servers}
    for round_number in range(1, rounds + 1):
        for kind in cfg.servers:
            if workload in BEFORE_ROUND:
                BEFORE_ROUND[workload](data)
            began = time.monotonic()
            server = start_server(kind, data, cfg, workload)
            try:
                # The workloads check replies by whose they are.
                result = RUNNERS[workload](server, SPEAKS_AS.get(kind, kind), data, cfg)
            finally:
                server.stop()
            result["elapsed_s"] = round(time.monotonic() - began, 1)
            problems = server.log_problems()
            if problems:
                result["server_log_problems"] = [*problems[:5], f"({len(problems)} lines)"]
            runs[kind].append(result)
            label = f"{workload} {round_number}/{rounds}" if rounds > 1 else workload
            print(
                f"{label:<16} {SERVER_TITLES[kind]:<21} {summary_line(workload, result)}"
                f" [{result['elapsed_s']} s]",
                flush=True,
            )
    return {kind: _median_round(workload, results) for kind, results in runs.items()}


def _median_round(workload: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [r for r in results if r.get("errors")]
    if failed or len(results) == 1:
        return failed[0] if failed else results[0]
    key = PRIMARY[workload]
    ordered = sorted(results, key=lambda r: float(r[key]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds"] = [r[key] for r in results]
    if "login_ms" in chosen:
        # Only the first round's login is a first login (sizes not yet cached).
        chosen["first_login_ms"] = results[0]["login_ms"]
    if "fresh_session_max_ms" in chosen:
        chosen["fresh_session_max_ms_rounds"] = [r["fresh_session_max_ms"] for r in results]
    return chosen


# -- report ------------------------------------------------------------------------------


#: The values of one row: server -> figure (None: not run or failed).
Values = dict[str, float | None]


@dataclass(frozen=True)
class Row:
    label: str
    workload: str
    get: Callable[[dict[str, Any]], float | None]
    higher_is_better: bool
    target: str = ""
    #: (pop3d value, every server's value) -> met? (None: cannot tell)
    check: Callable[[float, Values], bool | None] | None = None
    #: Which pop3d the target and the ratios are for: one process
    #: ("pop3d") or one worker per core ("pop3d-auto").
    measured: str = "pop3d"


def _checkpoint(n: int, key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(result: dict[str, Any]) -> float | None:
        checkpoint = result.get("checkpoints", {}).get(str(n))
        return None if checkpoint is None else checkpoint.get(key)

    return get


def _ratio_at_least(factor: float, other: str) -> Callable[[float, Values], bool | None]:
    def check(mine: float, values: Values) -> bool | None:
        theirs = values.get(other)
        return None if not theirs else mine / theirs >= factor

    return check


def _ratio_at_most(factor: float, other: str) -> Callable[[float, Values], bool | None]:
    def check(mine: float, values: Values) -> bool | None:
        theirs = values.get(other)
        return None if theirs is None else mine <= factor * theirs

    return check


def _at_least(limit: float) -> Callable[[float, Values], bool | None]:
    return lambda mine, _: mine >= limit


def _below(limit: float) -> Callable[[float, Values], bool | None]:
    return lambda mine, _: mine < limit


def report_rows(cfg: Config) -> list[Row]:
    """
    The table's rows, with issue 14's targets where it states one (the
    others are issue 5's, kept).
    """
    many = f"{cfg.many_messages // 1000}k-message Maildir"
    rows = [
        Row(
            f"login storm, {cfg.storm_clients} clients (sessions/s)",
            "login-storm",
            lambda r: r["sessions_per_s"],
            True,
            ">= 1.3x twisted (--workers auto)",
            _ratio_at_least(1.3, "twisted"),
            measured="pop3d-auto",
        ),
        Row(
            f"RETR {cfg.retr_messages:,} x 20 KB, 1 client (MB/s)",
            "retr-1",
            lambda r: r["mb_per_s"],
            True,
            ">= Dovecot",
            _ratio_at_least(1, "dovecot"),
        ),
        Row(
            f"RETR 20 KB, {cfg.retr_clients} clients on {cfg.retr_clients} maildrops (MB/s)",
            "retr-8",
            lambda r: r["mb_per_s"],
            True,
            ">= Dovecot (--workers auto)",
            _ratio_at_least(1, "dovecot"),
            measured="pop3d-auto",
        ),
        Row(
            f"RETR {cfg.retr_clients} clients: server CPU (cores)",
            "retr-8",
            lambda r: r["server_cores"],
            True,
            "both cores (#5, --workers auto)",
            _at_least(1.5),
            measured="pop3d-auto",
        ),
        Row(
            f"RETR one {cfg.huge_size // MB} MB message (MB/s)",
            "huge",
            lambda r: r["mb_per_s"],
            True,
            ">= 1.3x Dovecot",
            _ratio_at_least(1.3, "dovecot"),
        ),
        Row(
            f"RETR {cfg.huge_size // MB} MB: server peak RSS growth (MB)",
            "huge",
            lambda r: r["peak_rss_growth_mb"],
            False,
            "< 20 MB",
            _below(20),
        ),
        Row(
            f"{cfg.huge_size // MB} MB maildrop: first login, PASS (ms)",
            "huge",
            lambda r: r.get("first_login_ms", r["login_ms"]),
            False,
        ),
        Row(
            f"{many}: first login, PASS->STAT (ms)",
            "many",
            lambda r: r["first_login_ms"],
            False,
            "<= 0.3x Dovecot",
            _ratio_at_most(0.3, "dovecot"),
        ),
        Row(
            f"{many}: first login, fresh session meanwhile, connect->STAT, max (ms)",
            "many",
            lambda r: r["fresh_session_max_ms"],
            False,
            "< 50 ms (#5)",
            _below(50),
        ),
    ]
    for case, when in (
        ("later", "after RETR+QUIT"),
        ("delivered", f"after {cfg.many_deliveries} deliveries"),
    ):
        rows.append(
            Row(
                f"{many}: later login {when}, PASS->STAT (ms)",
                "many",
                lambda r, case=case: r[f"{case}_stat_ms"],  # type: ignore[misc]
                False,
                "<= 50 ms",
                lambda mine, _: mine <= 50,
            )
        )
        for key, name in (("list", "LIST"), ("uidl", "UIDL")):
            rows.append(
                Row(
                    f"{many}: later login {when}, {name} (ms)",
                    "many",
                    lambda r, key=f"{case}_{key}": r[f"{key}_ms"],  # type: ignore[misc]
                    False,
                    "<= Dovecot",
                    _ratio_at_most(1, "dovecot"),
                )
            )
    for n in cfg.idle_checkpoints:
        rows.append(
            Row(
                f"idle sessions: RSS per session at {n:,} (KiB)",
                "idle",
                _checkpoint(n, "kib_per_session"),
                False,
                "<= 4 KiB",
                lambda mine, _: mine <= 4,
            )
        )
        rows.append(
            Row(
                f"idle sessions: PSS per session at {n:,} (KiB)",
                "idle",
                _checkpoint(n, "pss_kib_per_session"),
                False,
            )
        )
        rows.append(
            Row(
                f"idle sessions: held of {n:,}",
                "idle",
                _checkpoint(n, "held"),
                True,
                f"{n:,} held (#5)" if n >= 10_000 else "",
                _at_least(n) if n >= 10_000 else None,
            )
        )
    return rows


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _ratio(mine: float | None, theirs: float | None) -> str:
    return f"{mine / theirs:.2f}x" if mine is not None and theirs else "-"


def render_table(
    results: dict[str, dict[str, Any]], cfg: Config
) -> tuple[str, list[dict[str, Any]]]:
    """
    One row per figure: each server's value, pop3d/twisted and
    pop3d/Dovecot, the target and whether pop3d meets it, and whether the
    floor of CPython + Twisted (benchmarks/floor_server.py) meets it.  The
    ratios and the target are for the pop3d of the row's `Row.measured`
    (one process, or --workers auto where the target says so), or the other
    one if only that one ran.
    """
    header = (
        "Workload (unit)",
        "Better",
        *(SERVER_TITLES[kind] for kind in SERVERS),
        "pop3d/twisted",
        "pop3d/Dovecot",
        "Target (#14)",
        "Met",
        "Floor meets it",
    )
    numeric = range(2, 2 + len(SERVERS) + 2)
    lines: list[tuple[str, ...]] = [header]
    verdicts: list[dict[str, Any]] = []
    for row in report_rows(cfg):
        if row.workload not in results:
            continue
        values: Values = {}
        for kind in SERVERS:
            result = results[row.workload].get(kind, {})
            try:
                values[kind] = None if result.get("errors") else row.get(result)
            except (KeyError, TypeError):
                values[kind] = None
        measured = row.measured
        if values.get(measured) is None:
            # Only the other pop3d ran (--servers): its figure, said so below.
            measured = next((k for k in POP3D_KINDS if values.get(k) is not None), measured)
        mine = values[measured]
        better = "higher" if row.higher_is_better else "lower"
        verdict = floor_verdict = ""
        if row.check is not None:
            met = None if mine is None else row.check(mine, values)
            verdict = "?" if met is None else ("met" if met else "MISSED")
            floor = values.get("floor")
            if floor is not None:
                # The same target, checked on the floor's own figure.
                floor_met = row.check(floor, values)
                floor_verdict = "?" if floor_met is None else ("yes" if floor_met else "no")
            verdicts.append(
                {
                    "figure": row.label.strip(),
                    "target": row.target,
                    # Which pop3d the target was checked on, and its figure.
                    "checked": measured,
                    "value": mine,
                    **{kind: values[kind] for kind in SERVERS},
                    "verdict": verdict,
                    # Whether the floor meets it: "yes", "no", "?" (cannot
                    # tell), None (the floor did not run).
                    "floor_meets": floor_verdict or None,
                }
            )
        lines.append(
            (
                row.label,
                better,
                *(_number(values[kind]) for kind in SERVERS),
                _ratio(mine, values["twisted"]),
                _ratio(mine, values["dovecot"]),
                row.target
                + ("" if measured == row.measured else f" [on {SERVER_TITLES[measured]}]"),
                verdict,
                floor_verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    heading = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()
    text = [rule, heading, rule]
    for line in lines[1:]:
        cells = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        text.append("  ".join(cells).rstrip())
    text.append(rule)
    return "\n".join(text), verdicts


def render_cpu(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "CPU over each measured window (cores = CPU seconds / wall seconds; other = the",
        "rest of the machine, which should be near 0):",
        f"  {'workload':<12} {'server':<21} {'server cores':>12} {'load generator cores':>21}"
        f" {'other cores':>12}",
    ]
    for workload in WORKLOADS:
        for kind in SERVERS:
            result = results.get(workload, {}).get(kind)
            if not result or "server_cores" not in result or workload == "idle":
                continue
            lines.append(
                f"  {workload:<12} {SERVER_TITLES[kind]:<21} {result['server_cores']:>12.2f}"
                f" {result['client_cores']:>21.2f} {result['other_cores']:>12.2f}"
            )
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import twisted

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) // 1024

    def git(*arguments: str) -> str:
        # Read-only git commands: which pop3d was measured.
        return subprocess.run(
            ["git", *arguments], capture_output=True, text=True, cwd=servers.HERE, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("--no-optional-locks", "status", "--porcelain", "--", "../pop3d"):
        commit += " with uncommitted changes"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_mib": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pop3d_commit": commit or "unknown",
        "dovecot": servers.dovecot_version(),
    }


def describe_machine(machine: dict[str, Any]) -> str:
    return (
        f"{machine['nproc']} x {machine['cpu_model']}, {machine['memory_mib']:,} MiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, "
        f"Twisted {machine['twisted']}, Dovecot {machine['dovecot']}, "
        f"pop3d {machine['pop3d_commit']}"
    )


# -- profiling ------------------------------------------------------------------------------


def profile(workload: str, data: Dataset, cfg: Config, output: Path, top: int) -> None:
    """Run one workload against pop3d under cProfile (all threads); print the top functions."""
    server = start_server("pop3d", data, cfg, f"profile-{workload}", profile=output)
    try:
        result = RUNNERS[workload](server, "pop3d", data, cfg)
        print(f"{workload} under cProfile (slower than without): {summary_line(workload, result)}")
    finally:
        server.stop(timeout=120)  # SIGTERM: twistd stops, the profile is written
    if not output.exists():
        raise RuntimeError(f"no profile written; log:\n{server.log_tail()}")
    for order in ("tottime", "cumulative"):
        print(f"\nTop {top} functions by {order} ({output}):")
        stats = pstats.Stats(str(output))
        _shorten_paths(stats)
        stats.sort_stats(order).print_stats(top)


def _shorten_paths(stats: pstats.Stats) -> None:
    """site-packages/twisted/... and pop3d/... instead of absolute paths."""
    prefixes = sorted({str(servers.HERE.parent) + "/", *(p + "/" for p in sys.path if p)}, key=len)

    def short(key: tuple[str, int, str]) -> tuple[str, int, str]:
        filename, line, name = key
        for prefix in reversed(prefixes):
            if filename.startswith(prefix):
                return filename[len(prefix) :], line, name
        return key

    table: Any = stats.stats  # type: ignore[attr-defined]
    stats.stats = {  # type: ignore[attr-defined]
        short(key): (cc, nc, tt, ct, {short(c): v for c, v in callers.items()})
        for key, (cc, nc, tt, ct, callers) in table.items()
    }


# -- main ---------------------------------------------------------------------------------------


def end_run(root: Path, keep: bool) -> None:
    """Stop every server; keep (``keep``) or remove the run's directory."""
    servers.stop_all()
    if keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter run (a few minutes)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--only", help=f"comma-separated workloads to run, of: {', '.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--profile",
        choices=WORKLOADS,
        help="run this workload against pop3d only, under cProfile, and print the top functions",
    )
    parser.add_argument("--profile-output", type=Path, help="where to write the .prof file")
    parser.add_argument("--top", type=int, default=25, help="functions to print with --profile")
    parser.add_argument("--tmpdir", type=Path, help="where to build the test maildrops")
    parser.add_argument("--keep", action="store_true", help="keep the test maildrops and logs")
    parser.add_argument(
        "--rounds",
        type=int,
        help="runs of each throughput workload per server, median kept (default 3; 1 quick)",
    )
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated servers to run, of: {', '.join(SERVERS)} (default: all)",
    )
    parser.add_argument(
        "--pop3d-args",
        default="",
        help='more options for twistd pop3d, as one string (e.g. "--max-connections 20000")',
    )
    options = parser.parse_args(argv)

    kinds = tuple(k for k in SERVERS if k in {s.strip() for s in options.servers.split(",")})
    unknown_servers = {s.strip() for s in options.servers.split(",")} - set(SERVERS)
    if unknown_servers or not kinds:
        parser.error(f"unknown servers: {', '.join(sorted(unknown_servers)) or options.servers}")
    cfg = Config.make(options.quick, tuple(shlex.split(options.pop3d_args)), options.rounds, kinds)
    if options.profile:
        workloads = [options.profile]
    elif options.only:
        workloads = [w.strip() for w in options.only.split(",")]
        unknown = set(workloads) - set(WORKLOADS)
        if unknown:
            parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    else:
        workloads = list(WORKLOADS)

    signal.signal(signal.SIGTERM, _interrupt)
    fd_limit = servers.raise_fd_limit()
    if "idle" in workloads and max(cfg.idle_checkpoints) + 256 > fd_limit:
        cfg = Config(**{**cfg.__dict__, "idle_checkpoints": (cfg.idle_checkpoints[0],)})
        print(f"open files limit {fd_limit}: 10,000 idle sessions skipped", flush=True)
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="pop3d-bench-", dir=options.tmpdir))
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    try:
        data = build_dataset(root, cfg, workloads)
        if options.profile:
            output = options.profile_output or Path(tempfile.gettempdir()) / (
                f"pop3d-{options.profile}.prof"
            )
            profile(options.profile, data, cfg, output.resolve(), options.top)
            return 0
        for workload in workloads:
            results[workload] = run_workload(workload, data, cfg)
    except KeyboardInterrupt:
        print("interrupted; stopping the servers", file=sys.stderr)
        return 130
    finally:
        end_run(root, options.keep)

    table, verdicts = render_table(results, cfg)
    errors = {
        f"{workload}/{kind}": result["errors"]
        for workload, by_server in results.items()
        for kind, result in by_server.items()
        if result.get("errors")
    }
    print()
    print(f"Machine: {describe_machine(machine)}")
    mode = "quick run" if cfg.quick else "full run"
    print(f"{mode} in {time.monotonic() - started:.0f} s; MB = 10^6 octets; loopback")
    if cfg.pop3d_args:
        print(f"pop3d options: {shlex.join(cfg.pop3d_args)}")
    print()
    print(table)
    print()
    print(render_cpu(results))
    if errors:
        print("\nERRORS (figures of these runs are not shown):")
        for name, messages in errors.items():
            for message in messages:
                print(f"  {name}: {message}")
    if options.json:
        document = {
            "machine": machine,
            "config": {k: v for k, v in cfg.__dict__.items()},
            "results": results,
            "targets": verdicts,
            "errors": errors,
        }
        options.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nJSON written to {options.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
