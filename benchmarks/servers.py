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
PROFILED_TWISTD = HERE / "profiled_twistd.py"
_READY = re.compile(rb"listening on (127\.0\.0\.1):(\d+)")
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


@dataclass
class ProcessSample:
    """CPU seconds (user + system, all threads) and memory (KiB) of a process."""

    cpu: float
    rss_kib: int
    hwm_kib: int


class Server:
    """One server process under test."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.port = 0
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
                match = _READY.search(seen)
                if match:
                    self.port = int(match.group(2))
                    return

    def sample(self) -> ProcessSample:
        """
        The server's process and its descendants (a server with worker
        processes): CPU of all of them (with their reaped children), the sum
        of their RSS and of their peak RSS.
        """
        cpu, rss, hwm = 0.0, 0, 0
        for pid in _process_tree(self.pid):
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
        return ProcessSample(cpu, rss, hwm)

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
        markers = ("Traceback", "Unhandled", "Could not accept", "Too many open files")
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
