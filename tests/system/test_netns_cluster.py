"""Three storage nodes on their own network (namespaces on a bridge, in
198.18.0.0/15, and over IPv6 with unique-local addresses): fan-out across
real interfaces, one node's cable cut and put back; a dual-stack listener."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from replicator.localcluster import LocalCluster, wait_for
from replicator.net import format_address

from ..helpers import MiB, fill, ipv6_missing, wait_same
from . import netns as _netns

pytestmark = pytest.mark.netns


def _lan(ipv6: bool) -> Iterator[_netns.Lan]:
    if not _netns.available():
        pytest.skip("needs root and ip netns")
    reason = ipv6_missing() if ipv6 else None
    if reason:
        pytest.skip(reason)
    net = _netns.Lan(3, ipv6=ipv6)
    try:
        yield net
    finally:
        net.close()


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def lan(family: int) -> Iterator[_netns.Lan]:
    yield from _lan(ipv6=family == 6)


@pytest.fixture
def dual_lan() -> Iterator[_netns.Lan]:
    yield from _lan(ipv6=True)


def test_fan_out_over_a_lan_with_a_cable_cut(
    cluster: LocalCluster, lan: _netns.Lan, family: int
) -> None:
    nodes = []
    for i, name in enumerate("abc"):
        ns, _, _ = lan.hosts[i]
        addr = lan.address(i, family)
        nodes.append(
            cluster.node(name, host=addr, netns=ns, port=7301 + i, node_extra={"dead_after": 3.0})
        )
    a, b, c = nodes
    cluster.connect("a", "b")
    cluster.connect("a", "c")
    src = a.add_mirror("m", push_to=["b", "c"])
    dst_b = b.add_mirror("m", accept_from=["a"])
    dst_c = c.add_mirror("m", accept_from=["a"])
    fill(src / "f1", 4 * MiB)
    cluster.start()
    wait_same(src, dst_b)
    wait_same(src, dst_c)
    assert a.link("c")["address"] == format_address(lan.address(2, family), 7303)
    (sess,) = c.status()["sessions"]
    a_host = lan.address(0, family)
    assert sess["address"].rpartition(":")[0] == (f"[{a_host}]" if family == 6 else a_host)
    lan.cut(2)  # c's cable
    # the heartbeat notices the dead peer within a few seconds
    wait_for(lambda: a.link("c")["state"] != "connected", 20, "a to notice c is unreachable")
    for i in range(20):
        (src / f"during-cut-{i}").write_bytes(os.urandom(4096))
    wait_same(src, dst_b)  # b is not held back
    lan.restore(2)
    wait_same(src, dst_c, timeout=90)
    assert a.link("c")["connects"] >= 2


def test_a_dual_stack_listener_takes_ipv4_and_ipv6_peers(
    cluster: LocalCluster, dual_lan: _netns.Lan
) -> None:
    """b listens on [::]:7302 in its namespace: a reaches it over IPv6, c over
    IPv4, and b shows each by the address it came from (c as IPv4, not as
    ::ffff:198.19...)."""
    lan = dual_lan
    a = cluster.node("a", host=lan.address(0, 6), netns=lan.hosts[0][0], port=7301)
    b = cluster.node("b", host="::", netns=lan.hosts[1][0], port=7302)
    c = cluster.node("c", host=lan.address(2, 4), netns=lan.hosts[2][0], port=7303)
    cluster.connect("a", "b")
    cluster.connect("c", "b")
    a.peers["b"]["address"] = f"[{lan.address(1, 6)}]:7302"
    c.peers["b"]["address"] = f"{lan.address(1, 4)}:7302"
    src_a, src_c = a.add_mirror("from-a", push_to=["b"]), c.add_mirror("from-c", push_to=["b"])
    dst_a = b.add_mirror("from-a", accept_from=["a"])
    dst_c = b.add_mirror("from-c", accept_from=["c"])
    fill(src_a / "f", 2 * MiB)
    fill(src_c / "f", 2 * MiB)
    cluster.start()
    wait_same(src_a, dst_a)
    wait_same(src_c, dst_c)
    st = b.status()
    assert st["listen"] == "[::]:7302"
    came_from = {s["peer"]: s["address"].rpartition(":")[0] for s in st["sessions"]}
    assert came_from == {"a": f"[{lan.address(0, 6)}]", "c": lan.address(2, 4)}
    assert a.link("b")["address"] == f"[{lan.address(1, 6)}]:7302"
