"""Small changes never wait behind bulk work (order, never timing).

The receiver runs in a network namespace behind a veth pair rate-limited
with tbf, so a big transfer takes many seconds and the tests can look at
what the replica holds while it is still going.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from replicator import net, rcvqueue
from replicator.localcluster import LocalCluster, LocalNode, wait_for

from ..helpers import MiB, fill, only_session, wait_same
from .netns import Netns
from .test_resume import partial_size, throttled_pair

pytestmark = pytest.mark.netns


def wait_published(dst: Path, name: str, timeout: float = 60) -> None:
    wait_for(lambda: (dst / name).exists(), timeout, f"{name} on the replica")


def test_a_small_file_is_published_while_a_big_one_streams(
    cluster: LocalCluster, netns: Netns, tmp_path: Path
) -> None:
    size = 256 * MiB
    a, b = throttled_pair(cluster, netns, 200)  # ~11 s for the big file
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    cluster.start()
    staged = tmp_path / "big.bin"
    fill(staged, size)
    os.rename(staged, src / "big.bin")  # moved in, as the operator did
    wait_for(lambda: partial_size(b) > 16 * MiB, 60, "the big file to stream")
    (src / "small.txt").write_bytes(b"a small live change\n")
    wait_published(dst, "small.txt")
    # Published, and the big file is still on its way: it was not held back.
    held = partial_size(b)
    assert not (dst / "big.bin").exists()
    assert 0 < held < size
    assert (dst / "small.txt").read_bytes() == b"a small live change\n"
    # ...and it was acknowledged (durable), not only visible.
    wait_for(lambda: a.link("b")["in_flight"] <= 1, 30, "the small file's ack")
    assert partial_size(b) < size or (dst / "big.bin").exists()
    wait_same(src, dst, timeout=120)


def test_a_small_file_is_published_between_the_chunks_of_a_big_one_on_loopback(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Loopback, no limit: the receiver's socket seldom runs dry while the
    big file streams, so only the commit deadline reliably publishes small
    files before the big one is complete (0.1.0 published them together,
    2-4 s later, on most runs)."""
    size = 1024 * MiB
    a, b, src, dst = loopback_pair(cluster)
    cluster.start()
    _small_behind_big(a, b, src, dst, size, tmp_path)
    wait_same(src, dst, timeout=120)


def loopback_pair(cluster: LocalCluster) -> tuple[LocalNode, LocalNode, Path, Path]:
    """a pushes mirror m to b over loopback: the nodes, source and replica."""
    a = cluster.node("a")
    b = cluster.node("b")
    cluster.connect("a", "b")
    return a, b, a.add_mirror("m", push_to=["b"]), b.add_mirror("m", accept_from=["a"])


def _small_behind_big(
    a: LocalNode, b: LocalNode, src: Path, dst: Path, size: int, tmp_path: Path
) -> None:
    staged = tmp_path / "big.bin"
    fill(staged, size)
    os.rename(staged, src / "big.bin")
    wait_for(lambda: partial_size(b) > 32 * MiB, 60, "the big file to stream")
    for i in range(3):
        (src / f"small{i}.txt").write_bytes(b"small\n")
        wait_published(dst, f"small{i}.txt")
        held = partial_size(b)
        assert not (dst / "big.bin").exists()
        assert 0 < held < size, f"small{i}.txt was published with the big file"


def _small_files(root: Path, n: int, per_dir: int = 500) -> None:
    for i in range(n):
        d = root / f"d{i // per_dir:03}"
        if i % per_dir == 0:
            d.mkdir()
        (d / f"f{i:06}").write_bytes(os.urandom(200 + i % 800))


def test_a_live_change_during_a_cold_sync_is_published_before_it_ends(
    cluster: LocalCluster, netns: Netns
) -> None:
    n = 20_000
    a, b = throttled_pair(cluster, netns, 20)  # ~15 MB of files and frames: ~8 s
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    _small_files(src, n)
    cluster.start()
    wait_for(lambda: sum(1 for _ in dst.glob("d*/f*")) > 1000, 60, "the cold sync to be going")
    (src / "live.txt").write_bytes(b"written during the cold sync\n")
    wait_published(dst, "live.txt", timeout=120)
    have = sum(1 for _ in dst.glob("d*/f*"))
    assert have < n, "the live change waited for the whole cold sync"
    wait_same(src, dst, timeout=180)
    # Both lanes drained; nothing is left queued.
    link = a.link("b")
    assert link["queue_files"] == 0


def test_a_live_mkdir_and_rm_are_acked_while_a_big_file_streams_on_loopback(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Namespace operations carry no live flag: the Ping the sender's live
    lane sends after them makes the receiver commit them within its live
    deadline. Before, their acks waited for the receiver's socket to run
    dry or a group to fill: on loopback, while a big file streams, mostly
    until it ended (a throttled link runs dry between bursts, so this test
    uses loopback, like the one above)."""
    size = 1024 * MiB
    a, b, src, dst = loopback_pair(cluster)
    (src / "old.txt").write_bytes(b"to be removed\n")
    cluster.start()
    wait_same(src, dst, timeout=60)
    wait_for(lambda: a.link("b")["in_flight"] == 0, 30, "the first sync's acks")
    staged = tmp_path / "big.bin"
    fill(staged, size)
    os.rename(staged, src / "big.bin")
    wait_for(lambda: partial_size(b) > 32 * MiB, 60, "the big file to stream")
    acked = a.link("b")["ops_acked"]
    (src / "newdir").mkdir()
    (src / "old.txt").unlink()
    wait_for(lambda: a.link("b")["ops_acked"] >= acked + 2, 60, "the acks of the mkdir and the rm")
    # Durable on the replica, and the big file is still on its way.
    assert (dst / "newdir").is_dir() and not (dst / "old.txt").exists()
    assert not (dst / "big.bin").exists()
    assert 0 < partial_size(b) < size
    wait_same(src, dst, timeout=120)


def _receive_buffer(port: int) -> int | None:
    """The SO_RCVBUF (ss's skmem ``rb``) of the established connection to
    ``port``, as the kernel holds it; None if there is none."""
    out = subprocess.run(
        ["ss", "-tnmH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"skmem:\([^)]*\brb(\d+)", out)
    return int(m.group(1)) if m else None


def test_the_receive_queue_is_kept_short_while_a_big_file_streams_on_loopback(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """With the kernel's autotuning the receiver's socket queued ~5 MB ahead
    of every live frame (~35 ms at the disk's speed); the session sizes it
    to a few milliseconds of what it reads, and the kernel holds that."""
    _, b, src, dst = loopback_pair(cluster)
    cluster.start()
    staged = tmp_path / "big.bin"
    fill(staged, 512 * MiB)
    os.rename(staged, src / "big.bin")
    wait_for(lambda: partial_size(b) > 32 * MiB, 60, "the big file to stream")

    wait_for(lambda: only_session(b)["rcvbuf"] > 0, 30, "the receiver to size its queue")
    size = only_session(b)["rcvbuf"]
    assert min(rcvqueue.FLOOR, net.rmem_max()) <= size <= net.rmem_max()
    # applied to the real socket (the kernel doubles what it is given)
    wait_for(
        lambda: _receive_buffer(b.port) == 2 * only_session(b)["rcvbuf"],
        30,
        "the socket's receive buffer to be the session's",
    )
    assert not (dst / "big.bin").exists()  # all while the big file streamed
    text = subprocess.run(
        [sys.executable, "-m", "replicator.ctl", "--socket", b.control_socket, "status"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ", receive buffer " in text
    wait_same(src, dst, timeout=120)
