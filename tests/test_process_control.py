"""
``twistd pop3d --control PATH`` run for real, with the real
``python -m pop3d who`` and ``python -m pop3d kick`` commands and poplib
sessions open: alone and with ``--workers 2``.
"""

from __future__ import annotations

import os
import poplib
import re
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pop3d.testing import deliver_to_maildir

from .test_process import (
    HOST,
    PATIENCE,
    Launch,
    launch,
    pop3d_arguments,
    write_passwd,
)

__all__ = ["launch"]

pytestmark = pytest.mark.process

PASSWORDS = "alice:{PLAIN}wonderland::\nbob:{PLAIN}builder::\n"
CONTROL_READY = re.compile(r"control socket at (\S+)")
STARTED = re.compile(
    r"pop3d worker (?P<worker>\d+) listening on [\d.]+:(?P<port>\d+)"
    r"|control socket at (?P<control>\S+)"
)
ISO_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"


@pytest.fixture
def control_path() -> Iterator[str]:
    # Short: a UNIX socket's path has at most 107 bytes.
    with tempfile.TemporaryDirectory(prefix="pop3d-ctl-") as directory:
        yield os.path.join(directory, "control")


#: setup.cfg's console script: ``pop3d who``, ``pop3d kick``.
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "pop3d")


def _pop3d(
    *arguments: str, program: Sequence[str] = (sys.executable, "-m", "pop3d")
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*program, *arguments],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )


def _log_in(port: int, user: str, password: str) -> poplib.POP3:
    client = poplib.POP3(HOST, port, timeout=PATIENCE)
    client.user(user)
    client.pass_(password)
    return client


def _files(maildir: Path) -> list[str]:
    return sorted(p.name for sub in ("new", "cur") for p in (maildir / sub).iterdir())


def test_who_and_kick(tmp_path: Path, launch: Launch, control_path: str) -> None:
    """
    ``who`` lists both sessions; ``kick alice`` drops hers without UPDATE
    (RFC 1939 section 6: her DELE removes nothing), exit status 0; a second
    kick finds nobody, exit status 1; bob's session carries on.
    """
    mail_root = tmp_path / "mail"
    passwd = write_passwd(tmp_path, PASSWORDS)
    deliver_to_maildir(str(mail_root / "alice"), b"Subject: keep me\n\nbody\n")
    kept = _files(mail_root / "alice")
    server = launch(*pop3d_arguments(mail_root, passwd, "--control", control_path))
    port = server.wait_listening()
    assert server.wait_for(CONTROL_READY).group(1) == control_path
    assert stat.S_IMODE(os.lstat(control_path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.lstat(control_path).st_mode)

    alice = _log_in(port, "alice", "wonderland")
    bob = _log_in(port, "bob", "builder")
    try:
        assert alice.dele(1) == b"+OK message 1 deleted"
        alice_port = alice.sock.getsockname()[1]
        bob_port = bob.sock.getsockname()[1]

        who = _pop3d("who", "--control", control_path)
        assert who.returncode == 0, who.stderr
        lines = who.stdout.splitlines()
        assert re.fullmatch(r"USER +PEER +STATE +SINCE +WORKER", lines[0]), who.stdout
        assert re.fullmatch(
            rf"alice +127\.0\.0\.1:{alice_port} +TRANSACTION +{ISO_TIME} +{server.pid}", lines[1]
        ), who.stdout
        assert re.fullmatch(
            rf"bob +127\.0\.0\.1:{bob_port} +TRANSACTION +{ISO_TIME} +{server.pid}", lines[2]
        ), who.stdout
        assert len(lines) == 3

        kick = _pop3d("kick", "--control", control_path, "alice")
        assert (kick.returncode, kick.stdout, kick.stderr) == (0, "kicked 1 session of alice\n", "")
        # RFC 3206 section 4: told why (SYS/TEMP: nothing to alarm the user,
        # the next poll may log in), unasked, before the server hangs up.
        assert alice.file.readline() == b"-ERR [SYS/TEMP] disconnected by the administrator\r\n"
        assert alice.file.read() == b""
        assert _files(mail_root / "alice") == kept

        again = _pop3d("kick", "--control", control_path, "alice", program=[CONSOLE_SCRIPT])
        assert (again.returncode, again.stdout) == (1, "kicked 0 sessions of alice\n")
        assert bob.stat() == (0, 0)
        who = _pop3d("who", "--control", control_path)
        assert [line.split()[0] for line in who.stdout.splitlines()] == ["USER", "bob"]
        # alice can log in again: her maildrop was unlocked.
        _log_in(port, "alice", "wonderland").quit()
    finally:
        alice.close()
        bob.quit()
    assert "Traceback" not in server.output, server.output
    server.stop()
    # The socket went with the server; the commands say so.
    assert not os.path.exists(control_path)
    missing = _pop3d("who", "--control", control_path)
    assert missing.returncode == 1
    assert missing.stderr == (
        f"python -m pop3d who: cannot reach the pop3d control socket {control_path}: "
        "No such file or directory (is twistd pop3d running with --control?)\n"
    )
    missing = _pop3d("kick", "--control", control_path, "alice", program=[CONSOLE_SCRIPT])
    assert missing.returncode == 1
    assert missing.stderr.startswith(
        f"pop3d kick: cannot reach the pop3d control socket {control_path}:"
    )


def test_who_and_kick_with_workers(tmp_path: Path, launch: Launch, control_path: str) -> None:
    """The parent's socket answers for every worker: each asked at PATH.PID."""
    mail_root = tmp_path / "mail"
    passwd = write_passwd(tmp_path, PASSWORDS)
    deliver_to_maildir(str(mail_root / "bob"), b"Subject: keep me\n\nbody\n")
    kept = _files(mail_root / "bob")
    server = launch(
        *pop3d_arguments(mail_root, passwd, "--workers", "2", "--control", control_path)
    )
    workers: set[int] = set()
    ready: set[str] = set()
    while len(workers) < 2 or len(ready) < 3:
        match = server.wait_for(STARTED)
        if match.group("control"):
            ready.add(match.group("control"))
        else:
            workers.add(int(match.group("worker")))
            port = int(match.group("port"))
    assert ready == {control_path, *(f"{control_path}.{pid}" for pid in workers)}
    for path in ready:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600

    clients = [_log_in(port, "alice", "wonderland"), _log_in(port, "bob", "builder")]
    try:
        assert clients[1].dele(1) == b"+OK message 1 deleted"
        who = _pop3d("who", "--control", control_path)
        assert who.returncode == 0, who.stderr
        rows = [line.split() for line in who.stdout.splitlines()[1:]]
        assert [row[0] for row in rows] == ["alice", "bob"], who.stdout
        assert {int(row[4]) for row in rows} <= workers, who.stdout

        kick = _pop3d("kick", "--control", control_path, "bob")
        assert (kick.returncode, kick.stdout) == (0, "kicked 1 session of bob\n"), kick.stderr
        assert clients[1].file.readline() == (
            b"-ERR [SYS/TEMP] disconnected by the administrator\r\n"
        )
        assert clients[1].file.read() == b""
        assert _files(mail_root / "bob") == kept
        assert clients[0].stat() == (0, 0)
    finally:
        clients[0].quit()
        clients[1].close()
    assert "Traceback" not in server.output, server.output
