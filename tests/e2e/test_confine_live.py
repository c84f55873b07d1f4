"""The sending side is confined like the receiving side, tested on real
daemons: a directory swapped for a symlink between an event and its send
(by a local user, or by a two-way peer) never makes the node ship a file
from outside the mirror — checked on the wire itself, through a recording
relay — and a path longer than PATH_MAX breaks nothing for anyone."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.localcluster import LocalCluster, LocalNode, wait_for
from replicator.paths import Source

from ..helpers import make_chain, make_deep
from .tcpproxy import Recorder

SECRET = b"TOPSECRET-" + os.urandom(8).hex().encode()
NO_RESCAN = {"rescan_interval": 86400.0}


@pytest.fixture
def recorder() -> Iterator[list[Recorder]]:
    made: list[Recorder] = []
    yield made
    for r in made:
        r.close()


def _relay(a: LocalNode, peer: LocalNode, made: list[Recorder]) -> Recorder:
    """Point ``a``'s link to ``peer`` through a recording relay."""
    r = Recorder(peer.address)
    made.append(r)
    a.peers[peer.name]["address"] = r.address
    return r


def _queued(a: LocalNode, peer: str) -> int:
    return int(a.link(peer)["queue_files"])


def _idle(a: LocalNode, peer: str) -> bool:
    ln = a.link(peer)
    return ln["state"] == "connected" and ln["queue_files"] == 0 and not ln.get("in_flight")


def test_local_user_swaps_a_directory_for_a_symlink(
    cluster: LocalCluster, recorder: list[Recorder], tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    (outside / "secret.txt").write_bytes(SECRET)
    a, b = cluster.node("a"), cluster.node("b")
    cluster.connect("a", "b")
    src = a.add_mirror("m", push_to=["b"], **NO_RESCAN)
    dst = b.add_mirror("m", accept_from=["a"])
    wire = _relay(a, b, recorder)
    cluster.start()
    wait_for(lambda: a.link("b")["mirrors"].get("m", {}).get("listed"), 30, "first reconcile")
    assert a.control("pause", peer="b")["ok"]
    # The user makes a directory and a file; the daemon records both dirty...
    (src / "d").mkdir()
    (src / "d" / "secret.txt").write_bytes(b"harmless")
    wait_for(lambda: _queued(a, "b") >= 2, 10, "the changes to be queued")
    # ...and before they are sent, swaps the directory for a symlink to a
    # folder the user cannot read but the daemon (root) can.
    os.rename(src / "d", src / "d.old")
    os.symlink(outside, src / "d")
    assert a.control("resume", peer="b")["ok"]
    (src / "after.txt").write_bytes(b"after")
    wait_for(lambda: (dst / "after.txt").exists(), 30, "a later file to arrive")
    wait_for(lambda: _idle(a, "b"), 30, "the link to go idle")
    assert (dst / "d.old" / "secret.txt").read_bytes() == b"harmless"
    assert os.readlink(dst / "d") == str(outside)  # the symlink, as a symlink
    assert wire.sent_bytes() > 0
    assert not wire.seen(SECRET), "a file from outside the mirror crossed the wire"


def test_two_way_peer_swaps_a_directory_for_a_symlink_to_the_key_folder(
    cluster: LocalCluster, recorder: list[Recorder]
) -> None:
    """The issue's attack: the peer pushes k/x.key, then replaces k with a
    symlink to the node's key folder, hoping the node pushes its own key
    for another peer back."""
    a, b = cluster.node("a"), cluster.node("b")
    cluster.connect("a", "b")
    key_dir = cluster.key_file("a", "b").parent
    other = key_dir / "a-c.key"  # a's key for another peer
    other.write_bytes(SECRET)
    other.chmod(0o600)
    ra = a.add_mirror("m", push_to=["b"], accept_from=["b"], two_way=True, **NO_RESCAN)
    rb = b.add_mirror("m", push_to=["a"], accept_from=["a"], two_way=True, **NO_RESCAN)
    wire = _relay(a, b, recorder)
    cluster.start()
    for n, p in ((a, "b"), (b, "a")):
        wait_for(lambda n=n, p=p: n.link(p)["mirrors"].get("m", {}).get("listed"), 30, "listed")
    assert a.control("pause", peer="b")["ok"]
    (rb / "k").mkdir()
    (rb / "k" / "a-c.key").write_bytes(b"bait")
    wait_for(lambda: (ra / "k" / "a-c.key").exists(), 30, "the bait to arrive at a")
    wait_for(lambda: _queued(a, "b") >= 1, 10, "a's own events to be queued")
    (rb / "k" / "a-c.key").unlink()
    (rb / "k").rmdir()
    os.symlink(key_dir, rb / "k")
    wait_for(lambda: (ra / "k").is_symlink(), 30, "the symlink to replace k at a")
    assert a.control("resume", peer="b")["ok"]
    (ra / "after.txt").write_bytes(b"after")
    wait_for(lambda: (rb / "after.txt").exists(), 30, "a later file to arrive at b")
    wait_for(lambda: _idle(a, "b"), 30, "a's link to go idle")
    assert wire.sent_bytes() > 0
    assert not wire.seen(SECRET), "the node's key for another peer crossed the wire"


def test_path_longer_than_path_max_breaks_nothing(cluster: LocalCluster) -> None:
    """A chain a → b → c: a legal 4,000-byte path reaches b and c, and the
    listings and watch checks of the shared mirror on b keep working for
    every peer (today's reconnect lists the mirror again)."""
    a, b, _, ra, rb, rc = make_chain(cluster)
    cluster.start()
    rel = make_deep(ra, 20, 203)
    assert len(os.fsencode(rc)) + len(rel) > 4096
    # the watcher cannot watch that deep (inotify takes whole paths); a
    # rescan of the mirror finds it, walking by directory fds
    assert a.control("sync", mirror="m")["ok"]
    for root in (rb, rc):
        wait_for(lambda root=root: Source(os.fsencode(root)).lstat(rel), 60, f"{rel[:20]!r}…")
    (ra / "plain.txt").write_bytes(b"plain")
    wait_for(lambda: (rc / "plain.txt").exists(), 30, "a plain file to pass the chain")
    # b lists the mirror for a fresh connection from a, and scans it for c
    b.stop()
    b.start()
    wait_for(lambda: a.links_connected() and b.links_connected(), 30, "links back")
    wait_for(lambda: a.link("b")["mirrors"].get("m", {}).get("listed"), 30, "b listed for a")
    wait_for(lambda: b.link("c")["mirrors"].get("m", {}).get("listed"), 30, "b scanned for c")
    (ra / "plain2.txt").write_bytes(b"plain2")
    wait_for(lambda: (rc / "plain2.txt").exists(), 30, "another file to pass the chain")
    st = b.status()
    assert not st["links"]["c"].get("last_error"), st["links"]["c"]
    found = Source(os.fsencode(rc)).lstat(rel)
    assert found is not None and found[0].st_size == 4
