"""
End to end: one ``dovecot-ldap.conf.ext``, read by the real ``twistd pop3d
--auth ldap:FILE`` and by the real Dovecot (``passdb``/``userdb`` with
``driver = ldap``, dovecot-ldap), against a real slapd; poplib logs in to
both: the same users are accepted and refused, and each user's own mail
location (``user_attrs``) is served.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3d.testing import deliver_to_maildir

from .ldapserver import PEOPLE, SERVICE_DN, SERVICE_PASSWORD, LdapServer, start_ldap_server
from .test_ldap import USERS, _ldif
from .test_process import HOST, PATIENCE, Server, twistd_arguments

DOVECOT = "/usr/sbin/dovecot"
DOVECOT_LDAP = "/usr/lib/dovecot/modules/auth/libauthdb_ldap.so"

HORSE = "correct horse"


def _require_dovecot_ldap() -> None:
    missing = [path for path in (DOVECOT, DOVECOT_LDAP) if not os.path.exists(path)]
    reason = None
    if missing:
        reason = "Dovecot's LDAP driver is not installed (apt-get install dovecot-ldap)"
    elif os.geteuid() != 0:
        reason = "Dovecot's master process needs root"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory Dovecot's unprivileged processes can reach (pytest's is private)."""
    directory = Path(tempfile.mkdtemp(prefix="pop3d-ldap-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def _mail(user: str) -> bytes:
    return f"From: postmaster@example.org\nSubject: for {user}\n\nHello {user}.\n".encode()


def _populate(server: LdapServer, homes: Path) -> None:
    entries = []
    for uid, location in (("alice", "maildir:~/Maildir"), ("bob", "maildir:~/mail/inbox")):
        home = homes / uid
        deliver_to_maildir(str(home / location.split("~/")[1]), _mail(uid))
        entries.append(
            _ldif(
                uid,
                USERS[uid][0],
                objectClass="pop3dUser",
                homeDirectory=str(home),
                mailLocation=location,
            )
        )
    entries.append(
        _ldif(
            "mallory",
            USERS["alice"][0],
            objectClass="pop3dUser",
            homeDirectory=str(homes / "mallory"),
            mailDisabled="TRUE",
            disabledReason="account closed",
        )
    )
    entries.append(_ldif("st*r", USERS["st*r"][0], homeDirectory=str(homes / "star")))
    server.add("\n".join(entries))
    for path in [homes, *homes.rglob("*")]:
        shutil.chown(path, "nobody", "nogroup")


def _ldap_conf(path: Path, server: LdapServer, auth_bind: bool) -> Path:
    path.write_text(
        "# Read by Dovecot and by pop3d.\n"
        f"uris = {server.uri}\n"
        f"dn = {SERVICE_DN}\n"
        f'dnpass = "{SERVICE_PASSWORD}"\n'
        f"auth_bind = {'yes' if auth_bind else 'no'}\n"
        f"base = {PEOPLE}\n"
        "scope = subtree\n"
        "pass_filter = (&(objectClass=posixAccount)(uid=%u))\n"
        "pass_attrs = uid=user, userPassword=password, \\\n"
        "  mailDisabled=nologin, disabledReason=reason\n"
        "user_filter = (&(objectClass=posixAccount)(uid=%u))\n"
        "user_attrs = homeDirectory=home, mailLocation=mail\n"
        "default_pass_scheme = CRYPT\n"
    )
    path.chmod(0o600)
    return path


def _dovecot_conf(directory: Path, ldap_conf: Path, port: int) -> Path:
    config = directory / "dovecot.conf"
    config.write_text(
        f"base_dir = {directory}/run\n"
        f"state_dir = {directory}/state\n"
        "log_path = /dev/stderr\n"
        "protocols = pop3\n"
        f"listen = {HOST}\n"
        "ssl = no\n"
        "disable_plaintext_auth = no\n"
        "auth_mechanisms = plain login\n"
        "auth_failure_delay = 0\n"
        "mail_uid = nobody\n"
        "mail_gid = nogroup\n"
        "first_valid_uid = 1\n"
        f"passdb {{\n  driver = ldap\n  args = {ldap_conf}\n}}\n"
        f"userdb {{\n  driver = ldap\n  args = {ldap_conf}\n}}\n"
        "service pop3-login {\n"
        f"  inet_listener pop3 {{\n    port = {port}\n  }}\n"
        "}\n"
        "service anvil {\n  chroot =\n}\n"
    )
    for name in ("run", "state"):
        (directory / name).mkdir(exist_ok=True)
    return config


def _pop3d(tmp_path: Path, ldap_conf: Path) -> Server:
    """``twistd pop3d --auth ldap:FILE``: every user's mail is where user_attrs say."""
    default_root = tmp_path / "default"
    default_root.mkdir(exist_ok=True)
    return Server(
        twistd_arguments(
            f"maildir:{default_root}/{{user}}",
            f"ldap:{ldap_conf}",
            # Many failed logins from 127.0.0.1 in a row: no waiting here.
            "--login-failure-delay",
            "0",
        ),
        tmp_path,
    )


class _POP3From(poplib.POP3):
    """poplib's client, connecting from a given loopback address."""

    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__(HOST, port, timeout=PATIENCE)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


def _session(port: int, user: str, password: str, source: str = HOST) -> tuple[str, list[bytes]]:
    """``+OK`` and the first message's body, or the ``-ERR`` line of PASS."""
    client = _POP3From(port, source)
    try:
        client.user(user)
        try:
            client.pass_(password)
        except poplib.error_proto as error:
            return error.args[0].decode(errors="replace"), []
        _, lines, _ = client.retr(1)
        client.quit()
        return "+OK", lines
    finally:
        client.close()


#: The directory matches uid without regard to case; its spelling is the name.
ACCEPTED = {("alice", HORSE), ("bob", HORSE), ("ALICE", HORSE)}

CASES = [
    ("alice", HORSE),
    ("bob", HORSE),
    ("alice", "wrong"),
    ("ALICE", HORSE),
    ("ghost", HORSE),
    ("mallory", HORSE),
    ("mallory", "wrong"),
    ("*", HORSE),
    ("a*", HORSE),
    ("*)(uid=*", HORSE),
    ("alice", ""),
]


@pytest.mark.peer
@pytest.mark.parametrize("auth_bind", [False, True], ids=["lookup", "auth_bind"])
def test_pop3d_and_dovecot_agree(tmp_path: Path, shared: Path, auth_bind: bool) -> None:
    _require_dovecot_ldap()
    ldap_server = start_ldap_server(tmp_path / "slapd")
    started: list[Server] = []
    try:
        _populate(ldap_server, shared / "home")
        ldap_conf = _ldap_conf(shared / "dovecot-ldap.conf.ext", ldap_server, auth_bind)
        dovecot_port = _free_port()
        dovecot = Server(
            ["-F", "-c", str(_dovecot_conf(shared, ldap_conf, dovecot_port))],
            tmp_path,
            program=[DOVECOT],
        )
        started.append(dovecot)
        dovecot.wait_for(re.compile(r"starting up"))
        pop3d = _pop3d(tmp_path, ldap_conf)
        started.append(pop3d)
        pop3d_port = pop3d.wait_listening()
        for number, (user, password) in enumerate(CASES, start=10):
            # Each case from its own address: Dovecot's auth penalty (up to
            # 15 s after failures from one address) does not add up.
            source = f"127.0.0.{number}"
            ours = _session(pop3d_port, user, password, source)
            theirs = _session(dovecot_port, user, password, source)
            assert (ours[0] == "+OK") == (theirs[0] == "+OK"), (user, password, ours, theirs)
            assert (ours[0] == "+OK") == ((user, password) in ACCEPTED), (user, ours)
            assert ours[1] == theirs[1], (user, password)
            if ours[0] == "+OK":
                # Each user's own mail location, from user_attrs.
                assert f"Hello {user.lower()}.".encode() in ours[1]
        assert _session(pop3d_port, "alice", HORSE)[0] == "+OK"
        assert _session(pop3d_port, "mallory", HORSE)[0] == "-ERR [AUTH] account closed"
        assert _session(pop3d_port, "ghost", HORSE)[0].startswith("-ERR [AUTH] ")
        pop3d.assert_healthy()
    finally:
        for server in started:
            server.stop()
        ldap_server.stop()


@pytest.mark.peer
def test_server_down_is_sys_temp_over_the_wire(tmp_path: Path, shared: Path) -> None:
    """RFC 3206 section 4: SYS/TEMP while the directory is down; logins again when it is back."""
    ldap_server = start_ldap_server(tmp_path / "slapd")
    pop3d: Server | None = None
    try:
        _populate(ldap_server, shared / "home")
        ldap_conf = _ldap_conf(shared / "dovecot-ldap.conf.ext", ldap_server, False)
        pop3d = _pop3d(tmp_path, ldap_conf)
        port = pop3d.wait_listening()
        assert _session(port, "alice", HORSE)[0] == "+OK"
        ldap_server.stop()
        status = _session(port, "alice", HORSE)[0]
        assert status == "-ERR [SYS/TEMP] authentication service unavailable, try again later"
        ldap_server.start()
        assert _session(port, "alice", HORSE)[0] == "+OK"
        pop3d.assert_healthy()
        assert pop3d.output.count("unavailable: Can't contact LDAP server") == 1
        assert HORSE not in pop3d.output
    finally:
        if pop3d is not None:
            pop3d.stop()
        ldap_server.stop()
