"""
The life of a ``twistd pop3d`` process, run for real: SIGTERM (a graceful
stop), SIGHUP (reloading), ``--uid``/``--gid`` (dropping root after binding
a privileged port), and the systemd units in ``contrib/systemd/``.
"""

from __future__ import annotations

import ctypes
import grp
import os
import poplib
import pwd
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3d.lifecycle import DRAIN_TIMEOUT
from pop3d.testing import deliver_to_maildir
from pop3d.workers import STOP_TIMEOUT

from .conftest import require_program
from .test_process import (
    HOST,
    PATIENCE,
    Launch,
    RawClient,
    Server,
    launch,
    pop3d_arguments,
    serve,
    write_passwd,
)

__all__ = ["launch"]

pytestmark = pytest.mark.process

PASSWORDS = "alice:{PLAIN}wonderland::\nbob:{PLAIN}builder::\n"
#: Enough messages that removing them all takes a while (it runs in a thread).
MANY = 5000
SHUTTING_DOWN = b"-ERR [SYS/TEMP] server shutting down, try again later\r\n"
WORKER_LISTENING = re.compile(r"pop3d worker (\d+) listening on [\d.]+:(\d+)")
CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


def _files(maildir: Path) -> list[str]:
    return sorted(name for part in ("new", "cur") for name in os.listdir(maildir / part))


def _log_in(client: RawClient, user: bytes, password: bytes) -> None:
    assert client.line().startswith(b"+OK")
    assert client.command(b"USER " + user).startswith(b"+OK")
    assert client.command(b"PASS " + password).startswith(b"+OK")


#: inotify(7): a name was removed from a watched directory.
IN_DELETE = 0x200


class DeletionWatch:
    """
    Tells when a file is removed from one of ``directories`` (inotify): an
    event, not a poll, for "UPDATE has started removing".
    """

    def __init__(self, *directories: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_CLOEXEC)
        assert self._fd >= 0, os.strerror(ctypes.get_errno())
        for directory in directories:
            watch = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), IN_DELETE)
            assert watch >= 0, os.strerror(ctypes.get_errno())

    def wait(self) -> None:
        readable, _, _ = select.select([self._fd], [], [], PATIENCE)
        assert readable, "nothing was removed"
        os.read(self._fd, 65536)

    def close(self) -> None:
        os.close(self._fd)


def _rest(client: RawClient) -> bytes:
    """Everything the server still sends, up to its end of the connection."""
    received, client.buffer = client.buffer, b""
    while data := client.sock.recv(65536):
        received += data
    return received


def test_sigterm_closes_sessions_without_update_and_lets_update_finish(
    tmp_path: Path, launch: Launch
) -> None:
    """
    SIGTERM: the server stops accepting; a session in TRANSACTION with a
    message marked by DELE is closed without UPDATE (RFC 1939 section 6:
    only QUIT enters UPDATE, so nothing is removed) and told why (RFC 3206
    section 4, SYS/TEMP); a session whose QUIT had started UPDATE finishes it and gets
    its +OK; the process exits within its bound.
    """
    mail_root = tmp_path / "mail"
    passwd = write_passwd(tmp_path, PASSWORDS)
    deliver_to_maildir(str(mail_root / "alice"), b"Subject: keep me\n\nbody\n")
    for number in range(MANY):
        deliver_to_maildir(str(mail_root / "bob"), b"Subject: %d\n\nbody\n" % number)
    kept = _files(mail_root / "alice")
    server = serve(launch, mail_root, passwd)

    idle = RawClient(server.port)
    quitting = RawClient(server.port)
    try:
        _log_in(idle, b"alice", b"wonderland")
        assert idle.command(b"DELE 1") == b"+OK message 1 deleted"
        _log_in(quitting, b"bob", b"builder")
        quitting.sock.sendall(b"".join(b"DELE %d\r\n" % n for n in range(1, MANY + 1)))
        for number in range(1, MANY + 1):
            assert quitting.line() == b"+OK message %d deleted" % number
        watch = DeletionWatch(mail_root / "bob" / "new", mail_root / "bob" / "cur")
        try:
            quitting.sock.sendall(b"QUIT\r\n")
            watch.wait()  # UPDATE has removed a first message: it is under way
        finally:
            watch.close()

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        status, output = server.wait_exit(timeout=PATIENCE)
        elapsed = time.monotonic() - started

        # twistd ends by the signal it got, as systemd expects of a stopped service.
        assert status == -signal.SIGTERM, output
        assert elapsed < DRAIN_TIMEOUT + 5, output
        assert "waiting up to 5 s for 1 sessions in UPDATE" in output, output
        assert "closed 1 sessions without UPDATE" in output, output
        assert "Traceback" not in output, output
        # The idle client is told, then disconnected; its DELE had no effect.
        assert _rest(idle) == SHUTTING_DOWN
        assert _files(mail_root / "alice") == kept
        # UPDATE ran to its end: every message bob deleted is gone.
        assert re.fullmatch(rb"\+OK [^\r\n]*\r\n", _rest(quitting)), output
        assert _files(mail_root / "bob") == []
    finally:
        idle.close()
        quitting.close()
    # Nothing listens any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, server.port), timeout=PATIENCE).close()


def test_sigterm_with_workers(tmp_path: Path, launch: Launch) -> None:
    """
    With --workers the parent passes SIGTERM on: each worker closes its
    sessions without UPDATE (nothing deleted) and the parent, having waited
    for them, exits in time.
    """
    mail_root = tmp_path / "mail"
    passwd = write_passwd(tmp_path, PASSWORDS)
    deliver_to_maildir(str(mail_root / "alice"), b"Subject: keep me\n\nbody\n")
    kept = _files(mail_root / "alice")
    server = launch(*pop3d_arguments(mail_root, passwd, "--workers", "2"))
    port = int(server.wait_for(WORKER_LISTENING).group(2))
    server.wait_for(WORKER_LISTENING)
    client = RawClient(port)
    try:
        _log_in(client, b"alice", b"wonderland")
        assert client.command(b"DELE 1") == b"+OK message 1 deleted"
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert _rest(client) == SHUTTING_DOWN
        status, output = server.wait_exit(timeout=PATIENCE)
        assert time.monotonic() - started < STOP_TIMEOUT, output
    finally:
        client.close()
    assert status == -signal.SIGTERM, output
    # Each worker stopped gracefully.
    assert output.count("[pop3d.lifecycle#info] shutting down") == 2, output
    assert "Traceback" not in output, output
    assert _files(mail_root / "alice") == kept


def test_sighup_rereads_the_passwd_file(tmp_path: Path, launch: Launch) -> None:
    """SIGHUP reads a changed passwd file at once; the new password logs in."""
    mail_root = tmp_path / "mail"
    passwd = write_passwd(tmp_path, PASSWORDS)
    deliver_to_maildir(str(mail_root / "alice"), b"Subject: hi\n\nbody\n")
    server = serve(launch, mail_root, passwd)
    replacement = tmp_path / "passwd.new"
    replacement.write_text("alice:{PLAIN}looking-glass::\n")
    replacement.rename(passwd)

    server.process.send_signal(signal.SIGHUP)
    server.wait_for(re.compile(re.escape(f"reloaded {passwd}")))

    client = poplib.POP3(HOST, server.port, timeout=PATIENCE)
    try:
        client.user("alice")
        assert client.pass_("looking-glass").startswith(b"+OK")
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()
    server.assert_healthy()


# -- dropping root -------------------------------------------------------------


def _free_privileged_port() -> int:
    """110 if it is free on the loopback, else another port below 1024."""
    for port in (110, *range(1023, 600, -1)):
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024 on the loopback")


@pytest.fixture
def world_readable_directory() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="pop3d-uid-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _status_ids(pid: int, field: str) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, values = line.partition(":")
        if name == field:
            return [int(value) for value in values.split()]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


# Marked peer as the house rules have it for a test that fails in CI where it
# would skip elsewhere (here: not being root).
@pytest.mark.peer
def test_uid_gid_drop_root_after_binding_a_privileged_port(
    world_readable_directory: Path,
) -> None:
    """
    ``twistd --uid nobody --gid nogroup pop3d --listen tcp:110``: the port is
    bound as root, then the process runs as nobody, serves mail from a
    Maildir nobody owns, and keeps its lock table and --login-history file
    (beside the Maildirs, by default) as nobody.
    """
    if os.geteuid() != 0:
        reason = "dropping privileges needs root (CI runs as root)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    user = pwd.getpwnam("nobody")
    group = grp.getgrgid(user.pw_gid)
    base = world_readable_directory
    mail_root = base / "mail"
    message = b"Subject: from root to nobody\n\nbody\n"
    deliver_to_maildir(str(mail_root / "alice"), message)
    for directory, _, files in os.walk(mail_root):
        for name in [directory, *(os.path.join(directory, f) for f in files)]:
            os.chown(name, user.pw_uid, group.gr_gid)
    passwd = write_passwd(base, PASSWORDS)
    passwd.chmod(0o644)
    port = _free_privileged_port()
    arguments = pop3d_arguments(mail_root, passwd, "--login-delay", "1")
    arguments[arguments.index(f"tcp:0:interface={HOST}")] = f"tcp:{port}:interface={HOST}"
    server = Server(["--uid", user.pw_name, "--gid", group.gr_name, *arguments], base)
    try:
        assert server.wait_listening() == port
        client = poplib.POP3(HOST, port, timeout=PATIENCE)
        try:
            client.user("alice")
            assert client.pass_("wonderland").startswith(b"+OK")
            assert client.retr(1)[1] == message.rstrip(b"\n").split(b"\n")
            assert client.quit().startswith(b"+OK")
        finally:
            client.close()
        # The process that served it (twistd itself) runs as nobody only.
        assert _status_ids(server.pid, "Uid") == [user.pw_uid] * 4
        assert _status_ids(server.pid, "Gid") == [group.gr_gid] * 4
        assert _status_ids(server.pid, "Groups") == [group.gr_gid]
        for made in (".pop3d-locks", ".pop3d-logins"):
            assert (mail_root / made).stat().st_uid == user.pw_uid, made
        server.assert_healthy()
    finally:
        server.stop()


# -- systemd -------------------------------------------------------------------


@pytest.mark.peer
def test_systemd_units_verify(tmp_path: Path) -> None:
    """
    ``systemd-analyze verify`` accepts contrib/systemd/pop3d.service and
    pop3d.socket (with ExecStart pointed at this twistd, since verify checks
    that the program exists).  .ci/run installs systemd-analyze; without it
    the test fails in CI and is skipped elsewhere.
    """
    analyze = require_program("systemd-analyze")
    twistd = Path(sys.executable).parent / "twistd"
    for name in ("pop3d.service", "pop3d.socket"):
        text = (CONTRIB / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/twistd", str(twistd)))
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "pop3d.socket"), str(tmp_path / "pop3d.service")],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    ours = [line for line in report.splitlines() if "pop3d." in line]
    assert ours == [], report


#: Listens the way pop3d.socket does (IPv6 and IPv4 on one socket), passes
#: it as systemd does (fd 3, LISTEN_FDS, LISTEN_PID), then runs twistd.
_ACTIVATE = r"""
import os, socket, sys
listener = socket.socket(socket.AF_INET6)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.bind(("::", 0))
listener.listen()
os.dup2(listener.fileno(), 3)
os.set_inheritable(3, True)
print(listener.getsockname()[1], flush=True)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="pop3d.socket", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-c",
    "from twisted.scripts.twistd import run; run()", *sys.argv[1:]])
"""


def _dual_stack() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _dual_stack(), reason="this machine has no IPv6")
def test_systemd_service_command_serves_the_socket_unit(tmp_path: Path) -> None:
    """
    The ExecStart of contrib/systemd/pop3d.service, given the socket
    pop3d.socket describes (dual-stack, passed as fd 3), serves mail over
    IPv4 (only the Maildir and passwd paths are changed for the test).
    """
    unit = (CONTRIB / "pop3d.service").read_text().replace("\\\n", " ")
    execstart = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    mail_root = tmp_path / "mail"
    passwd = write_passwd(tmp_path, PASSWORDS)
    message = b"Subject: activated\n\nbody\n"
    deliver_to_maildir(str(mail_root / "alice"), message)
    execstart = execstart.replace("/srv/mail", str(mail_root))
    execstart = execstart.replace("/etc/pop3d/passwd", str(passwd))
    arguments = shlex.split(execstart.removeprefix("ExecStart="))[1:]
    server = subprocess.Popen(
        [sys.executable, "-c", _ACTIVATE, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        # The socket listens before twistd starts: connecting needs no wait.
        client = poplib.POP3(HOST, port, timeout=PATIENCE)
        try:
            client.user("alice")
            assert client.pass_("wonderland").startswith(b"+OK")
            assert client.retr(1)[1] == message.rstrip(b"\n").split(b"\n")
            assert client.quit().startswith(b"+OK")
        finally:
            client.close()
    finally:
        server.kill()
        server.wait()
        server.stdout.close()  # type: ignore[union-attr]
