"""Sparse files stay sparse (rsync -S): only their data travels, the
replica keeps the holes, and the block map still verifies every byte."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from replicator.localcluster import LocalCluster, LocalNode, wait_for

from ..helpers import MiB, make_pair

SIZE = 64 * MiB
#: Where the data of the sparse file is (the rest are holes).
EXTENTS = [(0, MiB), (20 * MiB, MiB), (40 * MiB + 4096, 2 * MiB)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_sparse(path: Path, size: int = SIZE) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off, n in EXTENTS:
            os.pwrite(fd, os.urandom(n), off)
        os.ftruncate(fd, size)  # a trailing hole too
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def same(a: LocalNode, b: LocalNode, name: str) -> bool:
    src, dst = a.mirror_path("m") / name, b.mirror_path("m") / name
    return dst.exists() and dst.stat().st_size == src.stat().st_size and sha(src) == sha(dst)


def test_a_sparse_file_stays_sparse_and_only_its_data_travels(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    src = a.mirror_path("m") / "vm.img"
    make_sparse(src)
    data = sum(n for _, n in EXTENTS)
    assert allocated(src) < 2 * data  # the filesystem keeps it sparse
    wait_for(lambda: same(a, b, "vm.img"), 60, "the sparse file on b")
    dst = b.mirror_path("m") / "vm.img"
    assert allocated(dst) < 2 * data, f"replica allocated {allocated(dst)} of {SIZE}"
    link = a.link("b")
    assert link["payload_bytes_sent"] < 2 * data
    assert link["hole_bytes"] >= SIZE - 2 * data
    sessions = b.status()["sessions"]
    assert sessions[0]["hole_bytes"] >= SIZE - 2 * data
    assert sessions[0]["verify_mismatches"] == 0


def test_a_delta_of_a_sparse_file_keeps_its_holes(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    src = a.mirror_path("m") / "db.img"
    make_sparse(src)
    wait_for(lambda: same(a, b, "db.img"), 60, "the sparse file on b")
    wait_for(lambda: a.link("b")["in_flight"] == 0, 30)
    before = a.link("b")["payload_bytes_sent"]
    fd = os.open(src, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(4096), 20 * MiB + 100)  # inside a data extent
    finally:
        os.close(fd)
    wait_for(lambda: same(a, b, "db.img"), 60, "the new version on b")
    assert a.link("b")["delta_files"] >= 1
    assert a.link("b")["payload_bytes_sent"] - before <= MiB
    dst = b.mirror_path("m") / "db.img"
    assert allocated(dst) < 2 * sum(n for _, n in EXTENTS)
