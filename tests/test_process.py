"""
The real server, run as ``twistd pop3d`` in a separate process.

These tests need no reactor: the server is a child process, found ready by
the line twistd logs when it listens ("POP3Factory starting on PORT"), and
spoken to with poplib or a raw socket.  Every child is killed in teardown.
"""

from __future__ import annotations

import fcntl
import os
import poplib
import queue
import re
import shutil
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pop3d.testing import deliver_to_maildir

pytestmark = pytest.mark.process

HOST = "127.0.0.1"
PASSWORD_LINE = "alice:{PLAIN}wonderland::\n"
LISTENING = re.compile(r"POP3Factory starting on (\d+)")
#: How long any single wait for the server may take before the test fails.
PATIENCE = 60.0
MiB = 1024 * 1024
#: The most a server may grow while serving one huge message.
MEMORY_LIMIT = 20 * MiB


def _twistd() -> list[str]:
    """
    The command that runs twistd with this interpreter.  (``python -m
    twisted`` is ``twist``, not ``twistd``: it knows neither ``-n`` nor
    ``--pidfile``.)
    """
    script = Path(sys.executable).parent / "twistd"
    if script.is_file():
        return [sys.executable, str(script)]
    code = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    return [sys.executable, "-c", code]


TWISTD = _twistd()


class Server:
    """
    One twistd child process.  Its output (stdout and stderr together) is
    read by a thread as it comes, so the child never blocks on a full pipe
    and the test can wait for a given line without sleeping.
    """

    def __init__(self, arguments: list[str], cwd: Path, program: list[str] = TWISTD) -> None:
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [*program, *arguments],
            cwd=cwd,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.port = 0
        self.lines: list[str] = []
        self._unread: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            self._unread.put(line)
        self._unread.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line of output, "" if none came within ``timeout``, None at its end."""
        try:
            return self._unread.get(timeout=timeout)
        except queue.Empty:
            return ""

    def wait_for(self, pattern: re.Pattern[str], timeout: float = PATIENCE) -> re.Match[str]:
        """Block until the server prints a line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            line = self.next_line(remaining)
            if line is None:
                self.process.wait(timeout=PATIENCE)
                raise AssertionError(
                    f"twistd exited ({self.process.returncode}) before printing "
                    f"{pattern.pattern!r}:\n{self.output}"
                )
            if line and (match := pattern.search(line)):
                return match
        raise AssertionError(f"twistd did not print {pattern.pattern!r}:\n{self.output}")

    def wait_listening(self) -> int:
        self.port = int(self.wait_for(LISTENING).group(1))
        return self.port

    def wait_exit(self, timeout: float = PATIENCE) -> tuple[int, str]:
        """Read all output until the process ends; a server that starts fails."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            line = self.next_line(remaining)
            if line is None:
                return self.process.wait(timeout=PATIENCE), self.output
            if line and LISTENING.search(line):
                raise AssertionError(f"the server started:\n{self.output}")
        raise AssertionError(f"twistd did not exit:\n{self.output}")

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone (its locks with it)."""
        self.process.kill()
        self.process.wait(timeout=PATIENCE)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=PATIENCE)
        self._reader.join(timeout=PATIENCE)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def assert_healthy(self) -> None:
        assert self.process.poll() is None, f"twistd died:\n{self.output}"
        assert "Traceback" not in self.output, self.output


Launch = Callable[..., Server]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start ``twistd ARGUMENTS...``; every process started is stopped at the end."""
    started: list[Server] = []

    def start(*arguments: str) -> Server:
        server = Server(list(arguments), tmp_path)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def write_passwd(directory: Path, text: str = PASSWORD_LINE) -> Path:
    path = directory / "passwd"
    path.write_text(text)
    return path


def twistd_arguments(mail_location: str, auth: str, *extra: str) -> list[str]:
    """``twistd -n pop3d`` on a free loopback port, with one mail location and one checker."""
    return [
        "-n",
        "--pidfile=",
        "pop3d",
        "--listen",
        f"tcp:0:interface={HOST}",
        "--mail-location",
        mail_location,
        "--auth",
        auth,
        *extra,
    ]


def pop3d_arguments(mail_root: Path, passwd: Path, *extra: str, kind: str = "maildir") -> list[str]:
    return twistd_arguments(f"{kind}:{mail_root}/{{user}}", f"passwd-file:{passwd}", *extra)


def serve(launch: Launch, mail_root: Path, passwd: Path, *extra: str) -> Server:
    """A running ``twistd pop3d`` over ``mail_root``, listening on a free port."""
    server = launch(*pop3d_arguments(mail_root, passwd, *extra))
    server.wait_listening()
    return server


def login(server: Server) -> poplib.POP3:
    """A poplib client logged in as alice (USER/PASS, RFC 1939 section 7)."""
    client = poplib.POP3(HOST, server.port, timeout=PATIENCE)
    try:
        client.user("alice")
        client.pass_("wonderland")
    except BaseException:
        client.close()
        raise
    return client


# -- plugin discovery ----------------------------------------------------------


def test_plugin_help_lists_its_options(launch: Launch) -> None:
    """``twistd pop3d --help`` finds the plugin and documents its options."""
    status, output = launch("pop3d", "--help").wait_exit()
    assert status == 0, output
    for option in ("--listen", "--mail-location", "--auth", "--timeout"):
        assert option in output
    assert "Traceback" not in output


def test_twistd_help_lists_pop3d(launch: Launch) -> None:
    status, output = launch("--help").wait_exit()
    assert status == 0, output
    assert re.search(r"^\s+pop3d\s+A POP3 server", output, re.MULTILINE), output


# -- the documented command ----------------------------------------------------


def test_documented_command_serves_a_maildir(tmp_path: Path, launch: Launch) -> None:
    """
    ``twistd -n --pidfile= pop3d --listen ... --mail-location maildir:ROOT/{user}
    --auth passwd-file:PASSWD --timeout 600``: log in with USER/PASS (RFC 1939
    section 7), RETR (section 5, byte-stuffing of section 3), QUIT (section 6).
    """
    mail_root = tmp_path / "mail"
    passwd = write_passwd(tmp_path)
    message = b"From: rabbit@example.test\nSubject: late\n\nI'm late!\n.dot line\n"
    deliver_to_maildir(str(mail_root / "alice"), message)
    server = launch(
        "-n",
        "--pidfile=",
        "pop3d",
        "--listen",
        f"tcp:0:interface={HOST}",
        "--mail-location",
        f"maildir:{mail_root}/{{user}}",
        "--auth",
        f"passwd-file:{passwd}",
        "--timeout",
        "600",
    )
    server.wait_listening()

    client = login(server)
    try:
        wire_size = len(message) + message.count(b"\n")
        assert client.stat() == (1, wire_size)
        response, lines, _ = client.retr(1)
        assert response.startswith(b"+OK")
        assert lines == message.rstrip(b"\n").split(b"\n")
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()
    server.assert_healthy()


# -- bad options ---------------------------------------------------------------


BAD_OPTIONS = {
    # RFC 1939 section 3: an autologout timer MUST be at least 10 minutes.
    "timeout-below-600": (["--timeout", "30"], "--timeout 30"),
    "timeout-not-a-number": (["--timeout", "abc"], "--timeout 'abc'"),
    "unknown-store": (["--mail-location", "nosuch:/x"], "--mail-location 'nosuch:/x'"),
    "unknown-placeholder": (
        ["--mail-location", "maildir:/x/{bogus}"],
        "--mail-location: unknown placeholder",
    ),
    "no-mail-location": (["--mail-location", None], "--mail-location is required"),
    "no-auth": (["--auth", None], "--auth is required"),
    "missing-passwd-file": (
        ["--auth", "passwd-file:/nonexistent"],
        "--auth passwd-file: cannot read /nonexistent",
    ),
    "unknown-scheme": (["--auth", "passwd-file:BAD"], "--auth passwd-file"),
    "bad-endpoint": (["--listen", "notanendpoint:1"], "--listen 'notanendpoint:1'"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=list(BAD_OPTIONS))
def test_bad_option_is_a_usage_error(case: str, tmp_path: Path, launch: Launch) -> None:
    """
    A bad option stops twistd with a usage error that says what is wrong
    (the option, or the value at fault): no traceback, no server.
    """
    (option, value), expected = BAD_OPTIONS[case]
    bad_passwd = tmp_path / "bad-passwd"
    bad_passwd.write_text("alice:{FOO}x::\n")
    settings = {
        "--listen": f"tcp:0:interface={HOST}",
        "--mail-location": f"maildir:{tmp_path}/mail/{{user}}",
        "--auth": f"passwd-file:{write_passwd(tmp_path)}",
        "--timeout": "600",
    }
    settings[option] = value.replace("BAD", str(bad_passwd)) if value is not None else None
    arguments = ["-n", "--pidfile=", "pop3d"]
    for name, setting in settings.items():
        if setting is not None:
            arguments += [name, setting]

    status, output = launch(*arguments).wait_exit()

    assert status != 0, output
    assert "Traceback" not in output, output
    assert "Usage:" in output, output
    error_line = output.strip().splitlines()[-1]
    assert expected in error_line, output


# -- exclusive access across processes -----------------------------------------


#: The default lock table, and the lock files for Maildirs shared over NFS.
LOCK_KINDS = pytest.mark.parametrize("locks", [(), ("--nfs-locks",)], ids=["table", "nfs"])


@LOCK_KINDS
def test_maildrop_lock_holds_across_processes(
    tmp_path: Path, launch: Launch, locks: tuple[str, ...]
) -> None:
    """
    RFC 1939 section 4: the server takes an exclusive-access lock on the
    maildrop at login, and a login that cannot get it fails; RFC 2449
    section 8.1.2: with [IN-USE].  The lock is released at the end of UPDATE
    (RFC 1939 section 6).  Two processes on one Maildir root must agree.
    """
    mail_root = tmp_path / "mail"
    passwd = write_passwd(tmp_path)
    deliver_to_maildir(str(mail_root / "alice"), b"Subject: one\n\nbody\n")
    first = serve(launch, mail_root, passwd, *locks)
    second = serve(launch, mail_root, passwd, *locks)

    holder = login(first)
    try:
        contender = poplib.POP3(HOST, second.port, timeout=PATIENCE)
        try:
            contender.user("alice")
            with pytest.raises(poplib.error_proto) as refused:
                contender.pass_("wonderland")
            assert refused.value.args[0].startswith(b"-ERR [IN-USE]")
            # The holder's session is untouched by the attempt.
            assert holder.stat()[0] == 1
        finally:
            contender.close()
        assert holder.quit().startswith(b"+OK")
    finally:
        holder.close()

    # QUIT answered +OK only after UPDATE released the lock.
    successor = login(second)
    try:
        assert successor.stat()[0] == 1
        assert successor.quit().startswith(b"+OK")
    finally:
        successor.close()
    first.assert_healthy()
    second.assert_healthy()


@LOCK_KINDS
def test_killed_process_leaves_no_lock_and_deletes_nothing(
    tmp_path: Path, launch: Launch, locks: tuple[str, ...]
) -> None:
    """
    A server killed with SIGKILL holds no lock (the kernel drops its fcntl
    locks; its lock file names a process that is gone), and since its
    session never reached UPDATE, nothing marked by DELE was removed (RFC
    1939 section 6: a session that ends other than by QUIT MUST NOT remove
    any messages).
    """
    mail_root = tmp_path / "mail"
    passwd = write_passwd(tmp_path)
    maildir = mail_root / "alice"
    for number in (1, 2):
        deliver_to_maildir(str(maildir), b"Subject: %d\n\nbody\n" % number)
    delivered = sorted(os.listdir(maildir / "new"))
    doomed = serve(launch, mail_root, passwd, *locks)
    survivor = serve(launch, mail_root, passwd, *locks)

    victim = login(doomed)
    try:
        assert victim.dele(1).startswith(b"+OK")
        doomed.kill()
    finally:
        victim.close()

    client = login(survivor)
    try:
        assert client.stat()[0] == 2
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()
    # Every message is still there (QUIT moved them from new/ to cur/, as
    # Dovecot does, keeping their unique names).
    remaining = [
        name.split(":")[0] for part in ("new", "cur") for name in os.listdir(maildir / part)
    ]
    assert sorted(remaining) == delivered
    survivor.assert_healthy()


# -- memory: a huge message is streamed, never buffered ------------------------


def _big_block() -> bytes:
    """1 MiB of 1 KiB LF-terminated lines, some starting with "." (one is just ".")."""
    lines = []
    for number in range(1024):
        if number == 500:
            lines.append(b".\n")
            continue
        start = b"." if number % 50 == 0 else b"x"
        lines.append(start + b"%07d " % number + b"a" * 1014 + b"\n")
    block = b"".join(lines)
    return block + b"y" * (MiB - len(block) - 1) + b"\n"


BLOCKS = 200


class BigMessage:
    """Where the 200 MiB message is, and what RETR must send for it."""

    def __init__(self, mail_root: Path, passwd: Path) -> None:
        self.mail_root = mail_root
        self.passwd = passwd
        header = b"From: big@example.test\nSubject: huge\n\n"
        block = _big_block()
        maildir = mail_root / "alice"
        for part in ("tmp", "new", "cur"):
            (maildir / part).mkdir(parents=True)
        temporary = maildir / "tmp" / "1700000000.M1P1.huge"
        with open(temporary, "wb") as file:
            file.write(header)
            for _ in range(BLOCKS):
                file.write(block)
        temporary.rename(maildir / "new" / temporary.name)
        self.stored_size = len(header) + BLOCKS * len(block)
        self.lines = header.count(b"\n") + BLOCKS * block.count(b"\n")
        # RFC 1939 section 11: each LF counts as CRLF; stuffing dots do not count.
        self.wire_size = self.stored_size + self.lines
        block_lines = block.split(b"\n")[:-1]
        self.dot_lines = BLOCKS * sum(1 for line in block_lines if line.startswith(b"."))


@pytest.fixture(scope="module")
def big_message(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigMessage]:
    root = tmp_path_factory.mktemp("big")
    try:
        yield BigMessage(root / "mail", write_passwd(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def _memory_baseline(pid: int) -> int:
    """
    Reset the process's peak RSS to its current RSS (Linux 4.0+) and return
    it; where that is not possible, the peak so far is the baseline.
    """
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return _memory(pid)["VmHWM"]
    return _memory(pid)["VmRSS"]


class RawClient:
    """A POP3 client on a bare socket, for reading responses without keeping them."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(PATIENCE)
        self.sock.connect((HOST, port))
        self.buffer = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            assert data, "connection closed by the server"
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.line()

    def login(self) -> None:
        assert self.line().startswith(b"+OK")
        assert self.command(b"USER alice").startswith(b"+OK")
        assert self.command(b"PASS wonderland").startswith(b"+OK")

    def discard_multiline(self) -> tuple[int, int]:
        """
        Read a multi-line response body (after its status line) through its
        terminator, keeping nothing.  Returns the octets before the
        terminator line and how many lines were byte-stuffed (RFC 1939
        section 3): a stuffed line starts with "..", and no other line does.
        """
        pending, self.buffer = self.buffer, b""
        received = 0
        stuffed = 0
        stuffing_tail = b"\n"  # the status line ended with CRLF
        terminator_tail = b"\r\n"
        while True:
            chunk = pending or self.sock.recv(MiB)
            pending = b""
            assert chunk, f"connection closed after {received} octets"
            joined = stuffing_tail + chunk
            stuffed += joined.count(b"\n..")
            stuffing_tail = joined[-2:]
            joined = terminator_tail + chunk
            end = joined.find(b"\r\n.\r\n")
            received += len(chunk)
            if end != -1:
                assert end + 5 == len(joined), "octets after the terminator"
                return received - len(b".\r\n"), stuffed
            terminator_tail = joined[-4:]

    def queued(self) -> int:
        """Octets received by the kernel and not read yet (FIONREAD)."""
        answer = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
        return int(struct.unpack("i", answer)[0])

    def close(self) -> None:
        self.sock.close()


def test_huge_message_is_streamed_in_bounded_memory(
    big_message: BigMessage, launch: Launch
) -> None:
    """
    RETR of a 200 MiB message (RFC 1939 section 5) sends exactly its wire
    size plus one stuffing dot per line starting with "." (section 3), while
    the server's resident memory grows by less than 20 MB: not at login
    (sizing the message, section 4) and not while sending it.
    """
    server = serve(launch, big_message.mail_root, big_message.passwd)
    baseline = _memory_baseline(server.pid)
    client = RawClient(server.port)
    try:
        client.login()
        after_login = _memory(server.pid)["VmHWM"]
        assert after_login - baseline < MEMORY_LIMIT, (baseline, after_login)

        assert client.command(b"LIST 1") == b"+OK 1 %d" % big_message.wire_size
        status = client.command(b"RETR 1")
        assert re.fullmatch(rb"\+OK (\d+) octets", status), status
        announced = int(status.split()[1])
        assert announced == big_message.wire_size
        received, stuffed = client.discard_multiline()
        assert stuffed == big_message.dot_lines
        assert received == announced + big_message.dot_lines

        peak = _memory(server.pid)["VmHWM"]
        assert peak - baseline < MEMORY_LIMIT, (baseline, peak)
        assert client.command(b"QUIT").startswith(b"+OK")
    finally:
        client.close()
    server.assert_healthy()
