"""Two real replicatord processes on loopback replicate a tree exactly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from replicator.localcluster import (
    LocalCluster,
    LocalNode,
    wait_for,
    walk_files,
)

from ..helpers import MiB, fill, make_pair, wait_same


def build_tree(root: Path, big: int) -> None:
    (root / "empty").touch()
    (root / "one").write_bytes(b"x")
    fill(root / "four-k", 4096)
    fill(root / "one-m", MiB)
    fill(root / "big.bin", big)
    d = root / "a" / "b" / "c"
    d.mkdir(parents=True)
    (d / "deep.txt").write_text("deep\n")
    (root / "a" / "b" / "sib").write_bytes(os.urandom(1000))
    (root / "with space.txt").write_text("space")
    (root / "ünïcødé-ファイル").write_text("unicode")
    (root / "new\nline").write_text("newline in name")
    (root / "link-to-one").symlink_to("one")
    (root / "dangling").symlink_to("does/not/exist")
    (root / "abs-link").symlink_to("/etc/hostname")
    (root / "exec.sh").write_text("#!/bin/sh\n")
    (root / "exec.sh").chmod(0o750)
    (root / "private").write_text("secret")
    (root / "private").chmod(0o600)
    os.utime(root / "one", ns=(1_000_000_000_123_456_789, 1_000_000_000_123_456_789))
    os.utime(root / "a" / "b", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))
    (root / "emptydir").mkdir(mode=0o711)
    (root / "readonly").write_text("r")
    (root / "readonly").chmod(0o444)
    if os.geteuid() == 0:  # owner and group travel when running as root
        (root / "owned").write_text("o")
        os.chown(root / "owned", 1234, 5678)
        (root / "setuid").write_text("s")
        os.chown(root / "setuid", 1234, 5678)
        (root / "setuid").chmod(0o4755)


def exact_pair(cluster: LocalCluster, **mirror: object) -> tuple[LocalNode, LocalNode]:
    """Like make_pair, with a replica that takes owners and setuid/setgid/
    sticky bits as sent (by default it keeps its own: tests/e2e/test_modes.py)."""
    a, b = make_pair(cluster, **mirror)
    b.mirrors["m"]["preserve"] = ["owners", "special_bits"]
    return a, b


@pytest.mark.slow
def test_tree_with_big_file_replicates_exactly(cluster: LocalCluster) -> None:
    a, b = exact_pair(cluster)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    build_tree(src, 256 * MiB)
    cluster.start()
    wait_same(src, dst, timeout=120)
    if os.geteuid() == 0:
        for name in ("owned", "setuid"):
            st = (dst / name).lstat()
            assert (st.st_uid, st.st_gid) == (1234, 5678), name
    link = a.link("b")
    assert link["state"] == "connected"
    assert link["files_sent"] >= 10
    # payload went out once: nothing was re-sent
    total = sum(p.stat().st_size for p in walk_files(src) if not p.is_symlink())
    assert link["payload_bytes_sent"] == total


def apply_changes(src: Path) -> None:
    """Content, metadata, delete and type changes of every kind."""
    (src / "one").write_bytes(b"yy")
    (src / "exec.sh").chmod(0o700)
    os.utime(src / "four-k", ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    (src / "with space.txt").unlink()
    shutil.rmtree(src / "a")
    (src / "a").write_text("a is a file now")
    (src / "emptydir").rmdir()
    (src / "emptydir").symlink_to("one")


def test_live_changes_of_every_kind(cluster: LocalCluster) -> None:
    a, b = exact_pair(cluster, delete=True)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    build_tree(src, 3 * MiB)
    cluster.start()
    wait_same(src, dst)
    sent_before = a.link("b")["payload_bytes_sent"]
    apply_changes(src)
    wait_same(src, dst)
    # chmod and touch travelled as metadata: only the rewritten files' bytes moved
    sent = a.link("b")["payload_bytes_sent"] - sent_before
    assert sent == len(b"yy") + len(b"a is a file now")


def test_changes_while_sender_stopped_found_at_start(cluster: LocalCluster) -> None:
    a, b = exact_pair(cluster, delete=True)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    build_tree(src, 3 * MiB)
    cluster.start()
    wait_same(src, dst)
    a.stop()
    apply_changes(src)
    a.start()
    wait_same(src, dst)
    # a rescan judges files by size+mtime like rsync's quick check, so the
    # touched four-k is sent again; nothing else is
    assert a.link("b")["payload_bytes_sent"] == len(b"yy") + len(b"a is a file now") + 4096


def test_delete_false_keeps_replica_files(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster, delete=False)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    (src / "keep").write_text("k")
    cluster.start()
    wait_for(lambda: (dst / "keep").exists(), 30, "first copy")
    (src / "keep").unlink()
    (src / "new").write_text("n")
    a.control("sync", mirror="m")
    wait_for(lambda: (dst / "new").exists(), 30, "second file")
    assert (dst / "keep").read_text() == "k"


def test_excludes_are_not_sent_and_not_deleted(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster, exclude=["*.tmp", "cache/*"])
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    (src / "x.tmp").write_text("t")
    (src / "cache").mkdir()
    (src / "cache" / "c").write_text("c")
    (src / "real").write_text("r")
    (dst / "local.tmp").write_text("replica's own")
    cluster.start()
    wait_for(lambda: (dst / "real").exists(), 30, "real file")
    a.control("sync", mirror="m")
    wait_for(
        lambda: a.link("b")["queue_files"] == 0 and a.link("b")["in_flight"] == 0, 30, "queue empty"
    )
    assert not (dst / "x.tmp").exists()
    assert not (dst / "cache" / "c").exists()
    assert (dst / "local.tmp").read_text() == "replica's own"
