"""Real daemons over IPv6 loopback (::1): replication, and the addresses as
status, replicatorctl and the metrics show them. (In network namespaces with
unique-local addresses, and a dual-stack listener: system/test_netns_cluster.py.)"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator

import pytest

from replicator.localcluster import LocalCluster, free_port, wait_for

from ..helpers import MiB, fill, ipv6_missing, wait_same
from .test_ctl import ctl, status_json


@pytest.fixture(autouse=True)
def _ipv6() -> Iterator[None]:
    reason = ipv6_missing("lo")
    if reason:
        pytest.skip(reason)
    yield


def test_a_pair_replicates_over_ipv6_loopback(cluster: LocalCluster) -> None:
    a, b = cluster.node("a", host="::1"), cluster.node("b", host="::1")
    cluster.connect("a", "b")
    src = a.add_mirror("m", push_to=["b"])
    dst = b.add_mirror("m", accept_from=["a"])
    metrics = free_port("::1")
    a.node_extra["metrics_listen"] = f"[::1]:{metrics}"
    cluster.start()
    fill(src / "big", 6 * MiB)
    for i in range(20):
        (src / f"small{i}").write_bytes(os.urandom(1000 + i))
    (src / "d").mkdir()
    (src / "d" / "inner").write_text("inner")
    wait_same(src, dst)
    (src / "small0").rename(src / "d" / "moved")
    (src / "small1").unlink()
    wait_same(src, dst)

    code, st = status_json(a)
    assert code == 0, st["health"]
    assert a.address == f"[::1]:{a.port}" and st["listen"] == a.address
    ln = st["links"]["b"]
    assert ln["address"] == f"[::1]:{b.port}" and ln["state"] == "connected"
    assert ln["files_sent"] == 22 and ln["connects"] == 1
    _, sb = status_json(b)
    (sess,) = sb["sessions"]
    host, _, port = sess["address"].rpartition(":")
    assert sess["peer"] == "a" and host == "[::1]" and port.isdigit()
    assert sess["files_received"] == 22

    text = ctl(a, "status").stdout
    assert f"listening on [::1]:{a.port};" in text
    assert f"→ b ([::1]:{b.port}): connected" in text
    assert f"← a ({sess['address']}): connected" in ctl(b, "status").stdout
    row = next(r.split() for r in ctl(a, "peers").stdout.splitlines() if r.startswith("b "))
    assert row[:4] == ["b", "out", "connected", f"[::1]:{b.port}"]

    pytest.importorskip("prometheus_client")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://[::1]:{metrics}/metrics", timeout=5) as r:
            return str(r.read().decode())

    wait_for(lambda: 'replicator_link_up{node="a",peer="b"} 1.0' in scrape(), 10, "metrics")
    assert 'replicator_link_files_sent_total{node="a",peer="b"} 22.0' in scrape()
    assert "metrics on http://[::1]:" in a.log_path.read_text()


def test_one_node_on_ipv4_the_other_on_ipv6(cluster: LocalCluster) -> None:
    """a listens on 127.0.0.1, b on ::1; each pushes a mirror to the other."""
    a, b = cluster.node("a"), cluster.node("b", host="::1")
    cluster.connect("a", "b")
    src_ab, dst_ab = a.add_mirror("ab", push_to=["b"]), b.add_mirror("ab", accept_from=["a"])
    src_ba, dst_ba = b.add_mirror("ba", push_to=["a"]), a.add_mirror("ba", accept_from=["b"])
    cluster.start()
    (src_ab / "to-b").write_text("over IPv6")
    (src_ba / "to-a").write_text("over IPv4")
    wait_same(src_ab, dst_ab)
    wait_same(src_ba, dst_ba)
    assert a.link("b")["address"] == f"[::1]:{b.port}"
    assert b.link("a")["address"] == f"127.0.0.1:{a.port}"
    addresses = {s["peer"]: s["address"] for s in b.status()["sessions"]}
    assert addresses["a"].startswith("[::1]:")
    addresses = {s["peer"]: s["address"] for s in a.status()["sessions"]}
    assert addresses["b"].startswith("127.0.0.1:")
