"""Reloading the [node] section on real daemons: the listen and metrics
addresses are rebound (new socket first, the old one closed after), timings
reach the live links and sessions, and what cannot change live (the node's
name, its state_dir) or cannot be bound (an address in use) refuses the
whole reload, naming it, with everything left as it was.

The semantics tested: when b moves its listener, the session a opened
before stays up (an accepted connection is not the listener's) and a keeps
replicating over it; a moves to b's new address when a's own config says
so (its reload restarts the link, which connects there; b then closes the
previous session as the newest one wins)."""

from __future__ import annotations

import importlib.util
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from replicator.localcluster import LocalCluster, LocalNode, free_port, wait_for

from ..helpers import fill, make_pair, wait_same
from .test_ctl import ctl


def _sessions_from(node: LocalNode, peer: str) -> list[tuple[str, float]]:
    """The sessions ``peer`` holds on ``node``: its address and when it began."""
    return [(s["address"], s["since"]) for s in node.status()["sessions"] if s["peer"] == peer]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


def _replicates(a: LocalNode, b: LocalNode, name: str) -> None:
    """A new file on a arrives on b."""
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    fill(src / name, 100_000)
    wait_same(src, dst)


def _reload(node: LocalNode) -> Any:
    node.write_config()
    return ctl(node, "reload")


def _held_port() -> socket.socket:
    """A port some other process listens on (here: this test)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_a_new_listen_address_is_rebound_and_sessions_stay(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    _replicates(a, b, "f1")
    before = _sessions_from(b, "a")
    assert len(before) == 1 and a.link("b")["connects"] == 1

    old_port = b.port
    b.port = free_port()
    r = _reload(b)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "node settings applied live: listen" in r.stdout
    assert b.status()["listen"] == b.address
    assert not _accepts(old_port)
    assert _accepts(b.port)
    # The session a opened before goes on, and a replicates over it.
    _replicates(a, b, "f2")
    assert _sessions_from(b, "a") == before
    assert a.link("b")["connects"] == 1

    # a is told the new address: its link restarts and connects there.
    a.peers["b"]["address"] = b.address
    r = _reload(a)
    assert r.returncode == 0 and "links restarted: b" in r.stdout, r.stdout + r.stderr
    wait_for(
        lambda: a.link("b")["state"] == "connected" and a.link("b")["address"] == b.address,
        30,
        "a's link to connect to b's new address",
    )
    wait_for(
        lambda: len(now := _sessions_from(b, "a")) == 1 and now != before,
        30,
        "b to hold only a's new session",
    )
    _replicates(a, b, "f3")


def test_a_listen_address_in_use_refuses_the_whole_reload(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    old = b.address
    before = _sessions_from(b, "a")
    reloads = b.status()["reloads"]
    held = _held_port()
    try:
        b.port = held.getsockname()[1]
        b.node_extra["dead_after"] = 3.0  # would apply live, but not in a refused reload
        b.add_mirror("extra", accept_from=["a"])
        r = _reload(b)
        assert r.returncode != 0
        out = r.stdout + r.stderr
        assert f"node.listen: cannot listen on {b.address}" in out and "EADDRINUSE" in out, out
        assert f"still listening on {old}" in out
        st = b.status()
        assert st["listen"] == old and st["reloads"] == reloads
        assert "extra" not in st["mirrors"]
        assert "applied live" not in b.log_path.read_text()
        assert _accepts(int(old.rsplit(":", 1)[1]))
        _replicates(a, b, "f1")
        assert _sessions_from(b, "a") == before and a.link("b")["connects"] == 1
    finally:
        held.close()


def test_name_and_state_dir_need_a_restart(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    old, reloads = b.address, b.status()["reloads"]
    b.name = "b2"
    b.port = free_port()  # would be rebound, but not in a refused reload
    state = f'state_dir = "{b.dir / "state"}"'
    text = b.render_config()
    assert state in text
    b.config_path.write_text(text.replace(state, f'state_dir = "{b.dir / "elsewhere"}"'))
    r = ctl(b, "reload")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    for field in ("node.name changed", "node.state_dir changed"):
        assert field in out, out
    assert out.count("restart the daemon (systemctl restart replicatord)") == 2
    st = b.status()
    assert (st["node"], st["listen"], st["reloads"]) == ("b", old, reloads)
    assert not _accepts(b.port)
    _replicates(a, b, "f1")


def test_timings_reach_the_live_link_and_session(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    before = _sessions_from(b, "a")
    timings = {
        "heartbeat_interval": 0.5,
        "dead_after": 4.0,
        "backoff_initial": 0.5,
        "backoff_max": 5.0,
    }
    a.node_extra.update(timings)
    b.node_extra.update(timings)
    for node in (a, b):
        r = _reload(node)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "applied live: heartbeat_interval, dead_after, backoff_initial, backoff_max" in (
            r.stdout
        )
    assert "new timings applied (heartbeat 0.5 s, dead after 4 s, backoff 0.5-5 s" in (
        a.log_path.read_text()
    )
    _replicates(a, b, "f1")
    assert _sessions_from(b, "a") == before and a.link("b")["connects"] == 1

    # The live session judges the peer by the new dead_after: with a now
    # pinging less often than b waits, b drops the session a opened before.
    # b first: until a's reload, a pings every 0.5 s, and b still waits 4 s.
    b.node_extra["dead_after"] = 1.0
    a.node_extra["heartbeat_interval"] = 30.0
    a.node_extra["dead_after"] = 60.0
    for node in (b, a):
        assert _reload(node).returncode == 0
    wait_for(
        lambda: "no frame from the peer for 1 s" in b.log_path.read_text(),
        30,
        "b to drop the silent session",
    )
    wait_for(lambda: before[0] not in _sessions_from(b, "a"), 30, "the old session gone")
    # The session a opened before went by the new dead_after, not the old
    # one (a session opened after the reload gets it anyway).
    assert "no frame from the peer for 4 s" not in b.log_path.read_text()


def _serves_metrics(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return b"replicator_" in resp.read()
    except urllib.error.URLError as e:
        if isinstance(e.reason, ConnectionRefusedError):
            return False
        raise


@pytest.mark.skipif(
    importlib.util.find_spec("prometheus_client") is None, reason="needs prometheus_client"
)
def test_the_metrics_address_is_rebound(cluster: LocalCluster) -> None:
    a, _ = make_pair(cluster)
    first = free_port()
    a.node_extra["metrics_listen"] = f"127.0.0.1:{first}"
    cluster.start()
    assert _serves_metrics(first)
    assert a.status()["metrics_listen"] == f"127.0.0.1:{first}"

    second = free_port()
    a.node_extra["metrics_listen"] = f"127.0.0.1:{second}"
    r = _reload(a)
    assert r.returncode == 0 and "applied live: metrics_listen" in r.stdout, r.stdout + r.stderr
    assert _serves_metrics(second) and not _serves_metrics(first)
    assert a.status()["metrics_listen"] == f"127.0.0.1:{second}"
    assert f"; metrics on 127.0.0.1:{second};" in ctl(a, "status").stdout

    # An address in use: refused, the endpoint stays where it was.
    held = _held_port()
    try:
        taken = held.getsockname()[1]
        a.node_extra["metrics_listen"] = f"127.0.0.1:{taken}"
        r = _reload(a)
        out = r.stdout + r.stderr
        assert r.returncode != 0
        assert f"node.metrics_listen: cannot listen on 127.0.0.1:{taken}" in out, out
        assert f"metrics still on 127.0.0.1:{second}" in out
        assert _serves_metrics(second)
        assert a.status()["metrics_listen"] == f"127.0.0.1:{second}"
    finally:
        held.close()

    # No endpoint any more.
    del a.node_extra["metrics_listen"]
    assert _reload(a).returncode == 0
    assert not _serves_metrics(second)
    assert a.status()["metrics_listen"] is None
    assert a.link("b")["connects"] == 1


def test_metrics_address_in_use_at_start_is_named(cluster: LocalCluster) -> None:
    """A metrics address that cannot be bound stops the start with an error
    naming node.metrics_listen and the address (exit 2), before any link or
    listener thread runs."""
    a, _b = make_pair(cluster)
    held = _held_port()
    try:
        address = f"127.0.0.1:{held.getsockname()[1]}"
        a.node_extra["metrics_listen"] = address
        a.start(wait=False)
        assert a.proc is not None
        assert a.proc.wait(timeout=60) == 2, a.log_tail()
        out = a.log_tail()
        assert f"node.metrics_listen: cannot listen on {address}" in out, out
        assert "EADDRINUSE" in out, out
    finally:
        held.close()
