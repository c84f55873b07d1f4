"""replicatorctl conflicts and resolve on a two-way pair of real daemons:
a conflict is listed on the node that decided it, each way of settling it
does what it says here and replicates to the peer, a copy deleted by hand
settles it, the record survives restarts, status and metrics count it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from replicator.localcluster import LocalCluster, LocalNode, free_port, tree, wait_for

from ..helpers import wait_same
from .test_ctl import ctl, status_json

#: mtimes of the two edits: b's is the newer one, so b's version wins.
T_A = 1_800_000_000_000_000_000
T_B = 1_800_000_100_000_000_000
ON_A = "edited on a\n"
ON_B = "edited on b, later\n"


def idle(n: LocalNode, peer: str) -> bool:
    ln = n.link(peer)
    return bool(ln["state"] == "connected" and ln["queue_files"] == 0 and ln["in_flight"] == 0)


def settled(a: LocalNode, b: LocalNode) -> None:
    wait_for(lambda: idle(a, "b") and idle(b, "a"), 30, "both links idle")


def pair(cluster: LocalCluster, metrics: bool = False) -> tuple[LocalNode, LocalNode, Path, Path]:
    a, b = cluster.node("a"), cluster.node("b")
    cluster.connect("a", "b")
    pa = a.add_mirror("m", push_to=["b"], accept_from=["b"], two_way=True)
    pb = b.add_mirror("m", push_to=["a"], accept_from=["a"], two_way=True)
    if metrics:
        a.node_extra["metrics_listen"] = f"127.0.0.1:{free_port()}"
    cluster.start()
    settled(a, b)
    return a, b, pa, pb


def provoke(
    a: LocalNode,
    b: LocalNode,
    pa: Path,
    pb: Path,
    decider: LocalNode | None,
    name: str = "doc.txt",
) -> str:
    """Both sides change ``name`` while the links are paused (b later, so
    b's version wins); the name of the conflict copy (a's version, on both
    nodes once settled).

    The node that receives the other's version while its own is not yet
    acknowledged there decides the conflict: ``decider`` is made to receive
    first (then the other applies the winner as an ordinary update); with
    None both links resume at once, and one or both decide."""
    (pa / name).write_text("original\n")
    wait_same(pa, pb)
    settled(a, b)
    for n, peer in ((a, "b"), (b, "a")):
        assert n.control("pause", peer=peer)["ok"]
    (pa / name).write_text(ON_A)
    os.utime(pa / name, ns=(T_A, T_A))
    (pb / name).write_text(ON_B)
    os.utime(pb / name, ns=(T_B, T_B))
    if decider is None:
        order = [(a, "b"), (b, "a")]
    else:
        other = b if decider is a else a
        assert other.control("resume", peer=decider.name)["ok"]
        wait_for(lambda: any(c["path"] == name for c in listed(decider)), 30, "the conflict")
        order = [(decider, other.name)]
    for n, peer in order:
        assert n.control("resume", peer=peer)["ok"]
    wait_same(pa, pb)
    settled(a, b)
    stem = name.rpartition(".")[0]
    (copy,) = [p.name for p in pa.iterdir() if p.name.startswith(f"{stem}.conflict-a-")]
    return copy


def listed(n: LocalNode, *args: str) -> list[dict[str, Any]]:
    r = ctl(n, "conflicts", "--json", *args)
    assert r.returncode == 0, r.stderr
    found: list[dict[str, Any]] = json.loads(r.stdout)["conflicts"]
    return found


def unresolved(n: LocalNode) -> int:
    count: int = status_json(n)[1]["mirrors"]["m"]["conflicts_unresolved"]
    return count


def test_conflicts_lists_both_versions_the_peer_and_counts_them(cluster: LocalCluster) -> None:
    a, b, pa, pb = pair(cluster, metrics=True)
    copy = provoke(a, b, pa, pb, decider=a)
    (c,) = listed(a)
    assert (c["mirror"], c["path"], c["copy"], c["peer"]) == ("m", "doc.txt", copy, "b")
    assert c["full_path"] == str(pa / "doc.txt") and c["full_copy"] == str(pa / copy)
    assert c["kept"] == "remote"  # b's version, the newer, stays at the path
    assert c["at_path"]["from"] == "remote" and c["at_path"]["node"] == "b"
    assert (c["at_path"]["size"], c["at_path"]["mtime_ns"]) == (len(ON_B), T_B)
    assert c["in_copy"]["from"] == "local" and c["in_copy"]["node"] == "a"
    assert (c["in_copy"]["size"], c["in_copy"]["mtime_ns"]) == (len(ON_A), T_A)
    assert c["at_path"]["digest"].startswith("xxh3-128:")
    assert c["in_copy"]["digest"].startswith("xxh3-128:")
    assert c["at_path"]["digest"] != c["in_copy"]["digest"] and not c["same_content"]
    assert c["decided"] > 0
    # b never received a's version of doc.txt, only the copy (it replicated):
    # it decided nothing and lists nothing
    assert (pb / copy).read_text() == ON_A and listed(b) == []
    assert unresolved(b) == 0 and status_json(b)[0] == 0
    assert listed(a, "m") == [c] and ctl(a, "conflicts", "nope").returncode == 1
    # the human listing
    text = ctl(a, "conflicts").stdout
    assert f"m: {pa / 'doc.txt'} — with b" in text
    assert f"at the path: b's version, {len(ON_B)} bytes" in text
    assert f"in the copy: a's version (this node), {len(ON_A)} bytes" in text
    assert str(pa / copy) in text and "--keep local|remote|both" in text
    # status: counted, and a reason for exit code 5
    code, st = status_json(a)
    assert st["mirrors"]["m"]["conflicts_unresolved"] == 1
    assert code == 5 and "mirror m: 1 unresolved conflict (" in st["health"]["problems"][0]
    r = ctl(a, "status")
    assert r.returncode == 5 and "1 unresolved conflict (replicatorctl conflicts m)" in r.stdout
    # a conflict decided on b: the version kept at the path is b's own
    copy2 = provoke(a, b, pa, pb, decider=b, name="two.txt")
    (c2,) = listed(b)
    assert (c2["path"], c2["copy"], c2["peer"], c2["kept"]) == ("two.txt", copy2, "a", "local")
    assert (c2["at_path"]["node"], c2["at_path"]["from"], c2["at_path"]["size"]) == (
        "b",
        "local",
        len(ON_B),
    )
    assert (c2["in_copy"]["node"], c2["in_copy"]["from"], c2["in_copy"]["size"]) == (
        "a",
        "remote",
        len(ON_A),
    )
    # the same contents, hashed on either node, have the same digest
    assert c2["in_copy"]["digest"] == c["in_copy"]["digest"]
    assert c2["at_path"]["digest"] == c["at_path"]["digest"]
    assert [x["path"] for x in listed(a)] == ["doc.txt"] and unresolved(b) == 1
    # metrics
    pytest.importorskip("prometheus_client")
    url = f"http://{a.node_extra['metrics_listen']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'replicator_mirror_conflicts_unresolved{mirror="m",node="a"} 1.0' in metrics


def test_resolve_keep_local_deletes_the_copy_on_both_nodes(cluster: LocalCluster) -> None:
    a, b, pa, pb = pair(cluster)
    copy = provoke(a, b, pa, pb, decider=None)
    # one node decided it, or both did (each received the other's version)
    deciders = [n for n in (a, b) if listed(n)]
    assert deciders
    here = deciders[0]
    root = pa if here is a else pb
    r = ctl(here, "resolve", str(root / "doc.txt"), "--keep", "local")
    assert r.returncode == 0, r.stderr
    assert "kept" in r.stdout and f"deleted its copy {copy}" in r.stdout
    assert not (root / copy).exists() and (root / "doc.txt").read_text() == ON_B
    wait_same(pa, pb)  # the delete replicated
    assert sorted(tree(pa)) == sorted(tree(pb)) == ["doc.txt"]
    assert (pb / "doc.txt").read_text() == ON_B
    # the other node's record, if it had one, went with its copy
    assert listed(a) == [] and listed(b) == []
    assert unresolved(a) == unresolved(b) == 0
    assert status_json(a)[0] == status_json(b)[0] == 0


def test_resolve_keep_remote_renames_the_copy_over_the_file(cluster: LocalCluster) -> None:
    a, b, pa, pb = pair(cluster)
    copy = provoke(a, b, pa, pb, decider=a)
    renames = a.link("b")["renames"]
    # named by its copy, relative to the current directory
    cmd = [sys.executable, "-m", "replicator.ctl", "-s", a.control_socket]
    r = subprocess.run(
        [*cmd, "resolve", copy, "--keep", "remote"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=pa,
    )
    assert r.returncode == 0, r.stderr
    assert f"replaced {pa / 'doc.txt'} with its copy {copy}" in r.stdout
    assert not (pa / copy).exists() and (pa / "doc.txt").read_text() == ON_A
    assert (pa / "doc.txt").stat().st_mtime_ns == T_A
    wait_same(pa, pb)
    assert sorted(tree(pb)) == ["doc.txt"] and (pb / "doc.txt").read_text() == ON_A
    settled(a, b)
    assert a.link("b")["renames"] == renames + 1  # it travelled as a rename
    assert listed(a) == [] and listed(b) == []
    assert status_json(a)[0] == status_json(b)[0] == 0


def test_resolve_keep_both_forgets_the_conflict(cluster: LocalCluster) -> None:
    a, b, pa, pb = pair(cluster)
    copy = provoke(a, b, pa, pb, decider=None)
    deciders = [n for n in (a, b) if listed(n)]
    before = tree(pa)
    for i, n in enumerate(deciders):
        root = pa if n is a else pb
        r = ctl(n, "resolve", str(root / "doc.txt"), "--keep", "both")
        assert r.returncode == 0, r.stderr
        assert "kept both" in r.stdout and "settle it there" in r.stdout
        assert listed(n) == [] and unresolved(n) == 0
        # nothing changed on disk, so nothing replicated: a peer that
        # decided it too still lists it until it is settled there
        for other in deciders[i + 1 :]:
            assert [c["copy"] for c in listed(other)] == [copy]
    settled(a, b)
    assert tree(pa) == tree(pb) == before
    assert (pb / copy).read_text() == ON_A and (pb / "doc.txt").read_text() == ON_B
    assert status_json(a)[0] == status_json(b)[0] == 0


def test_a_copy_deleted_by_hand_settles_it_on_both_nodes(cluster: LocalCluster) -> None:
    a, b, pa, pb = pair(cluster)
    copy = provoke(a, b, pa, pb, decider=a)
    assert unresolved(a) == 1
    (pb / copy).unlink()  # on the node that did not decide it
    wait_same(pa, pb)
    assert not (pa / copy).exists()
    assert listed(a) == [] and unresolved(a) == 0 and status_json(a)[0] == 0
    # and then it is not a conflict any more
    r = ctl(a, "resolve", str(pa / "doc.txt"), "--keep", "remote")
    assert r.returncode == 1 and "not an unresolved conflict on node 'a'" in r.stderr


def test_the_record_survives_restarts(cluster: LocalCluster) -> None:
    a, b, pa, pb = pair(cluster)
    copy = provoke(a, b, pa, pb, decider=a)
    (before,) = listed(a)
    a.stop()
    a.start()
    assert listed(a) == [before]
    a.kill()  # no clean shutdown either
    a.start()
    assert listed(a) == [before] and unresolved(a) == 1
    wait_for(lambda: a.links_connected(), 30, "a to reconnect")
    assert ctl(a, "resolve", str(pa / copy), "--keep", "local").returncode == 0
    wait_same(pa, pb)
    assert not (pb / copy).exists() and listed(a) == []


def test_resolve_refuses_what_is_not_a_conflict(cluster: LocalCluster, tmp_path: Path) -> None:
    a, b, pa, pb = pair(cluster)
    (pa / "plain").write_text("p")
    copy = provoke(a, b, pa, pb, decider=a)
    r = ctl(a, "resolve", str(pa / "plain"), "--keep", "local")
    assert r.returncode == 1 and "is not an unresolved conflict" in r.stderr
    r = ctl(a, "resolve", str(tmp_path / "elsewhere"), "--keep", "local")
    assert r.returncode == 1 and "is in no mirror of node 'a'" in r.stderr
    r = ctl(a, "resolve", str(pa / "doc.txt"), "--keep", "theirs")
    assert r.returncode == 2  # argparse: not a choice
    # the copy deleted meanwhile: said so, and it is no longer listed
    (pa / copy).unlink()
    r = ctl(a, "resolve", str(pa / "doc.txt"), "--keep", "remote")
    assert r.returncode == 1, r.stdout
    assert f"its conflict copy {copy} is gone" in r.stderr
    assert (pa / "doc.txt").read_text() == ON_B and listed(a) == []
