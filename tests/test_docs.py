"""
The documentation site in ``docs/``: Sphinx builds it with warnings as
errors, and what it takes from the code and the README is there.
"""

from __future__ import annotations

import html
import poplib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.mail.maildir import MaildirDirdbmDomain

from pop3d import MaildirStore, MaildropRealm, PasswdFileChecker, POP3Factory, POP3Service
from pop3d.tap import Options
from pop3d.testing import deliver_to_maildir

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.rst").read_text()
PAGES = ("install", "options", "migrating", "operations", "scaling")
PAGES += ("developer", "extending", "api", "compliance")


def _text(page: Path) -> str:
    """A built page's text, without markup."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def _compliance_table() -> str:
    table = README.split(".. rfc-compliance-table-start\n", 1)[1]
    return table.split(".. rfc-compliance-table-end\n", 1)[0]


def test_the_readme_marks_the_whole_compliance_table() -> None:
    """docs/compliance.rst includes the table between these comments."""
    table = _compliance_table()
    assert table.lstrip().startswith(".. list-table::")
    assert table.count(".. list-table::") == 1
    # Every row of the README's table is between the markers.
    assert table.count("   * - RFC") == README.count("   * - RFC") >= 20


@pytest.mark.process
def test_the_docs_build_without_a_warning(tmp_path: Path) -> None:
    build = ["-W", "--keep-going", "-q", "-b", "html", "docs", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", *build],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    for page in PAGES:
        assert (tmp_path / f"{page}.html").is_file(), page

    # Every option of this version, from the code.
    options = _text(tmp_path / "options.html")
    for option in Options.optFlags + Options.optParameters:
        assert f"--{option[0]}" in options

    # The operations page shows the dashboard picture (Sphinx copied it).
    assert 'src="_images/grafana-dashboard.svg"' in (tmp_path / "operations.html").read_text()
    assert (tmp_path / "_images" / "grafana-dashboard.svg").is_file()

    # The whole RFC compliance table, every test it cites.
    compliance = _text(tmp_path / "compliance.html")
    cited = re.findall(r"``(tests/[\w/]+\.py(?:::\w+)+)``", _compliance_table())
    assert len(cited) >= 20
    for node_id in cited:
        assert node_id in compliance

    # The API reference has the composition classes and the store contract.
    api = _text(tmp_path / "api.html")
    for name in ("POP3Factory", "POP3Service", "MaildropRealm", "MemoryStore"):
        assert f"class pop3d.{name}" in api or f"class pop3d.testing.{name}" in api
    assert "class IMaildrop(Interface):" in api


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_twisted_mail_users_log_in_after_the_documented_migration(tmp_path: Path) -> None:
    """docs/migrating.rst: a ``twistd mail`` domain, its passwords converted."""
    domain = MaildirDirdbmDomain(None, str(tmp_path))
    domain.addUser(b"alice", b"wonder:land")
    deliver_to_maildir(str(tmp_path / "alice"), b"Subject: kept\n\nhello\n")
    converted = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "dirdbm_to_passwd.py"), str(tmp_path / "passwd")],
        capture_output=True,
        check=True,
        timeout=60,
    )
    passwd = tmp_path / "pop3d-passwd"
    passwd.write_bytes(converted.stdout)
    assert converted.stdout.startswith(b"alice:{ARGON2ID}$argon2id$")

    portal = Portal(
        MaildropRealm(MaildirStore(f"{tmp_path}/{{user}}")), [PasswdFileChecker(str(passwd))]
    )
    factory = POP3Factory(portal, clock=reactor, timeout=600)
    pop3 = POP3Service([serverFromString(reactor, "tcp:0:interface=127.0.0.1")], factory)
    pop3.startService()
    try:
        [port] = await pop3.when_listening()

        def fetch() -> list[bytes]:
            client = poplib.POP3("127.0.0.1", port.getHost().port, timeout=10)
            client.user("alice")
            client.pass_("wonder:land")
            lines = client.retr(1)[1]
            client.quit()
            return lines

        assert await deferToThread(fetch) == [b"Subject: kept", b"", b"hello"]
    finally:
        await pop3.stopService()
