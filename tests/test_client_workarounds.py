"""
``--client-workarounds``: Dovecot's ``pop3_client_workarounds`` for mail
clients that break on some messages.  ``outlook-no-nuls`` sends NUL octets
as 0x80; ``oe-ns-eoh`` sends the blank line that ends the header when a
message has none.  Only the octets of RETR and TOP change: never a stored
byte, never an announced size (RFC 1939 sections 5, 7 and 11).
"""

from __future__ import annotations

import io
import poplib
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python import usage
from zope.interface import implementer

from pop3d.factory import POP3Factory
from pop3d.protocol import CHUNK_SIZE
from pop3d.stores.interfaces import (
    IMaildrop,
    IMaildropStore,
    IMessageBody,
    MessageInfo,
    MessageList,
)
from pop3d.tap import Options
from pop3d.testing import MemoryStore, deliver_to_maildir, memory_portal
from pop3d.wire import ClientWorkarounds, MessageEncoder, UnknownWorkaround, wire_size

from .conftest import USERS, Wire, start_service
from .test_dovecot_migration import DOVECOT_POP3, _as_nobody, _require_dovecot

BOTH = ClientWorkarounds(outlook_no_nuls=True, oe_ns_eoh=True)
NO_NULS = ClientWorkarounds(outlook_no_nuls=True)
EOH = ClientWorkarounds(oe_ns_eoh=True)

#: NUL octets in the header and in the body.
WITH_NULS = b"Subject: a\x00b\n\nbo\x00dy\n"
#: No blank line and no body: a header-only message (RFC 5322 section 3.5).
HEADER_ONLY = b"Subject: x\nFrom: y\n"
#: Header-only, and not even a final newline.
HEADER_ONLY_NO_NEWLINE = b"Subject: x"


def encode(
    message: bytes,
    workarounds: ClientWorkarounds,
    chunk_size: int | None = None,
    body_lines: int | None = None,
) -> tuple[bytes, int]:
    """What RETR (or TOP) sends after its status line, and the size counted."""
    encoder = MessageEncoder(body_lines, workarounds)
    size = chunk_size or max(len(message), 1)
    out = [encoder.feed(message[i : i + size]) for i in range(0, len(message), size)]
    out.append(encoder.finish())
    return b"".join(out), encoder.size


# -- parsing the names -----------------------------------------------------------


class TestNames:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("", ClientWorkarounds()),
            ("outlook-no-nuls", NO_NULS),
            ("oe-ns-eoh", EOH),
            ("outlook-no-nuls oe-ns-eoh", BOTH),
            ("oe-ns-eoh,outlook-no-nuls", BOTH),
            (" Outlook-No-NULs ,, OE-NS-EOH ", BOTH),
            ("oe-ns-eoh oe-ns-eoh", EOH),
        ],
    )
    def test_like_dovecots_setting(self, text: str, expected: ClientWorkarounds) -> None:
        """Separated by spaces or commas, in any case, as Dovecot reads them."""
        assert ClientWorkarounds.parse(text) == expected

    def test_an_unknown_name_is_named(self) -> None:
        with pytest.raises(UnknownWorkaround, match="'outlook-idle'") as raised:
            ClientWorkarounds.parse("oe-ns-eoh outlook-idle")
        assert raised.value.name == "outlook-idle"

    def test_none_by_default(self) -> None:
        assert not ClientWorkarounds().enabled


# -- the bytes on the wire, chunk by chunk ---------------------------------------


class TestOffByDefault:
    """Without workarounds a message is sent as stored, but for CRLF and stuffing."""

    def test_nuls_are_sent_as_stored(self) -> None:
        assert encode(WITH_NULS, ClientWorkarounds()) == (
            b"Subject: a\x00b\r\n\r\nbo\x00dy\r\n.\r\n",
            23,
        )

    def test_no_header_end_is_added(self) -> None:
        assert encode(HEADER_ONLY, ClientWorkarounds()) == (
            b"Subject: x\r\nFrom: y\r\n.\r\n",
            21,
        )
        assert encode(HEADER_ONLY_NO_NEWLINE, ClientWorkarounds()) == (
            b"Subject: x\r\n.\r\n",
            12,
        )
        assert encode(b"", ClientWorkarounds()) == (b".\r\n", 0)


class TestOutlookNoNuls:
    def test_nuls_in_header_and_body_become_0x80(self) -> None:
        assert encode(WITH_NULS, NO_NULS) == (b"Subject: a\x80b\r\n\r\nbo\x80dy\r\n.\r\n", 23)

    def test_one_octet_for_one(self) -> None:
        message = b"\x00\x00\n\n\x00\r\n\x00"
        wire, size = encode(message, NO_NULS)
        assert wire == b"\x80\x80\r\n\r\n\x80\r\n\x80\r\n.\r\n"
        assert size == wire_size(message) == len(wire) - len(b".\r\n")

    def test_stuffing_is_unchanged(self) -> None:
        """RFC 1939 section 3: a line starting with "." after a NUL line."""
        assert (
            encode(b"H: v\n\n\x00\n.\x00\n", NO_NULS)[0] == b"H: v\r\n\r\n\x80\r\n..\x80\r\n.\r\n"
        )

    @pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 11])
    def test_nuls_at_chunk_boundaries(self, chunk_size: int) -> None:
        assert encode(WITH_NULS, NO_NULS, chunk_size) == encode(WITH_NULS, NO_NULS)

    def test_top_too(self) -> None:
        """RFC 1939 section 7: TOP sends the same header and lines as RETR."""
        assert encode(WITH_NULS, NO_NULS, body_lines=0) == (b"Subject: a\x80b\r\n\r\n.\r\n", 16)
        assert encode(WITH_NULS, NO_NULS, body_lines=1) == (
            b"Subject: a\x80b\r\n\r\nbo\x80dy\r\n.\r\n",
            23,
        )

    def test_no_header_end_is_added(self) -> None:
        assert encode(HEADER_ONLY, NO_NULS)[0] == b"Subject: x\r\nFrom: y\r\n.\r\n"


class TestOeNsEoh:
    def test_header_only_message_gets_its_blank_line(self) -> None:
        # The added CRLF is not counted: 21 octets, as LIST and RETR announce.
        assert encode(HEADER_ONLY, EOH) == (b"Subject: x\r\nFrom: y\r\n\r\n.\r\n", 21)
        assert wire_size(HEADER_ONLY) == 21

    def test_header_only_without_final_newline(self) -> None:
        assert encode(HEADER_ONLY_NO_NEWLINE, EOH) == (b"Subject: x\r\n\r\n.\r\n", 12)

    def test_header_only_ending_in_a_bare_cr(self) -> None:
        assert encode(b"Subject: x\r", EOH) == (b"Subject: x\r\r\n\r\n.\r\n", 13)

    def test_empty_message_is_an_empty_header_and_its_end(self) -> None:
        assert encode(b"", EOH) == (b"\r\n.\r\n", 0)

    @pytest.mark.parametrize(
        "message",
        [
            b"H: v\n\nbody\n",
            b"H: v\r\n\r\nbody\r\n",
            b"H: v\n\n",
            b"\nno header at all\n",
            b"H: v\n\n.\n",
        ],
    )
    def test_a_message_with_a_header_end_is_unchanged(self, message: bytes) -> None:
        assert encode(message, EOH) == encode(message, ClientWorkarounds())

    def test_a_line_of_spaces_does_not_end_the_header(self) -> None:
        assert encode(b"H: v\n \n", EOH)[0] == b"H: v\r\n \r\n\r\n.\r\n"

    def test_a_dot_line_stays_stuffed_before_the_blank_line(self) -> None:
        """The added line comes after the stuffed last line, before the terminator."""
        assert encode(b"H: v\n.", EOH)[0] == b"H: v\r\n..\r\n\r\n.\r\n"

    @pytest.mark.parametrize("chunk_size", range(1, 18))
    @pytest.mark.parametrize("message", [b"H: v\n\nbody\n", b"H: v\r\n\r\nbody\r\n"])
    def test_a_blank_line_split_across_chunks_is_seen(
        self, message: bytes, chunk_size: int
    ) -> None:
        assert encode(message, EOH, chunk_size) == encode(message, ClientWorkarounds())

    @pytest.mark.parametrize("chunk_size", range(1, 25))
    def test_a_header_only_message_in_any_chunks_gets_one_blank_line(self, chunk_size: int) -> None:
        message = b"Subject: x\r\nFrom: y\r\n"
        assert encode(message, EOH, chunk_size) == (b"Subject: x\r\nFrom: y\r\n\r\n.\r\n", 21)

    def test_top_of_a_header_only_message(self) -> None:
        """As Dovecot does, TOP ends the header the same way as RETR."""
        assert encode(HEADER_ONLY, EOH, body_lines=0)[0] == b"Subject: x\r\nFrom: y\r\n\r\n.\r\n"
        assert encode(HEADER_ONLY, EOH, body_lines=5)[0] == b"Subject: x\r\nFrom: y\r\n\r\n.\r\n"

    def test_top_of_a_message_with_a_header_end(self) -> None:
        assert encode(b"H: v\n\nbody\n", EOH, body_lines=0)[0] == b"H: v\r\n\r\n.\r\n"


def _expected(message: bytes, workarounds: ClientWorkarounds) -> bytes:
    """What a client makes of RETR, computed the slow, obvious way."""
    lines = re.sub(rb"(?<!\r)\n", b"\r\n", message)
    if message and not message.endswith(b"\n"):
        lines += b"\r\n"
    if workarounds.outlook_no_nuls:
        lines = lines.replace(b"\x00", b"\x80")
    if workarounds.oe_ns_eoh and not (lines.startswith(b"\r\n") or b"\r\n\r\n" in lines):
        lines += b"\r\n"
    return lines


@given(
    message=st.lists(
        st.sampled_from([b"H: v", b"\x00", b"\n", b"\r", b"\r\n", b".", b"x\x00y"])
    ).map(b"".join),
    chunk_size=st.integers(min_value=1, max_value=13),
    workarounds=st.sampled_from([BOTH, NO_NULS, EOH]),
)
def test_any_chunking_gives_the_same_bytes_and_size(
    message: bytes, chunk_size: int, workarounds: ClientWorkarounds
) -> None:
    whole, whole_size = encode(message, workarounds)
    assert encode(message, workarounds, chunk_size) == (whole, whole_size)
    unstuffed = re.sub(rb"(^|\r\n)\.", rb"\1", whole[: -len(b".\r\n")])
    assert unstuffed == _expected(message, workarounds)
    # The counted size is what LIST announces: the workarounds add nothing to it.
    assert whole_size == wire_size(message)


# -- through the protocol --------------------------------------------------------


@pytest.fixture
def mailbox(store: MemoryStore) -> MemoryStore:
    for message in (WITH_NULS, HEADER_ONLY, HEADER_ONLY_NO_NEWLINE):
        store.deliver("alice", message)
    return store


def _logged_in(factory: POP3Factory) -> Wire:
    wire = Wire(factory)
    assert wire.login().startswith(b"+OK")
    return wire


def test_retr_and_top_with_both_workarounds(
    mailbox: MemoryStore, make_factory: Callable[..., POP3Factory]
) -> None:
    """
    RFC 1939 sections 5 and 7: the sizes announced by STAT, LIST and RETR
    are the stored messages' (as Dovecot does); the blank line that
    oe-ns-eoh adds follows them, before the terminator.
    """
    wire = _logged_in(make_factory(client_workarounds=BOTH))
    assert wire.command(b"STAT") == b"+OK 3 56\r\n"
    assert wire.command(b"LIST") == (b"+OK 3 messages (56 octets)\r\n1 23\r\n2 21\r\n3 12\r\n.\r\n")
    assert wire.command(b"RETR 1") == (b"+OK 23 octets\r\nSubject: a\x80b\r\n\r\nbo\x80dy\r\n.\r\n")
    assert wire.command(b"RETR 2") == b"+OK 21 octets\r\nSubject: x\r\nFrom: y\r\n\r\n.\r\n"
    assert wire.command(b"RETR 3") == b"+OK 12 octets\r\nSubject: x\r\n\r\n.\r\n"
    assert wire.command(b"TOP 1 0") == b"+OK top of message follows\r\nSubject: a\x80b\r\n\r\n.\r\n"
    assert wire.command(b"TOP 2 3") == (
        b"+OK top of message follows\r\nSubject: x\r\nFrom: y\r\n\r\n.\r\n"
    )
    # Nothing was cut short, so the session carries on.
    assert wire.command(b"NOOP") == b"+OK\r\n"
    assert not wire.closed
    assert wire.command(b"QUIT") == b"+OK bye\r\n"
    assert mailbox.messages("alice") == [WITH_NULS, HEADER_ONLY, HEADER_ONLY_NO_NEWLINE]


def test_off_by_default(mailbox: MemoryStore, factory: POP3Factory) -> None:
    wire = _logged_in(factory)
    assert wire.command(b"RETR 1") == b"+OK 23 octets\r\nSubject: a\x00b\r\n\r\nbo\x00dy\r\n.\r\n"
    assert wire.command(b"RETR 2") == b"+OK 21 octets\r\nSubject: x\r\nFrom: y\r\n.\r\n"
    assert wire.command(b"TOP 3 1") == b"+OK top of message follows\r\nSubject: x\r\n.\r\n"


@pytest.mark.parametrize("workarounds", [NO_NULS, EOH])
def test_each_workaround_alone(
    mailbox: MemoryStore, make_factory: Callable[..., POP3Factory], workarounds: ClientWorkarounds
) -> None:
    wire = _logged_in(make_factory(client_workarounds=workarounds))
    nul = b"\x80" if workarounds.outlook_no_nuls else b"\x00"
    end = b"\r\n" if workarounds.oe_ns_eoh else b""
    assert wire.command(b"RETR 1") == (
        b"+OK 23 octets\r\nSubject: a" + nul + b"b\r\n\r\nbo" + nul + b"dy\r\n.\r\n"
    )
    assert wire.command(b"RETR 2") == b"+OK 21 octets\r\nSubject: x\r\nFrom: y\r\n" + end + b".\r\n"


def test_across_the_servers_read_chunks(
    store: MemoryStore, make_factory: Callable[..., POP3Factory]
) -> None:
    """
    The server reads 256 KiB at a time: a blank line straddling a chunk
    boundary still ends the header, a NUL on it is still replaced, and a
    header longer than a chunk with no end gets exactly one.
    """
    long_header = b"X-Long: " + b"h" * (CHUNK_SIZE - len(b"X-Long: ") - 1)
    straddling = long_header + b"\n\n\x00body\n"  # "\n" | "\n\x00body\n"
    header_only = long_header + b"\nX-Next: \x00\n" + b"X-More: y\n" * 30000
    store.deliver("alice", straddling)
    store.deliver("alice", header_only)
    wire = _logged_in(make_factory(client_workarounds=BOTH))
    crlf_long = long_header + b"\r\n"
    assert wire.command(b"RETR 1") == (
        b"+OK %d octets\r\n" % wire_size(straddling) + crlf_long + b"\r\n\x80body\r\n.\r\n"
    )
    answer = wire.command(b"RETR 2")
    assert answer == (
        b"+OK %d octets\r\n" % wire_size(header_only)
        + crlf_long
        + b"X-Next: \x80\r\n"
        + b"X-More: y\r\n" * 30000
        + b"\r\n.\r\n"
    )
    assert wire.command(b"NOOP") == b"+OK\r\n"


@implementer(IMessageBody)
class _Body(io.BytesIO):
    pass


@implementer(IMaildropStore, IMaildrop)
class _ShrunkMaildrop:
    """
    A maildrop whose one message lost its last 2 octets after it was listed
    (another program cut the file while pop3d had it open).
    """

    def __init__(self, stored: bytes, listed_size: int) -> None:
        self.stored = stored
        self.messages = MessageList.of([MessageInfo("shrunk", listed_size)])

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        return succeed(self)

    def open_message(self, index: int) -> Deferred[IMessageBody]:
        return succeed(_Body(self.stored))

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)


def test_the_added_blank_line_does_not_hide_a_message_cut_short(clock: Clock) -> None:
    """
    Listed as "Subject: x\\r\\n\\r\\n" (14 octets), found as "Subject: x\\n":
    oe-ns-eoh would make it 14 octets again, but a message shorter than
    announced still never ends with the terminator (RFC 1939 section 3).
    """
    store = _ShrunkMaildrop(b"Subject: x\n", 14)
    factory = POP3Factory(
        memory_portal(store, USERS),
        clock=clock,
        login_failure_delay=0,
        client_workarounds=EOH,
    )
    wire = _logged_in(factory)
    answer = wire.command(b"RETR 1")
    assert answer == b"+OK 14 octets\r\nSubject: x\r\n\r\n"
    assert not answer.endswith(b".\r\n")
    assert wire.closed


# -- the command line --------------------------------------------------------------


def _parse(*arguments: str) -> Options:
    options = Options()
    options.parseOptions(
        ["--mail-location", "maildir:/srv/mail/{user}", "--auth", "memory:a:b", *arguments]
    )
    return options


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("outlook-no-nuls", NO_NULS),
        ("oe-ns-eoh", EOH),
        ("outlook-no-nuls oe-ns-eoh", BOTH),
        ("outlook-no-nuls,oe-ns-eoh", BOTH),
        ("", ClientWorkarounds()),
    ],
)
def test_option(value: str, expected: ClientWorkarounds) -> None:
    assert _parse("--client-workarounds", value)["client-workarounds"] == expected


def test_option_default() -> None:
    assert _parse()["client-workarounds"] == ClientWorkarounds()


def test_unknown_name_is_a_usage_error_naming_option_and_name() -> None:
    with pytest.raises(
        usage.UsageError, match=r"^--client-workarounds: unknown workaround 'outlook-idle' "
    ):
        _parse("--client-workarounds", "oe-ns-eoh,outlook-idle")


# -- end to end --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_twistd_option_reaches_retr(tmp_path: Path) -> None:
    """``twistd pop3d --client-workarounds ...`` as poplib sees it."""
    server = await start_service(
        tmp_path,
        ["tcp:0:interface=127.0.0.1"],
        ["--client-workarounds", "outlook-no-nuls oe-ns-eoh"],
    )
    maildir = server.maildir("alice")
    deliver_to_maildir(str(maildir), WITH_NULS)
    try:

        def fetch() -> tuple[bytes, list[bytes]]:
            client = poplib.POP3(server.host, server.port, timeout=10)
            client.user("alice")
            client.pass_(USERS["alice"])
            status, lines, _ = client.retr(1)
            client.quit()
            return status, lines

        status, lines = await deferToThread(fetch)
    finally:
        await server.service.stopService()
    assert (status, lines) == (b"+OK 23 octets", [b"Subject: a\x80b", b"", b"bo\x80dy"])
    [stored] = [p.read_bytes() for part in ("new", "cur") for p in (maildir / part).iterdir()]
    assert stored == WITH_NULS


# -- against the real Dovecot ------------------------------------------------------

#: For the comparison: the cases where pop3d and Dovecot agree without the
#: workarounds too (Dovecot counts no CRLF it adds to a last line).
DOVECOT_MESSAGES = (
    WITH_NULS,
    HEADER_ONLY,
    b"H: v\r\n\r\n.dot\r\n",
    b"Subject: \x00\nFrom: y\n",
)
DOVECOT_COMMANDS = (
    b"LIST\r\nRETR 1\r\nRETR 2\r\nRETR 3\r\nRETR 4\r\nTOP 1 0\r\nTOP 2 1\r\nTOP 4 0\r\n"
)


def _responses(session: bytes, multiline: int) -> list[bytes]:
    """
    The first ``multiline`` multi-line responses of ``session``, each
    without its status line: what a client gets for each command.
    """
    responses = []
    for _ in range(multiline):
        status_end = session.index(b"\r\n") + 2
        assert session.startswith(b"+OK")
        end = session.index(b"\r\n.\r\n", status_end - 2) + 5
        responses.append(session[status_end:end])
        session = session[end:]
    return responses


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_same_bytes_as_dovecot(tmp_path: Path) -> None:
    """
    Dovecot's POP3 server with ``pop3_client_workarounds = outlook-no-nuls
    oe-ns-eoh``, then pop3d with the same ``--client-workarounds`` on the
    same Maildir: LIST, RETR and TOP answer with the same octets.
    """
    _require_dovecot()
    shared = Path(tempfile.mkdtemp(prefix="pop3d-workarounds-"))
    try:
        shared.chmod(0o755)
        home = shared / "home"
        for message in DOVECOT_MESSAGES:
            deliver_to_maildir(str(home / "Maildir"), message)
        for path in [home, *home.rglob("*")]:
            shutil.chown(path, "nobody")
        config = shared / "dovecot.conf"
        config.write_text(
            "mail_location = maildir:~/Maildir\nprotocols =\nssl = no\n"
            "log_path = /dev/stderr\npostmaster_address = postmaster@example.org\n"
            "pop3_client_workarounds = outlook-no-nuls oe-ns-eoh\n"
        )
        config.chmod(0o644)
        from_dovecot = _as_nobody(home, config, DOVECOT_POP3, stdin=DOVECOT_COMMANDS + b"QUIT\r\n")
        server = await start_service(
            tmp_path,
            ["tcp:0:interface=127.0.0.1"],
            ["--client-workarounds", "outlook-no-nuls,oe-ns-eoh"],
        )
        shutil.move(str(home / "Maildir"), server.maildir("alice"))
        try:

            def session() -> bytes:
                with socket.create_connection((server.host, server.port), timeout=10) as client:
                    client.sendall(
                        b"USER alice\r\nPASS " + USERS["alice"].encode() + b"\r\n"
                        + DOVECOT_COMMANDS + b"QUIT\r\n"
                    )  # fmt: skip
                    received = b""
                    while chunk := client.recv(65536):
                        received += chunk
                return received

            from_pop3d = await deferToThread(session)
        finally:
            await server.service.stopService()
    finally:
        shutil.rmtree(shared)
    # Past pop3d's greeting, USER and PASS lines.
    from_pop3d = from_pop3d.split(b"\r\n", 3)[3]
    count = DOVECOT_COMMANDS.count(b"\r\n")
    assert _responses(from_pop3d, count) == _responses(from_dovecot, count)
    # RETR announces the same sizes, without the added blank line.
    assert re.findall(rb"\+OK \d+ octets", from_pop3d) == re.findall(
        rb"\+OK \d+ octets", from_dovecot
    )
