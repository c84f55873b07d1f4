"""sd_notify and journald logging, against a real datagram socket standing in
for systemd's notify socket: both senders (libsystemd through systemd-python,
and the built-in one) must put the same datagrams on the wire."""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator import logs, sdnotify
from replicator.sdnotify import Notifier


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket."""

    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address  # as written in NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(5)

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NotifySocket]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        ns = NotifySocket(path, path)
    else:
        name = f"replicator-test-{uuid.uuid4().hex}"
        ns = NotifySocket("@" + name, "\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", ns.address)
    monkeypatch.delenv(sdnotify.FORCE_ENV, raising=False)
    try:
        yield ns
    finally:
        ns.sock.close()


def _has_systemd_python() -> bool:
    try:
        import systemd.daemon  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = [
    pytest.param(
        "libsystemd",
        marks=pytest.mark.skipif(not _has_systemd_python(), reason="systemd-python missing"),
    ),
    "builtin",
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lifecycle_datagrams_arrive_in_order(notify_socket: NotifySocket, backend: str) -> None:
    n = Notifier(builtin=backend == "builtin")
    assert n.enabled and n.backend == backend
    n.ready("2 links up, 1 mirror")
    n.status("a→b: connected; queue 0 files\nsecond line")
    n.watchdog()
    n.reloading()
    n.ready("reloaded")
    n.stopping("draining 3 files")
    n.stopping()
    got = [notify_socket.receive() for _ in range(7)]
    assert got[0] == "READY=1\nSTATUS=2 links up, 1 mirror"
    # A newline in a status must not smuggle in another assignment.
    assert got[1] == "STATUS=a→b: connected; queue 0 files second line"
    assert got[2] == "WATCHDOG=1"
    reloading, monotonic = got[3].split("\n")
    assert reloading == "RELOADING=1"
    assert monotonic.startswith("MONOTONIC_USEC=") and int(monotonic.split("=")[1]) > 0
    assert got[4] == "READY=1\nSTATUS=reloaded"
    assert got[5] == "STOPPING=1\nSTATUS=draining 3 files"
    assert got[6] == "STOPPING=1"
    assert notify_socket.empty()


def test_env_forces_builtin(notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sdnotify.FORCE_ENV, "builtin")
    n = Notifier()
    assert n.backend == "builtin"
    n.watchdog()
    assert notify_socket.receive() == "WATCHDOG=1"


def test_default_prefers_libsystemd(notify_socket: NotifySocket) -> None:
    expected = "libsystemd" if _has_systemd_python() else "builtin"
    assert Notifier().backend == expected


def test_without_systemd_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    n = Notifier()
    assert not n.enabled and n.backend == "off"
    assert n.watchdog_interval() is None
    n.ready("x")
    n.status("x")
    n.watchdog()
    n.reloading()
    n.stopping("x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_send_failure_never_raises_and_is_logged_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    backend: str,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    n = Notifier(builtin=backend == "builtin")
    with caplog.at_level(logging.DEBUG, logger="replicator.sdnotify"):
        for _ in range(3):
            n.watchdog()
            n.status("still here")
    failures = [r for r in caplog.records if "sd_notify" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.DEBUG


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "{pid}"}, 2.5),
        ({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(
    notify_socket: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    expected: float | None,
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(pid=os.getpid()))
    assert Notifier().watchdog_interval() == expected


# -- logging -------------------------------------------------------------------


@pytest.fixture
def clean_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("clean_root_logger")
def test_setup_uses_stderr_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    handler = logs.setup("a", "debug")
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
    assert logging.getLogger().handlers == [handler]
    assert logging.getLogger().level == logging.DEBUG


@pytest.mark.skipif(not _has_systemd_python(), reason="systemd-python missing")
@pytest.mark.usefixtures("clean_root_logger")
@pytest.mark.parametrize("var", ["JOURNAL_STREAM", "INVOCATION_ID"])
def test_setup_uses_journald_under_systemd(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    from systemd.journal import JournalHandler

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.setenv(var, "8:1234" if var == "JOURNAL_STREAM" else uuid.uuid4().hex)
    assert isinstance(logs.setup("a", "INFO"), JournalHandler)
    # An explicit choice wins over the environment.
    assert isinstance(logs.setup("a", "INFO", journal=False), logging.StreamHandler)


def test_stderr_format_appends_fields() -> None:
    fmt = logs._Formatter("a")
    record = logging.LogRecord(
        "replicator.link", logging.WARNING, __file__, 1, "x %s", ("y",), None
    )
    record.PEER, record.MIRROR, record.CODE = "b", "media", None
    text = fmt.format(record)
    assert text.endswith("WARNING replicatord[a] x y [PEER=b MIRROR=media]")


@pytest.mark.skipif(not _has_systemd_python(), reason="systemd-python missing")
def test_journal_fields_come_from_record_attributes() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    handler = logs.journal_handler("node-a", send=lambda msg, **f: sent.append((msg, f)))
    assert handler is not None
    log = logging.getLogger("replicator.test_journal")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        log.warning(
            "refused %s",
            "x/../y",
            extra={"PEER": "b", "MIRROR": "media", "PATH": "x/../y", "CODE": "BAD_PATH"},
        )
        log.info("plain")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    (msg, f), (msg2, f2), (msg3, f3) = sent
    assert msg == "refused x/../y"
    assert {k: f[k] for k in ("PEER", "MIRROR", "PATH", "CODE", "NODE")} == {
        "PEER": "b",
        "MIRROR": "media",
        "PATH": "x/../y",
        "CODE": "BAD_PATH",
        "NODE": "node-a",
    }
    assert f["PRIORITY"] == "4" and f["LOGGER"] == "replicator.test_journal"
    assert f["SYSLOG_IDENTIFIER"] == "replicatord"
    assert f["CODE_FUNC"] == "test_journal_fields_come_from_record_attributes"
    # Only journal fields travel, not every LogRecord attribute.
    assert set(f) <= logs.JOURNAL_FIELDS
    assert msg2 == "plain" and f2["PRIORITY"] == "6" and not set(logs.FIELDS) & set(f2)
    assert msg3.startswith("failed\nTraceback") and "ValueError: boom" in f3["EXCEPTION_TEXT"]
    assert f3["PRIORITY"] == "3"
