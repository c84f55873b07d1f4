"""A real replicatord under a test-owned NOTIFY_SOCKET: READY once listening and
scanned, STATUS, WATCHDOG while healthy, RELOADING…READY on SIGHUP, STOPPING
on SIGTERM — in that order, with and without systemd-python."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from replicator import sdnotify
from replicator.localcluster import LocalCluster, wait_for

from ..helpers import make_pair


class Listener:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return self.messages

    def seen(self, prefix: str) -> bool:
        return any(m.startswith(prefix) or f"\n{prefix}" in m for m in self.drain())

    def index(self, prefix: str, after: int = -1) -> int:
        for i, m in enumerate(self.drain()):
            if i > after and (m.startswith(prefix) or f"\n{prefix}" in m):
                return i
        raise AssertionError(f"no {prefix!r} after #{after} in {self.messages}")


@pytest.mark.parametrize("backend", ["libsystemd", "builtin"])
def test_notify_sequence(cluster: LocalCluster, tmp_path: Path, backend: str) -> None:
    if backend == "libsystemd":
        pytest.importorskip("systemd.daemon")
    lst = Listener(tmp_path / "notify.sock")
    a, _ = make_pair(cluster)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"}
    if backend == "builtin":
        env[sdnotify.FORCE_ENV] = "builtin"
    cluster.nodes["b"].start()
    a.start(extra_env=env)
    wait_for(lambda: lst.seen("READY=1"), 30, "READY=1")
    ready = lst.index("READY=1")
    assert "links up" in lst.messages[ready]  # READY carries the summary as STATUS
    wait_for(lambda: lst.seen("WATCHDOG=1"), 30, "WATCHDOG=1")
    wait_for(
        lambda: any(m.startswith("STATUS=") for m in lst.drain()[ready + 1 :]),
        30,
        "a STATUS= refresh",
    )
    a.signal(signal.SIGHUP)
    wait_for(lambda: lst.seen("RELOADING=1"), 30, "RELOADING=1")
    reloading = lst.index("RELOADING=1")
    wait_for(
        lambda: any("READY=1" in m for m in lst.drain()[reloading + 1 :]),
        30,
        "READY=1 after the reload",
    )
    assert "MONOTONIC_USEC=" in lst.messages[reloading]
    assert a.stop() == 0
    stopping = lst.index("STOPPING=1")
    assert ready < reloading < stopping
    lst.sock.close()
