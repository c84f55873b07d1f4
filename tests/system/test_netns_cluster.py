"""Three storage nodes on their own network (namespaces on a bridge, in
198.18.0.0/15): fan-out across real interfaces, one node's cable cut and
put back."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from replicator.localcluster import LocalCluster, wait_for

from ..helpers import MiB, fill, wait_same
from . import netns as _netns

pytestmark = pytest.mark.netns


@pytest.fixture
def lan() -> Iterator[_netns.Lan]:
    if not _netns.available():
        pytest.skip("needs root and ip netns")
    net = _netns.Lan(3)
    try:
        yield net
    finally:
        net.close()


def test_fan_out_over_a_lan_with_a_cable_cut(cluster: LocalCluster, lan: _netns.Lan) -> None:
    nodes = []
    for i, name in enumerate("abc"):
        ns, _, addr = lan.hosts[i]
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
    assert a.link("c")["address"].startswith("198.19.")
    lan.cut(2)  # c's cable
    # the heartbeat notices the dead peer within a few seconds
    wait_for(lambda: a.link("c")["state"] != "connected", 20, "a to notice c is unreachable")
    for i in range(20):
        (src / f"during-cut-{i}").write_bytes(os.urandom(4096))
    wait_same(src, dst_b)  # b is not held back
    lan.restore(2)
    wait_same(src, dst_c, timeout=90)
    assert a.link("c")["connects"] >= 2
