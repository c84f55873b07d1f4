"""A peer's bwlimit on real daemons: applied to the link's socket (the value
the daemon reads back with getsockopt is in status), changed by a reload on
the live connection (it is not reconnected), shown by replicatorctl and the
metrics; a big file under a low limit keeps its connection. (The measured
throughput with and without a limit: bench/bwlimit.py.)"""

from __future__ import annotations

import importlib.util
import signal
import urllib.request

from replicator.localcluster import LocalCluster, LocalNode, free_port, wait_for

from ..helpers import MiB, fill, make_pair, wait_same
from .test_ctl import ctl


def applied(node: LocalNode, rate: int) -> bool:
    return node.link("b")["bwlimit_applied"] == rate


def scraped(port: int | None, rate: int) -> bool:
    """The metrics show ``rate`` as the limit and as applied (True without
    prometheus_client)."""
    if port is None:
        return True
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    values = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    return all(
        float(values[f'replicator_link_{name}_bytes_per_second{{node="a",peer="b"}}']) == rate
        for name in ("bwlimit", "bwlimit_applied")
    )


def test_a_reload_changes_the_bwlimit_on_the_live_connection(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    a.peers["b"]["bwlimit"] = "8MiB"
    metrics = free_port() if importlib.util.find_spec("prometheus_client") else None
    if metrics is not None:
        a.node_extra["metrics_listen"] = f"127.0.0.1:{metrics}"
    cluster.start()
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    wait_for(lambda: applied(a, 8 * MiB), 10, "the limit on the socket")
    assert scraped(metrics, 8 * MiB)
    ln = a.link("b")
    assert ln["bwlimit"] == 8 * MiB and ln["connects"] == 1
    assert "→ b (" in (text := ctl(a, "status").stdout) and ", bwlimit 8.0 MiB/s" in text
    fill(src / "f1", 2 * MiB)
    wait_same(src, dst)

    # a reload changing only the limit: applied to the live socket
    a.peers["b"]["bwlimit"] = "2MiB"
    a.write_config()
    r = ctl(a, "reload")
    assert r.returncode == 0 and "bwlimit changed (applied live): b" in r.stdout, r.stderr
    wait_for(lambda: applied(a, 2 * MiB), 10, "the new limit on the socket")
    assert scraped(metrics, 2 * MiB)
    ln = a.link("b")
    assert ln["bwlimit"] == 2 * MiB and ln["connects"] == 1 and ln["state"] == "connected"
    assert ", bwlimit 2.0 MiB/s" in ctl(a, "status").stdout
    assert "bwlimit 2.0 MiB/s (was 8.0 MiB/s); the connection reports 2.0 MiB/s" in (
        a.log_path.read_text()
    )
    fill(src / "f2", MiB)
    wait_same(src, dst)
    assert a.link("b")["connects"] == 1

    # the next connection gets the new limit too
    b.stop()
    wait_for(lambda: a.link("b")["bwlimit_applied"] is None, 30, "the link to go down")
    b.start()
    wait_for(lambda: a.link("b")["connects"] == 2 and applied(a, 2 * MiB), 30, "reconnected")

    # no limit again (the key removed): the socket has no cap, still no reconnect
    del a.peers["b"]["bwlimit"]
    a.write_config()
    a.signal(signal.SIGHUP)
    wait_for(lambda: applied(a, 0), 10, "the socket without a cap")
    ln = a.link("b")
    assert ln["bwlimit"] == 0 and ln["connects"] == 2
    assert "bwlimit" not in ctl(a, "status").stdout.split("Outbound links")[1]
    assert scraped(metrics, 0)


def test_a_big_file_under_a_low_limit_keeps_its_connection(cluster: LocalCluster) -> None:
    """8 MiB at 1 MiB/s: longer than dead_after (6 s). The peer says nothing
    until the file ends, so only the heartbeat between chunks (half a second
    each at this limit) shows the link it is alive."""
    a, b = make_pair(cluster)
    a.peers["b"]["bwlimit"] = "1MiB"
    cluster.start()
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    fill(src / "big", 8 * MiB)
    wait_for(lambda: a.link("b")["current"], 30, "the file to be sent")
    wait_same(src, dst, timeout=120)
    ln = a.link("b")
    assert ln["connects"] == 1, ln["last_error"]
    assert ln["files_sent"] == 1 and ln["resumed_files"] == 0
