"""``replicatorctl wait``: a barrier for scripts, against real daemons.

Each test asserts what a script relies on: once ``wait`` exits 0, the
replica holds what the path held when the wait began — checked at once,
without polling the replica. Folders count with their mode, not their
mtime (barrier.py: the link restores it a moment later)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from replicator.localcluster import LocalCluster, LocalNode, diff_trees, tree, wait_for

from ..helpers import make_pair, wait_same

NO_RESCAN = {"rescan_interval": 86400.0}


def ctl(
    node: LocalNode, *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator.ctl", "--socket", node.control_socket, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def entries(root: Path) -> dict[str, tuple[Any, ...]]:
    """``localcluster.tree`` without the mtimes of folders."""
    return {k: ((*v[:3], None, *v[4:]) if v[0] == "d" else v) for k, v in tree(root).items()}


def same(src: Path, dst: Path) -> list[str]:
    return diff_trees(entries(src), entries(dst))


def test_a_file_and_a_tree_are_there_when_wait_returns(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    (src / "report.csv").write_bytes(os.urandom(300_000))
    r = ctl(a, "wait", str(src / "report.csv"))
    assert r.returncode == 0, r.stderr
    assert "durable on b" in r.stdout
    assert (dst / "report.csv").read_bytes() == (src / "report.csv").read_bytes()
    # a tree, named relative to the current directory, with a symlink and an empty folder
    top = src / "backup"
    for d in range(5):
        (top / f"d{d}" / "deeper").mkdir(parents=True)
        for f in range(20):
            (top / f"d{d}" / f"f{f}").write_bytes(os.urandom(1000 + f))
        (top / f"d{d}" / "deeper" / "big").write_bytes(os.urandom(2_000_000))
    (top / "empty").mkdir()
    os.symlink("d0/f0", top / "link")
    r = ctl(a, "wait", "backup", cwd=src)
    assert r.returncode == 0, r.stderr
    assert not same(top, dst / "backup")
    # several paths at once, one of them already there
    (src / "x").write_text("x")
    (src / "y").mkdir()
    (src / "y" / "z").write_text("z")
    r = ctl(a, "wait", str(src / "x"), str(src / "y"), str(src / "report.csv"))
    assert r.returncode == 0, r.stderr
    assert (dst / "x").read_text() == "x" and (dst / "y" / "z").read_text() == "z"


def test_a_tree_of_10k_files_while_it_keeps_changing(cluster: LocalCluster) -> None:
    """Changes made after the wait began are not waited for and confuse
    nothing: a file appended to all along, and new files in a new folder.
    The control socket answers meanwhile."""
    a, b = make_pair(cluster, **NO_RESCAN)
    cluster.start()
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    top = src / "many"
    for d in range(20):
        (top / f"{d:02}").mkdir(parents=True)
        for f in range(500):
            (top / f"{d:02}" / f"{f:03}").write_bytes(b"%d/%d" % (d, f))
    (top / "live.log").write_bytes(b"start\n")
    before = entries(top)
    proc = subprocess.Popen(
        [sys.executable, "-m", "replicator.ctl", "--socket", a.control_socket, "wait", str(top)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stop = threading.Event()

    def keep_writing() -> None:
        n = 0
        (top / "new").mkdir()
        while not stop.is_set():
            with (top / "live.log").open("ab") as f:
                f.write(b"line %d\n" % n)
            (top / "new" / str(n)).write_bytes(b"new")
            n += 1
            stop.wait(0.02)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        st = ctl(a, "status", "--json", timeout=30)
        assert st.returncode in (0, 3) and '"links"' in st.stdout  # not held up by the wait
        out, err = proc.communicate(timeout=300)
    finally:
        stop.set()
        writer.join()
    assert proc.returncode == 0, err
    # many, 20 folders, 10,000 files, live.log (and what the writer made, if
    # the listing came after it)
    held = re.search(r"durable on b \((\d+) entries\)", out)
    assert held is not None and int(held.group(1)) >= 10022, out
    there = entries(dst / "many")
    for rel, entry in before.items():
        if rel == "live.log":  # appended to since: its start at least is there
            assert (dst / "many" / rel).read_bytes().startswith(b"start\n")
        else:
            assert there.get(rel) == entry, rel
    wait_same(src, dst)


def test_receiver_down_times_out_with_the_reason_then_succeeds(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    b.stop()
    wait_for(lambda: a.link("b")["state"] != "connected", 30, "the link to go down")
    (src / "staged").write_bytes(b"must be safe there")
    r = ctl(a, "wait", "--timeout", "2", str(src / "staged"))
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "timed out after 2 s" in r.stderr
    assert "link to b is down" in r.stderr
    assert "1 of 1 entries not yet durable there" in r.stderr
    b.start()
    r = ctl(a, "wait", str(src / "staged"))
    assert r.returncode == 0, r.stderr
    assert (dst / "staged").read_bytes() == b"must be safe there"


def test_paths_that_cannot_be_waited_for_are_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    a, _ = make_pair(cluster, exclude=["*.tmp"])
    a.add_mirror("local-only")
    cluster.start()
    src = a.mirror_path("m")
    (src / "scratch.tmp").write_text("t")
    (src / "real").write_text("r")
    (tmp_path / "elsewhere").write_text("e")
    cases = {
        str(tmp_path / "elsewhere"): "not inside any mirror of this node (mirrors: local-only (",
        str(src / "missing"): "no such file or directory in mirror m",
        str(src / "scratch.tmp"): "excluded from mirror m",
        str(src / ".replicator"): "the daemon's own .replicator folder",
        str(a.mirror_path("local-only")): "mirror local-only is pushed to no peer",
    }
    for path, message in cases.items():
        r = ctl(a, "wait", path)
        assert r.returncode == 2, (path, r.stderr)
        assert message in r.stderr, (path, r.stderr)
    # one bad path refuses the whole wait
    r = ctl(a, "wait", str(src / "real"), str(tmp_path / "elsewhere"))
    assert r.returncode == 2 and "not inside any mirror" in r.stderr
    r = ctl(a, "wait", "--peer", "nobody", str(src / "real"))
    assert r.returncode == 2 and "does not push to a peer 'nobody'" in r.stderr
    assert ctl(a, "wait").returncode == 2  # no path: argparse
    assert ctl(a, "wait", str(src / "real")).returncode == 0


def test_a_refused_path_or_mirror_fails_the_wait_with_the_peers_reason(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    a, b = make_pair(cluster, **NO_RESCAN)
    a.add_mirror("unwanted", push_to=["b"])
    b.add_mirror("unwanted")  # not accepted from a
    cluster.start()
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    (src / "sub").mkdir()
    assert ctl(a, "wait", str(src / "sub")).returncode == 0
    # Someone on b replaces the replica's folder by a symlink: b refuses
    # every path through it, for good.
    (tmp_path / "outside").mkdir()
    (dst / "sub").rmdir()
    os.symlink(tmp_path / "outside", dst / "sub")
    (src / "sub" / "f").write_text("refused")
    r = ctl(a, "wait", str(src / "sub" / "f"))
    assert r.returncode == 5, (r.stdout, r.stderr)
    assert "b refused m:sub/f:" in r.stderr and "is a symlink in the replica" in r.stderr
    assert not (tmp_path / "outside" / "f").exists()
    (a.mirror_path("unwanted") / "u").write_text("u")
    r = ctl(a, "wait", str(a.mirror_path("unwanted") / "u"))
    assert r.returncode == 5, (r.stdout, r.stderr)
    assert "mirror unwanted refused by b" in r.stderr and "does not accept" in r.stderr


def test_peer_restricts_the_wait_to_one_target(cluster: LocalCluster) -> None:
    a, b, c = cluster.node("a"), cluster.node("b"), cluster.node("c")
    cluster.connect("a", "b")
    cluster.connect("a", "c")
    src = a.add_mirror("m", push_to=["b", "c"])
    b.add_mirror("m", accept_from=["a"])
    c.add_mirror("m", accept_from=["a"])
    cluster.start()
    c.stop()
    wait_for(lambda: a.link("c")["state"] != "connected", 30, "the link to c to go down")
    (src / "f").write_text("fan-out")
    r = ctl(a, "wait", "--peer", "b", str(src / "f"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "durable on b (1 entries)"
    assert (b.mirror_path("m") / "f").read_text() == "fan-out"
    r = ctl(a, "wait", "--timeout", "1", str(src / "f"))
    assert r.returncode == 3
    assert "link to c is down" in r.stderr and "b:" not in r.stderr  # b is done
    r = ctl(a, "wait", "--peer", "c", "--timeout", "1", str(src / "f"))
    assert r.returncode == 3 and "link to c is down" in r.stderr
