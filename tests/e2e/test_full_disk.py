"""A full receiver disk: clear error, nothing published damaged, nothing lost;
replication completes once space is freed."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.localcluster import LocalCluster, LocalNode, wait_for

from ..helpers import MiB, fill, wait_same


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_receiver_disk_full_then_freed(cluster: LocalCluster, small_fs: Path) -> None:
    a: LocalNode = cluster.node("a")
    b: LocalNode = cluster.node("b")
    cluster.connect("a", "b")
    src = a.add_mirror("m", push_to=["b"])
    dst = b.add_mirror("m", accept_from=["a"], path=str(small_fs / "m"))
    for i in range(6):
        fill(src / f"f{i}.bin", 3 * MiB)
    want = {p.name: sha(p) for p in src.glob("f*")}
    cluster.start()
    wait_for(
        lambda: "no space" in (a.link("b")["last_error"] or ""),
        60,
        "the sender to be told the replica is full",
    )
    assert "no space left on the replica" in b.log_path.read_text() + a.log_path.read_text()
    # what was published is whole; the source lost nothing
    for p in dst.iterdir():
        if p.name != ".replicator":
            assert sha(p) == want[p.name], f"{p.name} is damaged"
    assert {p.name: sha(p) for p in src.glob("f*")} == want
    assert b.proc is not None and b.proc.poll() is None
    # free space: the sender retries on its own and completes
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    wait_same(src, dst, timeout=90)
    assert not list((dst / ".replicator" / "partial" / "a").iterdir())
