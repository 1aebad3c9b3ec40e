"""
The ``twistd pop3d`` command line (pop3d.tap), parsed in-process.  Running
the real twistd is in test_process.py.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sqlite3
from pathlib import Path
from typing import cast

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage

from pop3d.authdb.ldap import LdapChecker
from pop3d.authdb.oauth2 import OAuth2Checker
from pop3d.authdb.sql import SQLChecker
from pop3d.checkers import PasswdFileChecker
from pop3d.credchecks import PortalVerifiers
from pop3d.driver import APOPCredentials
from pop3d.factory import POP3Factory
from pop3d.realm import MaildropRealm
from pop3d.stores.counting import CountingProcesses
from pop3d.stores.interfaces import IMaildrop
from pop3d.stores.locations import MaildirLocation, MboxLocation
from pop3d.stores.maildir import LISTING_CACHE_MESSAGES, MaildirStore
from pop3d.stores.posix import LockFiles, LockTable
from pop3d.tap import (
    DEFAULT_LISTEN,
    Options,
    build_portal,
    build_store,
    parse_counting_processes,
    reload_configuration,
)
from pop3d.testing import MemoryStore
from pop3d.userdb import AuthenticatedUser

from .conftest import Wire


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}wonderland::\n")
    return path


def parse(*arguments: str) -> Options:
    options = Options()
    options.parseOptions(list(arguments))
    return options


def test_documented_form(passwd: Path, tmp_path: Path) -> None:
    options = parse(
        "--listen", "tcp:1110:interface=127.0.0.1",
        "--mail-location", f"maildir:{tmp_path}/{{user}}",
        "--auth", f"passwd-file:{passwd}",
        "--timeout", "900",
    )  # fmt: skip
    assert options["timeout"] == 900
    assert MaildirStore(options["maildir-template"]).path_for("alice") == f"{tmp_path}/alice"
    [endpoint] = options["endpoints"]
    assert isinstance(endpoint, TCP4ServerEndpoint)


def test_defaults(passwd: Path) -> None:
    options = parse("--mail-location", "maildir:/srv/{user}", "--auth", f"passwd-file:{passwd}")
    assert options["listen"] == [DEFAULT_LISTEN]
    assert options["timeout"] == 600


def test_listen_is_repeatable(passwd: Path, tmp_path: Path) -> None:
    options = parse(
        "--listen", "tcp:0:interface=127.0.0.1",
        "--listen", f"unix:{tmp_path}/pop3.sock",
        "--mail-location", "maildir:/srv/{user}",
        "--auth", f"passwd-file:{passwd}",
    )  # fmt: skip
    assert [type(e) for e in options["endpoints"]] == [TCP4ServerEndpoint, UNIXServerEndpoint]


@pytest.mark.parametrize(
    "arguments,option",
    [
        (["--timeout", "599"], "--timeout"),
        (["--timeout", "ten"], "--timeout"),
        (["--mail-location", "nosuch:/var/mail/{user}"], "--mail-location"),
        (["--mail-location", "maildir:/srv/{usr}"], "--mail-location"),
        (["--listen", "bogus:1"], "--listen"),
        (["--listen", "tcp:notaport"], "--listen"),
        (["--listing-cache", "-1"], "--listing-cache"),
        (["--listing-cache", "lots"], "--listing-cache"),
        (["--read-ahead", "-1"], "--read-ahead '-1': expected a whole number"),
        (["--read-ahead", "16M"], "--read-ahead '16M': expected a whole number"),
        (["--counting-processes", "-1"], "--counting-processes '-1': expected a whole number"),
        (["--counting-processes", "two"], "--counting-processes 'two': expected a whole number"),
        (["--login-failure-delay", "16"], "--login-failure-delay"),
        (["--login-failure-delay", "-1"], "--login-failure-delay"),
        (["--trusted-network", "192.0.2.300/32"], "--trusted-network '192.0.2.300/32'"),
        (["--trusted-network", "webmail.example.org"], "--trusted-network"),
        (["--trusted-network", "2001:db8::/129"], "--trusted-network '2001:db8::/129'"),
    ],
)
def test_bad_options_name_the_option(passwd: Path, arguments: list[str], option: str) -> None:
    base = {"--mail-location": "maildir:/srv/{user}", "--auth": f"passwd-file:{passwd}"}
    given = dict(zip(arguments[::2], arguments[1::2], strict=True))
    merged = [part for item in {**base, **given}.items() for part in item]
    with pytest.raises(usage.UsageError, match=re.escape(option)):
        parse(*merged)


def test_trusted_networks_are_repeatable_ipv4_and_ipv6(passwd: Path) -> None:
    base = ("--mail-location", "maildir:/srv/{user}", "--auth", f"passwd-file:{passwd}")
    assert parse(*base)["trusted-networks"] == []
    options = parse(
        *base,
        "--trusted-network", "192.0.2.10/32",
        "--trusted-network", "2001:db8::/64",
        "--trusted-network", "198.51.100.0",
    )  # fmt: skip
    assert [str(network) for network in options["trusted-networks"]] == [
        "192.0.2.10/32",
        "2001:db8::/64",
        "198.51.100.0/32",
    ]


def test_login_failure_delay_0_to_15(passwd: Path) -> None:
    base = ("--mail-location", "maildir:/srv/{user}", "--auth", f"passwd-file:{passwd}")
    assert parse(*base)["login-failure-delay"] == 2
    assert parse(*base, "--login-failure-delay", "0")["login-failure-delay"] == 0
    assert parse(*base, "--login-failure-delay", "15")["login-failure-delay"] == 15


@pytest.mark.parametrize(
    ("arguments", "kind", "where"),
    [
        ([], LockTable, "/srv/.pop3d-locks"),
        (["--lock-table", "/run/pop3d/locks"], LockTable, "/run/pop3d/locks"),
        (["--nfs-locks"], LockFiles, None),
    ],
)
def test_maildir_locks(passwd: Path, arguments: list[str], kind: type, where: str | None) -> None:
    options = parse(
        "--mail-location", "maildir:/srv/{user}", "--auth", f"passwd-file:{passwd}", *arguments
    )
    store = build_store(options, reactor, Clock())  # type: ignore[arg-type]
    assert isinstance(store, MaildirStore)
    assert isinstance(store.locks, kind)
    assert store.listing_cache == LISTING_CACHE_MESSAGES
    if where is not None:
        assert store.locks.path == where  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("value", "one_process", "cores", "processes"),
    [
        ("auto", True, 1, 0),
        ("auto", True, 2, 1),
        ("auto", True, 64, 1),
        ("auto", False, 2, 0),
        ("0", True, 8, 0),
        ("3", True, 1, 3),
        ("1", False, 4, 1),
    ],
)
def test_counting_processes(value: str, one_process: bool, cores: int, processes: int) -> None:
    """'auto': one helper beside a single serving process where there is a second core."""
    maildir = MaildirLocation()
    counted = parse_counting_processes(value, one_process=one_process, store=maildir, cores=cores)
    assert counted == processes


def test_mbox_files_have_no_counting_processes(passwd: Path) -> None:
    """An mbox file is read whole at login, not counted message by message: no helper."""
    assert parse_counting_processes("auto", one_process=True, store=MboxLocation(), cores=8) == 0
    base = ("--mail-location", "mbox:/var/mail/{user}", "--auth", f"passwd-file:{passwd}")
    assert parse(*base)["counting-processes"] == 0
    assert parse(*base, "--counting-processes", "0")["counting-processes"] == 0
    with pytest.raises(usage.UsageError) as raised:
        parse(*base, "--counting-processes", "2")
    assert str(raised.value) == (
        "--counting-processes 2: mbox: locations count no message sizes in helper "
        "processes (Maildirs do), and no user has a location of their own (no user "
        "database); use --counting-processes 0 or auto"
    )


def test_a_user_database_may_give_maildirs_beside_mbox_files(tmp_path: Path) -> None:
    """Users of a user database may have a Maildir of their own: helpers count for those."""
    mbox = MboxLocation()
    assert parse_counting_processes("auto", one_process=True, store=mbox, per_user=True, cores=2)
    conf = tmp_path / "dovecot-sql.conf.ext"
    queries = (
        "password_query = SELECT userid AS user, password FROM users WHERE userid = '%u'\n"
        "user_query = SELECT mail FROM users WHERE userid = '%u'\n"
    )
    conf.write_text(f"driver = sqlite\nconnect = {tmp_path / 'users.db'}\n" + queries)
    options = parse(
        "--mail-location", "mbox:/var/mail/{user}", "--auth", f"sql:{conf}",
        "--counting-processes", "2",
    )  # fmt: skip
    assert options["counting-processes"] == 2


def test_workers_start_no_counting_processes_by_default(passwd: Path) -> None:
    """A worker gets the parent's options less --workers: 'auto' must still mean none."""
    from pop3d.workers import worker_command

    parent = ["--mail-location", "maildir:/srv/{user}", "--auth", f"passwd-file:{passwd}"]
    parent += ["--listen", "tcp:0:interface=127.0.0.1", "--workers", "2"]
    assert parse(*parent)["counting-processes"] == 0
    worker = worker_command(parent)
    given = [*worker[worker.index("pop3d") + 1 :], "--worker-sockets", "3:2"]
    assert parse(*given)["counting-processes"] == 0
    assert parse(*given, "--counting-processes", "1")["counting-processes"] == 1


@pytest.mark.parametrize(
    ("arguments", "helpers"),
    [
        (["--counting-processes", "2"], 2),
        (["--counting-processes", "0"], None),
        # The parent of workers serves no mail: its workers have helpers.
        (["--counting-processes", "2", "--workers", "2"], None),
    ],
)
def test_the_maildir_store_counts_with_the_helpers_of_the_service(
    passwd: Path, tmp_path: Path, arguments: list[str], helpers: int | None
) -> None:
    import gc
    import sys

    from pop3d.tap import makeService

    switch_interval = sys.getswitchinterval()
    options = parse(
        "--listen", "tcp:0:interface=127.0.0.1",
        "--mail-location", f"maildir:{tmp_path}/{{user}}",
        "--auth", f"passwd-file:{passwd}",
        *arguments,
    )  # fmt: skip
    try:
        service = makeService(options)
    finally:
        gc.unfreeze()
        sys.setswitchinterval(switch_interval)
    store = build_store(options, reactor, Clock())  # type: ignore[arg-type]
    assert isinstance(store, MaildirStore)
    counting = [child for child in service if isinstance(child, CountingProcesses)]  # type: ignore[attr-defined]
    if helpers is None:
        assert store.counting is None
        assert counting == []
    else:
        assert counting == [store.counting]
        assert store.counting is not None and store.counting.processes == helpers


@pytest.mark.parametrize(
    "arguments",
    [
        ["--nfs-locks", "--lock-table", "/run/locks"],
        ["--mail-location", "mbox:/var/mail/{user}", "--nfs-locks"],
        ["--mail-location", "mbox:/var/mail/{user}", "--lock-table", "/run/locks"],
    ],
)
def test_lock_options_that_cannot_apply(passwd: Path, arguments: list[str]) -> None:
    with pytest.raises(usage.UsageError, match=r"--nfs-locks|--lock-table"):
        parse(
            "--mail-location", "maildir:/srv/{user}", "--auth", f"passwd-file:{passwd}", *arguments
        )


def test_auth_and_mail_location_are_required(passwd: Path) -> None:
    with pytest.raises(usage.UsageError, match="--mail-location"):
        parse("--auth", f"passwd-file:{passwd}")
    with pytest.raises(usage.UsageError, match="--auth"):
        parse("--mail-location", "maildir:/srv/{user}")


def test_unknown_scheme_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("alice:{NOPE}x::\n")
    with pytest.raises(usage.UsageError, match=r"unsupported password scheme \{NOPE\}"):
        parse("--mail-location", "maildir:/srv/{user}", "--auth", f"passwd-file:{path}")


@pytest_twisted.ensureDeferred
async def test_every_auth_option_counts(passwd: Path) -> None:
    """Repeated --auth options are all consulted, in order."""
    options = parse(
        "--mail-location", "maildir:/srv/{user}",
        "--auth", f"passwd-file:{passwd}",
        "--auth", "memory:bob:builder",
    )  # fmt: skip
    portal = build_portal(MaildropRealm(MemoryStore()), options["credCheckers"])
    for user, password in [(b"alice", b"wonderland"), (b"bob", b"builder")]:
        _, maildrop, _ = await portal.login(UsernamePassword(user, password), None, IMaildrop)
        await IMaildrop(maildrop).close()


@pytest_twisted.ensureDeferred
async def test_memory_auth_supports_apop(passwd: Path) -> None:
    options = parse("--mail-location", "maildir:/srv/{user}", "--auth", "memory:bob:builder")
    portal = build_portal(MaildropRealm(MemoryStore()), options["credCheckers"])
    challenge = b"<1.2@host>"
    digest = hashlib.md5(challenge + b"builder").hexdigest().encode()
    _, maildrop, _ = await portal.login(APOPCredentials(challenge, b"bob", digest), None, IMaildrop)
    await IMaildrop(maildrop).close()


@pytest_twisted.ensureDeferred
async def test_cram_md5_reaches_every_checker_that_can_verify_it(tmp_path: Path) -> None:
    """A {CRAM-MD5} passwd-file and a plaintext memory: checker, side by side."""
    import hmac as hmac_module

    from pop3d.passwords import cram_md5_context
    from pop3d.sasl.cram_md5 import CramMD5Credentials

    passwd = tmp_path / "passwd"
    context = cram_md5_context(b"wonderland").hex()
    passwd.write_text(f"alice:{{CRAM-MD5}}{context}::\n")
    options = parse(
        "--mail-location", "maildir:/srv/{user}",
        "--auth", f"passwd-file:{passwd}",
        "--auth", "memory:bob:builder",
    )  # fmt: skip
    portal = build_portal(MaildropRealm(MemoryStore()), options["credCheckers"])
    challenge = b"<1.2@host>"
    for user, password in [(b"alice", b"wonderland"), (b"bob", b"builder")]:
        digest = hmac_module.new(password, challenge, "md5").hexdigest().encode()
        credentials = CramMD5Credentials(user, challenge, digest)
        _, maildrop, _ = await portal.login(credentials, None, IMaildrop)
        await IMaildrop(maildrop).close()


def test_the_server_leaves_what_lives_as_long_as_it_out_of_collections(
    passwd: Path, tmp_path: Path
) -> None:
    """
    Each full collection holds the GIL, and every session, while it walks
    the objects; the modules and the reactor need not be walked again.
    """
    import gc
    import sys

    from pop3d.tap import SWITCH_INTERVAL, makeService

    switch_interval = sys.getswitchinterval()
    try:
        makeService(
            parse(
                "--listen", "tcp:0:interface=127.0.0.1",
                "--mail-location", f"maildir:{tmp_path}/{{user}}",
                "--auth", f"passwd-file:{passwd}",
            )
        )  # fmt: skip
        assert gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == SWITCH_INTERVAL
    finally:
        gc.unfreeze()
        sys.setswitchinterval(switch_interval)


@pytest.mark.parametrize(
    ("arguments", "served"),
    [
        ([], b"Subject: a\n\n>From the earlier mail\n>>From x\n"),
        (["--mbox-format", "mboxo"], b"Subject: a\n\n>From the earlier mail\n>>From x\n"),
        (["--mbox-format", "mboxrd"], b"Subject: a\n\nFrom the earlier mail\n>From x\n"),
    ],
    ids=["default", "mboxo", "mboxrd"],
)
@pytest_twisted.ensureDeferred
async def test_mbox_format(
    passwd: Path, tmp_path: Path, arguments: list[str], served: bytes
) -> None:
    """mboxo (lines as stored) unless --mbox-format mboxrd (one '>' less on ^>+From )."""
    (tmp_path / "alice").write_bytes(
        b"From sender@example.test  Thu Nov 26 12:13:17 2026\n"
        b"Subject: a\n\n>From the earlier mail\n>>From x\n\n"
    )
    options = parse(
        "--mail-location", f"mbox:{tmp_path}/{{user}}", "--auth", f"passwd-file:{passwd}",
        *arguments,
    )  # fmt: skip
    store = build_store(options, reactor, Clock())  # type: ignore[arg-type]
    maildrop = await store.open("alice")
    try:
        body = await maybeDeferred(maildrop.open_message, 0)
        assert body.read(1000) == served
        body.close()
    finally:
        await maildrop.close()


@pytest.mark.parametrize(
    ("location", "value", "error"),
    [
        ("mbox:/var/mail/{user}", "mboxcl", "--mbox-format 'mboxcl': expected mboxo or mboxrd"),
        ("mbox:/var/mail/{user}", "", "--mbox-format '': expected mboxo or mboxrd"),
        (
            "maildir:/srv/{user}",
            "mboxrd",
            "--mbox-format applies to mbox files (--mail-location mbox:PATH), not Maildirs",
        ),
        (
            "maildir:/srv/{user}",
            "mboxo",
            "--mbox-format applies to mbox files (--mail-location mbox:PATH), not Maildirs",
        ),
    ],
)
def test_mbox_format_usage_errors(passwd: Path, location: str, value: str, error: str) -> None:
    with pytest.raises(usage.UsageError) as refused:
        parse(
            "--mail-location", location, "--auth", f"passwd-file:{passwd}",
            "--mbox-format", value,
        )  # fmt: skip
    assert str(refused.value) == error


def test_maildir_and_mbox_are_plugins_like_any_other() -> None:
    """The built-in stores are found through twisted.plugin, as a third party's are."""
    from pop3d.stores.interfaces import IMailLocationPlugin, IRetrievalTimesStore
    from pop3d.stores.locations import installed_mail_locations

    plugins = installed_mail_locations()
    assert [plugin.scheme for plugin in plugins] == ["maildir", "mbox"]
    assert all(IMailLocationPlugin.providedBy(plugin) for plugin in plugins)
    maildir, mbox = plugins
    assert IRetrievalTimesStore in maildir.store_interfaces
    assert IRetrievalTimesStore not in mbox.store_interfaces


def test_help_mail_location_lists_the_installed_stores(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--help-mail-location")
    assert exited.value.code == 0
    assert capsys.readouterr().out == (
        "Usage: --mail-location SCHEME:ARGUMENT\n"
        "\n"
        "  maildir:PATH with {user}, {local} or {domain}, e.g. maildir:/srv/mail/{user}\n"
        "      Maildirs (options: --lock-table, --nfs-locks, --uidl-format, --reuse-x-uidl, "
        "--listing-cache, --counting-processes)\n"
        "  mbox:PATH with {user}, {local} or {domain}, e.g. mbox:/var/mail/{user}\n"
        "      mbox files, locked with dotlocks (option: --mbox-format)\n"
    )


@pytest.mark.parametrize("location", ["nosuch:/var/mail/{user}", "/var/mail/{user}", "maildir"])
def test_an_unknown_mail_location_names_the_installed_stores(passwd: Path, location: str) -> None:
    with pytest.raises(usage.UsageError) as refused:
        parse("--mail-location", location, "--auth", f"passwd-file:{passwd}")
    assert str(refused.value) == (
        f"--mail-location {location!r}: expected SCHEME:ARGUMENT, SCHEME one of the installed "
        "stores: maildir, mbox (twistd pop3d --help-mail-location tells more)"
    )


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        (
            ["--mail-location", "mbox:/var/mail/{user}", "--uidl-format", "%u"],
            "--uidl-format applies to Maildirs; mbox UIDLs reuse X-UIDL headers",
        ),
        (
            ["--mail-location", "maildir:/srv/{user}", "--uidl-format", "%q"],
            "--uidl-format: ",
        ),
    ],
)
def test_store_options_are_checked_by_their_store(
    passwd: Path, arguments: list[str], error: str
) -> None:
    with pytest.raises(usage.UsageError) as refused:
        parse(*arguments, "--auth", f"passwd-file:{passwd}")
    assert str(refused.value).startswith(error)


def test_sasl_mechanisms_default_to_the_factorys(passwd: Path) -> None:
    """Without --sasl-mechanisms: all that the checkers can verify, strongest first."""
    options = parse("--mail-location", "maildir:/srv/{user}", "--auth", f"passwd-file:{passwd}")
    assert options["sasl-mechanisms"] is None
    factory = POP3Factory(
        build_portal(MaildropRealm(MemoryStore()), options["credCheckers"]),
        clock=Clock(),
        mechanisms=options["sasl-mechanisms"],
    )
    assert [m.name for m in factory.mechanisms] == [
        b"SCRAM-SHA-256",
        b"CRAM-MD5",
        b"PLAIN",
        b"LOGIN",
        b"OAUTHBEARER",
        b"XOAUTH2",
    ]
    # Offered: those a passwd-file can verify (OAUTHBEARER and XOAUTH2 need --auth oauth2:).
    verifiers = PortalVerifiers(factory.portal)
    assert [m.name for m in factory.mechanisms if m.usable(verifiers)] == [
        b"SCRAM-SHA-256",
        b"CRAM-MD5",
        b"PLAIN",
        b"LOGIN",
    ]


@pytest.mark.parametrize(
    "value,names",
    [
        ("PLAIN", [b"PLAIN"]),
        ("scram-sha-256 plain", [b"SCRAM-SHA-256", b"PLAIN"]),
        ("login,Cram-MD5", [b"LOGIN", b"CRAM-MD5"]),
        (" plain , login  plain ", [b"PLAIN", b"LOGIN"]),
    ],
)
def test_sasl_mechanisms_chosen(passwd: Path, value: str, names: list[bytes]) -> None:
    """Spaces or commas, any case, in the order given, each once."""
    options = parse(
        "--mail-location", "maildir:/srv/{user}",
        "--auth", f"passwd-file:{passwd}",
        "--sasl-mechanisms", value,
    )  # fmt: skip
    assert [m.name for m in options["sasl-mechanisms"]] == names


@pytest.mark.parametrize(
    "value,message",
    [
        (
            "PLAIN, X-NOPE",
            "--sasl-mechanisms: unknown mechanism X-NOPE; "
            "known: SCRAM-SHA-256, CRAM-MD5, PLAIN, LOGIN, "
            "OAUTHBEARER, XOAUTH2",
        ),
        (
            "digest-md5 gssapi",
            "--sasl-mechanisms: unknown mechanism DIGEST-MD5, GSSAPI; "
            "known: SCRAM-SHA-256, CRAM-MD5, PLAIN, LOGIN, "
            "OAUTHBEARER, XOAUTH2",
        ),
        (
            " , ",
            "--sasl-mechanisms names no mechanism; known: SCRAM-SHA-256, CRAM-MD5, PLAIN, LOGIN, "
            "OAUTHBEARER, XOAUTH2",
        ),
    ],
)
def test_sasl_mechanisms_usage_errors(passwd: Path, value: str, message: str) -> None:
    with pytest.raises(usage.UsageError) as refused:
        parse(
            "--mail-location", "maildir:/srv/{user}",
            "--auth", f"passwd-file:{passwd}",
            "--sasl-mechanisms", value,
        )  # fmt: skip
    assert str(refused.value) == message


def test_sasl_mechanisms_on_the_wire(passwd: Path) -> None:
    """
    RFC 2449 section 6.3 (CAPA's SASL) and RFC 5034 section 4 (AUTH): only
    the mechanisms chosen are offered; another is unsupported.
    """
    options = parse(
        "--mail-location", "maildir:/srv/{user}",
        "--auth", f"passwd-file:{passwd}",
        "--sasl-mechanisms", "login,plain",
    )  # fmt: skip
    store = MemoryStore()
    store.deliver("alice", b"Subject: hi\n\nhi\n")
    factory = POP3Factory(
        build_portal(MaildropRealm(store), options["credCheckers"]),
        clock=Clock(),
        hostname="pop.example.test",
        login_failure_delay=0,
        mechanisms=options["sasl-mechanisms"],
    )
    wire = Wire(factory)
    assert b"\r\nSASL LOGIN PLAIN\r\n" in wire.command(b"CAPA")
    assert wire.command(b"AUTH") == (
        b"+OK available authentication mechanisms\r\nLOGIN\r\nPLAIN\r\n.\r\n"
    )
    assert wire.command(b"AUTH SCRAM-SHA-256") == b"-ERR unsupported authentication mechanism\r\n"
    assert wire.command(b"AUTH CRAM-MD5") == b"-ERR unsupported authentication mechanism\r\n"
    answer = wire.command(b"AUTH PLAIN " + base64.b64encode(b"\x00alice\x00wonderland"))
    assert answer == b"+OK maildrop has 1 messages (19 octets)\r\n"


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_every_auth_file(passwd: Path, tmp_path: Path) -> None:
    """
    SIGHUP's reload reads again every --auth checker's file (passwd-file,
    and Dovecot's conf files): a changed password_query is the one the
    next login runs, without a restart.
    """
    database = tmp_path / "users.db"
    connection = sqlite3.connect(database)
    connection.executescript(
        "CREATE TABLE users (userid TEXT, password TEXT, other TEXT);"
        "INSERT INTO users VALUES ('carol', '{PLAIN}first', '{PLAIN}second');"
    )
    connection.commit()
    connection.close()
    conf = tmp_path / "dovecot-sql.conf.ext"
    query = "password_query = SELECT userid AS user, {} AS password FROM users WHERE userid = '%u'"
    conf.write_text(f"driver = sqlite\nconnect = {database}\n{query.format('password')}\n")
    ldap_conf = tmp_path / "dovecot-ldap.conf.ext"
    ldap_conf.write_text("uris = ldap://127.0.0.1:1/\nbase = o=first\n")
    oauth2_conf = tmp_path / "dovecot-oauth2.conf.ext"
    oauth2_conf.write_text("introspection_url = http://127.0.0.1:1/first\n")
    options = parse(
        "--mail-location", f"maildir:{tmp_path}/{{user}}",
        "--auth", f"passwd-file:{passwd}",
        "--auth", f"sql:{conf}",
        "--auth", f"ldap:{ldap_conf}",
        "--auth", f"oauth2:{oauth2_conf}",
    )  # fmt: skip
    [sql] = [c for c in options["credCheckers"] if isinstance(c, SQLChecker)]
    [ldap] = [c for c in options["credCheckers"] if isinstance(c, LdapChecker)]
    [oauth2] = [c for c in options["credCheckers"] if isinstance(c, OAuth2Checker)]
    conf.write_text(f"driver = sqlite\nconnect = {database}\n{query.format('other')}\n")
    ldap_conf.write_text("uris = ldap://127.0.0.1:2/\nbase = o=second\n")
    oauth2_conf.write_text("introspection_url = http://127.0.0.1:2/second\n")
    passwd.write_text("alice:{PLAIN}wonderland::\nbob:{PLAIN}builder::\n")
    assert "password AS password" in sql.config.password_query.statement
    assert ldap.settings.base == "o=first"
    assert oauth2.settings.introspection_url.url == "http://127.0.0.1:1/first"
    with capturedLogs() as events:
        await reload_configuration(options)()
    assert "other AS password" in sql.config.password_query.statement
    assert ldap.settings.base == "o=second"
    assert ldap.settings.uris == ("ldap://127.0.0.1:2/",)
    assert oauth2.settings.introspection_url.url == "http://127.0.0.1:2/second"
    # The passwd-file is read again by the signal itself, not at the next login.
    assert f"reloaded {passwd}" in [formatEvent(event) for event in events]
    # The next logins run the new query, and find the new user.
    sql.run_slow_work_in(cast(IReactorThreads, reactor))
    assert await sql.requestAvatarId(UsernamePassword(b"carol", b"second")) == AuthenticatedUser(
        "carol"
    )
    with pytest.raises(UnauthorizedLogin):
        await sql.requestAvatarId(UsernamePassword(b"carol", b"first"))
    [passwd_file] = [c for c in options["credCheckers"] if isinstance(c, PasswdFileChecker)]
    assert await passwd_file.requestAvatarId(UsernamePassword(b"bob", b"builder")) == b"bob"
