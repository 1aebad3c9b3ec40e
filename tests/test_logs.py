"""
The log an admin and fail2ban read: the session id on every line of a
session, the login line (with TLS version and cipher), the logout line in
Dovecot's pop3_logout_format, the one format of failed logins, and the
fail2ban filter and jail in contrib/, checked with the real fail2ban-regex
against the log file the real ``twistd pop3d --logfile`` writes.
"""

from __future__ import annotations

import base64
import configparser
import datetime
import hashlib
import poplib
import queue
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.logger import (
    Logger,
    LogLevel,
    eventAsJSON,
    eventAsText,
    eventFromJSON,
    formatEvent,
    formatEventAsClassicLogText,
)

from pop3d.driver import SESSION_LOG_NAMESPACE, SessionLogger
from pop3d.logformat import (
    LogoutFormat,
    LogoutFormatError,
    LogoutValues,
    SessionIds,
    quote,
)
from pop3d.testing import deliver_to_maildir

from .conftest import USERS, Logged, require_program, start_service
from .test_endpoints import _self_signed
from .test_process import (
    HOST,
    PATIENCE,
    Launch,
    Server,
    launch,  # noqa: F401  (the fixture)
    pop3d_arguments,
    write_passwd,
)

CONTRIB = Path(__file__).parent.parent / "contrib" / "fail2ban"
FILTER = CONTRIB / "filter.d" / "pop3d.conf"
JAIL = CONTRIB / "jail.d" / "pop3d.conf"

# -- the pure parts: quoting, the logout format, session ids -------------------


@pytest.mark.parametrize(
    ("sent", "logged"),
    [
        ("alice", '"alice"'),
        ('eve" rip=10.9.8.7', '"eve\\" rip=10.9.8.7"'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak\r", '"line\\x0abreak\\x0d"'),
        ("esc\x1b[2J del\x7f", '"esc\\x1b[2J del\\x7f"'),
        ("sep\u2028x\x85", '"sep\\u2028x\\x85"'),
        ("jürgen", '"jürgen"'),
    ],
)
def test_a_user_name_is_quoted_so_it_cannot_forge_a_line(sent: str, logged: str) -> None:
    assert quote(sent) == logged


VALUES = LogoutValues(
    top_count=1,
    top_bytes=16,
    retr_count=2,
    retr_bytes=300,
    deleted_count=1,
    deleted_bytes=41,
    message_count=3,
    message_bytes=400,
    uidls=("a", "b"),
)


def test_the_default_logout_format_is_dovecots() -> None:
    rendered = LogoutFormat.parse("top=%t/%p, retr=%r/%b, del=%d/%m, size=%s").render(VALUES)
    assert rendered == "top=1/16, retr=2/300, del=1/3, size=400"


def test_logout_format_long_names_percent_and_uidl_hash() -> None:
    text = "%{top_count} %{retr_bytes} %{deleted_bytes} %{message_count} %u %{uidl_change} 5%%"
    expected_hash = hashlib.sha1(b"a\nb\n").hexdigest()[:8]
    assert LogoutFormat.parse(text).render(VALUES) == (
        f"1 300 41 3 {expected_hash} {expected_hash} 5%"
    )


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        ("no variables", "no variables"),
        ("%r", "2"),
        ("%%t is %t", "%t is 1"),
        ("\x1b[2J%t\n%d\u2028", "\\x1b[2J1\\x0a1\\u2028"),
    ],
)
def test_a_logout_format_renders_its_text_and_escapes_control_characters(
    text: str, rendered: str
) -> None:
    # The admin's text cannot end the log line either (as a user name cannot).
    assert LogoutFormat.parse(text).render(VALUES) == rendered


@pytest.mark.parametrize("text", ["%x", "%{bogus}", "trailing %"])
def test_an_unknown_logout_variable_is_refused(text: str) -> None:
    with pytest.raises(LogoutFormatError, match="unknown variable"):
        LogoutFormat.parse(text)


def test_session_ids_are_short_and_unique() -> None:
    ids = SessionIds("w2")
    assert [ids.next_id() for _ in range(3)] == ["w2.1", "w2.2", "w2.3"]


# -- the login line names TLS ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_login_line_names_tls_version_and_cipher(tmp_path: Path, logged: Logged) -> None:
    """RFC 2595 section 4 (STLS): the login line says which TLS the session used."""
    key, cert = _self_signed(tmp_path)
    server = await start_service(
        tmp_path, ["tcp:0:interface=127.0.0.1"], ["--tls-cert", str(cert), "--tls-key", str(key)]
    )
    try:

        def sessions() -> tuple[str, str]:
            plain = poplib.POP3(server.host, server.port, timeout=10)
            plain.user("alice")
            plain.pass_(USERS["alice"])
            plain.quit()
            client = poplib.POP3(server.host, server.port, timeout=10)
            client.stls(context=_trusting(tmp_path))
            client.user("alice")
            client.pass_(USERS["alice"])
            tls = client.sock
            version, cipher = tls.version(), tls.cipher()[0]  # type: ignore[attr-defined]
            client.quit()
            return version, cipher

        version, cipher = await deferToThread(sessions)
    finally:
        await server.service.stopService()
    logins = [formatEvent(e) for e in logged.events if " login: " in e.get("log_format", "")]
    assert len(logins) == 2
    assert re.fullmatch(r'\[\w+\.\d+\] login: rip=127\.0\.0\.1 method=USER user="alice"', logins[0])
    assert re.fullmatch(
        r'\[\w+\.\d+\] login: rip=127\.0\.0\.1 method=USER user="alice"'
        + re.escape(f" tls={version} cipher={cipher}"),
        logins[1],
    ), logins[1]
    assert version.startswith("TLSv")


@pytest_twisted.ensureDeferred
async def test_failed_login_behind_haproxy_names_the_real_client(
    tmp_path: Path, logged: Logged
) -> None:
    """The PROXY protocol's source address is the one fail2ban must ban, not the proxy's."""
    server = await start_service(
        tmp_path,
        ["haproxy:tcp:0:interface=127.0.0.1"],
        ["--allow-plaintext-auth", "--login-failure-delay", "0"],
    )
    try:

        def client() -> bytes:
            with socket.create_connection((server.host, server.port), timeout=10) as sock:
                sock.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 40123 110\r\n")
                sock.sendall(b"USER alice\r\nPASS guess\r\nQUIT\r\n")
                received = b""
                while chunk := sock.recv(4096):
                    received += chunk
                return received

        answer = await deferToThread(client)
    finally:
        await server.service.stopService()
    assert b"-ERR [AUTH]" in answer
    failed = [formatEvent(e) for e in logged.events if "login failed:" in e.get("log_format", "")]
    assert len(failed) == 1
    assert re.fullmatch(
        r"\[\w+\.\d+\] login failed: rip=203\.0\.113\.7 method=USER reason=credentials"
        r' user="alice"',
        failed[0],
    ), failed


def _trusting(tmp_path: Path) -> object:
    import ssl

    return ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))


# -- the real twistd's log file, and fail2ban ------------------------------------


class LogFollower(Server):
    """``tail -F`` of twistd's --logfile: its lines as they are written, without polling."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            ["tail", "-n", "+1", "-F", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.port = 0
        self.lines = []
        self._unread = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


MESSAGE_1 = b"Subject: one\n\nfirst line\nsecond line\n"  # 41 octets with CRLF
MESSAGE_2 = b"Subject: two\n\nbody\n"  # 22 octets with CRLF
SESSION_LINE = (
    r"(?P<stamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4})"
    r" \[pop3d\.session\.Session#info\] \[(?P<id>[0-9a-z]+\.\d+)\] "
)
#: Shown as the user name by a client that tries to make fail2ban ban someone else.
FORGERIES = [
    'eve" rip=10.9.8.7 reason=credentials user="x',
    "mallory rip=10.9.8.8 method=USER",
    "x] [1.1] login failed: rip=10.9.8.9 method=USER reason=credentials user=",
]


class Client:
    """A raw POP3 connection: one reply line per command line."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection((HOST, port), timeout=PATIENCE)
        self.reader = self.socket.makefile("rb")
        self.greeting = self.reader.readline()

    def command(self, line: bytes) -> bytes:
        self.socket.sendall(line + b"\r\n")
        return self.reader.readline()

    def close(self) -> None:
        self.reader.close()
        self.socket.close()


def _plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode())


def _apop(client: Client, user: str, secret: str) -> bytes:
    challenge = re.search(rb"<[^>]+>", client.greeting)
    assert challenge is not None
    digest = hashlib.md5(challenge.group(0) + secret.encode()).hexdigest()
    return f"APOP {user} {digest}".encode()


def _one_attempt(port: int, *lines: bytes, answer: bytes = b"-ERR") -> None:
    client = Client(port)
    try:
        replies = [client.command(line) for line in lines]
        assert replies[-1].startswith(answer), replies
        client.command(b"QUIT")
    finally:
        client.close()


@pytest.mark.process
@pytest.mark.peer
def test_fail2ban_bans_failed_logins_and_nothing_else(tmp_path: Path, launch: Launch) -> None:  # noqa: F811
    fail2ban_regex = require_program("fail2ban-regex")
    mail_root = tmp_path / "mail"
    deliver_to_maildir(str(mail_root / "alice"), MESSAGE_1)
    deliver_to_maildir(str(mail_root / "alice"), MESSAGE_2)
    logfile = tmp_path / "pop3d.log"
    logout_format = "top=%t/%p retr=%{retr_count}/%b del=%d/%{deleted_bytes} msgs=%m/%s uidl=%u 9%%"
    arguments = pop3d_arguments(
        mail_root,
        write_passwd(tmp_path),
        "--login-failure-delay",
        "0",
        "--logout-format",
        logout_format,
    )
    server = launch(f"--logfile={logfile}", *arguments)
    log = LogFollower(logfile)
    try:
        port = log.wait_listening()
        server.port = port
        # A session that reads, with the lines it logs.
        reader = poplib.POP3(HOST, port, timeout=PATIENCE)
        reader.user("alice")
        reader.pass_("wonderland")
        uids = [line.split()[1] for line in reader.uidl()[1]]
        reader.top(1, 0)
        reader.retr(1)
        reader.dele(2)
        reader.quit()
        logout = log.wait_for(re.compile(SESSION_LINE + r"session logged out: .*"))
        # Successful logins of each kind.
        _one_attempt(port, b"USER alice", b"PASS wonderland", answer=b"+OK")
        apop = Client(port)
        assert apop.command(_apop(apop, "alice", "wonderland")).startswith(b"+OK")
        apop.command(b"QUIT")
        apop.close()
        _one_attempt(port, _plain("alice", "wonderland"), answer=b"+OK")
        # Failed logins: USER/PASS, APOP, SASL, and forgeries.
        _one_attempt(port, b"USER alice", b"PASS guess")
        failed_apop = Client(port)
        assert failed_apop.command(_apop(failed_apop, "alice", "guess")).startswith(b"-ERR")
        failed_apop.close()
        _one_attempt(port, _plain("alice", "guess"))
        for forgery in FORGERIES:
            _one_attempt(port, _plain(forgery, "guess"))
        _one_attempt(port, b"USER rip=10.9.8.10", b"PASS guess")
        # The right password while the maildrop is in use: a failed login,
        # but no guess; the jail ignores it.
        holder = Client(port)
        assert holder.command(b"USER alice").startswith(b"+OK")
        assert holder.command(b"PASS wonderland").startswith(b"+OK")
        _one_attempt(port, b"USER alice", b"PASS wonderland", answer=b"-ERR [IN-USE]")
        holder.command(b"QUIT")
        holder.close()
        log.wait_for(re.compile(SESSION_LINE + r"session logged out: .*"))
        server.assert_healthy()
    finally:
        server.stop()
        log.stop()
    text = logfile.read_text("utf-8")
    lines = text.splitlines()

    # Every line of the reading session carries its id, and only its lines do.
    session_id = logout.group("id")
    own = [line for line in lines if f"] [{session_id}] " in line]
    assert [line.split(f"[{session_id}] ", 1)[1] for line in own] == [
        'login: rip=127.0.0.1 method=USER user="alice"',
        f'session logged out: user="alice" peer={own[1].split("peer=")[1].split()[0]} '
        f"method=USER top=1/16 retr=1/41 del=1/22 msgs=2/63 "
        f"uidl={_uidl_hash(uids)} 9%",
    ]
    assert re.search(r"peer=127\.0\.0\.1:\d+ ", own[1])
    ids = re.findall(r"\[pop3d\.session\.Session#\w+\] \[([0-9a-z]+\.\d+)\] login", text)
    assert len(ids) == len(set(ids)) == 5 + 8

    # The other lines of a session carry its id too.
    for index, line in enumerate(lines):
        if "reason=credentials" in line:
            failed_id = line.split("] [", 1)[1].split("]", 1)[0]
            assert f"] [{failed_id}] disconnected before login: peer=127.0.0.1:" in lines[index + 1]

    failed = [line.split("] ", 2)[2] for line in lines if "login failed:" in line]
    assert failed == [
        'login failed: rip=127.0.0.1 method=USER reason=credentials user="alice"',
        'login failed: rip=127.0.0.1 method=APOP reason=credentials user="alice"',
        'login failed: rip=127.0.0.1 method=SASL/PLAIN reason=credentials user="alice"',
        "login failed: rip=127.0.0.1 method=SASL/PLAIN reason=credentials"
        ' user="eve\\" rip=10.9.8.7 reason=credentials user=\\"x"',
        "login failed: rip=127.0.0.1 method=SASL/PLAIN reason=credentials"
        ' user="mallory rip=10.9.8.8 method=USER"',
        "login failed: rip=127.0.0.1 method=SASL/PLAIN reason=credentials"
        ' user="x] [1.1] login failed: rip=10.9.8.9 method=USER reason=credentials user="',
        'login failed: rip=127.0.0.1 method=USER reason=credentials user="rip=10.9.8.10"',
        'login failed: rip=127.0.0.1 method=USER reason=in-use user="alice"',
    ]
    guesses = [line for line in lines if "login failed:" in line and "reason=credentials" in line]

    jail = configparser.ConfigParser()
    jail.read(JAIL)
    assert jail["pop3d"]["filter"] == "pop3d"
    datepattern, ignoreregex = jail["pop3d"]["datepattern"], jail["pop3d"]["ignoreregex"]

    def fail2ban(*extra: str, out: str) -> list[str]:
        result = subprocess.run(
            [fail2ban_regex, "-o", out, "-d", datepattern, str(logfile), str(FILTER), *extra],
            capture_output=True,
            text=True,
            timeout=PATIENCE,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.splitlines()

    # With the jail's ignoreregex: exactly the guesses, all from 127.0.0.1,
    # at the time each was logged (the jail's datepattern reads twistd's stamp).
    rows = fail2ban(ignoreregex, out="row")
    matched = [re.fullmatch(r"\['([^']+)',\s*(\d+),.*", row) for row in rows]
    assert all(matched), rows
    assert [m.group(1) for m in matched if m] == ["127.0.0.1"] * len(guesses)
    assert [int(m.group(2)) for m in matched if m] == [_epoch(line) for line in guesses]
    assert fail2ban(ignoreregex, out="msg") == guesses
    # The filter alone matches every failed login, the one in use too, and
    # no other line.
    assert fail2ban(out="msg") == [line for line in lines if "login failed:" in line]


def _uidl_hash(uids: list[bytes]) -> str:
    return hashlib.sha1(b"".join(uid + b"\n" for uid in uids)).hexdigest()[:8]


def _epoch(line: str) -> int:
    stamp = datetime.datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S%z")
    return int(stamp.timestamp())


@pytest.mark.process
def test_bad_logout_format_is_a_usage_error(tmp_path: Path, launch: Launch) -> None:  # noqa: F811
    server = launch(*pop3d_arguments(tmp_path, write_passwd(tmp_path), "--logout-format", "top=%q"))
    code, output = server.wait_exit()
    assert code != 0
    assert "--logout-format: unknown variable '%q' in the logout format" in output


@pytest.mark.process
@pytest.mark.peer
def test_the_readme_example_of_a_failed_login_is_what_the_filter_reads() -> None:
    fail2ban_regex = require_program("fail2ban-regex")
    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    examples = [
        line.strip()
        for line in readme.splitlines()
        if line.startswith("    2026-") and "login failed:" in line
    ]
    assert examples == [
        "2026-12-05T13:58:50+0000 [pop3d.session.Session#info] [5k8.5] login failed:"
        ' rip=192.0.2.7 method=USER reason=credentials user="alice"'
    ]
    result = subprocess.run(
        [fail2ban_regex, "-o", "ip", examples[0], str(FILTER)],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )
    assert result.stdout.splitlines() == ["192.0.2.7"], result.stdout + result.stderr


WORKER_LISTENING = re.compile(r"pop3d worker (\d+) listening on [\d.]+:(\d+)")


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while number:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
    return text


@pytest.mark.process
@pytest.mark.peer
def test_workers_log_into_the_parents_logfile(tmp_path: Path, launch: Launch) -> None:  # noqa: F811
    """
    ``twistd --logfile X pop3d --workers 2``: the workers' session lines are
    in X, in the same format (and nothing goes to standard output), and the
    contrib fail2ban filter finds every failed login there.
    """
    fail2ban_regex = require_program("fail2ban-regex")
    mail_root = tmp_path / "mail"
    deliver_to_maildir(str(mail_root / "alice"), MESSAGE_1)
    logfile = tmp_path / "pop3d.log"
    arguments = pop3d_arguments(
        mail_root, write_passwd(tmp_path), "--login-failure-delay", "0", "--workers", "2"
    )
    server = launch(f"--logfile={logfile}", *arguments)
    log = LogFollower(logfile)
    attempts = 8
    try:
        workers = set()
        for _ in range(2):
            match = log.wait_for(WORKER_LISTENING)
            workers.add(int(match.group(1)))
            port = int(match.group(2))
        reader = poplib.POP3(HOST, port, timeout=PATIENCE)
        reader.user("alice")
        reader.pass_("wonderland")
        reader.quit()
        log.wait_for(re.compile(SESSION_LINE + r"session logged out: "))
        for _ in range(attempts):
            _one_attempt(port, b"USER alice", b"PASS guess")
        for _ in range(attempts):
            log.wait_for(re.compile(SESSION_LINE + r"disconnected before login: "))
    finally:
        server.stop()
        log.stop()
    lines = logfile.read_text("utf-8").splitlines()
    session_lines = [line for line in lines if re.match(SESSION_LINE, line)]
    # Written by the workers: each session id starts with its worker's pid.
    prefixes = {_base36(pid) for pid in workers}
    assert {line.split("] [", 2)[1].split(".")[0] for line in session_lines} <= prefixes
    failed = [line for line in session_lines if " login failed: " in line]
    assert [line.split("] ", 2)[2] for line in failed] == [
        'login failed: rip=127.0.0.1 method=USER reason=credentials user="alice"'
    ] * attempts
    assert len([line for line in session_lines if "] login: rip=127.0.0.1 " in line]) == 1
    # Nothing of it on the parent's standard output (where workers wrote before).
    assert "Session#info" not in server.output, server.output
    result = subprocess.run(
        [fail2ban_regex, "-o", "msg", str(logfile), str(FILTER)],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == failed


# -- a session's lines reach every observer as twisted.logger would make them ----


def test_a_session_line_reads_the_same_to_every_observer(logged: Logged) -> None:
    """
    The text is made once, when the line is logged; observers that format
    (twistd's log file), that read fields, and that write JSON (whose reader
    formats again) see the same line and the same fields.
    """
    log = SessionLogger("k2.7")
    log.info("login: {summary} {n:03d} {name!r}", summary='user="{x}"', n=7, name="b}")
    [event] = logged.events
    text = "[k2.7] login: user=\"{x}\" 007 'b}'"
    assert formatEvent(event) == text
    assert event["summary"] == 'user="{x}"' and event["session"] == "k2.7"
    assert event["log_namespace"] == "pop3d.session.Session"
    assert event["log_level"] is LogLevel.info
    assert formatEvent(eventFromJSON(eventAsJSON(event))) == text
    line = formatEventAsClassicLogText(event)
    assert line is not None and line.endswith(" [pop3d.session.Session#info] " + text + "\n")


def test_a_session_line_twisted_logger_must_format_is_left_to_it(logged: Logged) -> None:
    """A {callable()} field, or a format that fails: twisted.logger formats (or reports) it."""
    log = SessionLogger("k2.8")
    log.info("count {count()}", count=lambda: 3)
    log.info("missing {nothing}")
    called, failed = logged.events
    assert formatEvent(called) == "[k2.8] count 3"
    assert formatEvent(failed).startswith("Unable to format event")


def test_a_session_failure_keeps_its_traceback(logged: Logged) -> None:
    log = SessionLogger("k2.9")
    try:
        raise ValueError("broken {brace}")
    except ValueError:
        log.failure("reading failed for {user}", user="bob")
    [event] = logged.events
    assert formatEvent(event) == "[k2.9] reading failed for bob"
    assert "ValueError: broken {brace}" in eventAsText(event)


def test_a_session_line_carries_what_twisted_loggers_lines_carry(logged: Logged) -> None:
    """
    SessionLogger makes its events itself (Logger.emit's level check and
    format pass cost a busy server more than the rest of a line): every key
    a twisted.logger Logger puts in an event is there, with the same
    meaning, so that observers written for twisted.logger read them alike.
    If a Twisted release adds a key, this fails.
    """
    Logger(namespace=SESSION_LOG_NAMESPACE).info("login: {summary}", summary="x")
    SessionLogger("k3.1").info("login: {summary}", summary="x")
    plain, session = logged.events
    assert set(session) == set(plain) | {"session", "log_flattened"}
    for key in ("log_namespace", "log_level", "log_source", "summary"):
        assert session[key] == plain[key], key
    assert session["log_logger"].namespace == plain["log_logger"].namespace
    assert formatEvent(session) == "[k3.1] " + formatEvent(plain)
