"""
Whole POP3 sessions over real Maildirs, checked step by step against a model.

Hypothesis drives pop3d as a server runs it (`POP3Factory` and its protocol
over a StringTransport, the real `MaildropRealm` and a cred portal, the
Maildir store doing its file work in a "thread pool" on the test's Clock,
failed logins answered late) with valid commands, malformed variants of
them, garbage, overlong and pipelined lines (CRLF or bare LF, cut anywhere),
dropped connections, autologouts, two clients at once (one refused a
maildrop the other holds, or logging in again the moment it quit), mail
arriving in the middle of a session, another program (an IMAP server)
moving, flagging and deleting files, and time passing (so that the store's
cached listings are used too).  A plain model of RFC 1939 predicts the exact
bytes of every reply and the files every Maildir holds after every step.
The model knows: each session's state (AUTHORIZATION or TRANSACTION), the
pending USER, failed logins, the run of rejected commands, the snapshot
taken at login, the messages marked as deleted or retrieved, where the
session last found each one, the locks; and each message file (name, place,
bytes).

What it checks, by RFC 1939 section:

- 3: keywords and arguments are printable ASCII separated by single spaces;
  anything else is ``-ERR`` and runs nothing; every reply is one
  CRLF-terminated status line or a byte-stuffed multi-line response ending
  in ``.CRLF`` (the model builds each one from the RFC's rules, and the bytes
  must be identical).
- 4: a login takes a snapshot: mail arriving during the session is not in
  it, and is in the next session's; the maildrop is locked meanwhile, for
  as long as the UPDATE after QUIT runs too (a maildrop whose Maildir does
  not exist yet is empty, and takes no lock).
- 5 and 7: STAT, LIST, UIDL, RETR, TOP, DELE, RSET, NOOP on the snapshot;
  numbers of deleted messages, zero, non-numeric and out of range are
  refused.
- 6: only QUIT from TRANSACTION deletes, exactly the messages marked
  (wherever another program moved them); a dropped connection, an
  autologout or too many bad commands deletes nothing and changes no file.

And the house rules: no stored byte is ever altered; on QUIT messages move
only as the README's "Migrating from Dovecot" says (``new/`` to ``cur/``
with ``:2,`` flags, ``S`` added for RETR, the unique name kept).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.task import Clock

from pop3d.factory import POP3Factory
from pop3d.stores.interfaces import IMaildrop
from pop3d.stores.maildir import MaildirStore
from pop3d.stores.posix import LockTable
from pop3d.testing import deliver_to_maildir, memory_portal

from .clock_threads import ClockThreads, result_of, settle
from .conftest import USERS, Wire

# Hypothesis runs hundreds of sessions: seconds, not milliseconds.
pytestmark = pytest.mark.slow

# -- the model ---------------------------------------------------------------

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
#: After UPDATE, or once the connection is gone.
ENDED = "ENDED"

#: Mailboxes mail is delivered to.  bob's Maildir does not exist until his
#: first delivery (an empty maildrop, not an error).
MAILBOXES = ("alice", "bob")
#: Names logins are tried with: the users, one nobody knows, one in capitals.
LOGIN_NAMES = ("alice", "bob", "mallory", "ALICE")
#: Mostly the user who gets most mail, and mostly the right password.
LOGINS = st.tuples(
    st.sampled_from(("alice", "alice", *LOGIN_NAMES)), st.sampled_from((True, True, False))
)

# RFC 1939 section 3 (and sections 4-7 for each command): the keywords and
# the arguments each takes, (fewest, most, usage).
GRAMMAR: dict[bytes, tuple[int, int, bytes]] = {
    b"USER": (1, 1, b"USER name"),
    b"PASS": (1, 1, b"PASS password"),
    b"APOP": (2, 2, b"APOP name digest"),
    b"QUIT": (0, 0, b"QUIT"),
    b"STAT": (0, 0, b"STAT"),
    b"LIST": (0, 1, b"LIST [msg]"),
    b"RETR": (1, 1, b"RETR msg"),
    b"DELE": (1, 1, b"DELE msg"),
    b"NOOP": (0, 0, b"NOOP"),
    b"RSET": (0, 0, b"RSET"),
    b"TOP": (2, 2, b"TOP msg n"),
    b"UIDL": (0, 1, b"UIDL [msg]"),
    b"CAPA": (0, 0, b"CAPA"),
    b"AUTH": (0, 2, b"AUTH [mechanism [initial-response]]"),
    b"STLS": (0, 0, b"STLS"),
    # RFC 6856 (UTF8 mode and LANG change what later replies look like:
    # tests/test_utf8.py and tests/test_lang.py; not modelled here).
    b"UTF8": (0, 0, b"UTF8"),
    b"LANG": (0, 1, b"LANG [language-range]"),
}
#: Commands whose arguments may be UTF-8: the server announces "UTF8 USER"
#: (RFC 6856 section 2.2).
UTF8_ARGUMENTS = {b"USER", b"APOP"}
ALLOWED = {
    AUTHORIZATION: {
        b"USER",
        b"PASS",
        b"APOP",
        b"CAPA",
        b"QUIT",
        b"AUTH",
        b"STLS",
        b"UTF8",
        b"LANG",
    },
    TRANSACTION: {
        b"STAT",
        b"LIST",
        b"RETR",
        b"DELE",
        b"NOOP",
        b"RSET",
        b"TOP",
        b"UIDL",
        b"CAPA",
        b"QUIT",
        b"LANG",
    },
}
#: Rejected commands in a row that close the connection (like Dovecot).
BAD_COMMAND_LIMIT = {AUTHORIZATION: 3, TRANSACTION: 20}
FAILED_LOGIN_LIMIT = 3
#: SASL mechanisms the portal can serve (an exchange is not modelled here:
#: tests/test_auth.py and tests/test_scram.py cover them).
MECHANISMS = (b"CRAM-MD5", b"PLAIN", b"LOGIN")
#: The longest line accepted, its CR included (pop3d.wire.MAX_COMMAND_LENGTH).
LONGEST_LINE = 8192

CAPABILITIES_BEFORE_LOGIN = (
    b"+OK capability list follows\r\n"
    b"TOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
    b"EXPIRE NEVER\r\nSASL CRAM-MD5 PLAIN LOGIN\r\nUTF8 USER\r\nLANG\r\n.\r\n"
)
CAPABILITIES_AFTER_LOGIN = CAPABILITIES_BEFORE_LOGIN[:-3] + b"IMPLEMENTATION pop3d\r\n.\r\n"
GREETING = re.compile(rb"\+OK pop3d ready (<[0-9a-f]{16}\.[0-9]+@pop\.example\.test>)\r\n")
LOGIN_FAILED = b"-ERR [AUTH] invalid user name or password\r\n"
IN_USE = b"-ERR [IN-USE] maildrop is locked by another session\r\n"
BYE = b"+OK bye\r\n"
TOO_MANY_BAD_COMMANDS = b"-ERR too many bad commands, closing connection\r\n"


@dataclass
class StoredMessage:
    """A message file: its unique name, where it is, its flags, its bytes."""

    unique: str
    content: bytes
    subdirectory: str
    #: What follows the unique name in the file name ("" or ":2,FLAGS").
    info: str

    @property
    def file_name(self) -> str:
        return self.unique + self.info


def on_the_wire(content: bytes) -> list[bytes]:
    """
    A stored message as RFC 1939 sends it, line by line (each ending in
    CRLF), before byte-stuffing: LF and CRLF line endings both become CRLF,
    and a last line without one gets one.
    """
    text = re.sub(rb"\r?\n", b"\r\n", content)
    if text and not text.endswith(b"\n"):
        text += b"\r\n"
    return re.findall(rb"[^\n]*\n", text)


def wire_octets(content: bytes) -> int:
    """The size LIST and STAT give a message (RFC 1939 section 11)."""
    return sum(len(line) for line in on_the_wire(content))


def multi_line(status: bytes, lines: list[bytes]) -> bytes:
    """RFC 1939 section 3: lines starting with "." get another, then ".CRLF"."""
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return status + b"".join(stuffed) + b".\r\n"


def top_of(lines: list[bytes], body_lines: int) -> list[bytes]:
    """RFC 1939 section 7, TOP: the header, the blank line, then n lines of the body."""
    for index, line in enumerate(lines):
        if line == b"\r\n":
            return lines[: index + 1 + body_lines]
    return lines


#: A day ago: directories "last changed" then have long settled.
_LONG_AGO_NS = (int(time.time()) - 86400) * 1_000_000_000


def let_time_pass(maildir: Path, moment: int) -> None:
    """
    Make a Maildir look as if nothing changed in it for a long while: its
    new/ and cur/ get modification times from a day ago (the ``moment``-th
    millisecond after, a different time each call, as if each change had
    been made at its own moment).  The store trusts the listing it keeps
    in memory only for directories that have settled (see `pop3d.stores.maildir`),
    so without this that path would never run in a test that runs fast.
    """
    stamp = _LONG_AGO_NS + moment * 1_000_000 + 1
    for subdirectory in ("new", "cur"):
        os.utime(maildir / subdirectory, ns=(stamp, stamp))


def apop_digest(challenge: bytes, password: str) -> bytes:
    """RFC 1939 section 7: MD5 of the greeting's timestamp and the secret, in hex."""
    return hashlib.md5(challenge + password.encode()).hexdigest().encode()


def message_number(argument: bytes) -> int | None:
    """A msg argument (RFC 1939 section 5): ASCII digits, greater than zero."""
    if re.fullmatch(rb"[0-9]+", argument) is None or int(argument) == 0:
        return None
    return int(argument)


@dataclass
class SessionModel:
    """What a POP3 session remembers (RFC 1939 sections 3-6)."""

    challenge: bytes
    state: str = AUTHORIZATION
    pending_user: bytes | None = None
    failed_logins: int = 0
    bad_commands: int = 0
    user: str = ""
    holds_lock: bool = False
    snapshot: list[StoredMessage] = field(default_factory=list)
    #: Where the session last found each message of the snapshot, as
    #: (subdirectory, file name): another program may have moved it since.
    seen_at: list[tuple[str, str]] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)
    retrieved: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Answer:
    reply: bytes
    closes: bool = False


class Rejected(Exception):
    """A command refused as malformed or out of place: -ERR, counted as bad."""

    def __init__(self, text: bytes) -> None:
        super().__init__(text)
        self.text = text


def parse(line: bytes) -> tuple[bytes, list[bytes]]:
    """A command line by the grammar of RFC 1939 section 3: (keyword, arguments)."""
    keyword, space, rest = line.partition(b" ")
    verb = keyword.upper()
    # Three or four characters: a letter, then letters or digits (UTF8).
    if re.fullmatch(rb"[A-Za-z][A-Za-z0-9]{2,3}", keyword) is None or verb not in GRAMMAR:
        raise Rejected(b"unknown command")
    fewest, most, usage = GRAMMAR[verb]
    if verb == b"PASS":
        # Section 7: the password is the rest of the line, spaces included.
        if space and rest and not re.search(rb"[\x00\r\n]", rest):
            return verb, [rest]
        if b"\x00" in rest:
            raise Rejected(b"the password may not contain NUL")
        raise Rejected(b"usage: " + usage)
    after_keyword = line[len(keyword) :]
    eight_bit = verb in UTF8_ARGUMENTS
    octets = rb"[\x21-\x7e\x80-\xff]" if eight_bit else rb"[\x21-\x7e]"
    if re.fullmatch(rb"( " + octets + rb"+)*", after_keyword) is None:
        if any(
            octet < 0x20 or octet == 0x7F or (octet > 0x7F and not eight_bit)
            for octet in after_keyword
        ):
            raise Rejected(b"arguments are printable ASCII")
        raise Rejected(b"keyword and arguments are separated by a single space")
    arguments = rest.split(b" ") if rest else []
    if eight_bit:
        for argument in arguments:
            try:
                argument.decode("utf-8")
            except UnicodeDecodeError:
                raise Rejected(b"arguments are UTF-8") from None
    if not fewest <= len(arguments) <= most:
        raise Rejected(b"usage: " + usage)
    return verb, arguments


def starts_sasl(line: bytes) -> bool:
    """
    Whether a line would begin what this model leaves out: a SASL exchange,
    or UTF8 and LANG, which change the wording of every later reply.
    """
    try:
        verb, arguments = parse(line)
    except Rejected:
        return False
    if verb in (b"UTF8", b"LANG"):
        return True
    return verb == b"AUTH" and bool(arguments) and arguments[0].upper() in MECHANISMS


class Model:
    """The Maildirs' files and the rules of RFC 1939 that change them."""

    def __init__(self) -> None:
        self.disk: dict[str, list[StoredMessage]] = {mailbox: [] for mailbox in MAILBOXES}
        self.locked: set[str] = set()
        #: Mailboxes whose Maildir exists (made by their first delivery).
        self.created: set[str] = set()

    def deliver(self, mailbox: str, message: StoredMessage) -> None:
        self.disk[mailbox].append(message)
        self.created.add(mailbox)

    def released(self, session: SessionModel) -> None:
        """The session ended (once): whatever happened, its lock goes."""
        if session.holds_lock:
            self.locked.discard(session.user)
            session.holds_lock = False
        session.state = ENDED

    def answer(self, session: SessionModel, line: bytes) -> Answer:
        """The reply to one command line; the model moves on as pop3d must."""
        try:
            verb, arguments = parse(line)
            if verb not in ALLOWED[session.state]:
                raise Rejected(b"command not valid in this state")
            answer = self._run(session, verb, arguments)
        except Rejected as rejected:
            session.bad_commands += 1
            if session.bad_commands >= BAD_COMMAND_LIMIT[session.state]:
                return Answer(TOO_MANY_BAD_COMMANDS, closes=True)
            return Answer(b"-ERR " + rejected.text + b"\r\n")
        # Accepted, whatever its answer: the run of bad commands ends.
        session.bad_commands = 0
        return answer

    def too_long(self, session: SessionModel) -> Answer:
        """A line over the limit, discarded: answered like a malformed command."""
        session.bad_commands += 1
        if session.bad_commands >= BAD_COMMAND_LIMIT[session.state]:
            return Answer(TOO_MANY_BAD_COMMANDS, closes=True)
        return Answer(b"-ERR line too long\r\n")

    def _run(self, session: SessionModel, verb: bytes, arguments: list[bytes]) -> Answer:
        if verb == b"CAPA":
            if session.state == AUTHORIZATION:
                return Answer(CAPABILITIES_BEFORE_LOGIN)
            return Answer(CAPABILITIES_AFTER_LOGIN)
        if session.state == AUTHORIZATION:
            return self._authorization(session, verb, arguments)
        return self._transaction(session, verb, arguments)

    # -- AUTHORIZATION (sections 4 and 7) --------------------------------------

    def _authorization(self, session: SessionModel, verb: bytes, arguments: list[bytes]) -> Answer:
        if verb == b"USER":
            session.pending_user = arguments[0]
            return Answer(b"+OK send PASS\r\n")
        if verb == b"PASS":
            if session.pending_user is None:
                raise Rejected(b"send USER first")
            name, session.pending_user = session.pending_user, None
            password = USERS.get(name.decode())
            return self._login(
                session, name, password is not None and arguments[0] == password.encode()
            )
        if verb == b"APOP":
            name, digest = arguments
            if re.fullmatch(rb"[0-9a-fA-F]{32}", digest) is None:
                raise Rejected(b"APOP takes a name and an MD5 digest")
            session.pending_user = None
            password = USERS.get(name.decode())
            right = password is not None and digest.lower() == apop_digest(
                session.challenge, password
            )
            return self._login(session, name, right)
        if verb == b"QUIT":
            return Answer(BYE, closes=True)
        if verb == b"AUTH":
            if not arguments:
                return Answer(
                    multi_line(
                        b"+OK available authentication mechanisms\r\n",
                        [mechanism + b"\r\n" for mechanism in MECHANISMS],
                    )
                )
            assert arguments[0].upper() not in MECHANISMS, "a SASL exchange is not modelled"
            return Answer(b"-ERR unsupported authentication mechanism\r\n")
        assert verb == b"STLS"
        return Answer(b"-ERR STLS is not available\r\n")

    def _login(self, session: SessionModel, name: bytes, right: bool) -> Answer:
        if not right:
            session.failed_logins += 1
            return Answer(LOGIN_FAILED, closes=session.failed_logins >= FAILED_LOGIN_LIMIT)
        mailbox = name.decode()
        if mailbox in self.locked:
            return Answer(IN_USE)
        if mailbox in self.created:
            # A maildrop with no Maildir yet is empty, and nothing is
            # locked: there is nothing a second session could take away.
            self.locked.add(mailbox)
            session.holds_lock = True
        session.state = TRANSACTION
        session.user = mailbox
        # Section 4: the maildrop as it is now, in unique-name order.
        session.snapshot = sorted(self.disk[mailbox], key=lambda message: message.unique)
        session.seen_at = [
            (message.subdirectory, message.file_name) for message in session.snapshot
        ]
        return Answer(b"+OK " + self._summary(session) + b"\r\n")

    # -- TRANSACTION (sections 5 and 7) and UPDATE (section 6) -------------------

    def _listed(self, session: SessionModel) -> list[tuple[int, StoredMessage]]:
        return [
            (index, message)
            for index, message in enumerate(session.snapshot)
            if index not in session.deleted
        ]

    def _totals(self, session: SessionModel) -> tuple[int, int]:
        listed = self._listed(session)
        return len(listed), sum(wire_octets(message.content) for _, message in listed)

    def _summary(self, session: SessionModel) -> bytes:
        return b"maildrop has %d messages (%d octets)" % self._totals(session)

    def _index(self, session: SessionModel, argument: bytes) -> int:
        """The snapshot index of a msg argument, or the refusal."""
        number = message_number(argument)
        if number is None:
            raise Rejected(b"invalid message number")
        if number > len(session.snapshot) or number - 1 in session.deleted:
            # A valid command about a message that is not there: not "bad".
            raise NoSuchMessage
        return number - 1

    def _transaction(self, session: SessionModel, verb: bytes, arguments: list[bytes]) -> Answer:
        try:
            return self._on_snapshot(session, verb, arguments)
        except NoSuchMessage:
            return Answer(b"-ERR no such message\r\n")
        except MessageGone:
            return Answer(b"-ERR message was removed by another program\r\n")

    def _on_snapshot(self, session: SessionModel, verb: bytes, arguments: list[bytes]) -> Answer:
        snapshot = session.snapshot
        if verb == b"STAT":
            return Answer(b"+OK %d %d\r\n" % self._totals(session))
        if verb in (b"LIST", b"UIDL"):

            def value(message: StoredMessage) -> bytes:
                if verb == b"LIST":
                    return b"%d" % wire_octets(message.content)
                return message.unique.encode()

            if arguments:
                index = self._index(session, arguments[0])
                return Answer(b"+OK %d %s\r\n" % (index + 1, value(snapshot[index])))
            heading = (
                b"+OK %d messages (%d octets)\r\n" % self._totals(session)
                if verb == b"LIST"
                else b"+OK unique-id listing follows\r\n"
            )
            lines = [b"%d %s\r\n" % (index + 1, value(m)) for index, m in self._listed(session)]
            return Answer(multi_line(heading, lines))
        if verb == b"RETR":
            index = self._index(session, arguments[0])
            self._find(session, index)
            session.retrieved.add(index)
            content = snapshot[index].content
            return Answer(
                multi_line(b"+OK %d octets\r\n" % wire_octets(content), on_the_wire(content))
            )
        if verb == b"TOP":
            if re.fullmatch(rb"[0-9]+", arguments[1]) is None:
                raise Rejected(b"invalid line count")
            index = self._index(session, arguments[0])
            self._find(session, index)
            lines = top_of(on_the_wire(snapshot[index].content), int(arguments[1]))
            return Answer(multi_line(b"+OK top of message follows\r\n", lines))
        if verb == b"DELE":
            number = message_number(arguments[0])
            if number is not None and number - 1 in session.deleted:
                return Answer(b"-ERR message already deleted\r\n")
            index = self._index(session, arguments[0])
            session.deleted.add(index)
            return Answer(b"+OK message %d deleted\r\n" % (index + 1))
        if verb == b"NOOP":
            return Answer(b"+OK\r\n")
        if verb == b"RSET":
            session.deleted.clear()
            return Answer(b"+OK " + self._summary(session) + b"\r\n")
        assert verb == b"QUIT"
        self.update(session)
        return Answer(BYE, closes=True)

    def _on_disk(self, mailbox: str, message: StoredMessage) -> bool:
        return any(message is there for there in self.disk[mailbox])

    def _find(self, session: SessionModel, index: int) -> None:
        """
        A message is read wherever another program moved it (the session
        learns its new place); one another program deleted is an -ERR.
        """
        message = session.snapshot[index]
        if not self._on_disk(session.user, message):
            raise MessageGone
        session.seen_at[index] = (message.subdirectory, message.file_name)

    def update(self, session: SessionModel) -> None:
        """
        Section 6: the marked messages go, wherever they are now, and nothing
        else.  Then what the README promises: the snapshot's other messages
        in new/ move to cur/, and those sent with RETR get the S flag; the
        unique name stays.  A file another program renamed since the session
        last saw it is left as that program left it.
        """
        doomed = [session.snapshot[index] for index in session.deleted]
        self.disk[session.user] = [
            message
            for message in self.disk[session.user]
            if not any(message is gone for gone in doomed)
        ]
        for index, message in enumerate(session.snapshot):
            if index in session.deleted:
                continue
            subdirectory, name = session.seen_at[index]
            retrieved = index in session.retrieved
            if subdirectory == "cur" and not retrieved:
                continue
            _, _, info = name.partition(":")
            flags = set(info[2:]) if info.startswith("2,") else set()
            if retrieved:
                flags.add("S")
            target = ":2," + "".join(sorted(flags))
            still_there = (message.subdirectory, message.file_name) == (subdirectory, name)
            if self._on_disk(session.user, message) and still_there:
                message.subdirectory, message.info = "cur", target


class NoSuchMessage(Exception):
    """A message number that is not (or no longer) in the snapshot."""


class MessageGone(Exception):
    """A message of the snapshot that another program deleted."""


# -- what the machine sends ---------------------------------------------------

#: Message-number arguments: mostly numbers that may or may not exist, and
#: forms that are not message numbers at all.
NUMBERS = st.one_of(
    st.integers(1, 6).map(lambda number: b"%d" % number),
    st.sampled_from(
        [
            b"0",
            b"00",
            b"01",
            b"007",
            b"4294967297",
            b"99999999999999999999999",
            b"x",
            b"-1",
            b"+1",
            b"1.0",
            b"1e0",
            b"0x1",
            b"one",
        ]
    ),
)
LINE_COUNTS = st.one_of(
    st.integers(0, 4).map(lambda count: b"%d" % count),
    st.sampled_from([b"00", b"99999999999999999999999", b"-1", b"x"]),
)

#: Command lines as a client writes them: those of TRANSACTION, and those of
#: AUTHORIZATION too (out of place after login).  QUIT has its own rule.
TRANSACTION_COMMANDS = st.one_of(
    st.sampled_from([b"STAT", b"LIST", b"UIDL", b"NOOP", b"RSET", b"CAPA"]),
    st.builds(lambda n: b"LIST " + n, NUMBERS),
    st.builds(lambda n: b"UIDL " + n, NUMBERS),
    st.builds(lambda n: b"RETR " + n, NUMBERS),
    st.builds(lambda n: b"DELE " + n, NUMBERS),
    st.builds(lambda n, k: b"TOP " + n + b" " + k, NUMBERS, LINE_COUNTS),
)
AUTHORIZATION_COMMANDS = st.one_of(
    st.builds(lambda name: b"USER " + name.encode(), st.sampled_from(LOGIN_NAMES)),
    st.sampled_from(
        [
            b"PASS wonderland",
            b"PASS builder",
            b"PASS wrong",
            b"PASS wonder land",
            b"CAPA",
            b"AUTH",
            b"AUTH X-UNKNOWN",
            b"AUTH X-UNKNOWN =",
            b"STLS",
        ]
    ),
)
#: Command lines as a client writes them, in any state: out of place is
#: part of the test.  QUIT has its own rule.
COMMANDS = st.one_of(TRANSACTION_COMMANDS, AUTHORIZATION_COMMANDS)


Mutation = Callable[[bytes, int], bytes]


def _insert(octets: bytes) -> Mutation:
    def insert(line: bytes, at: int) -> bytes:
        at %= len(line) + 1
        return line[:at] + octets + line[at:]

    return insert


#: Ways to break a valid line (RFC 1939 section 3's grammar); the model
#: works out what each one does, which is not always "malformed" (a lower-case
#: keyword is valid, "LIST 1" minus its argument is "LIST").
MUTATIONS: dict[str, Mutation] = {
    "double space": lambda line, at: line.replace(b" ", b"  ", 1) if b" " in line else line + b"  ",
    "trailing space": lambda line, at: line + b" ",
    "leading space": lambda line, at: b" " + line,
    "extra argument": lambda line, at: line + b" 1",
    "argument dropped": lambda line, at: line.rsplit(b" ", 1)[0],
    "tab for space": lambda line, at: (
        line.replace(b" ", b"\t", 1) if b" " in line else line + b"\t1"
    ),
    "NUL": _insert(b"\x00"),
    "8-bit octet": _insert(b"\xe9"),
    "UTF-8": _insert("\u0661".encode()),
    "DEL": _insert(b"\x7f"),
    "CR": _insert(b"\r"),
    "lower case": lambda line, at: line.lower(),
}

MALFORMED = st.builds(
    lambda line, mutation, at: MUTATIONS[mutation](line, at),
    COMMANDS,
    st.sampled_from(sorted(MUTATIONS)),
    st.integers(0, 30),
)
#: Lines a pipeline may hold now and then: QUIT (after which nothing is
#: read) and lines just within and just over the limit.
RARE_LINES = st.sampled_from([b"QUIT", b"X" * (LONGEST_LINE - 1), b"X" * LONGEST_LINE])
#: Lines a connection may drop right after.
ENDINGS = st.sampled_from([b"QUIT", b"PASS wonderland", b"RETR 1", b"LIST", b"DELE 1", b"NOOP"])

#: Anything a client could send as a line: no CR or LF, which end lines.
GARBAGE = st.binary(max_size=40).map(lambda line: line.replace(b"\r", b"").replace(b"\n", b""))

MESSAGE_PIECES = [
    b"Subject: test\n",
    b"From: a@example.test\r\n",
    b"\n",
    b"\r\n",
    b"\r",
    b".",
    b"..\n",
    b".\r\n",
    b"From here\n",
    b"body text",
    b"\x00",
    b"\xe9t\xe9",
    b" ",
]
#: Message bytes as mail is stored: LF or CRLF (or both), dots at the
#: start of lines, lone CRs, a last line without an ending, 8-bit and NUL.
MESSAGES = st.lists(
    st.one_of(st.sampled_from(MESSAGE_PIECES), st.binary(max_size=6)), max_size=10
).map(b"".join)
#: Where a delivery lands: new/ as an MTA puts it, or cur/ as an IMAP
#: client left it (with or without flags).
PLACEMENTS = st.sampled_from(
    [("new", ""), ("new", ""), ("cur", ""), ("cur", ":2,"), ("cur", ":2,F"), ("cur", ":2,RS")]
)


@dataclass
class Connection:
    """A client's connection, and the model of its session."""

    wire: Wire
    session: SessionModel
    #: The Clock's time when its last exchange ended.
    last_active: float


#: RFC 1939 section 3: the autologout timer, at least ten minutes.
AUTOLOGOUT = 600
#: The longest a failed login's answer waits (pop3d.throttle).
LONGEST_LOGIN_DELAY = 30


class SessionMachine(RuleBasedStateMachine):
    """Two clients, talking in turns, against one pop3d."""

    def __init__(self) -> None:
        super().__init__()
        # A Maildir tree per example: pytest's tmp_path is per test.
        self.root = tempfile.mkdtemp(prefix="pop3d-model-")
        self.clock = Clock()
        self.threads = ClockThreads(self.clock)
        self.store = MaildirStore(f"{self.root}/{{user}}", reactor=self.threads.as_reactor)
        self.factory = POP3Factory(
            memory_portal(self.store, USERS),
            clock=self.clock,
            hostname="pop.example.test",
            # As in production: a failed login is answered 2 s late, longer
            # for a peer that keeps failing (see _wait_for_replies).
            login_failure_delay=2,
        )
        self.model = Model()
        self.connections: list[Connection | None] = [None, None]
        #: The connection the rules talk on; `switch` changes it.
        self.current = 0
        self.moments = 0

    @property
    def wire(self) -> Wire | None:
        connection = self.connections[self.current]
        return connection.wire if connection is not None else None

    @property
    def session(self) -> SessionModel | None:
        connection = self.connections[self.current]
        return connection.session if connection is not None else None

    def teardown(self) -> None:
        try:
            for connection in self.connections:
                if connection is not None:
                    connection.wire.disconnect()
            settle(self.clock)
            # No maildrop stays locked once its connection is gone.
            for mailbox in MAILBOXES:
                maildrop = result_of(self.clock, self.store.open(mailbox))
                assert IMaildrop.providedBy(maildrop), maildrop
                IMaildrop(maildrop).close()
        finally:
            if isinstance(self.store.locks, LockTable):
                self.store.locks.close()
            shutil.rmtree(self.root)

    # -- talking -----------------------------------------------------------

    def _connection(self) -> tuple[Wire, SessionModel]:
        """The current connection; a new one if it has ended."""
        self._reap()
        connection = self.connections[self.current]
        if connection is None:
            wire = Wire(self.factory)
            greeting = GREETING.fullmatch(wire.greeting)
            assert greeting is not None, wire.greeting
            connection = Connection(wire, SessionModel(greeting.group(1)), self.clock.seconds())
            self.connections[self.current] = connection
        return connection.wire, connection.session

    def _reap(self) -> None:
        """
        Connections the autologout timer closed (section 3): only after ten
        minutes without a command, with no reply, and with no UPDATE.  (The
        timer restarts at each command read; the last one may have been
        read up to a failed login's delay before its exchange ended.)
        """
        for slot, connection in enumerate(self.connections):
            if connection is not None and connection.wire.closed:
                idle = self.clock.seconds() - connection.last_active
                assert idle >= AUTOLOGOUT - LONGEST_LOGIN_DELAY, idle
                self._gone(slot)

    def _gone(self, slot: int | None = None) -> None:
        """A connection (the current one by default) has ended, however it did."""
        connection = self.connections[self.current if slot is None else slot]
        assert connection is not None
        connection.wire.disconnect()
        settle(self.clock)
        assert connection.wire.take() == b""
        self.model.released(connection.session)
        self.connections[self.current if slot is None else slot] = None

    def _wait_for_replies(self) -> None:
        """
        Let every reply arrive: those waiting for the store's thread pool,
        and answers to failed logins, which wait up to 30 s (pop3d.throttle).
        The current connection's inactivity timer, ten minutes from its last
        command, never fires here; the other connection's may (see `_reap`).
        """
        settle(self.clock)
        while soon := [
            call.getTime()
            for call in self.clock.getDelayedCalls()
            if call.getTime() <= self.clock.seconds() + 60
        ]:
            self.clock.advance(min(soon) - self.clock.seconds())
            settle(self.clock)

    def _exchange(
        self, lines: list[bytes], cuts: list[int] | None = None, ending: bytes = b"\r\n"
    ) -> None:
        """
        Send ``lines`` (in one write, or cut into pieces at ``cuts``), let
        every reply arrive, and compare the bytes with the model's.  Lines
        end in CRLF, or in a bare LF as some clients send (accepted too).
        """
        wire, session = self._connection()
        expected = b""
        closes = False
        for line in lines:
            if len(line + ending) - len(b"\n") > LONGEST_LINE:
                answer = self.model.too_long(session)
            else:
                answer = self.model.answer(session, line)
            expected += answer.reply
            if answer.closes:
                # Whatever followed in the same write is never looked at.
                closes = True
                break
        data = b"".join(line + ending for line in lines)
        received = b""
        start = 0
        for cut in [*sorted({cut % (len(data) + 1) for cut in cuts or []}), len(data)]:
            received += wire.send(data[start:cut])
            start = cut
        # Pipelined replies leave strictly in order (RFC 2449 section 6.6):
        # what is out before the wait is the start of what is expected.
        assert expected.startswith(received), (lines, received, expected)
        self._wait_for_replies()
        received += wire.take()
        assert received == expected, (lines, received, expected)
        assert wire.closed == closes
        if closes:
            self._gone()
        else:
            connection = self.connections[self.current]
            assert connection is not None
            connection.last_active = self.clock.seconds()

    # -- rules: logging in -------------------------------------------------

    def _logged_in(self) -> bool:
        return self.session is not None and self.session.state == TRANSACTION

    @precondition(lambda self: not self._logged_in())
    @rule(login=LOGINS)
    def login_with_user_and_pass(self, login: tuple[str, bool]) -> None:
        name, right = login
        password = USERS.get(name.lower(), "wonderland")
        self._exchange(
            [b"USER " + name.encode(), b"PASS " + (password if right else "wrong").encode()]
        )

    @precondition(lambda self: not self._logged_in())
    @rule(login=LOGINS, upper=st.booleans())
    def login_with_apop(self, login: tuple[str, bool], upper: bool) -> None:
        name, right = login
        _, session = self._connection()
        secret = USERS.get(name.lower(), "wonderland") if right else "wrong"
        digest = apop_digest(session.challenge, secret)
        self._exchange([b"APOP %s %s" % (name.encode(), digest.upper() if upper else digest)])

    @precondition(lambda self: not self._logged_in())
    @rule(line=st.one_of(COMMANDS, MALFORMED, GARBAGE))
    def before_login(self, line: bytes) -> None:
        """Anything but a login: out of place, malformed, garbage (three close)."""
        assume(not starts_sasl(line))
        self._exchange([line])

    # -- rules: in TRANSACTION -----------------------------------------------

    @precondition(lambda self: self._logged_in())
    @rule(line=TRANSACTION_COMMANDS)
    def command(self, line: bytes) -> None:
        self._exchange([line])

    @precondition(lambda self: self._logged_in())
    @rule(verb=st.sampled_from([b"DELE", b"RETR"]), number=st.integers(1, 5))
    def dele_or_retr(self, verb: bytes, number: int) -> None:
        """The two commands whose effects outlast the session, on likely numbers."""
        self._exchange([b"%s %d" % (verb, number)])

    @precondition(lambda self: self._logged_in())
    @rule(line=st.one_of(AUTHORIZATION_COMMANDS, MALFORMED, GARBAGE))
    def misbehave(self, line: bytes) -> None:
        """Out of place, malformed, garbage: -ERR, nothing runs (twenty close)."""
        assume(not starts_sasl(line))
        self._exchange([line])

    # -- rules: any state ----------------------------------------------------

    @rule(
        length=st.sampled_from(
            [LONGEST_LINE - 2, LONGEST_LINE - 1, LONGEST_LINE, LONGEST_LINE + 1, 20000]
        ),
        cuts=st.lists(st.integers(0, 20002), max_size=2),
        ending=st.sampled_from([b"\r\n", b"\n"]),
    )
    def long_line(self, length: int, cuts: list[int], ending: bytes) -> None:
        self._exchange([b"X" * length], cuts, ending)

    @rule(
        lines=st.lists(st.one_of(COMMANDS, MALFORMED, GARBAGE, RARE_LINES), min_size=2, max_size=6),
        cuts=st.lists(st.integers(0, 20000), max_size=4),
        ending=st.sampled_from([b"\r\n", b"\r\n", b"\n"]),
    )
    def pipelined(self, lines: list[bytes], cuts: list[int], ending: bytes) -> None:
        """
        RFC 2449 section 6.6 (PIPELINING): several commands in one write, or
        cut anywhere, are answered in order, as if sent one by one.
        """
        assume(not any(starts_sasl(line) for line in lines))
        if ending == b"\n":
            # A line ending in CR would lose it, as the end of a CRLF.
            assume(not any(line.endswith(b"\r") for line in lines))
        self._exchange(lines, cuts, ending)

    @rule(line=st.one_of(MALFORMED, GARBAGE), count=st.integers(2, 25))
    def flood(self, line: bytes, count: int) -> None:
        """The same line again and again: bad ones close, at 3 before login, 20 after."""
        assume(not starts_sasl(line))
        self._exchange([line] * count)

    # -- rules: the end of a connection ------------------------------------------

    @precondition(lambda self: self.wire is not None)
    @rule(
        how=st.sampled_from(["QUIT", "QUIT", "QUIT", "drop", "autologout", "drop after"]),
        line=ENDINGS,
    )
    def end(self, how: str, line: bytes) -> None:
        """
        QUIT; or the connection drops, between commands or right after one
        (before its reply may have arrived); or the inactivity timer ends it
        (section 3).  Only a QUIT in TRANSACTION updates (section 6).
        """
        wire, session = self._connection()
        if how == "QUIT":
            self._exchange([b"QUIT"])
        elif how == "drop":
            self._gone()
        elif how == "autologout":
            # Ten minutes without a command: the other connection, idle at
            # least as long, goes too.
            self.clock.advance(AUTOLOGOUT)
            assert wire.closed
            self._reap()
            assert self.connections == [None, None]
        else:
            answer = self.model.answer(session, line)
            received = wire.send(line + b"\r\n")
            # Whatever part of the reply was out before the end.
            assert answer.reply.startswith(received)
            # The command still happens: a QUIT still updates, a login whose
            # answer comes too late lets the maildrop go again.
            self._gone()

    @rule()
    def switch(self) -> None:
        """Talk on the other connection (it stays open meanwhile)."""
        self._reap()
        self.current = 1 - self.current

    @precondition(lambda self: self.session is not None and self.session.holds_lock)
    @rule()
    def second_session_is_refused(self) -> None:
        """Section 4: the maildrop stays locked to the first session."""
        assert self.session is not None
        user = self.session.user
        other = Wire(self.factory)
        assert other.command(b"USER " + user.encode()) == b"+OK send PASS\r\n"
        reply = other.command(b"PASS " + USERS[user].encode())
        settle(self.clock)
        assert reply + other.take() == IN_USE
        assert other.command(b"QUIT") == BYE
        other.disconnect()
        settle(self.clock)

    @precondition(lambda self: self._logged_in())
    @rule()
    def quit_and_log_in_again_at_once(self) -> None:
        """
        A client quits and logs in again on a new connection before the
        first UPDATE may have finished (a polling client does).  The second
        login is refused [IN-USE] while the UPDATE is under way, and never
        sees the maildrop half-updated: when it gets in, it gets exactly
        what the first session left.
        """
        wire, session = self._connection()
        user = session.user.encode()
        bye = self.model.answer(session, b"QUIT")
        received = wire.send(b"QUIT\r\n")
        again = Wire(self.factory)
        greeting = GREETING.fullmatch(again.greeting)
        assert greeting is not None
        second = SessionModel(greeting.group(1))
        self.model.answer(second, b"USER " + user)
        again.command(b"USER " + user)
        reply = again.command(b"PASS " + USERS[user.decode()].encode())
        self._wait_for_replies()
        reply += again.take()
        if reply != IN_USE:
            # The first UPDATE was over at once (nothing to delete or move).
            self.model.released(session)
        assert reply == self.model.answer(second, b"PASS " + USERS[user.decode()].encode()).reply
        assert received + wire.take() == bye.reply
        self._gone()
        answer = self.model.answer(second, b"QUIT")
        assert again.command(b"QUIT") + self._settled_take(again) == answer.reply
        again.disconnect()
        settle(self.clock)
        self.model.released(second)

    def _settled_take(self, wire: Wire) -> bytes:
        self._wait_for_replies()
        return wire.take()

    # -- rules: the world outside the session --------------------------------

    @initialize(deliveries=st.lists(st.tuples(MESSAGES, PLACEMENTS), max_size=4))
    def mail_waiting(self, deliveries: list[tuple[bytes, tuple[str, str]]]) -> None:
        """alice has mail before the first session."""
        for content, placement in deliveries:
            self.deliver("alice", content, placement)

    @rule(mailbox=st.sampled_from(("alice", *MAILBOXES)), content=MESSAGES, placement=PLACEMENTS)
    def deliver(self, mailbox: str, content: bytes, placement: tuple[str, str]) -> None:
        """Mail arrives, in the middle of a session or between two."""
        subdirectory, info = placement
        unique = deliver_to_maildir(
            os.path.join(self.root, mailbox), content, subdirectory=subdirectory, info=info
        )
        self.model.deliver(mailbox, StoredMessage(unique, content, subdirectory, info))

    @precondition(lambda self: self.model.disk["alice"])
    @rule(which=st.integers(0, 20), flags=st.sampled_from(["", "S", "F", "RS"]))
    def another_program_moves(self, which: int, flags: str) -> None:
        """
        An IMAP server on the same Maildir (README: "Migrating from Dovecot")
        moves a message of alice's to cur/ or changes its flags.
        """
        mailbox = self.model.disk["alice"]
        message = mailbox[which % len(mailbox)]
        source = Path(self.root, "alice", message.subdirectory, message.file_name)
        message.subdirectory, message.info = "cur", ":2," + flags
        source.rename(Path(self.root, "alice", "cur", message.file_name))

    @precondition(lambda self: self.model.disk["alice"])
    @rule(which=st.integers(0, 20))
    def another_program_deletes(self, which: int) -> None:
        message = self.model.disk["alice"].pop(which % len(self.model.disk["alice"]))
        Path(self.root, "alice", message.subdirectory, message.file_name).unlink()

    @rule()
    def time_passes(self) -> None:
        """The Maildirs settle: the store may trust what it listed before."""
        for mailbox in self.model.created:
            self.moments += 1
            let_time_pass(Path(self.root, mailbox), self.moments)

    # -- what must always hold ------------------------------------------------

    @invariant()
    def files_are_as_the_model_says(self) -> None:
        """Every file is one the model expects, where it expects it, byte for byte."""
        for mailbox in MAILBOXES:
            root = Path(self.root, mailbox)
            expected = {
                (message.subdirectory, message.file_name): message.content
                for message in self.model.disk[mailbox]
            }
            if not root.exists():
                assert expected == {}
                continue
            found = {
                (path.parent.name, path.name): path.read_bytes()
                for subdirectory in ("new", "cur")
                for path in (root / subdirectory).iterdir()
            }
            assert found == expected
            assert list((root / "tmp").iterdir()) == []
            # Besides the mail, only pop3d's own state files: message sizes,
            # and what a QUIT changed (for another process's next login).
            state_files = {"pop3d-sizes", "pop3d-changes"}
            assert {path.name for path in root.iterdir()} <= {"new", "cur", "tmp", *state_files}

    @invariant()
    def nothing_is_left_waiting(self) -> None:
        """Every reply was complete when checked: no store work is pending."""
        assert all(call.getTime() > self.clock.seconds() for call in self.clock.getDelayedCalls())


SessionMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSessions = SessionMachine.TestCase
