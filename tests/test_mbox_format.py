"""
mboxo against mboxrd: a body line ``>From `` that its author wrote (a
quoted reply) is served as stored by default, because Postfix local(8),
procmail and mail.local (mboxo) leave it alone; ``MboxStore(...,
format=MboxFormat.MBOXRD)`` / ``--mbox-format mboxrd`` removes one ``>``
for files an mboxrd writer wrote.  Sizes, TOP, UIDLs and the rewrite at
QUIT in both; the real procmail and the real ``twistd pop3d`` at the end.
"""

from __future__ import annotations

import poplib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from pop3d.factory import POP3Factory
from pop3d.session import SessionPolicy
from pop3d.stores.mbox import MboxFormat, MboxStore
from pop3d.testing import memory_portal

from .conftest import USERS, Wire, require_program
from .test_dovecot_migration import DOVECOT_POP3, _as_nobody, _require_dovecot
from .test_process import PATIENCE, Server, login, pop3d_arguments, write_passwd

FROM_LINE = b"From sender@example.test  Thu Nov 26 12:13:17 2026\n"

# A quoted reply as procmail or Postfix local(8) stores it: they leave a
# line that already starts with ">From " as it is.
QUOTED_REPLY = FROM_LINE + b"Subject: quoted reply\n\n>From the earlier mail\n>>From x\n\n"

# The UIDL this module gave QUOTED_REPLY before the format could be chosen
# (the SHA-256 of the From_ line and the mboxrd reading of the message).
QUOTED_REPLY_UIDL = b"90044a64b9d46aa41f892d4de7fd6ca684294259"


@pytest.fixture
def mail(tmp_path: Path) -> Path:
    directory = tmp_path / "mail"
    directory.mkdir()
    return directory


@pytest.fixture
def alice(mail: Path) -> Path:
    return mail / "alice"


def session(mail: Path, format: MboxFormat | None = None) -> Wire:
    """A logged-in session over the mbox files in ``mail`` (the store runs inline)."""
    store = (
        MboxStore(f"{mail}/{{user}}")
        if format is None
        else MboxStore(f"{mail}/{{user}}", format=format)
    )
    factory = POP3Factory(
        memory_portal(store, USERS),
        clock=Clock(),
        hostname="pop.example.test",
        policy=SessionPolicy(),
        login_failure_delay=0,
    )
    wire = Wire(factory)
    assert wire.login().startswith(b"+OK ")
    return wire


def test_by_default_every_line_is_served_as_stored(mail: Path, alice: Path) -> None:
    """
    RFC 1939 section 7: RETR sends the message; section 11: LIST and STAT
    give its size, exactly the octets RETR sends (here 59: 23 + 2 + 24 + 10).
    """
    alice.write_bytes(QUOTED_REPLY)
    wire = session(mail)
    assert wire.command(b"STAT") == b"+OK 1 59\r\n"
    assert wire.command(b"LIST 1") == b"+OK 1 59\r\n"
    message = b"Subject: quoted reply\r\n\r\n>From the earlier mail\r\n>>From x\r\n"
    assert len(message) == 59
    assert wire.command(b"RETR 1") == b"+OK 59 octets\r\n" + message + b".\r\n"
    assert wire.command(b"TOP 1 1") == (
        b"+OK top of message follows\r\nSubject: quoted reply\r\n\r\n>From the earlier mail\r\n"
        b".\r\n"
    )


def test_mboxo_is_the_explicit_default(mail: Path, alice: Path) -> None:
    alice.write_bytes(QUOTED_REPLY)
    wire = session(mail, MboxFormat.MBOXO)
    assert wire.command(b"RETR 1") == (
        b"+OK 59 octets\r\nSubject: quoted reply\r\n\r\n>From the earlier mail\r\n>>From x\r\n.\r\n"
    )


def test_mboxrd_removes_one_quote(mail: Path, alice: Path) -> None:
    """The same file as an mboxrd writer's: one ">" less on every ^>+From line."""
    alice.write_bytes(QUOTED_REPLY)
    wire = session(mail, MboxFormat.MBOXRD)
    assert wire.command(b"STAT") == b"+OK 1 57\r\n"
    assert wire.command(b"LIST 1") == b"+OK 1 57\r\n"
    message = b"Subject: quoted reply\r\n\r\nFrom the earlier mail\r\n>From x\r\n"
    assert len(message) == 57
    assert wire.command(b"RETR 1") == b"+OK 57 octets\r\n" + message + b".\r\n"
    assert wire.command(b"TOP 1 1") == (
        b"+OK top of message follows\r\nSubject: quoted reply\r\n\r\nFrom the earlier mail\r\n.\r\n"
    )


@pytest.mark.parametrize("format", [None, *MboxFormat], ids=["default", "mboxo", "mboxrd"])
def test_the_uidl_does_not_depend_on_the_format(
    mail: Path, alice: Path, format: MboxFormat | None
) -> None:
    """
    RFC 1939 section 7: a UIDL persists across sessions.  The one served
    before the format could be chosen stays, whichever is chosen, so no
    client downloads its mail again.
    """
    alice.write_bytes(QUOTED_REPLY)
    wire = session(mail, format)
    assert wire.command(b"UIDL 1") == b"+OK 1 " + QUOTED_REPLY_UIDL + b"\r\n"


@pytest.mark.parametrize("format", list(MboxFormat), ids=lambda format: format.value)
def test_the_rewrite_at_quit_copies_kept_messages_as_stored(
    mail: Path, alice: Path, format: MboxFormat
) -> None:
    """
    RFC 1939 section 6: UPDATE removes the deleted message; the others stay
    byte for byte, never quoted or un-quoted, whichever the format.
    """
    deleted = FROM_LINE + b"Subject: deleted\n\n>From gone\n\n"
    procmail_quoted = FROM_LINE + b"Subject: kept\n\n>From the start\n>>>From y\n"
    alice.write_bytes(QUOTED_REPLY + deleted + procmail_quoted)
    wire = session(mail, format)
    assert wire.command(b"DELE 2") == b"+OK message 2 deleted\r\n"
    assert wire.command(b"QUIT").startswith(b"+OK ")
    assert alice.read_bytes() == (
        b"From sender@example.test  Thu Nov 26 12:13:17 2026\n"
        b"Subject: quoted reply\n\n>From the earlier mail\n>>From x\n\n"
        b"From sender@example.test  Thu Nov 26 12:13:17 2026\n"
        b"Subject: kept\n\n>From the start\n>>>From y\n"
    )


@pytest.mark.peer
def test_dovecot_serves_the_same_octets(mail: Path, alice: Path) -> None:
    """
    Dovecot's POP3 server, over the same mbox file, answers LIST and RETR
    (RFC 1939 section 7) with the very octets pop3d sends by default.
    """
    _require_dovecot()
    alice.write_bytes(QUOTED_REPLY)
    ours = session(mail)
    expected_list = ours.command(b"LIST 1")
    expected_retr = ours.command(b"RETR 1")
    assert expected_list == b"+OK 1 59\r\n"
    # Dovecot runs as nobody, who cannot enter pytest's private directory.
    shared = Path(tempfile.mkdtemp(prefix="pop3d-dovecot-mbox-"))
    try:
        shared.chmod(0o755)
        home = shared / "home"
        (home / "mail").mkdir(parents=True)
        (home / "inbox").write_bytes(QUOTED_REPLY)
        for path in (home, home / "mail", home / "inbox"):
            shutil.chown(path, "nobody")
        config = shared / "dovecot.conf"
        config.write_text(
            "mail_location = mbox:~/mail:INBOX=~/inbox\nprotocols =\nssl = no\n"
            "log_path = /dev/stderr\npostmaster_address = postmaster@example.org\n"
        )
        config.chmod(0o644)
        answer = _as_nobody(home, config, DOVECOT_POP3, stdin=b"LIST 1\r\nRETR 1\r\nQUIT\r\n")
    finally:
        shutil.rmtree(shared)
    assert expected_list + expected_retr in answer


# -- the real procmail and the real server ----------------------------------------


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``twistd pop3d`` over ``mbox:MAIL/{user}`` with more options; stopped at the end."""
    started: list[Server] = []
    passwd = write_passwd(tmp_path)

    def start(mail: Path, *extra: str) -> Server:
        server = Server(pop3d_arguments(mail, passwd, *extra, kind="mbox"), tmp_path)
        started.append(server)
        server.wait_listening()
        return server

    yield start
    for server in started:
        server.stop()


def retr_exactly(client: poplib.POP3, number: int) -> bytes:
    """Every octet of the answer to RETR, status line and terminating ".\\r\\n" included."""
    client.sock.sendall(b"RETR %d\r\n" % number)
    answer = [client.file.readline()]
    if answer[0].startswith(b"+OK"):
        while answer[-1] != b".\r\n":
            line = client.file.readline()
            assert line, "the server closed the connection during RETR"
            answer.append(line)
    return b"".join(answer)


@pytest.mark.process
@pytest.mark.peer
def test_procmail_delivery_is_served_as_procmail_stored_it(
    tmp_path: Path, mail: Path, alice: Path, serve: Callable[..., Server]
) -> None:
    """
    procmail writes mboxo: it quotes the body line "From the start" as
    ">From the start" and leaves the author's ">From the earlier mail" and
    ">>From x" alone.  Then the two ">From " lines are the same bytes; the
    default serves both as stored, so the author's lines arrive unaltered.
    RETR (RFC 1939 section 7) sends CRLF lines (section 3), as many octets
    as LIST announced (section 11).
    """
    procmail = require_program("procmail")
    rcfile = tmp_path / "procmailrc"
    rcfile.write_text(f"LOCKSLEEP=1\n:0:\n{alice}\n")
    message = (
        b"From: author@example.test\n"
        b"Subject: re: the earlier mail\n"
        b"\n"
        b"From the start of a line, procmail quotes.\n"
        b">From the earlier mail, you wrote:\n"
        b">>From x\n"
        b"bye\n"
    )
    delivered = subprocess.run(
        [procmail, "-m", "-f", "sender@example.test", str(rcfile)],
        input=message,
        timeout=PATIENCE,
        check=False,
    )
    assert delivered.returncode == 0
    stored = alice.read_bytes()
    assert stored.startswith(b"From sender@example.test ")
    assert stored.split(b"\n", 1)[1] == (
        b"From: author@example.test\n"
        b"Subject: re: the earlier mail\n"
        b"\n"
        b">From the start of a line, procmail quotes.\n"
        b">From the earlier mail, you wrote:\n"
        b">>From x\n"
        b"bye\n"
        b"\n"
    )

    server = serve(mail)
    client = login(server)
    try:
        served = (
            b"From: author@example.test\r\n"
            b"Subject: re: the earlier mail\r\n"
            b"\r\n"
            b">From the start of a line, procmail quotes.\r\n"
            b">From the earlier mail, you wrote:\r\n"
            b">>From x\r\n"
            b"bye\r\n"
        )
        assert client.list(1) == b"+OK 1 %d" % len(served)
        assert retr_exactly(client, 1) == b"+OK %d octets\r\n" % len(served) + served + b".\r\n"
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()
    server.assert_healthy()


@pytest.mark.process
def test_twistd_mbox_format_mboxrd_removes_one_quote(
    mail: Path, alice: Path, serve: Callable[..., Server]
) -> None:
    """``--mbox-format mboxrd`` reaches the store of the real server."""
    alice.write_bytes(QUOTED_REPLY)
    server = serve(mail, "--mbox-format", "mboxrd")
    client = login(server)
    try:
        assert client.list(1) == b"+OK 1 57"
        assert retr_exactly(client, 1) == (
            b"+OK 57 octets\r\nSubject: quoted reply\r\n\r\nFrom the earlier mail\r\n>From x\r\n"
            b".\r\n"
        )
        assert client.uidl(1) == b"+OK 1 " + QUOTED_REPLY_UIDL
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()
    server.assert_healthy()
