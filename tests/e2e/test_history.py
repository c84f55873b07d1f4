"""Two-way mirrors across downtime: what was agreed is remembered (history.py).

Each case stops one side (SIGKILL or a clean stop), changes files on either
side while it is down, starts it again and checks the outcome once both
links have reconciled and are idle: a delete stays deleted, an edit on one
side wins over an unchanged other side without a conflict copy, an edit
wins over a delete, and only a real concurrent edit makes one conflict copy.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from replicator.localcluster import LocalCluster, LocalNode, tree, wait_for, walk_files

#: mtimes set explicitly (ns), so that "newer" never depends on the clock.
T_EDIT_DOWN = 1_900_000_000_000_000_000
T_EDIT_UP = 1_900_000_100_000_000_000


def agreed_rows(n: LocalNode, peer: str) -> int:
    """Records of ``n``'s archive with ``peer`` (read from its database)."""
    path = n.dir / "state" / "maps.sqlite3"
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=30)
    try:
        return int(db.execute("SELECT count(*) FROM agreed WHERE peer=?", (peer,)).fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def settled(n: LocalNode, peer: str, scans: int = 1) -> bool:
    """``n``'s link to ``peer`` reconciled since it started and is idle."""
    ln = n.link(peer)
    m = ln.get("mirrors", {}).get("m", {})
    return (
        ln["state"] == "connected"
        and ln["queue_files"] == 0
        and ln["in_flight"] == 0
        and m.get("last_scan") is not None
    )


def wait_settled(nodes: dict[str, LocalNode]) -> None:
    for name, n in nodes.items():
        for peer in nodes:
            if peer != name:
                wait_for(lambda n=n, p=peer: settled(n, p), 60, f"{name} -> {peer} settled")


def wait_agreed(nodes: dict[str, LocalNode], entries: int) -> None:
    """Every node recorded at least ``entries`` agreements with every other."""
    for name, n in nodes.items():
        for peer in nodes:
            if peer != name:
                wait_for(
                    lambda n=n, p=peer: agreed_rows(n, p) >= entries,
                    30,
                    f"{name}'s archive with {peer} ({agreed_rows(n, peer)} of {entries})",
                )


def files(root: Path) -> dict[str, tuple[object, ...]]:
    """``tree``, but a directory by its mode alone: a directory's mtime may
    still differ after a cold sync of a two-way pair (a separate race)."""
    return {k: v[:3] if v[0] == "d" else v for k, v in tree(root).items()}


def wait_same(*roots: Path) -> None:
    wait_for(lambda: all(files(r) == files(roots[0]) for r in roots[1:]), 60, "the same files")


def names(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in walk_files(root)}


def edit(path: Path, data: bytes, mtime_ns: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def pair(cluster: LocalCluster) -> tuple[LocalNode, LocalNode, Path, Path]:
    a, b = cluster.node("a"), cluster.node("b")
    cluster.connect("a", "b")
    pa = a.add_mirror("m", push_to=["b"], accept_from=["b"], two_way=True)
    pb = b.add_mirror("m", push_to=["a"], accept_from=["a"], two_way=True)
    return a, b, pa, pb


def down(n: LocalNode, how: str) -> None:
    if how == "kill":
        n.kill()
    else:
        assert n.stop() == 0


def conflict_copies(root: Path) -> list[str]:
    return sorted(k for k in names(root) if ".conflict-" in k)


@pytest.mark.parametrize("how", ["kill", "stop"])
@pytest.mark.parametrize("which", ["a", "b"])
def test_changes_while_one_side_is_down(cluster: LocalCluster, which: str, how: str) -> None:
    a, b, pa, pb = pair(cluster)
    files = [
        "del-down",
        "del-up",
        "edit-down",
        "edit-up",
        "both",
        "del-down-edit-up",
        "del-up-edit-down",
        "same",
    ]
    for f in files:
        (pa / f).write_bytes(f"original {f}\n".encode())
    for t in ("tree-down", "tree-up"):
        (pa / t / "sub").mkdir(parents=True)
        (pa / t / "x").write_text("x")
        (pa / t / "sub" / "y").write_text("y")
    cluster.start()
    nodes = {"a": a, "b": b}
    wait_same(pa, pb)
    wait_settled(nodes)
    wait_agreed(nodes, len(files) + 8)  # the files, two trees of 4 entries
    dn, up = (a, b) if which == "a" else (b, a)
    pdn, pup = (pa, pb) if which == "a" else (pb, pa)
    same = {str(r): (r / "same").stat().st_ino for r in (pa, pb)}

    down(dn, how)
    # on the side that is down (its daemon sees none of it happen)
    (pdn / "del-down").unlink()
    shutil.rmtree(pdn / "tree-down")
    edit(pdn / "edit-down", b"edited while down\n", T_EDIT_DOWN)
    edited = (pdn / "edit-down").stat().st_ino
    edit(pdn / "both", b"edited on the down side\n", T_EDIT_DOWN)
    (pdn / "del-down-edit-up").unlink()
    edit(pdn / "del-up-edit-down", b"edited while down, deleted up\n", T_EDIT_DOWN)
    # on the side that is up (its link queues the changes)
    (pup / "del-up").unlink()
    shutil.rmtree(pup / "tree-up")
    edit(pup / "edit-up", b"edited on the up side\n", T_EDIT_UP)
    edit(pup / "both", b"edited on the up side, later\n", T_EDIT_UP)
    edit(pup / "del-down-edit-up", b"edited up, deleted down\n", T_EDIT_UP)
    (pup / "del-up-edit-down").unlink()
    wait_for(lambda: up.link(dn.name)["queue_files"] >= 5, 30, "the up side queued its changes")

    dn.start()
    wait_same(pa, pb)
    wait_settled(nodes)
    wait_same(pa, pb)

    got = names(pa)
    for gone in ("del-down", "del-up", "tree-down/x", "tree-up/sub/y"):
        assert gone not in got, f"{gone} came back"
    assert not (pa / "tree-down").exists() and not (pa / "tree-up").exists()
    assert got["edit-down"] == b"edited while down\n"
    assert (pdn / "edit-down").stat().st_ino == edited, "the edit came back as a copy"
    assert got["edit-up"] == b"edited on the up side\n"
    assert got["del-down-edit-up"] == b"edited up, deleted down\n"
    assert got["del-up-edit-down"] == b"edited while down, deleted up\n"
    assert got["same"] == b"original same\n"
    # the one real conflict: the later edit (up's) wins, the other is one copy
    assert got["both"] == b"edited on the up side, later\n"
    copies = conflict_copies(pa)
    assert len(copies) == 1 and copies[0].startswith(f"both.conflict-{dn.name}-"), copies
    assert got[copies[0]] == b"edited on the down side\n"
    assert conflict_copies(pb) == copies
    # what did not change did not cross again (a received file is a new inode)
    assert {str(r): (r / "same").stat().st_ino for r in (pa, pb)} == same


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_reconnect_with_nothing_changed_sends_nothing(cluster: LocalCluster, how: str) -> None:
    a, b, pa, pb = pair(cluster)
    for i in range(20):
        (pa / f"a-{i}").write_bytes(os.urandom(100 + i))
        (pb / f"b-{i}").write_bytes(os.urandom(200 + i))
    (pa / "d" / "e").mkdir(parents=True)
    (pa / "d" / "e" / "f").write_text("f")
    cluster.start()
    nodes = {"a": a, "b": b}
    wait_same(pa, pb)
    wait_settled(nodes)
    wait_agreed(nodes, 43)
    sent = b.link("a")["files_sent"]
    down(a, how)
    a.start()
    wait_settled(nodes)
    # no file crossed again (a directory's mtime may, see ``files``)
    assert a.link("b")["files_sent"] == 0
    assert b.link("a")["files_sent"] == sent
    assert conflict_copies(pa) == conflict_copies(pb) == []
    for n in (a, b):
        assert "conflict on" not in n.log_path.read_text()


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_three_nodes_changes_while_one_is_down(cluster: LocalCluster, how: str) -> None:
    order = ["a", "b", "c"]
    nodes = {n: cluster.node(n) for n in order}
    for i, x in enumerate(order):
        for y in order[i + 1 :]:
            cluster.connect(x, y)
    roots = {}
    for n, node in nodes.items():
        others = [o for o in order if o != n]
        roots[n] = node.add_mirror("m", push_to=others, accept_from=others, two_way=True)
    for i in range(5):
        (roots["a"] / f"f-{i}").write_text(f"f{i}")
    (roots["a"] / "t" / "u").mkdir(parents=True)
    (roots["a"] / "t" / "u" / "v").write_text("v")
    cluster.start()
    for n in order[1:]:
        wait_same(roots["a"], roots[n])
    wait_settled(nodes)
    wait_agreed(nodes, 8)
    c = nodes["c"]
    down(c, how)
    # c deletes and edits while down; a deletes and b edits while c is down
    (roots["c"] / "f-0").unlink()
    shutil.rmtree(roots["c"] / "t")
    edit(roots["c"] / "f-2", b"edited on c while down\n", T_EDIT_DOWN)
    (roots["c"] / "f-4").unlink()
    (roots["a"] / "f-1").unlink()
    edit(roots["a"] / "f-3", b"edited on a\n", T_EDIT_UP)
    edit(roots["b"] / "f-4", b"edited on b, deleted on c\n", T_EDIT_UP)
    wait_for(lambda: not (roots["b"] / "f-1").exists(), 30, "b applied a's delete")
    c.start()
    for n in ("b", "c"):
        wait_same(roots["a"], roots[n])
    wait_settled(nodes)
    for n in ("b", "c"):
        wait_same(roots["a"], roots[n])
    for n in order:
        got = names(roots[n])
        assert sorted(got) == ["f-2", "f-3", "f-4"], n  # and no conflict copy
        assert got["f-2"] == b"edited on c while down\n", n
        assert got["f-3"] == b"edited on a\n", n
        assert got["f-4"] == b"edited on b, deleted on c\n", n  # the edit beats the delete
        assert not (roots[n] / "t").exists(), n
