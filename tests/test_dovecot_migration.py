"""
Replacing Dovecot without making clients download everything again: the
UIDLs Dovecot served are kept (from ``dovecot-uidlist``), and what pop3d
does to a Maildir on QUIT is what Dovecot does.  The interoperability tests
run the real Dovecot: its LDA delivers, its POP3 server lists.
"""

from __future__ import annotations

import os
import poplib
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.python import usage

from pop3d.stores.maildir import MaildirStore
from pop3d.tap import Options
from pop3d.testing import deliver_to_maildir
from pop3d.uidl import (
    DOVECOT_DEFAULT_FORMAT,
    UIDLFormatError,
    check_format,
    expand_format,
    parse_dovecot_uidlist,
)

from .conftest import USERS, start_service

# Written by Dovecot 2.3's LDA (see test_real_dovecot_uidls_are_kept).
UIDLIST = b"""3 V1795695242 N3 G72cebf168a22086b0e4a000083ecc375
1 :1795695242.M381375P18958.vm,S=43,W=47
2 P0000beefcafe :1795695242.M396959P18962.vm,S=39,W=43
"""


class TestFormats:
    def test_parse(self) -> None:
        uidlist = parse_dovecot_uidlist(UIDLIST)
        assert uidlist is not None
        assert uidlist.uidvalidity == 1795695242
        first = uidlist.records["1795695242.M381375P18958.vm,S=43,W=47"]
        assert (first.uid, first.stored_uidl) == (1, None)
        second = uidlist.records["1795695242.M396959P18962.vm,S=39,W=43"]
        assert (second.uid, second.stored_uidl) == (2, "0000beefcafe")

    @pytest.mark.parametrize("content", [b"", b"2 V1 N1\n", b"3 N1\n", b"3 V1\nx :name\n"])
    def test_other_versions_and_damage_are_ignored(self, content: bytes) -> None:
        assert parse_dovecot_uidlist(content) is None

    @pytest.mark.parametrize(
        "template,expected",
        [
            (DOVECOT_DEFAULT_FORMAT, "000000016b08228a"),
            ("%08Xu%08Xv", "000000016B08228A"),
            ("%u-%v", "1-1795695242"),
            ("%f", "1.M1.host"),
            ("%m", "9e9b9ba5f2e9d1e8a8e5c8f0e1cbb7b3"),
            ("x%%%u", "x%1"),
        ],
    )
    def test_expand(self, template: str, expected: str) -> None:
        header = b"Subject: x\n\n"
        result = expand_format(
            template, uid=1, uidvalidity=1795695242, file_name="1.M1.host", header=header
        )
        if template == "%m":
            import hashlib

            expected = hashlib.md5(header).hexdigest()
        assert result == expected

    def test_a_uid_is_needed_for_u(self) -> None:
        assert expand_format("%u", uid=None, uidvalidity=None, file_name="f") is None

    @pytest.mark.parametrize("template", ["%q", "%v", "constant"])
    def test_bad_formats(self, template: str) -> None:
        with pytest.raises(UIDLFormatError):
            check_format(template)

    def test_command_line(self) -> None:
        options = Options()
        with pytest.raises(usage.UsageError, match="--uidl-format"):
            options.parseOptions(
                ["--mail-location", "maildir:/x/{user}", "--auth", "memory:a:b",
                 "--uidl-format", "%q"]
            )  # fmt: skip


def _dovecot_maildir(root: Path) -> Path:
    maildir = root / "alice"
    (maildir / "new").mkdir(parents=True)
    (maildir / "cur").mkdir()
    (maildir / "dovecot-uidlist").write_bytes(UIDLIST)
    (maildir / "new" / "1795695242.M381375P18958.vm,S=43,W=47").write_bytes(
        b"From: a@example.org\nSubject: one\n\nbody one\n"
    )
    (maildir / "cur" / "1795695242.M396959P18962.vm,S=39,W=43:2,S").write_bytes(
        b"From: a@example.org\nSubject: two\n\n.dot\n"
    )
    return maildir


@pytest_twisted.ensureDeferred
async def test_dovecot_uidls_are_served(tmp_path: Path) -> None:
    _dovecot_maildir(tmp_path)
    deliver_to_maildir(str(tmp_path / "alice"), b"Subject: after the move\n\nnew\n")
    maildrop = await MaildirStore(f"{tmp_path}/{{user}}").open("alice")
    uids = [m.uid for m in maildrop.messages]
    await maildrop.close()
    # UID order first; the stored P record wins; unknown to Dovecot: own UIDL.
    assert uids[:2] == ["000000016b08228a", "0000beefcafe"]
    assert uids[2].endswith(".pop3d-testing")


@pytest_twisted.ensureDeferred
async def test_quit_does_to_the_maildir_what_dovecot_does(tmp_path: Path) -> None:
    """new/ moves to cur/; retrieved messages get S; UIDLs do not change."""
    maildir = _dovecot_maildir(tmp_path / "mail")
    server = await start_service(tmp_path, ["tcp:0:interface=127.0.0.1"])
    try:

        def session() -> list[bytes]:
            client = poplib.POP3(server.host, server.port, timeout=10)
            client.user("alice")
            client.pass_(USERS["alice"])
            uidls = client.uidl()[1]
            client.retr(1)
            client.quit()
            return uidls

        before = await deferToThread(session)
        after = await deferToThread(session)
    finally:
        await server.service.stopService()
    assert before == after == [b"1 000000016b08228a", b"2 0000beefcafe"]
    assert os.listdir(maildir / "new") == []
    assert sorted(os.listdir(maildir / "cur")) == [
        "1795695242.M381375P18958.vm,S=43,W=47:2,S",
        "1795695242.M396959P18962.vm,S=39,W=43:2,S",
    ]


# -- against the real Dovecot -------------------------------------------------

DOVECOT_LDA = "/usr/lib/dovecot/dovecot-lda"
DOVECOT_POP3 = "/usr/lib/dovecot/pop3"


def _require_dovecot() -> None:
    missing = [p for p in (DOVECOT_LDA, DOVECOT_POP3) if not os.access(p, os.X_OK)]
    reason = None
    if missing:
        reason = "Dovecot is not installed (apt-get install dovecot-core dovecot-pop3d)"
    elif os.geteuid() != 0 or shutil.which("runuser") is None:
        reason = "running Dovecot's tools as an unprivileged user needs root and runuser"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def _as_nobody(home: Path, config: Path, program: str, *arguments: str, stdin: bytes) -> bytes:
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", f"HOME={home}", "USER=nobody",
         program, "-c", str(config), *arguments],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=True,
    )  # fmt: skip
    return result.stdout


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_real_dovecot_uidls_are_kept(tmp_path: Path) -> None:
    """
    Dovecot's LDA delivers and Dovecot's POP3 server lists (and marks one
    message read); then pop3d serves the same Maildir: same UIDLs, same
    bytes.  Then Dovecot again: it still agrees, after pop3d's QUIT.
    """
    _require_dovecot()
    # Dovecot runs as nobody: its files must be reachable for that user,
    # which pytest's private temporary directory is not.
    shared = Path(tempfile.mkdtemp(prefix="pop3d-dovecot-"))
    try:
        await _compare_with_dovecot(shared, tmp_path)
    finally:
        shutil.rmtree(shared)


async def _compare_with_dovecot(shared: Path, tmp_path: Path) -> None:
    shared.chmod(0o755)
    home = shared / "home"
    home.mkdir()
    shutil.chown(home, "nobody")
    config = shared / "dovecot.conf"
    config.write_text(
        "mail_location = maildir:~/Maildir\nprotocols =\nssl = no\n"
        "log_path = /dev/stderr\npostmaster_address = postmaster@example.org\n"
    )
    config.chmod(0o644)
    for body in (b"one\n", b".dot line\n", b"no final newline"):
        message = b"From: a@example.org\nSubject: test\n\n" + body
        _as_nobody(home, config, DOVECOT_LDA, "-f", "a@example.org", stdin=message)

    def dovecot_pop3(commands: bytes) -> bytes:
        return _as_nobody(home, config, DOVECOT_POP3, stdin=commands)

    from_dovecot = dovecot_pop3(b"UIDL\r\nRETR 2\r\nQUIT\r\n")
    server = await start_service(tmp_path, ["tcp:0:interface=127.0.0.1"])
    shutil.move(str(home / "Maildir"), server.mail_root / "alice")
    try:

        def session() -> tuple[list[bytes], list[bytes]]:
            client = poplib.POP3(server.host, server.port, timeout=10)
            client.user("alice")
            client.pass_(USERS["alice"])
            uidls = client.uidl()[1]
            message = client.retr(2)[1]
            client.quit()
            return uidls, message

        uidls, message = await deferToThread(session)
    finally:
        await server.service.stopService()
    dovecot_uidls = from_dovecot.split(b".\r\n")[0].split(b"\r\n")[1:-1]
    assert uidls == dovecot_uidls
    assert b"\r\n".join(message) + b"\r\n" in from_dovecot.replace(b"\r\n..", b"\r\n.")
    shutil.move(str(server.mail_root / "alice"), home / "Maildir")
    assert dovecot_pop3(b"UIDL\r\nQUIT\r\n").split(b".\r\n")[0].split(b"\r\n")[1:-1] == uidls


@pytest.mark.parametrize("reuse", [True, False])
@pytest_twisted.ensureDeferred
async def test_x_uidl_headers_are_reused_when_asked(tmp_path: Path, reuse: bool) -> None:
    """qpopper and others wrote X-UIDL headers; clients saw those."""
    root = str(tmp_path / "alice")
    first = deliver_to_maildir(root, b"X-UIDL: 7c1b8d2e0f\nSubject: a\n\na\n")
    second = deliver_to_maildir(root, b"X-UIDL: 7c1b8d2e0f\nSubject: b\n\nsame X-UIDL\n")
    plain = deliver_to_maildir(root, b"Subject: c\n\nnone\n")
    store = MaildirStore(f"{tmp_path}/{{user}}", reuse_x_uidl=reuse)
    maildrop = await store.open("alice")
    uids = [m.uid for m in maildrop.messages]
    await maildrop.close()
    if reuse:
        # A second message claiming the same X-UIDL keeps its own: unique.
        assert uids == ["7c1b8d2e0f", second, plain]
    else:
        assert uids == [first, second, plain]
