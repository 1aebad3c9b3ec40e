"""
Starting, watching and stopping the servers under test.

Each server is a subprocess on a loopback port chosen by the kernel (port
0).  It is ready when its log says "... listening on 127.0.0.1:PORT"; the
log (stdout and stderr) is read until that line, then copied to a file by
``cat``, so that no thread of the load generator competes for its GIL.  The
servers run in their own session (Ctrl-C reaches only the runner, which
stops them) and get SIGTERM if the runner dies (PR_SET_PDEATHSIG), so none
outlives a run.
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TWISTED_LAUNCHER = HERE / "twisted_pop3_server.py"
FLOOR_SERVER = HERE / "floor_server.py"
PROFILED_TWISTD = HERE / "profiled_twistd.py"
_READY = re.compile(rb"listening on (127\.0\.0\.1):(\d+)")
#: Dovecot's master logs this once its listeners are bound (the port is ours).
DOVECOT_READY = re.compile(rb"master: Info: Dovecot v\S+ .*starting up")
#: pop3d without --workers: its counting helper processes have started.
COUNTING_READY = re.compile(rb"counting helper processes started: \[")
DOVECOT = "/usr/sbin/dovecot"
#: Dovecot's mail processes run as this user (it refuses UID 0).
DOVECOT_MAIL_USER = "nobody"
DOVECOT_MAIL_GROUP = "nogroup"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1

_running: list[Server] = []


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _with_fd_limit(argv: list[str]) -> list[str]:
    """The command, run with its soft open-files limit raised to the hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return ["sh", "-c", 'ulimit -S -n "$0" && exec "$@"', str(hard), *argv]


def pop3d_command(
    mail_root: Path, passwd: Path, profile: Path | None = None, extra: tuple[str, ...] = ()
) -> list[str]:
    twistd = str(Path(sys.executable).parent / "twistd")
    prefix = (
        [sys.executable, twistd]
        if profile is None
        else [
            sys.executable,
            str(PROFILED_TWISTD),
            str(profile),
        ]
    )
    return _with_fd_limit(
        [
            *prefix,
            "-n",
            "--pidfile=",
            "pop3d",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--mail-location",
            f"maildir:{mail_root}/{{user}}",
            "--auth",
            f"passwd-file:{passwd}",
            *extra,
        ]
    )


def twisted_command(mail_root: Path, passwd: Path) -> list[str]:
    return _with_fd_limit(
        [
            sys.executable,
            str(TWISTED_LAUNCHER),
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--maildirs",
            str(mail_root),
            "--passwd",
            str(passwd),
        ]
    )


def floor_command(mail_root: Path, passwd: Path, workers: int) -> list[str]:
    """The floor of CPython + Twisted (benchmarks/floor_server.py), pop3d's passwd-file."""
    return _with_fd_limit(
        [
            sys.executable,
            str(FLOOR_SERVER),
            "--maildirs",
            str(mail_root),
            "--passwd",
            str(passwd),
            "--workers",
            str(workers),
        ]
    )


def free_port() -> int:
    """
    A loopback port the kernel has just handed out and taken back: for
    Dovecot, which cannot listen on port 0 and say which port it got.
    """
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dovecot_version() -> str:
    try:
        result = subprocess.run([DOVECOT, "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return "not installed"
    return result.stdout.strip() or "unknown"


def prepare_for_dovecot(root: Path, mail_root: Path) -> Path:
    """
    Dovecot refuses to access mail as root: its pop3 processes run as
    ``nobody``, so the temporary directory must be reachable (0755) and the
    Maildirs owned by ``nobody`` (pop3d and twisted.mail.pop3 run as root
    and are not affected).  Dovecot's index and control files (its UID list)
    go to ``dovecot-meta/`` outside the Maildirs, so that pop3d never sees a
    ``dovecot-uidlist`` Dovecot wrote during the run.  Returns that directory.
    """
    root.chmod(0o755)
    meta = root / "dovecot-meta"
    meta.mkdir(exist_ok=True)
    owner = f"{DOVECOT_MAIL_USER}:{DOVECOT_MAIL_GROUP}"
    subprocess.run(["chown", "-R", owner, str(mail_root), str(meta)], check=True)
    return meta


def write_dovecot_config(
    root: Path, mail_root: Path, meta: Path, passwd: Path, port: int, label: str
) -> Path:
    """
    A complete Dovecot 2.3 configuration (not Debian's conf.d): POP3 only,
    Maildir, the benchmark's passwd-file, no SSL, its runtime directories
    under the run's temporary directory.  Changed from Dovecot's defaults,
    and why: see benchmarks/README.rst ("Dovecot").
    """
    run_dir = root / f"dovecot-{label}"
    config = root / f"dovecot-{label}.conf"
    run_dir.mkdir(exist_ok=True)
    config.write_text(
        f"""\
# Generated by benchmarks/servers.py for one benchmark workload.
base_dir = {run_dir}/run
state_dir = {run_dir}/state
instance_name = pop3d-bench-{label}
protocols = pop3
listen = 127.0.0.1
ssl = no
log_path = /dev/stderr
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = home={mail_root}/%u
}}
mail_uid = {DOVECOT_MAIL_USER}
mail_gid = {DOVECOT_MAIL_GROUP}
mail_location = maildir:{mail_root}/%u:INDEX={meta}/index/%u:CONTROL={meta}/control/%u
pop3_lock_session = yes

# Limits raised so that 10,000 idle sessions (one pop3 process each) fit.
default_client_limit = 12000
service pop3 {{
  process_limit = 12000
}}
# High-performance login mode (Dovecot's documented setting for busy
# servers): long-lived login processes, one per core, instead of one
# process per connection.
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
  service_count = 0
  process_min_avail = {len(os.sched_getaffinity(0))}
  client_limit = 12000
}}
"""
    )
    return config


def dovecot_command(config: Path) -> list[str]:
    return _with_fd_limit([DOVECOT, "-F", "-c", str(config)])


@dataclass
class ProcessSample:
    """CPU seconds (user + system, all threads) and memory (KiB) of a process."""

    cpu: float
    rss_kib: int
    hwm_kib: int
    #: Proportional set size (shared pages divided among the processes that
    #: share them); 0 unless asked for (it is slower to read).
    pss_kib: int = 0
    #: How many processes were summed.
    processes: int = 0


class Server:
    """One server process under test."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        cwd: Path,
        port: int = 0,
        ready: re.Pattern[bytes] = _READY,
        workers: int = 0,
        also_ready: re.Pattern[bytes] | None = None,
    ) -> None:
        """
        ``ready``: the log line that says the server is listening; if it
        has no port group, the server was told ``port``.  ``workers``: how
        many worker processes must also say they are listening on that port
        (pop3d --workers: the parent says so before it starts them).
        ``also_ready``: a line that must also have come (pop3d's counting
        helper processes started: they belong to the server from its start,
        so their memory is not counted as what a workload made it grow).
        """
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.port = 0
        self._given_port = port
        self._ready = ready
        self._workers = workers
        self._also_ready = also_ready
        self.process: subprocess.Popen[bytes] | None = None
        self._log_copier: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> None:
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        _running.append(self)
        assert self.process.stdout is not None
        pipe = self.process.stdout
        try:
            self._wait_until_listening(pipe.fileno(), timeout)
            # From now on `cat` copies the log, so that no thread of the
            # load generator competes with it for the GIL.
            with open(self.log_path, "ab") as log:
                self._log_copier = subprocess.Popen(["cat"], stdin=pipe, stdout=log)
        finally:
            pipe.close()
        if not self.port:
            self.stop()
            raise RuntimeError(
                f"{self.name} did not report listening within {timeout} s; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )

    def _wait_until_listening(self, fd: int, timeout: float) -> None:
        """Copy the log until the "listening on" line (or exit, or timeout)."""
        deadline = time.monotonic() + timeout
        seen = b""
        with open(self.log_path, "ab") as log:
            while (remaining := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([fd], [], [], remaining)
                if not readable:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    return  # exited before listening
                log.write(chunk)
                seen += chunk
                match = self._ready.search(seen)
                if match:
                    port = int(match.group(2)) if self._ready.groups >= 2 else self._given_port
                    also = self._also_ready
                    if self._workers_listening(seen, port) >= self._workers and (
                        also is None or also.search(seen)
                    ):
                        self.port = port
                        return

    @staticmethod
    def _workers_listening(log: bytes, port: int) -> int:
        return len(re.findall(rb"worker \d+ listening on 127\.0\.0\.1:%d\b" % port, log))

    def sample(self, pss: bool = False) -> ProcessSample:
        """
        The server's process and its descendants (a server with worker
        processes, Dovecot's master and its login, auth and pop3 processes):
        CPU of all of them (with their reaped children), the sum of their
        RSS and of their peak RSS, and with ``pss`` the sum of their PSS.
        """
        cpu, rss, hwm, pss_total = 0.0, 0, 0, 0
        tree = _process_tree(self.pid)
        for pid in tree:
            try:
                with open(f"/proc/{pid}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
                status = _proc_status(pid)
            except OSError:
                continue  # exited meanwhile
            # utime, stime, cutime, cstime
            cpu += sum(int(field) for field in fields[11:15]) / _CLOCK_TICKS
            rss += status.get("VmRSS", 0)
            hwm += status.get("VmHWM", 0)
            if pss:
                pss_total += _proc_pss(pid)
        return ProcessSample(cpu, rss, hwm, pss_total, len(tree))

    def open_files_limit(self) -> int:
        with open(f"/proc/{self.pid}/limits") as limits:
            for line in limits:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        return 0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (twistd shuts down cleanly), SIGKILL if that takes too long."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self._log_copier is not None:
            try:
                self._log_copier.wait(10)
            except subprocess.TimeoutExpired:
                self._log_copier.kill()
                self._log_copier.wait(10)
        if self in _running:
            _running.remove(self)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self) -> list[str]:
        """Tracebacks and errors in the log, for the report."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        markers = (
            "Traceback",
            "Unhandled",
            "Could not accept",
            "Too many open files",
            ": Error:",  # Dovecot
            ": Fatal:",
            ": Panic:",
        )
        return [line for line in text.splitlines() if any(m in line for m in markers)]


def _process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def _proc_status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key.startswith("Vm"):
                values[key] = int(rest.split()[0])
    return values


def _proc_pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass  # exited meanwhile
    return 0


def stop_all() -> None:
    """Stop every server still running (on errors and Ctrl-C too)."""
    for server in list(_running):
        try:
            server.stop(timeout=10)
        except Exception as error:  # keep stopping the others
            print(f"warning: stopping {server.name}: {error}", file=sys.stderr)


def wait_for_exit(server: Server, timeout: float) -> None:
    """Used by the profiler: wait until the server has written its stats."""
    deadline = time.monotonic() + timeout
    while server.alive() and time.monotonic() < deadline:
        assert server.process is not None
        try:
            server.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
