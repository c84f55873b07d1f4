"""Interrupted transfers resume at the receiver's offset and never publish a torn file.

The receiver runs in a network namespace behind a rate-limited veth pair, so
the test can act in the middle of a 256 MiB transfer without guessing times.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from replicator.localcluster import LocalCluster, LocalNode, wait_for

from ..helpers import MiB, fill, wait_same
from .netns import Netns

pytestmark = pytest.mark.netns

SIZE = 256 * MiB


def throttled_pair(cluster: LocalCluster, ns: Netns, mbit: int) -> tuple[LocalNode, LocalNode]:
    a = cluster.node("a", host=ns.host_ip)
    b = cluster.node("b", host=ns.ns_ip, netns=ns.name)
    cluster.connect("a", "b")
    a.add_mirror("m", push_to=["b"])
    b.add_mirror("m", accept_from=["a"])
    ns.rate(mbit)
    return a, b


def partial_size(b: LocalNode) -> int:
    d = b.mirror_path("m") / ".replicator" / "partial" / "a"
    sizes = [p.stat().st_size for p in d.glob("*.part")] if d.exists() else []
    return max(sizes, default=0)


def test_receiver_sigkill_mid_file_resumes(cluster: LocalCluster, netns: Netns) -> None:
    a, b = throttled_pair(cluster, netns, 400)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    fill(src / "big.bin", SIZE)
    cluster.start()
    wait_for(lambda: partial_size(b) > SIZE * 0.4, 60, "40% of the file on the receiver")
    b.signal(signal.SIGKILL)
    b.kill()
    held = partial_size(b)
    assert 0 < held < SIZE
    b.start()
    wait_same(src, dst, timeout=120)
    link = a.link("b")
    assert link["resumed_files"] == 1
    assert link["resumed_bytes_skipped"] >= held * 0.9
    resent = link["payload_bytes_sent"] - SIZE
    assert resent < SIZE * 0.10, f"re-sent {resent} bytes of {SIZE}"
    assert "resuming big.bin at offset" in a.log_path.read_text()


def test_link_cut_mid_file_reconnects_and_resumes(cluster: LocalCluster, netns: Netns) -> None:
    a, b = throttled_pair(cluster, netns, 400)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    fill(src / "big.bin", SIZE)
    cluster.start()
    wait_for(lambda: partial_size(b) > SIZE * 0.3, 60, "30% of the file on the receiver")
    # kill the TCP connection, not the processes
    subprocess.run(["ss", "-K", "dst", netns.ns_ip], check=True, capture_output=True)
    wait_same(src, dst, timeout=120)
    link = a.link("b")
    assert link["connects"] >= 2
    assert link["resumed_files"] == 1
    assert link["payload_bytes_sent"] - SIZE < SIZE * 0.10


def test_a_file_longer_than_dead_after_keeps_its_connection(
    cluster: LocalCluster, netns: Netns
) -> None:
    """24 MiB at 16 Mbit/s (12 s; dead_after is 6 s), no bwlimit: the peer
    says nothing until the file ends, so the link's pings between chunks
    (about 2 s each here) are what show it the peer is alive. It used to
    reconnect every 6 s and resume (16 MiB over 8 Mbit/s: 3 connections)."""
    a, b = throttled_pair(cluster, netns, 16)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    cluster.start()
    fill(src / "big.bin", 24 * MiB)
    wait_same(src, dst, timeout=180)
    link = a.link("b")
    assert link["connects"] == 1, link["last_error"]
    assert link["resumed_files"] == 0 and link["files_sent"] == 1


def digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("how", ["overwrite", "truncate"])
def test_source_rewritten_during_transfer(cluster: LocalCluster, netns: Netns, how: str) -> None:
    a, b = throttled_pair(cluster, netns, 200)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    size = 48 * MiB
    fill(src / "f.bin", size)
    old = digest(src / "f.bin")
    seen: set[str | None] = set()
    stop = threading.Event()

    def watch() -> None:  # every version ever visible at the destination
        while not stop.is_set():
            seen.add(digest(dst / "f.bin"))

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        cluster.start()
        wait_for(lambda: partial_size(b) > size * 0.25, 60, "a quarter of the file")
        with (src / "f.bin").open("r+b") as f:
            if how == "truncate":
                f.truncate(size // 2)
            else:
                f.seek(size // 2)
                f.write(os.urandom(MiB))
        new = digest(src / "f.bin")
        wait_for(lambda: digest(dst / "f.bin") == new, 120, "the new content on the replica")
    finally:
        stop.set()
        t.join()
    assert seen <= {None, old, new}, "a torn file was visible at the destination"
    assert a.link("b")["files_aborted"] >= 1
    wait_same(src, dst)
