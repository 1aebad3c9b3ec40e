"""
The project as a user meets it: the README's commands and example, and the
code-quality gates (ruff, mypy --strict) that CI runs through this suite.
"""

from __future__ import annotations

import ast
import poplib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from pop3d.service import POP3Service
from pop3d.testing import deliver_to_maildir

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.rst").read_text()


def literal_blocks(text: str) -> list[str]:
    """The indented blocks that follow a ``::`` paragraph in reStructuredText."""
    blocks = []
    for match in re.finditer(r"::\n\n((?:(?:    .*)?\n)+)", text):
        lines = [line[4:] for line in match.group(1).splitlines()]
        blocks.append("\n".join(lines).strip() + "\n")
    return blocks


def test_quick_start_is_two_commands() -> None:
    start, tests = literal_blocks(README)[:2]
    assert start.count("\n") == 1 and "twistd -n --pidfile= pop3d" in start
    assert tests.count("\n") == 1 and "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = literal_blocks(README)[1].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_quick_start_data_is_in_the_repository() -> None:
    assert (ROOT / "examples" / "passwd").is_file()
    assert list((ROOT / "examples" / "maildir" / "alice").glob("*/1*"))


@pytest_twisted.ensureDeferred
async def test_composition_example_runs(tmp_path: Path) -> None:
    example = next(block for block in literal_blocks(README) if "POP3Service(" in block)
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}wonderland::\n")
    deliver_to_maildir(str(tmp_path / "alice"), b"Subject: composed\n\nhello\n")
    code = (
        example.replace("/srv/mail/{user}", f"{tmp_path}/{{user}}")
        .replace("/etc/pop3d/passwd", str(passwd))
        .replace("tcp:1110:", "tcp:0:")
    )
    namespace: dict[str, object] = {}
    exec(compile(code, "README.rst", "exec"), namespace)  # noqa: S102
    services = namespace["application_services"]
    pop3 = namespace["pop3"]
    assert isinstance(pop3, POP3Service)
    services.startService()  # type: ignore[attr-defined]
    try:
        [port] = await pop3.when_listening()

        def fetch() -> list[bytes]:
            client = poplib.POP3("127.0.0.1", port.getHost().port, timeout=10)
            client.user("alice")
            client.pass_("wonderland")
            lines = client.retr(1)[1]
            client.quit()
            return lines

        assert await deferToThread(fetch) == [b"Subject: composed", b"", b"hello"]
    finally:
        await services.stopService()  # type: ignore[attr-defined]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "command",
    [
        ("ruff", "check", "."),
        ("ruff", "format", "--check", "."),
        ("mypy",),
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_code_quality(command: tuple[str, ...]) -> None:
    result = _run(sys.executable, "-m", *command)
    assert result.returncode == 0, result.stdout + result.stderr


def _defined_names(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """Functions, classes and assigned names of a module or class body."""
    names: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            # A test case made by assignment (hypothesis's TestCase).
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
    return names


def test_every_test_the_compliance_table_cites_exists() -> None:
    """
    The README's RFC compliance table names tests by node id: each must be
    there, a method inside the class the id names.
    """
    table = README.split("RFC compliance\n==============", 1)[1].split("\n\n\n", 1)[0]
    node_ids = re.findall(r"``(tests/[\w/]+\.py(?:::\w+)+)``", table)
    assert len(node_ids) >= 20
    for node_id in node_ids:
        path, *names = node_id.split("::")
        body = ast.parse((ROOT / path).read_text()).body
        for name in names:
            found = _defined_names(body).get(name)
            assert found is not None, f"{node_id}: no {name}"
            body = found.body if isinstance(found, ast.ClassDef) else []


def test_the_readme_renders_without_a_warning() -> None:
    """PyPI shows the README only if it is valid reStructuredText."""
    import docutils.core

    docutils.core.publish_string(
        README,
        writer="html",
        settings_overrides={"halt_level": 2, "report_level": 2, "output_encoding": "unicode"},
    )
