"""
A real OpenLDAP server for the tests: Debian's slapd with a generated
slapd.conf, an mdb database in a temp dir, listening on a loopback port
(StartTLS with a test certificate), loaded with ldapadd.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import require_program
from .test_endpoints import _self_signed

SUFFIX = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "root secret"
#: The account pop3d and Dovecot bind as: it may read userPassword.
SERVICE_DN = f"cn=pop3d,{SUFFIX}"
SERVICE_PASSWORD = "service secret"
PEOPLE = f"ou=people,{SUFFIX}"

SLAPD = "/usr/sbin/slapd"

#: Attributes for what Dovecot calls fields (1.3.6.1.4.1.99999: an example arc).
SCHEMA = """\
attributetype ( 1.3.6.1.4.1.99999.1.1 NAME 'mailLocation'
    EQUALITY caseExactMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.99999.1.2 NAME 'popLoginDelay'
    EQUALITY caseExactMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.99999.1.3 NAME 'popExpire'
    EQUALITY caseExactMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.99999.1.4 NAME 'allowedNets'
    EQUALITY caseExactMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.99999.1.5 NAME 'mailDisabled'
    EQUALITY caseExactMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.99999.1.6 NAME 'disabledReason'
    EQUALITY caseExactMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.99999.2.1 NAME 'pop3dUser' SUP top AUXILIARY
    MAY ( mailLocation $ popLoginDelay $ popExpire $ allowedNets $ mailDisabled $
          disabledReason ) )
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _config(directory: Path, cert: Path, key: Path) -> str:
    return f"""\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/nis.schema
include /etc/ldap/schema/inetorgperson.schema
include {directory}/pop3d.schema
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload pw-sha2
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
# Simple binds keep working without TLS (pop3d's tls=no configurations).
security simple_bind=0

database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw "{ROOT_PASSWORD}"
directory {directory}/db
access to attrs=userPassword
    by dn.exact="{SERVICE_DN}" read
    by anonymous auth
    by * none
access to * by * read
"""


@dataclass
class LdapServer:
    """A running slapd; `stop` and `start` again keep its data."""

    directory: Path
    port: int
    ca_file: Path
    process: subprocess.Popen[bytes] | None = None
    entries: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def start(self) -> None:
        # In the foreground (-d), with its connection log: its event loop's
        # first round ("daemon: epoll: listen=...") comes after listen(2).
        process = subprocess.Popen(
            [SLAPD, "-d", "conns", "-f", str(self.directory / "slapd.conf"), "-h", f"{self.uri}/"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        said: list[bytes] = []
        for line in process.stderr:
            said.append(line)
            if b"daemon: epoll: listen=" in line:
                break
        else:
            process.wait()
            raise RuntimeError(f"slapd did not start: {b''.join(said).decode(errors='replace')}")
        # Keep reading what it says, so that it never blocks on a full pipe.
        threading.Thread(target=process.stderr.read, daemon=True).start()
        self.process = process

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        self.process.wait(timeout=30)
        self.process = None

    def add(self, ldif: str) -> None:
        """Add entries (LDIF) as the root DN, with ldapadd."""
        subprocess.run(
            [
                require_program("ldapadd"),
                "-x",
                "-H",
                self.uri,
                "-D",
                ROOT_DN,
                "-w",
                ROOT_PASSWORD,
            ],
            input=ldif.encode(),
            check=True,
            capture_output=True,
        )


def base_ldif() -> str:
    return f"""\
dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: {SERVICE_DN}
objectClass: simpleSecurityObject
objectClass: organizationalRole
cn: pop3d
userPassword: {SERVICE_PASSWORD}

dn: {PEOPLE}
objectClass: organizationalUnit
ou: people
"""


def person_ldif(uid: str, password: str | None, **attributes: str | list[str]) -> str:
    """An inetOrgPerson + posixAccount under ou=people (uid is the RDN)."""
    lines = [
        f"dn: uid={uid},{PEOPLE}",
        "objectClass: inetOrgPerson",
        "objectClass: posixAccount",
        f"uid: {uid}",
        f"cn: {uid}",
        f"sn: {uid}",
        "uidNumber: 1000",
        "gidNumber: 1000",
        f"homeDirectory: {attributes.pop('homeDirectory', f'/home/{uid}')}",
    ]
    if password is not None:
        lines.append(f"userPassword: {password}")
    for name, value in attributes.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{name}: {item}")
    return "\n".join(lines) + "\n"


def start_ldap_server(directory: Path) -> LdapServer:
    """slapd on a free loopback port, with the base entries."""
    if not os.path.exists(SLAPD):
        require_program("slapd")  # fails in CI, skips elsewhere, naming the package
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "db").mkdir()
    tls = directory / "tls"
    tls.mkdir()
    key, cert = _self_signed(tls)
    (directory / "pop3d.schema").write_text(SCHEMA)
    (directory / "slapd.conf").write_text(_config(directory, cert, key))
    server = LdapServer(directory, _free_port(), cert)
    server.start()
    server.add(base_ldif())
    return server
