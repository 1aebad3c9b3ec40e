"""
End-to-end OAuth2 logins: the real ``twistd pop3d --auth
oauth2:dovecot-oauth2.conf.ext`` in a child process, a twisted.web provider
(RFC 7662 introspection) in this one, and real clients: a raw socket client
speaking RFC 7628 by hand, curl (``--oauth2-bearer``) and mpop
(``auth oauthbearer``/``xoauth2`` with ``passwordeval``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from pop3d.testing import deliver_to_maildir
from tests.conftest import require_program
from tests.oauth2_provider import ProviderState, listen
from tests.test_process import Server, twistd_arguments

ALICE = "alice@example.test"
GOOD = "ya29.good-token_for-alice~1"
BAD = "ya29.revoked-token"
MESSAGE = b"Subject: oauth2\r\n\r\nhello over a bearer token\r\n"
TIMEOUT = 60


@dataclass
class Deployment:
    server: Server
    provider: ProviderState
    mail_root: Path
    conf: Path


@pytest_twisted.async_yield_fixture
async def deployment(tmp_path: Path) -> AsyncIterator[Deployment]:
    """twistd pop3d with --auth oauth2:, introspecting at the test's provider (post mode)."""
    state = ProviderState()
    state.tokens[GOOD] = {"username": ALICE, "scope": "mail"}
    port = listen(reactor, state)
    address = port.getHost()
    conf = tmp_path / "dovecot-oauth2.conf.ext"
    conf.write_text(
        "# RFC 7662 introspection, as WSO2's example in Dovecot's documentation\n"
        "introspection_mode = post\n"
        f"introspection_url = http://pop3d:secret@127.0.0.1:{address.port}/introspect\n"  # type: ignore[attr-defined]
        "username_attribute = username\n"
        "scope = mail\n"
        "timeout_msecs = 5000\n"
    )
    mail_root = tmp_path / "mail"
    deliver_to_maildir(str(mail_root / ALICE), MESSAGE)
    server = Server(
        twistd_arguments(
            f"maildir:{mail_root}/{{user}}", f"oauth2:{conf}", "--login-failure-delay", "0"
        ),
        tmp_path,
    )
    try:
        # Blocks this thread until twistd listens: the provider is not needed before.
        server.wait_listening()
        yield Deployment(server, state, mail_root, conf)
    finally:
        server.stop()
        await port.stopListening()


def raw_session(port: int, lines: list[bytes]) -> list[bytes]:
    """Send each line after reading the previous answer; the first answer is the greeting."""
    answers: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as connection:
        stream = connection.makefile("rb")
        answers.append(stream.readline())
        for line in lines:
            connection.sendall(line + b"\r\n")
            answer = stream.readline()
            if line == b"CAPA" or line.startswith(b"RETR"):
                while not answer.endswith(b"\r\n.\r\n"):
                    answer += stream.readline()
            answers.append(answer)
    return answers


def b64(data: str) -> bytes:
    return base64.b64encode(data.encode())


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_raw_client_oauthbearer_and_xoauth2(deployment: Deployment) -> None:
    """
    RFC 7628 section 4.1 (success) and 4.3 (failure: the JSON challenge, the
    client's %x01, -ERR), over the real server; the token never reaches its log.
    """
    ir = b64(f"n,a={ALICE},\x01host=127.0.0.1\x01port=110\x01auth=Bearer {GOOD}\x01\x01")
    bad = b64(f"n,,\x01auth=Bearer {BAD}\x01\x01")
    xoauth2 = b64(f"user={ALICE}\x01auth=Bearer {GOOD}\x01\x01")
    answers = await deferToThread(
        raw_session,
        deployment.server.port,
        [b"CAPA", b"AUTH OAUTHBEARER " + bad, b"AQ==", b"AUTH OAUTHBEARER " + ir, b"QUIT"],
    )
    assert answers[0].startswith(b"+OK")
    assert b"\r\nSASL OAUTHBEARER XOAUTH2\r\n" in answers[1]
    # {"status":"invalid_token","scope":"mail"}
    assert answers[2] == b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJtYWlsIn0=\r\n"
    assert answers[3] == b"-ERR [AUTH] invalid user name or password\r\n"
    assert answers[4] == b"+OK maildrop has 1 messages (46 octets)\r\n"
    answers = await deferToThread(
        raw_session,
        deployment.server.port,
        [b"AUTH XOAUTH2", xoauth2, b"RETR 1", b"QUIT"],
    )
    assert answers[1:3] == [b"+ \r\n", b"+OK maildrop has 1 messages (46 octets)\r\n"]
    assert answers[3].endswith(b"hello over a bearer token\r\n.\r\n")
    seen = deployment.provider.seen
    assert [(s.method, s.form_token, s.basic) for s in seen] == [
        ("POST", BAD, ("pop3d", "secret")),
        ("POST", GOOD, ("pop3d", "secret")),
        ("POST", GOOD, ("pop3d", "secret")),
    ]
    output = deployment.server.output
    assert f'login: rip=127.0.0.1 method=SASL/OAUTHBEARER user="{ALICE}"' in output
    assert f'login: rip=127.0.0.1 method=SASL/XOAUTH2 user="{ALICE}"' in output
    failed = 'login failed: rip=127.0.0.1 method=SASL/OAUTHBEARER reason=credentials user=""'
    assert failed in output
    assert "oauth2: token refused for -: token not active" in output
    assert GOOD not in output and BAD not in output
    assert "secret" not in output
    deployment.server.assert_healthy()


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_provider_down_is_sys_temp(deployment: Deployment) -> None:
    """An outage is no wrong password: -ERR [SYS/TEMP] (RFC 3206 section 4), logged once."""
    deployment.provider.status = 503
    ir = b64(f"n,,\x01auth=Bearer {GOOD}\x01\x01")
    for _ in range(2):
        answers = await deferToThread(
            raw_session, deployment.server.port, [b"AUTH OAUTHBEARER " + ir, b"QUIT"]
        )
        assert answers[1] == (
            b"-ERR [SYS/TEMP] authentication service unavailable, try again later\r\n"
        )
    output = deployment.server.output
    assert output.count("oauth2: token check unavailable") == 1
    assert "Traceback" not in output


async def curl(deployment: Deployment, token: str, *options: str) -> tuple[int, bytes, bytes]:
    arguments = [
        "--disable",
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        str(TIMEOUT),
        "--oauth2-bearer",
        token,
        *options,
        f"pop3://alice%40example.test@127.0.0.1:{deployment.server.port}/1",
    ]
    out: bytes
    err: bytes
    code: int
    out, err, code = await getProcessOutputAndValue(
        require_program("curl"), arguments, env={"PATH": os.defpath}
    )
    return code, out, err


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_curl(deployment: Deployment) -> None:
    """curl's OAUTHBEARER (with and without --sasl-ir) and XOAUTH2 (AUTH= login option)."""
    for options in ((), ("--sasl-ir",), ("--login-options", "AUTH=XOAUTH2")):
        code, out, err = await curl(deployment, GOOD, *options)
        assert code == 0, err
        assert out.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")
    # 67: CURLE_LOGIN_DENIED.
    code, _, _ = await curl(deployment, BAD)
    assert code == 67
    assert BAD not in deployment.server.output and GOOD not in deployment.server.output


@pytest.mark.peer
@pytest.mark.parametrize("method", ["oauthbearer", "xoauth2"])
@pytest_twisted.ensureDeferred
async def test_mpop(deployment: Deployment, tmp_path: Path, method: str) -> None:
    """mpop fetches with the token from passwordeval; a revoked one is refused."""
    mpop = require_program("mpop")
    home = tmp_path / "home"
    home.mkdir()
    mbox = tmp_path / "inbox.mbox"

    def config(token: str) -> Path:
        path = tmp_path / f"mpoprc-{token[-5:]}"
        path.write_text(
            "account default\n"
            "host 127.0.0.1\n"
            f"port {deployment.server.port}\n"
            f"user {ALICE}\n"
            f"passwordeval printf %s {token}\n"
            f"uidls_file {tmp_path / 'uidls'}\n"
            "received_header off\n"
            f"timeout {TIMEOUT}\n"
        )
        path.chmod(0o600)
        return path

    env = {"HOME": str(home), "PATH": os.defpath, "TMPDIR": str(tmp_path), "LC_ALL": "C.UTF-8"}

    async def run(token: str) -> tuple[int, bytes]:
        arguments = [
            "-C",
            str(config(token)),
            "--quiet",
            "--tls=off",
            f"--auth={method}",
            "--keep=on",
            f"--delivery=mbox,{mbox}",
        ]
        out: bytes
        err: bytes
        code: int
        out, err, code = await getProcessOutputAndValue(mpop, arguments, env=env)
        return code, out + err

    code, said = await run(BAD)
    assert code != 0, said
    assert not mbox.exists()
    code, said = await run(GOOD)
    assert code == 0, said
    assert b"hello over a bearer token" in mbox.read_bytes()


# -- the same config file, the same provider: Dovecot's oauth2 passdb -------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


DOVECOT_CASES = [
    # (mechanism, initial response, accepted?)
    ("OAUTHBEARER", f"n,a={ALICE},\x01auth=Bearer {GOOD}\x01\x01", True),
    ("OAUTHBEARER", f"n,a={ALICE.upper()},\x01auth=Bearer {GOOD}\x01\x01", True),
    ("OAUTHBEARER", f"n,a={ALICE},\x01auth=Bearer {BAD}\x01\x01", False),
    ("OAUTHBEARER", f"n,a=bob@example.test,\x01auth=Bearer {GOOD}\x01\x01", False),
    ("XOAUTH2", f"user={ALICE}\x01auth=Bearer {GOOD}\x01\x01", True),
    ("XOAUTH2", f"user={ALICE}\x01auth=Bearer {BAD}\x01\x01", False),
    ("XOAUTH2", f"user=bob@example.test\x01auth=Bearer {GOOD}\x01\x01", False),
]


def auth_exchange(port: int, mechanism: str, response: str) -> list[bytes]:
    """AUTH with an initial response; after an error challenge, the dummy response."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as connection:
        stream = connection.makefile("rb")
        stream.readline()
        connection.sendall(f"AUTH {mechanism} ".encode() + b64(response) + b"\r\n")
        answers = [stream.readline()]
        if answers[0].startswith(b"+ "):
            # RFC 7628 section 3.2.3: %x01; Google's XOAUTH2: an empty line.
            connection.sendall(b"AQ==\r\n" if mechanism == "OAUTHBEARER" else b"\r\n")
            answers.append(stream.readline())
        connection.sendall(b"QUIT\r\n")
        return answers


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_dovecot_reads_the_same_file_and_agrees(tmp_path: Path) -> None:
    """
    Dovecot's oauth2 passdb with the same dovecot-oauth2.conf.ext and the same
    provider accepts and refuses the same logins as pop3d, with the same
    error challenges (RFC 7628 section 3.2.2; Google's XOAUTH2 JSON).
    """
    import shutil
    import tempfile

    dovecot = require_program("dovecot")
    state = ProviderState()
    state.tokens[GOOD] = {"username": ALICE, "active": True}
    provider = listen(reactor, state)
    # Dovecot's processes run as other users: a directory they may read.
    shared = Path(tempfile.mkdtemp(prefix="pop3d-oauth2-"))
    shared.chmod(0o755)
    servers: list[Server] = []
    try:
        conf = shared / "dovecot-oauth2.conf.ext"
        conf.write_text(
            "introspection_mode = post\n"
            f"introspection_url = http://pop3d:secret@127.0.0.1:{provider.getHost().port}"  # type: ignore[attr-defined]
            "/introspect\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n"
            "timeout_msecs = 5000\n"
        )
        conf.chmod(0o644)
        mail = shared / "mail"
        mail.mkdir()
        shutil.chown(mail, "nobody")
        dovecot_port = free_port()
        dovecot_conf = shared / "dovecot.conf"
        dovecot_conf.write_text(
            f"base_dir = {shared}/run\nstate_dir = {shared}/state\nlog_path = /dev/stderr\n"
            "protocols = pop3\nlisten = 127.0.0.1\nssl = no\ndisable_plaintext_auth = no\n"
            "auth_mechanisms = oauthbearer xoauth2\nauth_failure_delay = 0\n"
            f"mail_location = maildir:{mail}/%u\n"
            f"service pop3-login {{\n  inet_listener pop3 {{\n    port = {dovecot_port}\n  }}\n}}\n"
            "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"
            "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
            f"  args = {conf}\n}}\n"
            f"userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={mail}/%u\n}}\n"
        )
        dovecot_conf.chmod(0o644)
        servers.append(Server(["-F", "-c", str(dovecot_conf)], tmp_path, program=[dovecot]))
        servers[-1].wait_for(re.compile(r"starting up for pop3"))
        deliver_to_maildir(str(tmp_path / "mail" / ALICE), MESSAGE)
        servers.append(
            Server(
                twistd_arguments(
                    f"maildir:{tmp_path}/mail/{{user}}",
                    f"oauth2:{conf}",
                    "--login-failure-delay",
                    "0",
                ),
                tmp_path,
            )
        )
        pop3d_port = servers[-1].wait_listening()
        for mechanism, response, accepted in DOVECOT_CASES:
            ours = await deferToThread(auth_exchange, pop3d_port, mechanism, response)
            theirs = await deferToThread(auth_exchange, dovecot_port, mechanism, response)
            case = f"{mechanism} {response!r}"
            assert ours[-1].startswith(b"+OK" if accepted else b"-ERR [AUTH]"), case
            assert theirs[-1].startswith(b"+OK" if accepted else b"-ERR [AUTH]"), case
            # The same challenge, byte for byte, before the failure.
            assert ours[:-1] == theirs[:-1], case
        assert GOOD not in servers[-1].output and BAD not in servers[-1].output
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(shared)
        await provider.stopListening()


ROOT = Path(__file__).resolve().parent.parent
README_EXAMPLE = re.compile(
    r"^    (TOKEN=\$\(.*make_token\.py alice\))\n    (.*twistd .*)\n    (curl .*)\n", re.MULTILINE
)


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_the_readme_example(tmp_path: Path) -> None:
    """
    README, the OAuth2 subsection: its file, and its three commands run in a
    copy of the checkout's examples (the server on a free port, not 1110):
    make_token.py's token lists alice's mail with curl (RFC 7628 section
    3.1, OAUTHBEARER); the keys it wrote trust no private key in public.
    """
    readme = (ROOT / "README.rst").read_text()
    config = ROOT / "examples" / "oauth2" / "dovecot-oauth2.conf.ext"
    settings = [
        line for line in config.read_text().splitlines() if line and not line.startswith("#")
    ]
    assert "\n".join(f"    {line}" for line in settings) in readme
    match = README_EXAMPLE.search(readme)
    assert match is not None
    make_token, twistd, curl_command = match.groups()
    assert make_token == "TOKEN=$(.venv/bin/python examples/oauth2/make_token.py alice)"
    generated = ("jwks.json", "example-key.json", "__pycache__")
    shutil.copytree(
        ROOT / "examples" / "oauth2",
        tmp_path / "examples" / "oauth2",
        ignore=shutil.ignore_patterns(*generated),
    )
    shutil.copytree(ROOT / "examples" / "maildir", tmp_path / "examples" / "maildir")

    async def token_for(user: str) -> str:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["examples/oauth2/make_token.py", user], path=str(tmp_path)
        )
        assert code == 0, err
        return out.decode().strip()

    alice, bob = await token_for("alice"), await token_for("bob")
    public = json.loads((tmp_path / "examples" / "oauth2" / "jwks.json").read_text())
    assert [sorted(key) for key in public["keys"]] == [["alg", "e", "kid", "kty", "n", "use"]]
    private = tmp_path / "examples" / "oauth2" / "example-key.json"
    assert private.stat().st_mode & 0o777 == 0o600

    program, *arguments = shlex.split(twistd)
    assert program == ".venv/bin/twistd"
    assert "tcp:1110:interface=127.0.0.1" in arguments
    arguments[arguments.index("tcp:1110:interface=127.0.0.1")] = "tcp:0:interface=127.0.0.1"
    server = Server(arguments, tmp_path)
    try:
        server.wait_listening()
        program, *options, url = shlex.split(curl_command)
        assert (program, options, url) == (
            "curl",
            ["--oauth2-bearer", "$TOKEN"],
            "pop3://alice@127.0.0.1:1110/",
        )
        url = url.replace(":1110/", f":{server.port}/")
        checks = ["--disable", "--silent", "--show-error", "--noproxy", "*"]
        common = [*checks, "--max-time", str(TIMEOUT), "--oauth2-bearer"]
        curl = require_program("curl")
        environment = {"PATH": os.defpath}
        out, err, code = await getProcessOutputAndValue(
            curl, [*common, alice, url], env=environment
        )
        assert (code, err) == (0, b"")
        assert out == b"1 254\r\n2 301\r\n3 507\r\n4 210\r\n"
        # bob's token is no key to alice's mail.
        out, err, code = await getProcessOutputAndValue(curl, [*common, bob, url], env=environment)
        assert code == 67, err
    finally:
        server.stop()
    assert alice not in server.output
