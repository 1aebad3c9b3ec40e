"""
A third-party store as a plug-in: ``examples/sqlite_store`` keeps mail in an
SQLite file, reads it in the reactor's thread pool (bodies answer with
Deferreds) and is installed as a twisted.plugin dropin that makes
``--mail-location sqlite:PATH`` known to ``twistd pop3d``.
"""

from __future__ import annotations

import importlib.util
import os
import poplib
import re
import sqlite3
import sys
from pathlib import Path
from types import ModuleType

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from pop3d.errors import MaildropLocked, MessageGone
from pop3d.stores.interfaces import IMaildropStore, IMailLocationPlugin, MailLocationError
from tests.test_process import HOST, PATIENCE, Launch, launch, write_passwd

__all__ = ["launch"]  # the fixture the process tests use

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sqlite_store"


def _load_example() -> ModuleType:
    """The example's module, loaded from its file (the test process's path is left alone)."""
    spec = importlib.util.spec_from_file_location("pop3d_sqlite", EXAMPLE / "pop3d_sqlite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("pop3d_sqlite", module)
    spec.loader.exec_module(module)
    return module


example = _load_example()

#: Body lines start with dots (byte-stuffed on the wire, RFC 1939 section 3)
#: and "From " (served as stored).
FIRST = b"From: rabbit@example.test\nSubject: late\n\nI'm late!\n.dot line\n..two dots\n"
#: Large enough to be read in many pieces, each a Deferred.
SECOND = b"Subject: long\n\n" + b"".join(b"line %06d of a long message\n" % n for n in range(8000))


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "mail.sqlite"
    example.deliver(str(path), "alice", FIRST)
    example.deliver(str(path), "alice", SECOND)
    example.deliver(str(path), "bob", b"Subject: not alice's\n\nx\n")
    return path


def sqlite_store(database: Path) -> IMaildropStore:
    location = example.SQLiteLocation()
    assert IMailLocationPlugin.providedBy(location)
    location.check(str(database), {})
    store: IMaildropStore = location.make(str(database), {}, reactor, Clock())
    return store


async def read_all(body: object) -> bytes:
    """Every byte of a body whose reads answer later (Deferreds), 4 KiB at a time."""
    data = b""
    while True:
        answer = body.read(4096)  # type: ignore[attr-defined]
        assert isinstance(answer, Deferred), "the example answers from its thread pool"
        chunk = await answer
        if not chunk:
            return data
        data += chunk


# -- the store, in this process -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lists_and_reads_a_mailbox_asynchronously(database: Path) -> None:
    """Sizes are wire sizes (RFC 1939 section 11); bodies are read back as stored."""
    maildrop = await sqlite_store(database).open("alice")
    try:
        assert maildrop.messages.uids == ("1", "2")
        assert maildrop.messages.sizes == (
            len(FIRST) + FIRST.count(b"\n"),
            len(SECOND) + SECOND.count(b"\n"),
        )
        for index, stored in enumerate([FIRST, SECOND]):
            body = await maybeDeferred(maildrop.open_message, index)
            try:
                assert await read_all(body) == stored
            finally:
                body.close()
    finally:
        await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_a_message_deleted_while_it_is_read_is_read_to_its_end(database: Path) -> None:
    maildrop = await sqlite_store(database).open("alice")
    try:
        body = await maybeDeferred(maildrop.open_message, 1)
        first = await body.read(100)
        with sqlite3.connect(database) as other:
            other.execute("DELETE FROM messages WHERE id = 2")
        assert first + await read_all(body) == SECOND
        body.close()
    finally:
        await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_a_message_deleted_before_it_is_opened_is_gone(database: Path) -> None:
    maildrop = await sqlite_store(database).open("alice")
    try:
        with sqlite3.connect(database) as other:
            other.execute("DELETE FROM messages WHERE id = 1")
        with pytest.raises(MessageGone):
            await maybeDeferred(maildrop.open_message, 0)
    finally:
        await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_one_session_per_maildrop(database: Path) -> None:
    store = sqlite_store(database)
    maildrop = await store.open("alice")
    with pytest.raises(MaildropLocked):
        await store.open("alice")
    other = await store.open("bob")
    await other.close()
    await maildrop.close()
    again = await store.open("alice")
    await again.close()


@pytest_twisted.ensureDeferred
async def test_update_deletes_only_the_deleted_rows(database: Path) -> None:
    """RFC 1939 section 6: the messages marked as deleted are removed, no other."""
    maildrop = await sqlite_store(database).open("alice")
    try:
        await maildrop.remove([0])
    finally:
        await maildrop.close()
    assert example.stored(str(database), "alice") == [SECOND]
    assert example.stored(str(database), "bob") == [b"Subject: not alice's\n\nx\n"]


@pytest.mark.parametrize(
    ("argument", "options", "error"),
    [
        ("", {}, "--mail-location sqlite: needs a database file"),
        ("/nonexistent/mail.sqlite", {}, "--mail-location sqlite:/nonexistent/mail.sqlite: "),
        ("DB", {"uidl-format": "%u"}, "--uidl-format does not apply to --mail-location sqlite:"),
        ("DB", {"nfs-locks": 1}, "--nfs-locks does not apply to --mail-location sqlite:"),
    ],
)
def test_what_the_plugin_refuses(tmp_path: Path, argument: str, options: dict, error: str) -> None:
    with pytest.raises(MailLocationError) as refused:
        example.SQLiteLocation().check(argument.replace("DB", f"{tmp_path}/db"), options)
    assert str(refused.value).startswith(error)


# -- twistd pop3d with the example installed ------------------------------------


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example on the PYTHONPATH of the twistd processes the test starts."""
    paths = [str(EXAMPLE), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))


@pytest.mark.process
def test_help_mail_location_lists_the_installed_stores(installed: None, launch: Launch) -> None:
    status, output = launch("pop3d", "--help-mail-location").wait_exit()
    assert status == 0, output
    assert "Traceback" not in output, output
    schemes = re.findall(r"^  (\w+):", output, re.MULTILINE)
    assert schemes == ["maildir", "mbox", "sqlite"], output
    assert "  sqlite:PATH of the SQLite file, e.g. sqlite:/var/mail/pop3d.sqlite\n" in output
    assert "      messages in one SQLite file" in output


@pytest.mark.process
def test_twistd_serves_the_sqlite_store(
    installed: None, database: Path, tmp_path: Path, launch: Launch
) -> None:
    """
    ``twistd pop3d --mail-location sqlite:DB``: STAT, UIDL, RETR byte for
    byte (RFC 1939 sections 5 and 7), and DELE then QUIT deletes the row
    (section 6).
    """
    server = launch(
        "-n", "--pidfile=", "pop3d",
        "--listen", f"tcp:0:interface={HOST}",
        "--mail-location", f"sqlite:{database}",
        "--auth", f"passwd-file:{write_passwd(tmp_path)}",
    )  # fmt: skip
    server.wait_listening()
    client = poplib.POP3(HOST, server.port, timeout=PATIENCE)
    try:
        client.user("alice")
        client.pass_("wonderland")
        wire = [len(m) + m.count(b"\n") for m in (FIRST, SECOND)]
        assert client.stat() == (2, sum(wire))
        assert client.uidl()[1] == [b"1 1", b"2 2"]
        for number, stored in enumerate([FIRST, SECOND], start=1):
            response, lines, _ = client.retr(number)
            assert response == b"+OK %d octets" % wire[number - 1]
            assert b"\n".join(lines) + b"\n" == stored
        assert client.dele(1) == b"+OK message 1 deleted"
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()
    server.assert_healthy()
    assert example.stored(str(database), "alice") == [SECOND]


@pytest.mark.process
def test_an_unknown_scheme_names_the_installed_ones(
    installed: None, tmp_path: Path, launch: Launch
) -> None:
    status, output = launch(
        "-n", "--pidfile=", "pop3d",
        "--mail-location", "postgres://db/mail",
        "--auth", f"passwd-file:{write_passwd(tmp_path)}",
    ).wait_exit()  # fmt: skip
    assert status != 0, output
    assert "Traceback" not in output, output
    assert (
        output.strip()
        .splitlines()[-1]
        .endswith(
            ": --mail-location 'postgres://db/mail': expected SCHEME:ARGUMENT, SCHEME one "
            "of the installed stores: maildir, mbox, sqlite (twistd pop3d --help-mail-location "
            "tells more)"
        )
    ), output
