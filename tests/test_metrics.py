"""
``--metrics``: Prometheus metrics served over HTTP, scraped with a real
HTTP client (urllib, in a thread) after real POP3 sessions (poplib).
"""

from __future__ import annotations

import html
import http.client
import importlib.util
import json
import os
import poplib
import re
import signal
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import cast

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.threads import deferToThread

from pop3d.metrics import metrics_service
from pop3d.service import POP3Service
from pop3d.testing import deliver_to_maildir

from .conftest import RunningServer, require_program, start_service
from .test_endpoints import _self_signed
from .test_process import HOST, PATIENCE, Launch, launch, pop3d_arguments, write_passwd
from .test_workers import WORKER_LISTENING

__all__ = ["launch"]  # the fixture

CLIENT_TIMEOUT = 60

#: Two messages of the same size, so whichever is number 1 the octets are known.
MESSAGES = (b"Subject: one\r\n\r\nfirst body\r\n", b"Subject: two\r\n\r\nother body\r\n")


async def start_with_metrics(tmp_path: Path) -> tuple[RunningServer, str]:
    """The twistd-built service with --metrics on an ephemeral port; and the metrics URL."""
    server = await start_service(
        tmp_path,
        ["tcp:0:interface=127.0.0.1"],
        ["--metrics", "tcp:0:interface=127.0.0.1", "--login-failure-delay", "0"],
    )
    served = server.service.getServiceNamed("metrics")
    assert isinstance(served, POP3Service)
    [port] = await served.when_listening()
    return server, f"http://127.0.0.1:{port.getHost().port}/metrics"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=CLIENT_TIMEOUT) as response:  # noqa: S310
        assert response.status == 200
        return bytes(response.read()).decode("utf-8")


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def quit_and_wait_for_close(client: poplib.POP3) -> None:
    """
    QUIT, then read until the server hangs up: by then the server has
    closed its side, so a later scrape counts this session as ended.
    """
    client.sock.sendall(b"QUIT\r\n")
    assert client.file.readline() == b"+OK bye\r\n"
    assert client.file.read() == b""
    client.close()


def sessions(server: RunningServer) -> None:
    """
    Three sessions: alice fails once, logs in, retrieves 1, deletes 2;
    meanwhile a second login of alice finds her maildrop in use; then a
    session that never logs in.
    """
    alice = poplib.POP3(server.host, server.port, timeout=CLIENT_TIMEOUT)
    alice.user("alice")
    with pytest.raises(poplib.error_proto) as refused:
        alice.pass_("wrong")
    assert refused.value.args == (b"-ERR [AUTH] invalid user name or password",)
    alice.user("alice")
    alice.pass_("wonderland")
    assert alice.stat() == (2, 2 * len(MESSAGES[0]))

    second = poplib.POP3(server.host, server.port, timeout=CLIENT_TIMEOUT)
    second.user("alice")
    with pytest.raises(poplib.error_proto) as in_use:
        second.pass_("wonderland")
    assert in_use.value.args[0].startswith(b"-ERR [IN-USE] ")
    quit_and_wait_for_close(second)

    alice.retr(1)
    alice.dele(2)
    quit_and_wait_for_close(alice)

    anonymous = poplib.POP3(server.host, server.port, timeout=CLIENT_TIMEOUT)
    with pytest.raises(poplib.error_proto):
        anonymous.noop()
    anonymous.capa()
    with pytest.raises(poplib.error_proto):
        anonymous._shortcmd("FOO")
    quit_and_wait_for_close(anonymous)


@pytest_twisted.ensureDeferred
async def test_metrics_count_real_sessions_exactly(tmp_path: Path) -> None:
    """
    After real sessions, the scraped metrics give exactly what happened:
    sessions, logins by method and result, commands by verb, replies by
    RFC 2449/3206 response code (RFC 2449 section 8: IN-USE, AUTH), octets
    and messages retrieved, messages deleted in UPDATE, lock conflicts.
    """
    server, url = await start_with_metrics(tmp_path)
    try:
        for message in MESSAGES:
            deliver_to_maildir(str(server.maildir("alice")), message)
        await deferToThread(sessions, server)
        found = samples(await deferToThread(scrape, url))
    finally:
        await server.service.stopService()

    def value(name: str, **labels: str) -> float:
        return found.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("pop3d_sessions_total") == 3
    assert ("pop3d_sessions_active", ()) in found  # there, at 0: not merely absent
    assert value("pop3d_sessions_active") == 0
    assert value("pop3d_logins_total", method="USER", result="ok") == 1
    assert value("pop3d_logins_total", method="USER", result="credentials") == 1
    assert value("pop3d_logins_total", method="USER", result="in-use") == 1
    assert value("pop3d_lock_conflicts_total") == 1
    commands = {
        dict(labels)["verb"]: count
        for (name, labels), count in found.items()
        if name == "pop3d_commands_total" and count
    }
    assert commands == {
        "USER": 3,
        "PASS": 3,
        "STAT": 1,
        "RETR": 1,
        "DELE": 1,
        "QUIT": 3,
        "NOOP": 1,
        "CAPA": 1,
        "unknown": 1,
    }
    replies = {
        dict(labels)["code"]: count
        for (name, labels), count in found.items()
        if name == "pop3d_replies_total" and count
    }
    # ok: USER x3, PASS, STAT, RETR, DELE, QUIT x3, CAPA; err: NOOP, FOO.
    assert replies == {"ok": 11, "err": 2, "AUTH": 1, "IN-USE": 1}
    # Every verb and code is there from the start, at 0 (no gaps in graphs).
    assert ("pop3d_commands_total", (("verb", "APOP"),)) in found
    assert value("pop3d_commands_total", verb="APOP") == 0
    assert ("pop3d_replies_total", (("code", "SYS/TEMP"),)) in found
    assert value("pop3d_messages_retrieved_total") == 1
    assert value("pop3d_messages_deleted_total") == 1
    assert value("pop3d_message_octets_sent_total") == len(MESSAGES[0])
    assert value("pop3d_login_seconds_count", result="ok") == 1
    assert value("pop3d_login_seconds_count", result="failed") == 2
    assert value("pop3d_update_seconds_count") == 1
    # The checker accepted alice's password twice (her second login then
    # found the maildrop in use) and refused it once; the store opened (or
    # failed to open) her maildrop twice, and a message once (RETR).
    assert value("pop3d_auth_seconds_count", result="ok") == 2
    assert value("pop3d_auth_seconds_count", result="failed") == 1
    assert value("pop3d_store_open_seconds_count", object="maildrop") == 2
    assert value("pop3d_store_open_seconds_count", object="message") == 1
    # Deleted in UPDATE: only the retrieved message is left.
    assert len(list((server.maildir("alice") / "cur").iterdir())) == 1


@pytest.mark.process
@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_promtool_accepts_the_exposition(tmp_path: Path) -> None:
    """Prometheus's own checker finds the exposition valid (after some sessions)."""
    promtool = require_program("promtool")
    server, url = await start_with_metrics(tmp_path)
    try:
        deliver_to_maildir(str(server.maildir("alice")), MESSAGES[0])
        deliver_to_maildir(str(server.maildir("alice")), MESSAGES[1])
        await deferToThread(sessions, server)
        exposition = await deferToThread(scrape, url)
    finally:
        await server.service.stopService()
    checked = await deferToThread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""


def test_metrics_have_their_own_registry() -> None:
    """Two servers in one process count apart (no global registry)."""
    from prometheus_client import REGISTRY

    from pop3d.metrics import Metrics

    first, second = Metrics(), Metrics()
    first.session_started()
    assert first.registry.get_sample_value("pop3d_sessions_total") == 1
    assert second.registry.get_sample_value("pop3d_sessions_total") == 0
    assert REGISTRY.get_sample_value("pop3d_sessions_total") is None
    assert metrics_service is not None


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a UNIX socket (the --metrics endpoint of the workers test)."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=CLIENT_TIMEOUT)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CLIENT_TIMEOUT)
        self.sock.connect(self._path)


def scrape_unix(path: Path) -> str:
    connection = UnixHTTPConnection(path)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200
        return response.read().decode("utf-8")
    finally:
        connection.close()


@pytest.mark.process
def test_one_endpoint_sums_the_workers(tmp_path: Path, launch: Launch) -> None:
    """
    With --workers 2, the parent's endpoint shows the sum of what both
    workers counted (logins, commands, replies, sessions), whichever
    worker each of the sessions reached.
    """
    mail_root = tmp_path / "mail"
    deliver_to_maildir(str(mail_root / "alice"), MESSAGES[0])
    socket_path = tmp_path / "metrics.sock"
    server = launch(
        *pop3d_arguments(
            mail_root,
            write_passwd(tmp_path),
            "--workers",
            "2",
            "--metrics",
            f"unix:{socket_path}",
        )
    )
    ports = {int(server.wait_for(WORKER_LISTENING).group(2)) for _ in range(2)}
    [port] = ports
    sessions = 8
    for _ in range(sessions):
        client = poplib.POP3(HOST, port, timeout=PATIENCE)
        client.user("alice")
        client.pass_("wonderland")
        assert client.stat() == (1, len(MESSAGES[0]))
        quit_and_wait_for_close(client)
    found = samples(scrape_unix(socket_path))

    def value(name: str, **labels: str) -> float:
        return found.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("pop3d_sessions_total") == sessions
    assert value("pop3d_logins_total", method="USER", result="ok") == sessions
    for verb in ("USER", "PASS", "STAT", "QUIT"):
        assert value("pop3d_commands_total", verb=verb) == sessions, verb
    assert value("pop3d_replies_total", code="ok") == 4 * sessions
    assert value("pop3d_login_seconds_count", result="ok") == sessions


def test_the_grafana_dashboard_queries_only_metrics_pop3d_serves() -> None:
    """contrib/grafana/pop3d.json: every series a panel queries is one pop3d exposes."""
    from prometheus_client import generate_latest

    from pop3d.metrics import LoginTiming, Metrics

    dashboard = json.loads(
        (Path(__file__).parent.parent / "contrib" / "grafana" / "pop3d.json").read_text()
    )
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bpop3d_\w+", target["expr"])
    }
    metrics = Metrics()
    metrics.login("USER", "ok", 0.1, "TLSv1.3")
    timing = LoginTiming(0.0)
    timing.checked, timing.opened = 0.1, 0.2
    metrics.login_timing(timing, "ok", 0.2)
    metrics.message_opened(0.1)
    metrics.tls_handshake("TLSv1.3")
    metrics.tls_handshake_failed()
    metrics.update(0.1)
    exposed = {
        line.split("{")[0].split(" ")[0]
        for line in generate_latest(metrics.registry).decode().splitlines()
        if not line.startswith("#")
    }
    assert len(dashboard["panels"]) == 14
    assert queried - exposed == set()
    # Every metric has a panel (histograms: their buckets; no _created series).
    counted = {
        name
        for name in exposed
        if not name.endswith(("_created", "_seconds_count", "_seconds_sum"))
    }
    assert counted - queried == set()


@pytest_twisted.ensureDeferred
async def test_logins_and_handshakes_over_tls_are_counted_by_version(tmp_path: Path) -> None:
    """
    RFC 2595 section 4 (STLS) and RFC 8314 section 3.3 (implicit TLS): each
    completed handshake counts for its TLS version, a login after STLS for
    its version too; a handshake that fails (a plain-text client on the TLS
    port, a client that does not trust the certificate) counts as failed.
    """
    key, cert = _self_signed(tmp_path)
    server = await start_service(
        tmp_path,
        ["tcp:0:interface=127.0.0.1", "ssl:0:interface=127.0.0.1"],
        ["--tls-cert", str(cert), "--tls-key", str(key), "--metrics", "tcp:0:interface=127.0.0.1"],
    )
    pop3 = server.service.getServiceNamed("pop3")
    assert isinstance(pop3, POP3Service)
    implicit_port = (await pop3.when_listening())[1].getHost().port
    served = server.service.getServiceNamed("metrics")
    assert isinstance(served, POP3Service)
    [port] = await served.when_listening()
    url = f"http://127.0.0.1:{port.getHost().port}/metrics"

    def over_tls() -> None:
        context = ssl.create_default_context(cafile=str(cert))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        client = poplib.POP3(server.host, server.port, timeout=CLIENT_TIMEOUT)
        assert client.stls(context=context) == b"+OK begin TLS negotiation"
        client.user("alice")
        client.pass_("wonderland")
        quit_and_wait_for_close(client)

        context = ssl.create_default_context(cafile=str(cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        implicit = poplib.POP3_SSL(
            server.host, implicit_port, context=context, timeout=CLIENT_TIMEOUT
        )
        assert implicit.sock.version() == "TLSv1.3"
        quit_and_wait_for_close(implicit)

        # A client that does not trust the self-signed certificate ...
        with pytest.raises(ssl.SSLCertVerificationError):
            poplib.POP3_SSL(
                server.host,
                implicit_port,
                context=ssl.create_default_context(),
                timeout=CLIENT_TIMEOUT,
            )
        # ... then a plain-text client on the TLS port: hung up on once the
        # server gave up (and, before, read the first one's alert).
        with socket.create_connection((server.host, implicit_port), CLIENT_TIMEOUT) as plain:
            plain.sendall(b"USER alice\r\n")
            while plain.recv(4096):
                pass

    try:
        await deferToThread(over_tls)
        found = samples(await deferToThread(scrape, url))
    finally:
        await server.service.stopService()

    def by_version(name: str) -> dict[str, float]:
        return {
            dict(labels)["version"]: count
            for (found_name, labels), count in found.items()
            if found_name == name
        }

    assert by_version("pop3d_tls_logins_total") == {"TLSv1.2": 1}
    assert by_version("pop3d_tls_handshakes_total") == {"TLSv1.2": 1, "TLSv1.3": 1}
    assert found[("pop3d_tls_handshake_failures_total", ())] == 2
    assert found[("pop3d_commands_total", (("verb", "STLS"),))] == 1


#: The parent's line once a worker has exited (and been forgotten by --metrics).
WORKER_ENDED = re.compile(r"worker \d+ ended \(.*\); starting it again")
STARTED = re.compile(r"pop3d worker (\d+) listening on [\d.]+:(\d+)|control socket at (\S+)")


def ask_control(path: Path, request: dict[str, str]) -> dict[str, object]:
    """One request on a --control socket (pop3d/control.py: a JSON line each way)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
        control.settimeout(CLIENT_TIMEOUT)
        control.connect(str(path))
        control.sendall(json.dumps(request).encode() + b"\n")
        answer: dict[str, object] = json.loads(control.makefile("rb").readline())
        return answer


@pytest.mark.process
def test_a_dead_workers_sessions_leave_the_active_gauge(tmp_path: Path, launch: Launch) -> None:
    """
    With --workers, a worker that dies (killed here) takes its sessions
    with it: once the parent has seen it exit, ``pop3d_sessions_active``
    no longer counts them (prometheus_client's mark_process_dead), while
    the counters keep what it had counted.
    """
    mail_root = tmp_path / "mail"
    deliver_to_maildir(str(mail_root / "alice"), MESSAGES[0])
    metrics_path = tmp_path / "metrics.sock"
    control_path = tmp_path / "control.sock"
    server = launch(
        *pop3d_arguments(
            mail_root,
            write_passwd(tmp_path),
            "--workers",
            "2",
            "--metrics",
            f"unix:{metrics_path}",
            "--control",
            str(control_path),
        )
    )
    workers: set[int] = set()
    controls: set[str] = set()
    while len(workers) < 2 or len(controls) < 3:
        match = server.wait_for(STARTED)
        if match.group(3):
            controls.add(match.group(3))
        else:
            workers.add(int(match.group(1)))
            port = int(match.group(2))

    def value(name: str) -> float:
        return samples(scrape_unix(metrics_path)).get((name, ()), 0.0)

    client = poplib.POP3(HOST, port, timeout=PATIENCE)
    try:
        client.user("alice")
        client.pass_("wonderland")
        assert value("pop3d_sessions_active") == 1
        who = ask_control(control_path, {"command": "who"})
        [row] = cast(list[dict[str, object]], who["sessions"])
        serving = cast(int, row["worker"])
        assert serving in workers

        os.kill(serving, signal.SIGKILL)
        server.wait_for(WORKER_ENDED)
        assert ("pop3d_sessions_active", ()) in samples(scrape_unix(metrics_path))
        assert value("pop3d_sessions_active") == 0
        assert value("pop3d_sessions_total") == 1
        found = samples(scrape_unix(metrics_path))
        assert found[("pop3d_logins_total", (("method", "USER"), ("result", "ok")))] == 1
        # The client finds the connection gone; nothing was deleted.
        assert client.file.read() == b""
    finally:
        client.close()
    assert len(list((mail_root / "alice" / "new").iterdir())) == 1


IMAGES = Path(__file__).parent.parent / "docs" / "images"


def _render_dashboard_module() -> ModuleType:
    """contrib/grafana/render_dashboard.py (a script, not a package module)."""
    path = Path(__file__).parent.parent / "contrib" / "grafana" / "render_dashboard.py"
    spec = importlib.util.spec_from_file_location("render_dashboard", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dashboard_picture_is_drawn_from_a_real_runs_samples() -> None:
    """
    docs/images/grafana-dashboard.svg is what render_dashboard.py draws
    from the samples beside it (Prometheus's answers to the dashboard's own
    queries during a real run): every panel, each with data, and a caption
    that says it is no Grafana screenshot.
    """
    render_dashboard = _render_dashboard_module()
    dashboard = json.loads(render_dashboard.DASHBOARD.read_text())
    samples = json.loads((IMAGES / "grafana-dashboard-samples.json").read_text())
    picture = (IMAGES / "grafana-dashboard.svg").read_text()
    assert render_dashboard.render(dashboard, samples) == picture
    # The samples answer the dashboard's queries as they are written now.
    assert [[target["expr"] for target in panel["targets"]] for panel in samples["panels"]] == [
        [
            render_dashboard.resolve(
                target["expr"], samples["rate_interval"], {"job": ".*", "instance": ".*"}
            )
            for target in panel["targets"]
        ]
        for panel in dashboard["panels"]
    ]
    for panel in dashboard["panels"]:
        assert f">{html.escape(panel['title'], quote=False)}</text>" in picture
    assert "No data" not in picture
    assert "not a Grafana screenshot" in picture
    # Lines drawn: every series of every panel.
    drawn = picture.count("<polyline ")
    assert drawn >= sum(len(t["series"]) for p in samples["panels"] for t in p["targets"])


def test_the_operations_page_shows_the_dashboard_picture() -> None:
    """docs/operations.rst shows the picture, captioned as a rendering, not a screenshot."""
    page = (Path(__file__).parent.parent / "docs" / "operations.rst").read_text()
    figure = page.split(".. figure:: images/grafana-dashboard.svg\n", 1)[1].split("\n\n", 2)
    caption = " ".join(figure[1].split())
    assert "rendering of the panels of contrib/grafana/pop3d.json" in caption
    assert "not a Grafana screenshot" in caption
