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
from collections.abc import Iterator
from dataclasses import dataclass
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


@pytest.mark.process
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


# -- markers: fast tests apart from process and peer tests --------------------

#: Names whose use starts a child process: the subprocess module, Twisted's
#: process API, and the os functions that do.
PROCESS_NAMES = frozenset(
    {
        "subprocess",
        "spawnProcess",
        "getProcessOutput",
        "getProcessOutputAndValue",
        "getProcessValue",
    }
)
PROCESS_OS_FUNCTIONS = re.compile(r"system|popen|fork(pty)?|(posix_)?spawn\w*|exec\w*")


@dataclass(frozen=True)
class Needs:
    """What a test, or something it uses, does: start a process, run a peer program."""

    process: bool = False
    peer: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(self.process or other.process, self.peer or other.peer)


def _reads_ci(node: ast.AST) -> bool:
    """``os.environ.get("CI")``, ``os.environ["CI"]``, ``"CI" in os.environ``."""
    if isinstance(node, ast.Call):
        found = node.args[:1]
    elif isinstance(node, ast.Subscript):
        found = [node.slice]
    elif isinstance(node, ast.Compare):
        found = [node.left]
    else:
        return False
    return any(isinstance(value, ast.Constant) and value.value == "CI" for value in found)


def _starts_a_process(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in PROCESS_NAMES
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "os":
            return PROCESS_OS_FUNCTIONS.fullmatch(node.attr) is not None
        return node.attr in PROCESS_NAMES
    return False


def _runs_a_peer(node: ast.AST) -> bool:
    """
    Looks for a peer program: with `conftest.require_program`, or by hand
    next to a lookup of ``CI`` (where a missing peer fails instead of
    skipping, as the house rules require).
    """
    if isinstance(node, ast.Name):
        return node.id == "require_program"
    return _reads_ci(node)


def _direct_needs(node: ast.AST) -> Needs:
    """What ``node``'s own code does."""
    needs = Needs()
    for child in ast.walk(node):
        if _runs_a_peer(child):
            needs |= Needs(process=True, peer=True)
        elif _starts_a_process(child):
            needs |= Needs(process=True)
    return needs


def _names_used(node: ast.AST) -> set[str]:
    """Names ``node`` refers to: variables, parameters (fixtures), ``self.`` attributes."""
    names = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            names.add(child.id)
        elif isinstance(child, ast.arg):
            names.add(child.arg)
        elif isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name):
            if child.value.id == "self":
                names.add(child.attr)
    return names


def _marks(expressions: list[ast.expr]) -> set[str]:
    """The X of every ``pytest.mark.X`` in decorators or a ``pytestmark`` value."""
    return {
        node.attr
        for expression in expressions
        for node in ast.walk(expression)
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "pytest.mark"
    }


def _pytestmark(body: list[ast.stmt]) -> set[str]:
    """Marks given by a ``pytestmark = ...`` line of a module or class."""
    return _marks(
        [
            statement.value
            for statement in body
            if isinstance(statement, ast.Assign)
            and [ast.unparse(target) for target in statement.targets] == ["pytestmark"]
        ]
    )


@dataclass
class Definition:
    """A function, class or assignment of a test module, and what using it needs."""

    module: str
    name: str  # "function", "Class" or "Class.method"
    uses: set[str]
    needs: Needs
    marks: set[str]
    is_test: bool = False


def _definitions(path: Path) -> Iterator[Definition]:
    module = ast.parse(path.read_text(), str(path))
    module_marks = _pytestmark(module.body)
    for statement in module.body:
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    yield Definition(
                        path.stem,
                        target.id,
                        _names_used(statement.value),
                        _direct_needs(statement.value),
                        module_marks,
                        # A test case made by assignment (hypothesis's machine.TestCase).
                        is_test=target.id.startswith("Test"),
                    )
        elif isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            marks = module_marks | _marks(statement.decorator_list)
            yield Definition(
                path.stem,
                statement.name,
                _names_used(statement),
                _direct_needs(statement),
                marks,
                is_test=statement.name.startswith("test")
                and not isinstance(statement, ast.ClassDef),
            )
            if isinstance(statement, ast.ClassDef):
                marks |= _pytestmark(statement.body)
                for member in statement.body:
                    if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef):
                        yield Definition(
                            path.stem,
                            f"{statement.name}.{member.name}",
                            _names_used(member),
                            _direct_needs(member),
                            marks | _marks(member.decorator_list),
                            is_test=statement.name.startswith("Test")
                            and member.name.startswith("test"),
                        )


def _scan_tests(directory: Path) -> dict[str, Definition]:
    """
    Every test in ``directory`` (by node id), knowing what it needs: what
    its own code does, and what the helpers, fixtures and classes it uses do
    (in its module or class, the test modules it imports them from, and
    conftest.py), followed to the end.
    """
    definitions = {
        (definition.module, definition.name): definition
        for path in sorted(directory.glob("*.py"))
        for definition in _definitions(path)
    }
    imported = {
        (path.stem, alias.asname or alias.name): (statement.module, alias.name)
        for path in sorted(directory.glob("*.py"))
        for statement in ast.parse(path.read_text()).body
        if isinstance(statement, ast.ImportFrom) and statement.level == 1 and statement.module
        for alias in statement.names
    }

    def resolve(user: Definition, name: str) -> Definition | None:
        owner = user.name.split(".")[0]
        key = (user.module, name)
        while key in imported:
            key = imported[key]
        return (
            definitions.get((user.module, f"{owner}.{name}"))
            or definitions.get(key)
            or definitions.get(("conftest", name))  # a fixture, asked for by its name
        )

    changed = True
    while changed:
        changed = False
        for definition in definitions.values():
            for name in definition.uses:
                used = resolve(definition, name)
                if used is not None and definition.needs | used.needs != definition.needs:
                    definition.needs |= used.needs
                    changed = True
    return {
        f"{module}.py::{name.replace('.', '::')}": definition
        for (module, name), definition in definitions.items()
        if definition.is_test
    }


def test_the_marker_scan_follows_fixtures_helpers_and_imports(tmp_path: Path) -> None:
    """What `test_tests_that_start_processes_or_run_peers_are_marked` relies on."""
    (tmp_path / "conftest.py").write_text(
        "def require_program(name): ...\n@pytest.fixture\ndef forked(): return os.fork()\n"
    )
    (tmp_path / "test_a.py").write_text(
        "from twisted.internet.utils import getProcessOutput\n"
        "pytestmark = [pytest.mark.slow]\n"
        "class Server:\n"
        "    def __init__(self): self.process = subprocess.Popen(['twistd'])\n"
        "@pytest.fixture\n"
        "def launch(): yield Server\n"
        "def test_fixture(launch): pass\n"
        "def test_twisted(): getProcessOutput('x')\n"
        "def test_conftest_fixture(forked): pass\n"
        "def test_pure(tmp_path): assert tmp_path\n"
    )
    (tmp_path / "test_b.py").write_text(
        "from .test_a import launch as start\n"
        "def _dovecot():\n"
        "    if os.environ.get('CI'): pytest.fail('no dovecot')\n"
        "@pytest.mark.process\n"
        "def test_imported_fixture(start): pass\n"
        "def test_own_fixture(start_twice): pass\n"
        "@pytest.fixture\n"
        "def start_twice(start): pass\n"
        "@pytest.mark.peer\n"
        "class TestPeers:\n"
        "    def _curl(self): return require_program('curl')\n"
        "    def test_method(self): self._curl()\n"
        "    def test_plain(self): pass\n"
        "    def test_dovecot(self): _dovecot()\n"
        "TestModel = Machine.TestCase\n"
    )
    process, peer = Needs(process=True), Needs(process=True, peer=True)
    tests = _scan_tests(tmp_path)
    assert {node_id: test.needs for node_id, test in tests.items()} == {
        "test_a.py::test_fixture": process,
        "test_a.py::test_twisted": process,
        "test_a.py::test_conftest_fixture": process,
        "test_a.py::test_pure": Needs(),
        "test_b.py::test_imported_fixture": process,
        "test_b.py::test_own_fixture": process,
        "test_b.py::TestPeers::test_method": peer,
        "test_b.py::TestPeers::test_plain": Needs(),
        "test_b.py::TestPeers::test_dovecot": peer,
        "test_b.py::TestModel": Needs(),
    }
    assert tests["test_a.py::test_fixture"].marks == {"slow"}
    assert tests["test_b.py::test_imported_fixture"].marks == {"process"}
    assert tests["test_b.py::TestPeers::test_plain"].marks == {"peer"}


def test_tests_that_start_processes_or_run_peers_are_marked() -> None:
    """
    ``pytest -m "not process and not peer"`` runs the fast tests only if every
    test that starts a child process is marked ``process`` (or ``peer``), and
    every test that runs a program from outside the project (curl, mpop,
    procmail, Dovecot, ...) is marked ``peer``.
    """
    tests = _scan_tests(ROOT / "tests")
    assert len(tests) > 500
    unmarked = [
        f"{node_id} needs @pytest.mark.{'peer' if test.needs.peer else 'process'}"
        for node_id, test in tests.items()
        if (test.needs.peer and "peer" not in test.marks)
        or (test.needs.process and not test.marks & {"process", "peer"})
    ]
    assert unmarked == []


def _imported_by(module: str) -> set[str]:
    """The modules a fresh interpreter has loaded once it imported ``module``."""
    shown = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return set(shown.stdout.split())


@pytest.mark.process
@pytest.mark.parametrize("module", ["pop3d.wire", "pop3d.session", "pop3d.errors"])
def test_the_pure_modules_import_no_twisted(module: str) -> None:
    """
    The wire format and the session's state machine are plain Python: a
    program that parses POP3 with them loads no part of Twisted, nor the
    rest of pop3d (its package's names are imported when first used).
    """
    loaded = _imported_by(module)
    assert not {name for name in loaded if name.split(".")[0] in {"twisted", "OpenSSL"}}
    assert not loaded & {"pop3d.factory", "pop3d.protocol", "pop3d.checkers"}


@pytest.mark.process
def test_a_counting_helper_loads_no_server() -> None:
    """
    A counting helper process imports `pop3d.stores.counting` (and, under
    twistd, twistd's own modules): not the protocol, the checkers, TLS or
    the stores' other modules, which would double its memory.
    """
    loaded = _imported_by("pop3d.stores.counting")
    unwanted = {"pop3d.factory", "pop3d.protocol", "pop3d.checkers", "pop3d.stores.maildir"}
    assert not loaded & unwanted
    assert "OpenSSL" not in loaded


def test_the_package_names_are_there_when_used() -> None:
    """`from pop3d import X` for each name of ``pop3d.__all__``, which type checkers see too."""
    import pop3d

    for name in pop3d.__all__:
        assert getattr(pop3d, name) is not None
        assert name in dir(pop3d)
    # Submodules imported so far are the package's attributes, as always;
    # what __init__ itself imports is not offered.
    import pop3d.wire

    assert "wire" in dir(pop3d)
    assert not {"importlib", "ModuleType", "TYPE_CHECKING", "Any"} & set(dir(pop3d))
    with pytest.raises(AttributeError, match="no attribute 'MailDirStore'"):
        pop3d.MailDirStore  # noqa: B018
    tree = ast.parse((ROOT / "pop3d" / "__init__.py").read_text())
    [checking] = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    ]
    seen_by_type_checkers = {
        alias.asname or alias.name
        for node in checking.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen_by_type_checkers == set(pop3d.__all__) - {"__version__"}


@pytest.mark.process
@pytest.mark.parametrize(
    "first",
    ["pop3d.authdb.sql", "pop3d.authdb.ldap", "pop3d.sasl.cram_md5", "pop3d.sasl.scram", "pop3d"],
)
def test_every_password_check_is_there_whatever_is_imported_first(first: str) -> None:
    """
    A program that makes an SQL or LDAP checker (or imports a SASL
    mechanism) without ever importing ``pop3d.checkers`` verifies USER/PASS,
    APOP, CRAM-MD5 and SCRAM-SHA-256 all the same: the SQL checker's
    factory says so, which is what ``twistd pop3d --help-auth`` lists it by.
    """
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import {first}\n"
            "from pop3d.authdb.sql import SQLCheckerFactory\n"
            "print(*sorted(i.__name__ for i in SQLCheckerFactory.credentialInterfaces))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert shown.stdout.split() == [
        "ICramMD5Credentials",
        "IScramSHA256Credentials",
        "IUsernameHashedPassword",
        "IUsernamePassword",
    ]


@pytest.mark.process
def test_twistd_lists_every_auth_type() -> None:
    """``twistd pop3d --help-auth``: pop3d's checkers, each for what pop3d verifies."""
    twistd = Path(sys.executable).parent / "twistd"
    shown = subprocess.run(
        [str(twistd), "pop3d", "--help-auth"], capture_output=True, text=True, cwd=ROOT
    )
    kinds = {line.split()[0] for line in shown.stdout.splitlines()[4:] if line.strip()}
    assert {"passwd-file", "sql", "ldap", "oauth2"} <= kinds, shown.stdout
