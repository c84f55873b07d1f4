"""What a reload does with a new [node] section, without a daemon: which
fields apply live and which are refused (and how the refusal reads), the
new addresses bound before anything switches (in-process loopback sockets),
the listener's accept loop handed over to a new socket, the backoff's new
bounds."""

from __future__ import annotations

import errno
import socket
import threading
from typing import cast

import pytest

from replicator import net, nodereload
from replicator.config import NodeConfig
from replicator.errors import ConfigError
from replicator.listener import Listener
from replicator.localcluster import free_port, wait_for
from replicator.nodereload import LIVE, RESTART_ONLY, TIMING, Fresh, NodeChanges, plan, refusal
from replicator.session import Session
from replicator.wire import Backoff

BASE = NodeConfig(name="b", listen="127.0.0.1:7302")


def test_every_node_field_is_decided_once() -> None:
    # A new NodeConfig field must be put in one of the tables.
    assert sorted(NodeConfig.model_fields) == sorted([*LIVE, *RESTART_ONLY])
    assert not set(LIVE) & set(RESTART_ONLY)
    assert set(TIMING) <= set(LIVE)


def test_nothing_changed() -> None:
    assert plan(BASE, BASE) == NodeChanges((), ())
    assert refusal(plan(BASE, BASE), "r.toml") is None


def test_addresses_and_timings_apply_live() -> None:
    new = BASE.model_copy(
        update={
            "listen": "127.0.0.1:7399",
            "metrics_listen": "127.0.0.1:9100",
            "dead_after": 3.0,
            "heartbeat_interval": 0.5,
            "backoff_initial": 1.0,
            "backoff_max": 10.0,
            "inline_max": 0,
            "verify_rate": 8.0,
            "partial_max_age": 60.0,
        }
    )
    changes = plan(BASE, new)
    assert changes.refused == ()
    assert changes.live == (
        "listen",
        "heartbeat_interval",
        "dead_after",
        "backoff_initial",
        "backoff_max",
        "inline_max",
        "verify_rate",
        "metrics_listen",
        "partial_max_age",
    )
    assert changes.retime
    assert refusal(changes, "r.toml") is None


@pytest.mark.parametrize(
    ("field", "live", "retime"),
    [
        ("listen", ("listen",), False),
        ("metrics_listen", ("metrics_listen",), False),
        ("partial_max_age", ("partial_max_age",), False),
        ("verify_rate", ("verify_rate",), True),
        ("dead_after", ("dead_after",), True),
    ],
)
def test_which_changes_reach_links(field: str, live: tuple[str, ...], retime: bool) -> None:
    value = {
        "listen": "127.0.0.1:7399",
        "metrics_listen": "127.0.0.1:9100",
        "partial_max_age": 60.0,
        "verify_rate": 8.0,
        "dead_after": 3.0,
    }[field]
    changes = plan(BASE, BASE.model_copy(update={field: value}))
    assert (changes.live, changes.retime) == (live, retime)


def test_identity_and_held_places_are_refused_by_name() -> None:
    new = BASE.model_copy(
        update={"name": "b2", "state_dir": "/srv/state", "dead_after": 3.0, "control_socket": "/x"}
    )
    changes = plan(BASE, new)
    assert changes.refused == ("name", "state_dir", "control_socket")
    assert changes.live == ("dead_after",)
    msg = refusal(changes, "/etc/r.toml")
    assert msg is not None
    lines = msg.splitlines()
    assert len(lines) == 3
    for line, field in zip(lines, changes.refused, strict=True):
        assert line.startswith(f"/etc/r.toml: node.{field} changed: ")
        assert line.endswith("restart the daemon (systemctl restart replicatord)")
    assert "identity" in lines[0]


def _held() -> tuple[socket.socket, str]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, f"127.0.0.1:{s.getsockname()[1]}"


def test_a_listen_address_in_use_is_refused_naming_it() -> None:
    held, address = _held()
    try:
        new = BASE.model_copy(update={"listen": address})
        with pytest.raises(ConfigError) as e:
            Fresh.open(plan(BASE, new), BASE, new, dict)
    finally:
        held.close()
    msg = str(e.value)
    assert msg.startswith(f"node.listen: cannot listen on {address}: ")
    assert errno.errorcode[errno.EADDRINUSE] in msg
    assert msg.endswith(f"; still listening on {BASE.listen}")


def test_a_failed_metrics_bind_closes_the_new_listener() -> None:
    pytest.importorskip("prometheus_client")
    held, metrics_address = _held()
    port = free_port()
    listen = f"127.0.0.1:{port}"
    new = BASE.model_copy(update={"listen": listen, "metrics_listen": metrics_address})
    try:
        refused = f"node.metrics_listen: cannot listen on {metrics_address}"
        with pytest.raises(ConfigError, match=refused):
            Fresh.open(plan(BASE, new), BASE, new, dict)
    finally:
        held.close()
    # The new listening socket was closed again: its port can be bound.
    again = Fresh.open(plan(BASE, new.model_copy(update={"metrics_listen": None})), BASE, new, dict)
    assert again.listen is not None and again.listen.getsockname()[1] == port
    again.close()
    assert again.listen is None


def test_fresh_binds_only_what_changed() -> None:
    new = BASE.model_copy(update={"dead_after": 2.0})
    fresh = Fresh.open(plan(BASE, new), BASE, new, dict)
    assert (fresh.listen, fresh.metrics_changed, fresh.metrics) == (None, False, None)
    # metrics_listen removed: changed, and no new server.
    old = BASE.model_copy(update={"metrics_listen": "127.0.0.1:9100"})
    fresh = Fresh.open(plan(old, BASE), old, BASE, dict)
    assert (fresh.listen, fresh.metrics_changed, fresh.metrics) == (None, True, None)


def test_backoff_takes_new_bounds() -> None:
    b = Backoff(0.2, 30.0)
    for _ in range(10):
        b.next()
    assert b.current == 30.0
    b.retime(1.0, 5.0)
    assert b.current == 5.0 and 0.8 * 5.0 <= b.next() <= 1.2 * 5.0
    b.retime(10.0, 60.0)
    assert b.current == 10.0
    b.reset()
    assert b.current == 10.0


def test_bind_error_hints() -> None:
    e = nodereload.bind_error("listen", "10.9.9.9:1", OSError(errno.EADDRNOTAVAIL, "nope"))
    assert "EADDRNOTAVAIL" in str(e) and "no interface of this host" in str(e)


class _Accepted:
    """Stands in for a Session: records where it came from and hangs up."""

    peer = ""
    introduced = False

    def __init__(self, sock: socket.socket, where: str, got: list[str]) -> None:
        self.sock, self.where, self._got = sock, where, got

    def run(self) -> None:
        self._got.append(self.where)
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def shutdown(self) -> None:
        pass


def test_the_listener_moves_its_accept_loop_to_a_new_socket() -> None:
    got: list[str] = []
    stopping = threading.Event()
    first = f"127.0.0.1:{free_port()}"
    listener = Listener(
        first,
        lambda sock, where: cast(Session, _Accepted(sock, where, got)),
        stopping,
    )
    listener.start()
    try:
        c1 = socket.create_connection(net.parse_address(first))
        wait_for(lambda: len(got) == 1, 10, "the first connection accepted")
        second = f"127.0.0.1:{free_port()}"
        listener.rebind(net.listen_socket(second, 16), second)
        assert listener.address == second
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(net.parse_address(first))
        c2 = socket.create_connection(net.parse_address(second))
        wait_for(lambda: len(got) == 2, 10, "a connection to the new socket accepted")
        assert listener.alive() and listener.dead() == []
        # The old socket closed under the loop is not an accept error.
        assert listener.status()["accept_errors"] == 0
        c1.close()
        c2.close()
    finally:
        stopping.set()
        listener.close()
