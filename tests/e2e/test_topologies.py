"""Mirror topologies with three or more real daemons on loopback."""

from __future__ import annotations

import os
from pathlib import Path

from replicator.localcluster import LocalCluster, LocalNode, tree, wait_for, walk_files

from ..helpers import MiB, fill, make_chain, wait_same


def idle(n: LocalNode, peer: str) -> bool:
    ln = n.link(peer)
    return ln["state"] == "connected" and ln["queue_files"] == 0 and ln["in_flight"] == 0


def test_fan_out_dead_target_does_not_slow_the_others(cluster: LocalCluster) -> None:
    a, b, c = cluster.node("a"), cluster.node("b"), cluster.node("c")
    cluster.connect("a", "b")
    cluster.connect("a", "c")
    src = a.add_mirror("m", push_to=["b", "c"])
    dst_b = b.add_mirror("m", accept_from=["a"])
    dst_c = c.add_mirror("m", accept_from=["a"])
    fill(src / "big", 20 * MiB)
    (src / "small").write_text("s")
    cluster.start()
    wait_same(src, dst_b)
    wait_same(src, dst_c)
    # each target got its own copy of every byte (read once per target)
    assert a.link("b")["payload_bytes_sent"] == a.link("c")["payload_bytes_sent"] == 20 * MiB + 1
    c.kill()  # a dead target...
    wait_for(lambda: a.link("c")["state"] != "connected", 30, "a to notice c is gone")
    for i in range(50):
        (src / f"while-c-down-{i}").write_bytes(os.urandom(2048))
    wait_same(src, dst_b)  # ...does not hold back the live one
    wait_for(lambda: a.link("c")["queue_files"] >= 50, 10, "changes queued for c")
    c.start()
    wait_same(src, dst_c)


def test_chain_forwards_files_renames_and_deletes(cluster: LocalCluster) -> None:
    _, b, _, src, relay, end = make_chain(cluster)
    cluster.start()
    (src / "d").mkdir()
    fill(src / "d" / "f", 2 * MiB)
    (src / "link").symlink_to("d/f")
    wait_same(src, end)
    wait_same(src, relay)
    sent_bc = b.link("c")["payload_bytes_sent"]
    os.rename(src / "d", src / "e")
    wait_same(src, end)
    # c renames on disk before its Ack reaches b: wait for b to count it.
    wait_for(lambda: b.link("c")["renames"] >= 1, 30, "the relay's rename acknowledged")
    assert b.link("c")["payload_bytes_sent"] == sent_bc, "the relay re-sent renamed data"
    (src / "e" / "f").unlink()
    (src / "link").unlink()
    wait_same(src, end)
    assert not (end / "e" / "f").exists()


def two_way_pair(cluster: LocalCluster) -> tuple[LocalNode, LocalNode, Path, Path]:
    a, b = cluster.node("a"), cluster.node("b")
    cluster.connect("a", "b")
    pa = a.add_mirror("m", push_to=["b"], accept_from=["b"], two_way=True)
    pb = b.add_mirror("m", push_to=["a"], accept_from=["a"], two_way=True)
    cluster.start()
    wait_for(lambda: idle(a, "b") and idle(b, "a"), 30, "both links up")
    return a, b, pa, pb


def test_bidirectional_no_echo(cluster: LocalCluster) -> None:
    a, b, pa, pb = two_way_pair(cluster)
    for i in range(20):
        (pa / f"from-a-{i}").write_bytes(os.urandom(1000 + i))
        (pb / f"from-b-{i}").write_bytes(os.urandom(2000 + i))
    (pa / "dir-a").mkdir()
    (pa / "dir-a" / "x").write_text("x")
    wait_same(pa, pb)
    wait_for(lambda: idle(a, "b") and idle(b, "a"), 30, "both links idle")
    # every file crossed once: nothing came back as an echo
    assert a.link("b")["files_sent"] == 21
    assert b.link("a")["files_sent"] == 20
    # deletes and renames travel once too, in either direction
    os.rename(pb / "from-b-0", pb / "renamed-on-b")
    (pa / "from-a-1").unlink()
    wait_same(pa, pb)
    wait_for(lambda: idle(a, "b") and idle(b, "a"), 30, "both links idle")
    assert a.link("b")["files_sent"] == 21 and b.link("a")["files_sent"] == 20


def test_bidirectional_conflict_keeps_both_versions(cluster: LocalCluster) -> None:
    a, b, pa, pb = two_way_pair(cluster)
    (pa / "doc.txt").write_text("original\n")
    wait_same(pa, pb)
    # both sides change the file while the links are paused: a true conflict
    for n, peer in ((a, "b"), (b, "a")):
        assert n.control("pause", peer=peer)["ok"]
    (pa / "doc.txt").write_text("edited on a\n")
    os.utime(pa / "doc.txt", ns=(1_800_000_000_000_000_000, 1_800_000_000_000_000_000))
    (pb / "doc.txt").write_text("edited on b, later\n")
    os.utime(pb / "doc.txt", ns=(1_800_000_100_000_000_000, 1_800_000_100_000_000_000))
    for n, peer in ((a, "b"), (b, "a")):
        assert n.control("resume", peer=peer)["ok"]
    wait_same(pa, pb)
    files = {p.name: p.read_text() for p in walk_files(pa)}
    # the newer edit (b's) wins on both nodes; a's edit is kept as a conflict copy
    assert files["doc.txt"] == "edited on b, later\n"
    copies = [name for name in files if name.startswith("doc.conflict-a-")]
    assert len(copies) == 1 and copies[0].endswith(".txt")
    assert files[copies[0]] == "edited on a\n"
    assert "conflict on doc.txt" in a.log_path.read_text() + b.log_path.read_text()


def test_three_node_mesh(cluster: LocalCluster) -> None:
    names = ["a", "b", "c"]
    nodes = {n: cluster.node(n) for n in names}
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            cluster.connect(x, y)
    roots = {}
    for n, node in nodes.items():
        others = [o for o in names if o != n]
        roots[n] = node.add_mirror("m", push_to=others, accept_from=others, two_way=True)
    cluster.start()
    for n in names:
        for i in range(10):
            (roots[n] / f"{n}-{i}").write_bytes(os.urandom(500))
    (roots["b"] / "sub").mkdir()
    (roots["b"] / "sub" / "deep").write_text("deep")
    for n in names[1:]:
        wait_same(roots["a"], roots[n])
    for n in names:
        wait_for(lambda n=n: all(idle(nodes[n], o) for o in names if o != n), 60, "idle")
    # echoes are bounded: each of the 31 files crossed at most twice per other node
    total = sum(nodes[n].link(o)["files_sent"] for n in names for o in names if o != n)
    assert 31 * 2 <= total <= 31 * 4, total
    assert tree(roots["a"]) == tree(roots["c"])


def test_node_with_mirrors_in_different_roles(cluster: LocalCluster) -> None:
    a, b, c = cluster.node("a"), cluster.node("b"), cluster.node("c")
    cluster.connect("a", "b")
    cluster.connect("b", "c")
    # b receives "in" from a, sends "out" to c, and shares "both" with a
    a_in = a.add_mirror("in", push_to=["b"])
    b_in = b.add_mirror("in", accept_from=["a"])
    b_out = b.add_mirror("out", push_to=["c"])
    c_out = c.add_mirror("out", accept_from=["b"])
    a_both = a.add_mirror("both", push_to=["b"], accept_from=["b"], two_way=True)
    b_both = b.add_mirror("both", push_to=["a"], accept_from=["a"], two_way=True)
    cluster.start()
    (a_in / "1").write_text("in")
    (b_out / "2").write_text("out")
    (a_both / "3").write_text("both from a")
    (b_both / "4").write_text("both from b")
    wait_same(a_in, b_in)
    wait_same(b_out, c_out)
    wait_same(a_both, b_both)
    assert sorted(p.name for p in walk_files(b_both)) == ["3", "4"]


def test_chain_forwards_a_replaced_directory(cluster: LocalCluster, tmp_path: Path) -> None:
    """A directory replaced by another moved in (pump._names_changed) on
    a: what the old one held is deleted on b, and b, which only relays,
    deletes it on c in turn; the directories' mtimes follow on both."""
    _, _, _, src, relay, end = make_chain(cluster)
    cluster.start()
    (src / "top" / "d" / "sub").mkdir(parents=True)
    (src / "top" / "d" / "sub" / "old").write_text("old")
    (src / "top" / "d" / "kept").write_text("kept")
    (tmp_path / "new" / "sub").mkdir(parents=True)
    (tmp_path / "new" / "sub" / "fresh").write_text("fresh")
    wait_same(src, end)
    os.rename(src / "top" / "d", tmp_path / "gone")
    os.rename(tmp_path / "new", src / "top" / "d")
    wait_same(src, relay)
    wait_same(src, end)
    for root in (relay, end):
        assert not (root / "top" / "d" / "sub" / "old").exists()
        assert not (root / "top" / "d" / "kept").exists()
        assert (root / "top" / "d" / "sub" / "fresh").read_text() == "fresh"
