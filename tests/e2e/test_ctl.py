"""replicatorctl and the control socket, against real daemons."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from replicator.localcluster import LocalCluster, LocalNode, free_port, wait_for

from ..helpers import make_pair, wait_same


def ctl(node: LocalNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator.ctl", "--socket", node.control_socket, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def status_json(node: LocalNode, *extra: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = ctl(node, "status", "--json", *extra)
    return r.returncode, json.loads(r.stdout)


def test_status_json_field_by_field(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    sizes = [1, 4096, 100_000, 3 * 1024 * 1024]
    for i, n in enumerate(sizes):
        (src / f"f{i}").write_bytes(os.urandom(n))
    (src / "d").mkdir()
    wait_same(src, dst)
    wait_for(lambda: status_json(a)[1]["links"]["b"]["lag_seconds"] is None, 30, "lag to clear")
    code, st = status_json(a)
    assert code == 0 and st["health"] == {"code": 0, "problems": []}
    assert st["node"] == "a" and st["listen"] == a.address and st["pid"] == a.proc.pid  # type: ignore[union-attr]
    ln = st["links"]["b"]
    assert ln["state"] == "connected" and ln["address"] == b.address
    assert ln["files_sent"] == len(sizes)
    assert ln["payload_bytes_sent"] == sum(sizes)
    assert ln["bytes_sent"] > sum(sizes)  # frames on top of the payload
    assert ln["ops_sent"] == ln["ops_acked"] == len(sizes) + 1  # + the mkdir
    assert ln["queue_files"] == 0 and ln["queue_bytes"] == 0 and ln["in_flight"] == 0
    assert ln["lag_seconds"] is None and ln["current"] is None
    assert ln["rtt_ms"] is None or ln["rtt_ms"] > 0
    assert ln["mirrors"]["m"]["listed"] is True
    m = st["mirrors"]["m"]
    assert m["path"] == str(src) and m["push_to"] == ["b"] and m["marker_ok"] is True
    assert m["watched"] is True and m["unwatched_dirs"] == 0
    _, sb = status_json(b)
    (sess,) = sb["sessions"]
    assert sess["peer"] == "a" and sess["state"] == "connected" and sess["mirrors"] == ["m"]
    assert sess["files_received"] == len(sizes)
    assert sess["payload_bytes_received"] == sum(sizes)
    assert sess["ops_applied"] >= 1 and sess["mode"] == "splice"
    # the human view says the same
    text = ctl(a, "status").stdout
    assert "→ b (" in text and "connected" in text and "4 files" in text
    assert ln["lanes"]["live"]["files"] == ln["lanes"]["bulk"]["files"] == 0
    assert ln["in_flight_bulk"] == 0
    assert "lanes: live 0 files" in text and "bulk 0 files" in text


def test_status_shows_what_waits_in_each_lane(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    src = a.mirror_path("m")
    assert ctl(a, "pause").returncode == 0
    for i in range(3):
        (src / f"live{i}").write_bytes(b"x" * 1000)

    def live() -> dict[str, object]:
        lane: dict[str, object] = status_json(a)[1]["links"]["b"]["lanes"]["live"]
        return lane

    wait_for(lambda: live()["files"] == 3, 10, "three live changes queued")
    lane = live()
    assert lane["bytes"] == 0  # the watcher gives no size hints (scans do)
    assert isinstance(lane["oldest_age_seconds"], float) and lane["oldest_age_seconds"] >= 0
    text = ctl(a, "status").stdout
    assert "lanes: live 3 files" in text
    assert ctl(a, "resume").returncode == 0
    wait_same(src, b.mirror_path("m"))


def test_exit_codes_for_monitoring(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    assert ctl(a, "status").returncode == 0
    assert ctl(a, "pause", "--peer", "b").returncode == 0
    (a.mirror_path("m") / "waiting").write_text("w")
    wait_for(lambda: status_json(a)[1]["links"]["b"]["lag_seconds"], 10, "lag to grow")
    wait_for(lambda: status_json(a, "--max-lag", "0.2")[0] == 4, 10, "lag over the threshold")
    r = ctl(a, "status", "--max-lag", "0.2")
    assert r.returncode == 4 and "lags" in r.stderr
    assert ctl(a, "resume", "--peer", "b").returncode == 0
    wait_for(lambda: (b.mirror_path("m") / "waiting").exists(), 30, "resume")
    b.stop()
    wait_for(lambda: ctl(a, "status").returncode == 3, 30, "link down reported")
    assert "link to b is" in ctl(a, "status").stderr
    assert ctl(a, "pause", "--peer", "nobody").returncode == 1
    r = subprocess.run(
        [sys.executable, "-m", "replicator.ctl", "--socket", "/nonexistent", "status"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "is replicatord running?" in r.stderr


def test_peers_and_mirrors_tables(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    out = ctl(a, "peers").stdout
    assert out.splitlines()[0].split()[:3] == ["PEER", "DIRECTION", "STATE"]
    assert any(line.split()[:3] == ["b", "out", "connected"] for line in out.splitlines())
    wait_for(
        lambda: any(
            line.split()[:2] == ["a", "in"] for line in ctl(b, "peers").stdout.splitlines()
        ),
        10,
        "inbound row",
    )
    out = ctl(a, "mirrors").stdout
    assert "m" in out and "ok" in out


def test_reload_keeps_unchanged_links_and_refuses_invalid(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    a, b, c = cluster.node("a"), cluster.node("b"), cluster.node("c")
    cluster.connect("a", "b")
    cluster.connect("a", "c")
    a.add_mirror("m", push_to=["b"])
    b.add_mirror("m", accept_from=["a"])
    c.add_mirror("m", accept_from=["a"])
    c.add_mirror("extra", accept_from=["a"])
    cluster.start()
    wait_for(lambda: a.link("b")["state"] == "connected", 30, "link to b")
    connects_b = a.link("b")["connects"]
    # add peer c to mirror m, and a whole new mirror: via SIGHUP
    a.mirrors["m"]["push_to"] = ["b", "c"]
    a.add_mirror("extra", push_to=["c"])
    (a.mirror_path("extra") / "e").write_text("extra")
    a.write_config()
    a.signal(signal.SIGHUP)
    wait_for(lambda: "c" in a.status()["links"], 30, "the new link")
    wait_same(a.mirror_path("extra"), c.mirror_path("extra"))
    wait_same(a.mirror_path("m"), c.mirror_path("m"))
    # the link to b was rebuilt only because its mirror list changed
    # (m's push_to changed); a reload that touches nothing of b keeps it up
    wait_for(lambda: a.link("b")["state"] == "connected", 30, "b back")
    connects_b = a.link("b")["connects"]
    a.add_mirror("extra2", push_to=["c"])
    c.add_mirror("extra2", accept_from=["a"])
    c.write_config()
    assert ctl(c, "reload").returncode == 0
    a.write_config()
    r = ctl(a, "reload")
    assert r.returncode == 0 and "reloaded" in r.stdout
    assert a.link("b")["connects"] == connects_b and a.link("b")["state"] == "connected"
    # an invalid config is refused and the running one stays
    good = a.config_path.read_text()
    a.config_path.write_text(good.replace('push_to = ["b", "c"]', 'push_to = ["b", "zz"]'))
    r = ctl(a, "reload")
    assert r.returncode == 1
    assert "mirrors.m.push_to[1]: unknown peer 'zz'" in r.stderr
    assert "running config stays" in r.stderr
    a.config_path.write_text("this is [not toml")
    a.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in a.log_path.read_text(), 10, "the refusal in the log")
    st = a.status()
    assert set(st["links"]) == {"b", "c"} and st["links"]["b"]["state"] == "connected"
    (a.mirror_path("m") / "after-bad-reload").write_text("still working")
    wait_same(a.mirror_path("m"), b.mirror_path("m"))


def test_control_socket_survives_bad_clients(cluster: LocalCluster) -> None:
    a, _ = make_pair(cluster)
    cluster.start()
    assert oct(os.stat(a.control_socket).st_mode & 0o777) == "0o660"
    bad = [
        b"garbage that is not a frame",
        struct.pack("!I", 0xFFFFFFFF),
        struct.pack("!I", 5) + b"[1,2]",
        struct.pack("!I", 3) + b"{x:",
        b"",
    ]
    for payload in bad:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(15)
            s.connect(a.control_socket)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
    # a silent client does not block others
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(a.control_socket)
    try:
        assert ctl(a, "status").returncode == 0
        r = ctl(a, "sync", "nonexistent-mirror")
        assert r.returncode == 1 and "no mirror" in r.stderr
    finally:
        idle.close()


def test_check_config_offline(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o600)
    loose = tmp_path / "loose.key"
    loose.write_text("0123456789abcdef0123456789abcdef\n")
    loose.chmod(0o644)
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "sub").mkdir()
    base = f"""
[node]
name = "a"
listen = "127.0.0.1:7301"

[peers.b]
address = "127.0.0.1:7302"
key_file = "{key}"

[peers.c]
address = "127.0.0.1:7303"
key_file = "{key}"

[mirrors.media]
path = "{tmp_path}/srv"
push_to = ["b"]
"""
    cases = {
        "ok": (base, None),
        "unknown peer": (
            base.replace('push_to = ["b"]', 'push_to = ["b", "zz"]'),
            "mirrors.media.push_to[1]: unknown peer 'zz'",
        ),
        "unknown key": (base + "colour = 1\n", "mirrors.media.colour: unknown key"),
        "typo in node": (
            base.replace('name = "a"', 'name = "a"\nlisten_on = 1'),
            "node.listen_on: unknown key",
        ),
        "missing key": (
            base.replace('listen = "127.0.0.1:7301"', ""),
            "node.listen: required key is missing",
        ),
        "bad address": (
            base.replace("127.0.0.1:7302", "nowhere"),
            "peers.b.address: 'nowhere' is not HOST:PORT",
        ),
        "ipv6 peer": (base.replace("127.0.0.1:7302", "[fd52:7e11::2]:7302"), None),
        "ipv6 without brackets": (
            base.replace("127.0.0.1:7302", "fd52:7e11::2:7302"),
            "peers.b.address: 'fd52:7e11::2:7302': write an IPv6 address in brackets, then the "
            "port: '[fd52:7e11::2]:7302'",
        ),
        "link-local listen": (
            base.replace("127.0.0.1:7301", "[fe80::1%eth0]:7301"),
            "node.listen: '[fe80::1%eth0]:7301': link-local and scoped IPv6 addresses "
            "(fe80::/10, %interface) are not supported: use a global or unique-local",
        ),
        "bwlimit": (base.replace(f'"{key}"', f'"{key}"\nbwlimit = "50MiB"', 1), None),
        "bad bwlimit": (
            base.replace(f'"{key}"', f'"{key}"\nbwlimit = "50mb"', 1),
            "peers.b.bwlimit: '50mb': unknown unit 'mb'; write bytes per second as an integer",
        ),
        "relative path": (
            base.replace(f'path = "{tmp_path}/srv"', 'path = "srv"'),
            "mirrors.media.path: mirror path 'srv' must be absolute",
        ),
        "missing path": (
            base.replace(f"{tmp_path}/srv", f"{tmp_path}/nope"),
            f"mirrors.media.path: {tmp_path}/nope does not exist",
        ),
        "overlap": (
            base + f'\n[mirrors.inner]\npath = "{tmp_path}/srv/sub"\n',
            "mirrors.media.path: " + f"{tmp_path}/srv overlaps mirror 'inner'",
        ),
        "two-way not confirmed": (
            base.replace('push_to = ["b"]', 'push_to = ["b"]\naccept_from = ["b"]'),
            "mirrors.media.accept_from: peer 'b' is in both push_to and accept_from",
        ),
        "two_way without peer": (
            base.replace('push_to = ["b"]', 'push_to = ["b"]\ntwo_way = true'),
            "mirrors.media.two_way: two_way = true, but no peer",
        ),
        "self as peer": (base.replace("[peers.c]", "[peers.a]"), "peers.a: a node cannot be"),
        "duplicate peer": (
            base.replace('push_to = ["b"]', 'push_to = ["b", "b"]'),
            "mirrors.media.push_to[1]: peer 'b' is listed twice",
        ),
        "wrong type": (
            base.replace('push_to = ["b"]', 'push_to = ["b"]\ndelete = "yes"'),
            "mirrors.media.delete: Input should be a valid boolean",
        ),
        "not toml": ("[node\nname=", "not valid TOML"),
        "key readable by others": (
            base.replace(str(key), str(loose)),
            f"peers.b.key_file: key file {loose}: mode 0644",
        ),
        "key missing": (
            base.replace(str(key), str(tmp_path / "none.key")),
            "peers.b.key_file: key file",
        ),
    }
    for what, (text, expected) in cases.items():
        f = tmp_path / f"{what.replace(' ', '-')}.toml"
        f.write_text(text)
        r = subprocess.run(
            [sys.executable, "-m", "replicator.ctl", "check-config", str(f)],
            capture_output=True,
            text=True,
        )
        if expected is None:
            assert r.returncode == 0, (what, r.stderr)
            assert "OK" in r.stdout
        else:
            assert r.returncode == 2, (what, r.stdout)
            assert expected in r.stderr, (what, r.stderr)
            assert str(f) in r.stderr, (what, r.stderr)


def test_metrics_endpoint(cluster: LocalCluster) -> None:
    pytest.importorskip("prometheus_client")
    a, b = make_pair(cluster)
    port = free_port()
    a.node_extra["metrics_listen"] = f"127.0.0.1:{port}"
    cluster.start()
    (a.mirror_path("m") / "f").write_bytes(b"x" * 1234)
    wait_same(a.mirror_path("m"), b.mirror_path("m"))

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    wait_for(
        lambda: 'replicator_link_payload_bytes_sent_total{node="a",peer="b"} 1234.0' in scrape(),
        10,
        "the payload counter",
    )
    text = scrape()
    assert 'replicator_link_up{node="a",peer="b"} 1.0' in text
    assert 'replicator_link_files_sent_total{node="a",peer="b"} 1.0' in text
    assert 'replicator_mirror_marker_ok{mirror="m",node="a"} 1.0' in text
    assert 'replicator_link_lane_files{lane="live",node="a",peer="b"} 0.0' in text
    assert 'replicator_link_lane_files{lane="bulk",node="a",peer="b"} 0.0' in text


def test_wrong_key_shows_auth_failed(cluster: LocalCluster, tmp_path: Path) -> None:
    a, b = make_pair(cluster)
    other = tmp_path / "other.key"
    other.write_text("a completely different shared secret\n")
    other.chmod(0o600)
    b.peers["a"]["key_file"] = str(other)
    cluster.start(wait_links=False)
    wait_for(lambda: a.link("b")["state"] == "auth_failed", 30, "auth_failed")
    r = ctl(a, "status")
    assert r.returncode == 3 and "auth_failed" in r.stderr
    assert "authentication" in (a.link("b")["last_error"] or "")


def test_status_counts_are_current_right_after_the_first_sync(cluster: LocalCluster) -> None:
    """Status said "to b: 204 entries here, 0 there" after the first sync
    although b held all 204: the count of the peer's entries was the one of
    its listing, before anything was sent. It follows every Ack now; the
    count here says when it was taken."""
    a, b = make_pair(cluster, rescan_interval=86400.0)
    src = a.mirror_path("m")
    for d in range(4):
        (src / f"d{d}").mkdir()
        for f in range(50):
            (src / f"d{d}" / f"f{f}").write_bytes(b"x" * f)
    cluster.start()
    wait_same(src, b.mirror_path("m"))

    def counts() -> tuple[int, int]:
        lm = status_json(a)[1]["mirrors"]["m"]["links"]["b"]
        return lm["source_entries"], lm["remote_entries"]

    wait_for(lambda: counts() == (204, 204), 30, "both counts to be 204")
    text = ctl(a, "status").stdout
    assert "to b: 204 entries there; 204 here at the last scan" in text
    log = a.log_path.read_text()
    assert log.count("mirror m reconciled") == 1  # no rescan made them right
    assert "reconciled: 204 entries here, 0 there, 204 to send" in log
    # and it follows later changes too, without a rescan
    (src / "d0" / "f0").unlink()
    (src / "new").write_text("new")
    wait_same(src, b.mirror_path("m"))
    wait_for(lambda: counts()[1] == 204, 30, "204 there again")  # one gone, one new
    (src / "new2").write_text("new")
    wait_for(lambda: counts()[1] == 205, 30, "205 there")
    b.stop()
    wait_for(lambda: "(when the link was last up)" in ctl(a, "status").stdout, 30, "the label")
