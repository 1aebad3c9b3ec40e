"""
End-to-end tests: real POP3 clients against the service as ``twistd pop3d``
builds it, listening on a loopback port, serving a real Maildir.

The clients are Python's poplib, Twisted's POP3 client, curl, mpop,
fetchmail and a raw socket that pipelines.  Blocking clients run in a thread and external
programs run as child processes of the reactor, so the server (which runs
in the reactor of this process) is never blocked by its own client.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import os
import poplib
import random
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import connectionDone
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.mail.pop3 import AdvancedPOP3Client
from twisted.python.failure import Failure

from pop3d.testing import deliver_to_maildir

from .conftest import RunningServer, require_program

#: The users of the ``running_server`` fixture (tests/conftest.py).
PASSWORDS = {"alice": "wonderland", "bob": "builder"}

KIB = 1024

#: The server reads stored messages in chunks of this size: message features
#: are placed on and around its multiples.
SERVER_CHUNK = 256 * KIB

#: Lines that must be byte-stuffed on the wire (RFC 1939 section 3): a line
#: that is only ".", a line that is "..", a line starting with ".".
DOT_LINES = (b".", b"..", b".x")

#: Seconds an external client may take before it is considered hung.
CLIENT_TIMEOUT = 60


# -- the maildrop ---------------------------------------------------------------


def _pad_to(message: bytearray, offset: int, eol: bytes) -> None:
    """
    Append filler lines ending in ``eol`` so that the next byte appended to
    ``message`` lands exactly at ``offset``.
    """
    assert offset - len(message) >= len(eol), "no room for a filler line"
    while (room := offset - len(message)) > 0:
        width = room if room <= 80 else 72
        message += b"f" * (width - len(eol)) + eol


def _dot_lines(eol: bytes) -> bytes:
    return b"".join(line + eol for line in DOT_LINES)


def make_dotted_lf_message() -> bytes:
    """
    An LF-stored message whose dot lines start right at the start of the
    body, at 16 KiB, 64 KiB, exactly on the server's 256 KiB chunk boundary,
    with the "." as the last byte of the second chunk, and as its last line.
    """
    message = bytearray(b"X-Case: dotted-lf\nSubject: lines starting with a dot\n\n")
    message += _dot_lines(b"\n")
    for offset in (16 * KIB, 64 * KIB, SERVER_CHUNK, 2 * SERVER_CHUNK - 1):
        _pad_to(message, offset, b"\n")
        message += _dot_lines(b"\n")
    message += b"the last line is a lone dot\n.\n"
    return bytes(message)


def make_crlf_message() -> bytes:
    """
    A CRLF-stored message (as some MTAs store them) larger than a chunk,
    with one CRLF split by the 256 KiB chunk boundary (CR last in the first
    chunk, LF first in the second) and followed by dot lines.
    """
    message = bytearray(b"X-Case: crlf\r\nSubject: stored with CRLF\r\n\r\n")
    message += _dot_lines(b"\r\n")
    # The last filler line's CR is at SERVER_CHUNK - 1, its LF at SERVER_CHUNK.
    _pad_to(message, SERVER_CHUNK + 1, b"\r\n")
    message += _dot_lines(b"\r\n")
    message += b"end of the CRLF message\r\n"
    return bytes(message)


EIGHT_BIT_MESSAGE = (
    "X-Case: eight-bit\n"
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Grüße aus Köln: ünïcödé, ελληνικά, 日本語, emoji \U0001f4ec\n"
    ".ä line starting with a dot, then 8-bit text\n"
).encode()

#: The payload of the attachment: incompressible, about 3.75 MB.
ATTACHMENT = random.Random(1939).randbytes(3_750_000)


def make_attachment_message() -> bytes:
    """A MIME message with a ~5 MB base64 attachment, LF line endings."""
    return (
        b"X-Case: attachment\n"
        b"Subject: a 5 MB attachment\n"
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="=-b1939"\n'
        b"\n"
        b"--=-b1939\n"
        b"Content-Type: text/plain; charset=us-ascii\n"
        b"\n"
        b"The attachment follows.\n"
        b"--=-b1939\n"
        b"Content-Type: application/octet-stream\n"
        b"Content-Transfer-Encoding: base64\n"
        b'Content-Disposition: attachment; filename="blob.bin"\n'
        b"\n" + base64.encodebytes(ATTACHMENT) + b"--=-b1939--\n"
    )


NO_FINAL_NEWLINE_MESSAGE = (
    b"X-Case: no-final-newline\nSubject: unterminated\n\n"
    b"first line\n.the last line starts with a dot and has no newline"
)

EMPTY_BODY_MESSAGE = b"X-Case: empty-body\nSubject: nothing below the header\n\n"

#: Stored bytes of every message, by the value of its X-Case header.
MESSAGES: dict[str, bytes] = {
    "dotted-lf": make_dotted_lf_message(),
    "eight-bit": EIGHT_BIT_MESSAGE,
    "attachment": make_attachment_message(),
    "no-final-newline": NO_FINAL_NEWLINE_MESSAGE,
    "crlf": make_crlf_message(),
    "empty-body": EMPTY_BODY_MESSAGE,
}

#: A few small messages, for tests about sessions rather than content.
SMALL = ("eight-bit", "no-final-newline", "empty-body")


def on_the_wire(stored: bytes) -> bytes:
    """
    What RETR must transfer for a stored message, before byte-stuffing:
    lines end in CRLF (an LF becomes CRLF, a CRLF stays one, never
    CR CR LF), and a message without a final newline gets a CRLF so that the
    terminator starts a line (RFC 1939 section 3).
    """
    wire = re.sub(rb"\r?\n", b"\r\n", stored)
    if wire and not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    return wire


EXPECTED: dict[str, bytes] = {name: on_the_wire(stored) for name, stored in MESSAGES.items()}


def deliver(server: RunningServer, names: Iterable[str] = MESSAGES) -> dict[str, bytes]:
    """
    Deliver the named messages to alice's Maildir; return what each must
    look like on the wire, by name.
    """
    maildir = str(server.maildir("alice"))
    for name in names:
        deliver_to_maildir(maildir, MESSAGES[name])
    return {name: EXPECTED[name] for name in names}


def case_of(message: bytes) -> str:
    """The X-Case header value of a message (its first line)."""
    first_line = message.split(b"\n", 1)[0].rstrip(b"\r")
    match = re.fullmatch(rb"X-Case: (\S+)", first_line)
    assert match is not None, f"not one of our messages: {first_line[:80]!r}"
    return match.group(1).decode("ascii")


def stored_cases(server: RunningServer, user: str = "alice") -> list[str]:
    """The X-Case of every message file in a Maildir's new/ and cur/."""
    root = server.maildir(user)
    return sorted(
        case_of(path.read_bytes())
        for sub in ("new", "cur")
        for path in (root / sub).iterdir()
        if path.is_file()
    )


def assert_same_message(name: str, got: bytes, expected: bytes) -> None:
    """Byte equality, reported without dumping megabytes of message."""
    if got == expected:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
        min(len(got), len(expected)),
    )
    window = slice(max(0, at - 30), at + 30)
    pytest.fail(
        f"message {name}: received {len(got)} octets, expected {len(expected)}; "
        f"first difference at octet {at}: received {got[window]!r}, "
        f"expected {expected[window]!r}"
    )


def assert_all_arrived(received: dict[str, bytes], expected: dict[str, bytes]) -> None:
    assert sorted(received) == sorted(expected)
    for name, message in received.items():
        assert_same_message(name, message, expected[name])


def from_lines(lines: Iterable[bytes]) -> bytes:
    """A message back from the (unstuffed, CRLF-stripped) lines a client gives."""
    return b"".join(line + b"\r\n" for line in lines)


# -- poplib ----------------------------------------------------------------------


def poplib_login(server: RunningServer, user: str = "alice") -> poplib.POP3:
    client = poplib.POP3(server.host, server.port, timeout=CLIENT_TIMEOUT)
    try:
        client.user(user)
        client.pass_(PASSWORDS[user])
    except BaseException:
        client.close()
        raise
    return client


@dataclass
class PoplibSession:
    """What one poplib session saw."""

    stat: tuple[int, int]
    sizes: dict[int, int]
    uids: dict[int, bytes]
    retr_status: dict[int, bytes]
    messages: dict[int, bytes]


def poplib_fetch_all(server: RunningServer, retrieve: bool = True) -> PoplibSession:
    client = poplib_login(server)
    try:
        stat = client.stat()
        _, listing, _ = client.list()
        sizes = {int(n): int(size) for n, size in (line.split() for line in listing)}
        _, uid_lines, _ = client.uidl()
        uids = {int(n): uid for n, uid in (line.split(b" ", 1) for line in uid_lines)}
        statuses: dict[int, bytes] = {}
        messages: dict[int, bytes] = {}
        for number in sizes if retrieve else ():
            statuses[number], lines, _ = client.retr(number)
            messages[number] = from_lines(lines)
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()
    return PoplibSession(stat, sizes, uids, statuses, messages)


@pytest_twisted.ensureDeferred
async def test_poplib_retrieves_every_message_byte_identical(
    running_server: RunningServer,
) -> None:
    """
    RFC 1939 sections 3 and 7: every message arrives exactly, whatever its
    stored line endings, dot lines, chunk boundaries, 8-bit bytes or size.
    RFC 1939 sections 5, 7 and 11: STAT, LIST and the RETR status give the
    exact octet count of what RETR sends (before byte-stuffing).
    """
    expected = deliver(running_server)
    session = await deferToThread(poplib_fetch_all, running_server)

    received = {case_of(message): message for message in session.messages.values()}
    assert_all_arrived(received, expected)

    assert session.stat == (len(expected), sum(len(m) for m in expected.values()))
    assert sorted(session.sizes) == list(range(1, len(expected) + 1))
    for number, message in session.messages.items():
        octets = len(expected[case_of(message)])
        assert session.sizes[number] == octets, case_of(message)
        status = re.fullmatch(rb"\+OK (\d+) octets", session.retr_status[number])
        assert status is not None, session.retr_status[number]
        assert int(status.group(1)) == octets, case_of(message)

    # What a user sees in a mail program: the attachment decodes to the
    # original bytes.
    parsed = email.message_from_bytes(received["attachment"], policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_content() == ATTACHMENT
    text = email.message_from_bytes(received["eight-bit"], policy=email.policy.default)
    assert isinstance(text, email.message.EmailMessage)
    assert text["Subject"] == "Grüße"
    body = text.get_body()
    assert body is not None
    assert "日本語" in body.get_content()


@pytest_twisted.ensureDeferred
async def test_poplib_uidls_are_valid_unique_and_stable(running_server: RunningServer) -> None:
    """
    RFC 1939 section 7 (UIDL): a unique-id is 1 to 70 characters in the range
    0x21 to 0x7E, unique within the maildrop, and the same for a message in
    every session.
    """
    expected = deliver(running_server)
    first = await deferToThread(poplib_fetch_all, running_server, False)
    second = await deferToThread(poplib_fetch_all, running_server, False)

    assert sorted(first.uids) == list(range(1, len(expected) + 1))
    for uid in first.uids.values():
        assert re.fullmatch(rb"[\x21-\x7e]{1,70}", uid), uid
    assert len(set(first.uids.values())) == len(expected)
    assert second.uids == first.uids


# -- Twisted's POP3 client ----------------------------------------------------------


class _POP3Client(AdvancedPOP3Client):
    """twisted.mail.pop3client.POP3Client, telling when the connection closed."""

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_twisted_pop3_client_retrieves_every_message(
    running_server: RunningServer,
) -> None:
    """
    RFC 1939 sections 3, 7 and 11 with Twisted's POP3 client, which logs in
    with APOP (the greeting has a timestamp) and reads lines up to the
    terminator: every message arrives byte-identical, LIST and UIDL agree.
    """
    from twisted.internet import reactor

    expected = deliver(running_server)
    endpoint = TCP4ClientEndpoint(reactor, running_server.host, running_server.port)
    client = await connectProtocol(endpoint, _POP3Client())
    await client.login(b"alice", b"wonderland")
    sizes = await client.listSize()
    uids = await client.listUID()
    assert len(sizes) == len(set(uids)) == len(expected)
    received: dict[str, bytes] = {}
    for index, size in enumerate(sizes):
        message = from_lines(await client.retrieve(index))
        name = case_of(message)
        received[name] = message
        assert size == len(expected[name]), name
    await client.quit()
    await client.closed
    assert_all_arrived(received, expected)


# -- curl ---------------------------------------------------------------------------


async def run_client(executable: str, arguments: list[str], env: dict[str, str]) -> bytes:
    """Run an external client; return its output, failing on a non-zero exit."""
    out: bytes
    err: bytes
    code: int
    out, err, code = await getProcessOutputAndValue(executable, arguments, env=env)
    assert code == 0, f"{executable} exited with {code}: {err.decode(errors='replace')}"
    return out


async def curl(server: RunningServer, path: str) -> bytes:
    arguments = [
        "--disable",  # no ~/.curlrc
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        str(CLIENT_TIMEOUT),
        "--user",
        "alice:wonderland",
        f"pop3://{server.host}:{server.port}/{path}",
    ]
    return await run_client(require_program("curl"), arguments, env={"PATH": os.defpath})


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_curl_lists_and_retrieves_every_message(running_server: RunningServer) -> None:
    """
    curl removes the byte-stuffing and the terminator (RFC 1939 section 3)
    and writes the message as sent: its CRLF form.  Listing the mailbox
    (LIST, RFC 1939 section 5) shows every message with its exact size.
    """
    expected = deliver(running_server)
    listing = await curl(running_server, "")
    sizes = dict(line.split() for line in listing.split(b"\r\n") if line)
    assert sorted(sizes) == sorted(b"%d" % n for n in range(1, len(expected) + 1))

    received: dict[str, bytes] = {}
    for number, size in sizes.items():
        message = await curl(running_server, number.decode())
        name = case_of(message)
        received[name] = message
        assert int(size) == len(expected[name]), name
    assert_all_arrived(received, expected)


# -- deletion -------------------------------------------------------------------------


def dele_and_quit(server: RunningServer, victim: str) -> None:
    client = poplib_login(server)
    try:
        deleted = 0
        for number in range(1, client.stat()[0] + 1):
            _, lines, _ = client.top(number, 0)
            if case_of(from_lines(lines)) == victim:
                assert client.dele(number).startswith(b"+OK")
                deleted += 1
        assert deleted == 1
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_dele_then_quit_removes_the_message_file(running_server: RunningServer) -> None:
    """RFC 1939 section 6: QUIT enters UPDATE, which removes the DELE'd message."""
    deliver(running_server, SMALL)
    await deferToThread(dele_and_quit, running_server, "no-final-newline")
    assert stored_cases(running_server) == ["eight-bit", "empty-body"]
    session = await deferToThread(poplib_fetch_all, running_server)
    assert sorted(case_of(m) for m in session.messages.values()) == ["eight-bit", "empty-body"]


def dele_then_drop(server: RunningServer) -> None:
    client = poplib_login(server)
    try:
        count = client.stat()[0]
        for number in range(1, count + 1):
            assert client.dele(number).startswith(b"+OK")
        assert client.stat()[0] == 0
        # Hang up without QUIT.  Shutting down our sending side is a hangup
        # as far as the server can tell; reading until the server closes its
        # side proves it has processed the hangup before we look at the
        # Maildir (no sleeping, no retrying).
        client.sock.shutdown(socket.SHUT_WR)
        assert client.file.read() == b""
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_dele_without_quit_removes_nothing(running_server: RunningServer) -> None:
    """
    RFC 1939 section 6: a session that ends without QUIT does not enter
    UPDATE, so messages marked by DELE stay in the maildrop; and the maildrop
    is unlocked, so the next login succeeds and finds them all.
    """
    expected = deliver(running_server, SMALL)
    await deferToThread(dele_then_drop, running_server)
    assert stored_cases(running_server) == sorted(expected)
    session = await deferToThread(poplib_fetch_all, running_server)
    received = {case_of(message): message for message in session.messages.values()}
    assert_all_arrived(received, expected)


# -- exclusive access -------------------------------------------------------------------


def concurrent_logins(server: RunningServer, count: int) -> None:
    first = poplib_login(server)
    try:
        second = poplib.POP3(server.host, server.port, timeout=CLIENT_TIMEOUT)
        try:
            second.user("alice")
            with pytest.raises(poplib.error_proto) as refused:
                second.pass_("wonderland")
            assert refused.value.args[0].startswith(b"-ERR [IN-USE]"), refused.value
            # Still in AUTHORIZATION: a polite goodbye works.
            assert second.quit().startswith(b"+OK")
        finally:
            second.close()
        # The first session is unaffected.
        assert first.stat()[0] == count
        _, lines, _ = first.retr(1)
        assert case_of(from_lines(lines)) in SMALL
        assert first.quit().startswith(b"+OK")
    finally:
        first.close()
    # QUIT released the maildrop.
    third = poplib_login(server)
    try:
        assert third.stat()[0] == count
        assert third.quit().startswith(b"+OK")
    finally:
        third.close()


@pytest_twisted.ensureDeferred
async def test_second_login_to_a_maildrop_in_use_is_refused(
    running_server: RunningServer,
) -> None:
    """
    RFC 1939 section 4 / RFC 2449 section 8.1.2: while a session holds the
    maildrop, another login to it fails with ``-ERR [IN-USE]``; the first
    session works on, and once it has quit a new login succeeds.
    """
    deliver(running_server, SMALL)
    await deferToThread(concurrent_logins, running_server, len(SMALL))


# -- pipelining -----------------------------------------------------------------------------


class ReplyReader:
    """Parses a recorded stream of POP3 replies."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    @property
    def at_end(self) -> bool:
        return self.position == len(self.data)

    def line(self) -> bytes:
        end = self.data.find(b"\r\n", self.position)
        assert end != -1, f"unterminated line at octet {self.position}"
        line = self.data[self.position : end]
        self.position = end + 2
        return line

    def status(self) -> bytes:
        line = self.line()
        assert line.startswith(b"+OK"), line
        return line

    def multiline(self) -> bytes:
        """A positive multi-line reply: its body, unstuffed, CRLF line endings."""
        self.status()
        lines = []
        while (line := self.line()) != b".":
            lines.append(line[1:] if line.startswith(b".") else line)
        return from_lines(lines)


PIPELINE = [
    b"CAPA",
    b"USER alice",
    b"PASS wonderland",
    b"STAT",
    b"LIST",
    b"RETR 1",
    b"RETR 2",
    b"UIDL",
    b"TOP 1 0",
    b"NOOP",
    b"QUIT",
]


def send_pipelined(server: RunningServer, commands: list[bytes]) -> bytes:
    """Send all commands in one write, then read every reply until the server hangs up."""
    with socket.create_connection((server.host, server.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"".join(command + b"\r\n" for command in commands))
        received = bytearray()
        while chunk := sock.recv(1 << 20):
            received += chunk
    return bytes(received)


@pytest_twisted.ensureDeferred
async def test_pipelined_commands_are_answered_in_order(running_server: RunningServer) -> None:
    """
    RFC 2449 section 6.6 (PIPELINING): commands sent together in one write
    are answered strictly in order, each reply complete before the next,
    so the stream parses as the sequence of replies to the sequence sent.
    """
    expected = deliver(running_server)
    stream = await deferToThread(send_pipelined, running_server, PIPELINE)
    reader = ReplyReader(stream)

    assert reader.status().startswith(b"+OK")  # greeting
    capabilities = reader.multiline().split(b"\r\n")
    assert b"PIPELINING" in capabilities
    reader.status()  # USER
    reader.status()  # PASS
    stat = reader.status()
    assert stat == b"+OK %d %d" % (len(expected), sum(len(m) for m in expected.values()))
    sizes = dict(line.split() for line in reader.multiline().splitlines())
    first = reader.multiline()
    second = reader.multiline()
    uids = dict(line.split() for line in reader.multiline().splitlines())
    top = reader.multiline()
    assert reader.status() == b"+OK"  # NOOP
    assert reader.status().startswith(b"+OK")  # QUIT
    assert reader.at_end, stream[reader.position : reader.position + 200]

    assert len(sizes) == len(uids) == len(expected)
    assert case_of(first) != case_of(second)
    assert_same_message("RETR 1", first, expected[case_of(first)])
    assert_same_message("RETR 2", second, expected[case_of(second)])
    assert int(sizes[b"1"]) == len(expected[case_of(first)])
    assert int(sizes[b"2"]) == len(expected[case_of(second)])
    # TOP 1 0: the header and the blank line after it (RFC 1939 section 7).
    header_end = first.index(b"\r\n\r\n") + 4
    assert top == first[:header_end]


# -- mpop ---------------------------------------------------------------------------------


def split_mbox(mbox: bytes) -> dict[str, bytes]:
    """
    The messages of an mbox written by mpop (MBOXRD, LF line endings, a
    blank line after each message), by X-Case.  None of our messages has a
    line starting with "From ", so no From-quoting to undo.
    """
    assert mbox.startswith(b"From ")
    parts = re.split(rb"^From [^\n]*\n", mbox, flags=re.MULTILINE)[1:]
    messages: dict[str, bytes] = {}
    for part in parts:
        assert part.endswith(b"\n\n")
        message = part[:-1]
        messages[case_of(message)] = message
    return messages


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_mpop_fetches_every_message_into_an_mbox(
    running_server: RunningServer, tmp_path: Path
) -> None:
    """
    mpop (which pipelines RETR when CAPA says PIPELINING, RFC 2449 section
    6.6) fetches every message intact with --keep=on, which leaves them on
    the server (no DELE, RFC 1939 section 6); a second run finds nothing new
    because the UIDLs did not change (RFC 1939 section 7).
    """
    mpop = require_program("mpop")
    expected = deliver(running_server)
    home = tmp_path / "home"
    home.mkdir()
    mbox = tmp_path / "inbox.mbox"
    config = tmp_path / "mpoprc"
    config.write_text(
        "account default\n"
        f"host {running_server.host}\n"
        f"port {running_server.port}\n"
        "user alice\n"
        "passwordeval printf %s wonderland\n"
        f"uidls_file {tmp_path / 'uidls'}\n"
        "received_header off\n"
        f"timeout {CLIENT_TIMEOUT}\n"
    )
    # mpop refuses a config file holding a password unless it is private;
    # passwordeval does not need that, but keep the file private anyway.
    config.chmod(0o600)
    arguments = [
        "-C",
        str(config),
        "--quiet",
        "--tls=off",
        "--auth=user",
        "--keep=on",
        f"--delivery=mbox,{mbox}",
    ]
    env = {"HOME": str(home), "PATH": os.defpath, "TMPDIR": str(tmp_path), "LC_ALL": "C.UTF-8"}

    await run_client(mpop, arguments, env)
    delivered = mbox.read_bytes()
    received = split_mbox(delivered)
    assert_all_arrived(
        received, {name: wire.replace(b"\r\n", b"\n") for name, wire in expected.items()}
    )
    assert stored_cases(running_server) == sorted(expected)

    # Only new messages by default: everything was seen, nothing is fetched.
    await run_client(mpop, arguments, env)
    assert mbox.read_bytes() == delivered


# -- fetchmail ------------------------------------------------------------------------------


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_fetchmail_fetches_every_message_byte_identical(
    running_server: RunningServer, tmp_path: Path
) -> None:
    """
    fetchmail hands each message to an MDA, as it does for most of its users
    (with LF line endings, as it delivers).  With --keep and --uidl it leaves
    them on the server (RFC 1939 section 6) and, the UIDLs being stable
    (RFC 1939 section 7), fetches nothing the second time.
    """
    fetchmail = require_program("fetchmail")
    expected = deliver(running_server)
    home = tmp_path / "home"
    home.mkdir()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rcfile = tmp_path / "fetchmailrc"
    rcfile.write_text(
        f"poll {running_server.host} protocol pop3 port {running_server.port}"
        " auth password timeout 60\n"
        "  user alice password wonderland\n"
    )
    # fetchmail refuses a run-control file that others can read.
    rcfile.chmod(0o600)
    arguments = [
        "--fetchmailrc",
        str(rcfile),
        "--idfile",
        str(tmp_path / "fetchids"),
        "--pidfile",
        str(tmp_path / "fetchmail.pid"),
        "--nosyslog",
        "--silent",
        "--sslproto",
        "",
        "--keep",
        "--uidl",
        "--invisible",  # no Received: header of its own
        "--norewrite",
        "--mda",
        f"/bin/sh -c 'cat > \"$(mktemp {inbox}/message.XXXXXX)\"'",
    ]
    env = {"HOME": str(home), "PATH": os.defpath, "LC_ALL": "C.UTF-8"}

    await run_client(fetchmail, arguments, env)
    received = {case_of(path.read_bytes()): path.read_bytes() for path in sorted(inbox.iterdir())}
    assert len(list(inbox.iterdir())) == len(expected)
    assert_all_arrived(
        received, {name: wire.replace(b"\r\n", b"\n") for name, wire in expected.items()}
    )
    assert stored_cases(running_server) == sorted(expected)

    # Exit status 1 is fetchmail's "no mail": every UIDL was seen.
    _out, err, code = await getProcessOutputAndValue(fetchmail, arguments, env=env)
    assert code == 1, err.decode(errors="replace")
    assert len(list(inbox.iterdir())) == len(expected)
