"""Reloads from every side at once, on a real daemon: SIGHUPs, control
socket and ``replicatorctl reload`` requests, while the config adds and
removes peers and another client reads the status as fast as it can. The
daemon stays up, answers every request, logs no traceback, and ends with
exactly one link per peer (each link holds one connection to the backlog
database: counted in /proc, a link nobody knows of would show there)."""

from __future__ import annotations

import os
import random
import signal
import threading
from typing import Any

from replicator.control import request
from replicator.localcluster import LocalCluster, LocalNode, wait_for

from ..helpers import wait_same
from .test_ctl import ctl

RECEIVERS = ("b", "c", "d")
#: SIGHUPs sent, each with a new config (the other clients reload meanwhile)...
ROUNDS = 25
#: ...at least; and replicatorctl reloads done (20 times more by socket).
CTL_RELOADS = 5


def _write_atomic(node: LocalNode) -> None:
    tmp = node.config_path.with_name("replicator.toml.tmp")
    tmp.write_text(node.render_config())
    os.replace(tmp, node.config_path)


def _configure(
    a: LocalNode,
    peers: dict[str, dict[str, str]],
    m1: list[str],
    m2: list[str],
    rng: random.Random | None = None,
) -> None:
    """a's peers (those pushed to, and with ``rng`` maybe more) and its
    mirrors' targets, written atomically."""
    wanted = set(m1) | set(m2)
    a.peers = {p: v for p, v in peers.items() if p in wanted or (rng and rng.random() < 0.5)}
    a.mirrors["m1"]["push_to"] = sorted(m1)
    a.mirrors["m2"]["push_to"] = sorted(m2)
    _write_atomic(a)


def _backlog_connections(node: LocalNode) -> int:
    """Open descriptors of the daemon on its backlog database: one per link."""
    assert node.proc is not None
    fd_dir = f"/proc/{node.proc.pid}/fd"
    n = 0
    for fd in os.listdir(fd_dir):
        try:
            n += os.readlink(f"{fd_dir}/{fd}").endswith("/backlog.sqlite3")
        except OSError:
            continue
    return n


def _sessions_from(node: LocalNode, peer: str) -> int:
    return sum(1 for s in node.status()["sessions"] if s["peer"] == peer)


def test_concurrent_reloads_and_status(cluster: LocalCluster) -> None:
    rng = random.Random(8)
    a = cluster.node("a")
    for r in RECEIVERS:
        cluster.node(r)
        cluster.connect("a", r)
    for r in RECEIVERS:
        node = cluster.nodes[r]
        node.add_mirror("m1", accept_from=["a"])
        node.add_mirror("m2", accept_from=["a"])
    src1 = a.add_mirror("m1", push_to=["b"])
    src2 = a.add_mirror("m2", push_to=["c"])
    (src1 / "f1").write_text("one")
    (src2 / "f2").write_text("two")
    all_peers = dict(a.peers)
    cluster.start()

    stop = threading.Event()
    failures: list[str] = []
    counts = {"status": 0, "reload": 0, "ctl": 0}
    lock = threading.Lock()

    def record(kind: str, problem: str | None) -> None:
        with lock:
            counts[kind] += 1
            if problem:
                failures.append(f"{kind}: {problem}")

    def poll_status() -> None:
        while not stop.is_set():
            try:
                reply = request(a.control_socket, {"cmd": "status"}, timeout=60)
                record("status", None if reply.get("ok") else str(reply))
            except Exception as e:
                record("status", repr(e))

    def reload_by_socket() -> None:
        while not stop.is_set():
            try:
                reply = request(a.control_socket, {"cmd": "reload"}, timeout=60)
                record("reload", None if reply.get("ok") else str(reply))
            except Exception as e:
                record("reload", repr(e))

    def reload_by_ctl() -> None:
        while not stop.is_set():
            r = ctl(a, "reload")
            record("ctl", None if r.returncode == 0 else f"exit {r.returncode}: {r.stderr}")

    threads = [
        threading.Thread(target=f, name=f.__name__)
        for f in (poll_status, poll_status, reload_by_socket, reload_by_socket, reload_by_ctl)
    ]
    for t in threads:
        t.start()
    try:
        rounds = 0
        # (and on until every kind of client had its share)
        while rounds < ROUNDS or min(counts["ctl"], counts["reload"] // 20) < CTL_RELOADS:
            rounds += 1
            m1 = [p for p in RECEIVERS if rng.random() < 0.5]
            m2 = [p for p in RECEIVERS if rng.random() < 0.5]
            _configure(a, all_peers, m1, m2, rng)
            before = a.status()["reloads"]
            a.signal(signal.SIGHUP)
            wait_for(lambda b=before: a.status()["reloads"] > b, 60, "the SIGHUP reload")
            assert a.proc is not None and a.proc.poll() is None, a.log_tail()
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not failures, "\n".join(failures[:10])
    assert min(counts.values()) > 0, counts

    # No link at all: no link may be left behind, to any receiver.
    _configure(a, all_peers, [], [])
    assert ctl(a, "reload").returncode == 0
    assert a.status()["links"] == {}
    wait_for(lambda: _backlog_connections(a) == 0, 30, "every link's backlog connection closed")
    for r in RECEIVERS:
        wait_for(lambda r=r: _sessions_from(cluster.nodes[r], "a") == 0, 30, f"{r} to see no a")

    # Then one link per receiver, each working.
    _configure(a, all_peers, ["b", "d"], ["c"])
    assert ctl(a, "reload").returncode == 0
    wait_for(a.links_connected, 30, "a's links to connect")
    st: dict[str, Any] = a.status()
    assert sorted(st["links"]) == ["b", "c", "d"]
    assert _backlog_connections(a) == 3
    for r in RECEIVERS:
        wait_for(lambda r=r: _sessions_from(cluster.nodes[r], "a") == 1, 30, f"one session on {r}")
    (src1 / "after").write_text("after the storm")
    (src2 / "after").write_text("after the storm")
    for r, name, src in (("b", "m1", src1), ("d", "m1", src1), ("c", "m2", src2)):
        wait_same(src, cluster.nodes[r].mirror_path(name))
    assert _backlog_connections(a) == 3
    assert a.proc is not None and a.proc.poll() is None
    log = a.log_path.read_text()
    assert "Traceback" not in log and "internal error" not in log, a.log_tail(60)
