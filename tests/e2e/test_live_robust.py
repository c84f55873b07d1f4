"""Nothing missed: inotify overflow, a missing mirror marker, a peer that is
down while thousands of changes happen and the sender restarts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.localcluster import LocalCluster, wait_for, walk_files

from ..helpers import make_pair, wait_same

QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.fixture
def tiny_inotify_queue() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("changing fs.inotify.max_queued_events needs root")
    old = QUEUED.read_text()
    QUEUED.write_text("256\n")  # read by each inotify instance when it is created
    try:
        yield
    finally:
        QUEUED.write_text(old)


@pytest.mark.slow
def test_overflow_burst_of_20000_files(cluster: LocalCluster, tiny_inotify_queue: None) -> None:
    a, b = make_pair(cluster, rescan_interval=86400.0)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    cluster.start()
    wait_for(lambda: a.link("b")["mirrors"].get("m", {}).get("listed"), 30, "first reconcile")
    for d in range(20):
        sub = src / f"burst{d:02}"
        sub.mkdir()
        for f in range(1000):
            (sub / f"{f:04}").write_bytes(b"%d/%d" % (d, f))
    wait_same(src, dst, timeout=300)
    assert a.status()["watcher"]["overflows"] >= 1
    assert "overflow" in a.log_path.read_text()


@pytest.fixture
def bind_root(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A mirror root that is a bind mount of ``data``: unmounting it leaves
    an empty directory, like a storage disk that failed to mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    data, root = tmp_path / "data", tmp_path / "root"
    data.mkdir()
    root.mkdir()
    subprocess.run(["mount", "--bind", str(data), str(root)], check=True)
    try:
        yield data, root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_marker_missing_keeps_replica_files(
    cluster: LocalCluster, bind_root: tuple[Path, Path]
) -> None:
    data, root = bind_root
    a, b = make_pair(cluster, path=str(root))
    dst = b.mirror_path("m")
    for i in range(10):
        (root / f"f{i}").write_text(str(i))
    cluster.start()
    wait_same(root, dst)
    assert (root / ".replicator" / "marker").exists()
    subprocess.run(["umount", str(root)], check=True)  # the disk "disappears"
    assert not any(root.iterdir())
    a.control("sync", mirror="m")
    wait_for(lambda: a.status()["mirrors"]["m"]["marker_ok"] is False, 30, "marker missing")
    wait_for(lambda: a.link("b")["mirrors"]["m"].get("marker_missing"), 30, "deletions held back")
    wait_for(
        lambda: a.link("b")["queue_files"] == 0 and a.link("b")["in_flight"] == 0, 30, "link idle"
    )
    assert sorted(p.name for p in walk_files(dst)) == [f"f{i}" for i in range(10)]
    assert "marker .replicator/marker is missing" in a.log_path.read_text()
    # the disk comes back and new changes flow again (a bind mount keeps its
    # inode watches; a real unmount drops them and the daemon re-watches the
    # root within seconds, see Daemon.check_workers)
    subprocess.run(["mount", "--bind", str(data), str(root)], check=True)
    wait_for(lambda: a.status()["mirrors"]["m"]["marker_ok"], 30, "marker back")
    (root / "after").write_text("back")
    (root / "f0").unlink()
    wait_same(root, dst)


@pytest.mark.slow
def test_peer_down_5000_changes_and_sender_restart(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster, rescan_interval=86400.0)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    (src / "old").mkdir()
    for i in range(500):
        (src / "old" / f"o{i}").write_text("old")
    (src / "hot").write_text("v0")
    cluster.start()
    wait_same(src, dst)
    b.stop()
    wait_for(lambda: a.link("b")["state"] in ("backoff", "connecting"), 30, "link down")
    (src / "new").mkdir()
    for i in range(4000):
        (src / "new" / f"n{i}").write_text(f"new {i}")
    for i in range(250):
        (src / "old" / f"o{i}").write_text("changed")
    for i in range(250, 500):
        (src / "old" / f"o{i}").unlink()
    for i in range(1000):  # one file changed a thousand times
        (src / "hot").write_text(f"v{i + 1}")
    wait_for(lambda: a.link("b")["queue_files"] >= 4500, 60, "changes queued")
    # the sender restarts while the peer is still down: its backlog survives
    a.stop()
    a.start()
    assert "pending changes loaded from the backlog" in a.log_path.read_text()
    assert a.link("b")["queue_files"] >= 4500
    sent = a.link("b")["files_sent"]
    b.start()
    wait_same(src, dst, timeout=180)
    # coalesced: 4000 new + 250 changed + the hot file once
    assert a.link("b")["files_sent"] - sent == 4251


WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")


def _watches_in_use() -> int:
    """inotify watches held by every process of this user (the limit is per user)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                        total += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


@pytest.mark.slow
def test_watch_limit_falls_back_to_polling(cluster: LocalCluster) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing fs.inotify.max_user_watches needs root")
    a, b = make_pair(cluster, rescan_interval=86400.0)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    for i in range(120):
        (src / f"d{i:03}").mkdir()
    old = WATCHES.read_text()
    # room for the root and about half of the directories, whatever else runs here
    WATCHES.write_text(f"{_watches_in_use() + 60}\n")
    try:
        cluster.start()
        wait_for(
            lambda: (a.status()["mirrors"]["m"]["unwatched_dirs"] or 0) > 0,
            60,
            "unwatched directories to be noticed",
        )
    finally:
        WATCHES.write_text(old)
    st = a.status()["mirrors"]["m"]
    assert st["dirs"] == 121 and st["unwatched_dirs"] >= 30
    assert "have no inotify watch" in a.log_path.read_text()
    r = subprocess.run(
        [sys.executable, "-m", "replicator.ctl", "--socket", a.control_socket, "status"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 5 and "unwatched dirs" in r.stderr
    # a change in every directory, watched or not, still reaches the replica
    for i in range(120):
        (src / f"d{i:03}" / "f").write_text(str(i))
    wait_same(src, dst, timeout=120)


def test_very_deep_tree_replicates_and_deletes(cluster: LocalCluster, tmp_path: Path) -> None:
    """1,100 nested directories (a legal 2,200-byte path): watched, sent and
    deleted without hitting Python's recursion limit anywhere (regression:
    a recursive delete crashed every session and the link looped)."""
    depth = 1100
    a, b = make_pair(cluster)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    deep = "/".join(["d"] * depth)
    try:
        fd = os.open(src, os.O_RDONLY)
        for _ in range(depth):  # iteratively: os.makedirs recurses
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("deep")
        os.close(fd)
        cluster.start()
        wait_for(lambda: (dst / deep / "f").exists(), 120, "the deep file on the replica")
        assert (dst / deep / "f").read_text() == "deep"
        subprocess.run(["rm", "-rf", str(src / "d")], check=True)
        wait_for(lambda: not (dst / "d").exists(), 120, "the deep tree deleted on the replica")
        assert b.proc is not None and b.proc.poll() is None
        assert "RecursionError" not in a.log_path.read_text() + b.log_path.read_text()
    finally:  # pytest's own cleanup recurses: never leave a deep tree behind
        subprocess.run(["rm", "-rf", str(src / "d"), str(dst / "d")], check=False)
