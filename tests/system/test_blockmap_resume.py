"""Block maps across crashes: a delta cut by SIGKILL of either side resumes,
and a partial file damaged while the receiver was down is caught by the
block map and repaired, not published.

The receiver runs in a network namespace behind a rate-limited veth pair
(as in test_resume.py), so the tests act in the middle of a transfer
without guessing times.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from replicator.localcluster import LocalCluster, wait_for

from ..helpers import MiB, fill, wait_same
from .netns import Netns
from .test_resume import partial_size, throttled_pair

pytestmark = pytest.mark.netns


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


BASE = 64 * MiB
TAIL = 128 * MiB


@pytest.mark.parametrize("who", ["receiver", "sender"])
def test_delta_cut_by_sigkill_resumes(cluster: LocalCluster, netns: Netns, who: str) -> None:
    a, b = throttled_pair(cluster, netns, 400)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    fill(src / "big.bin", BASE)
    cluster.start()
    wait_same(src, dst, timeout=120)
    wait_for(lambda: a.link("b")["in_flight"] == 0, 30)
    with (src / "big.bin").open("ab") as f:  # an append: a delta of BASE
        f.write(os.urandom(TAIL))
    # the base is copied on the receiver at once; the tail crawls
    wait_for(lambda: partial_size(b) > BASE + TAIL * 0.3, 60, "30% of the tail")
    node = b if who == "receiver" else a
    node.signal(signal.SIGKILL)
    node.kill()
    held = partial_size(b)
    assert BASE < held < BASE + TAIL
    node.start()
    wait_for(lambda: a.link("b")["connects"] >= 1, 30)
    wait_same(src, dst, timeout=120)
    link = a.link("b")
    log = a.log_path.read_text()
    assert "resuming big.bin at offset" in log
    # never the base again, and not the part of the tail the partial held
    if who == "sender":  # a new process: its counters start after the restart
        assert link["payload_bytes_sent"] < TAIL * 0.8
    else:
        assert link["payload_bytes_sent"] < BASE + TAIL * 1.1
    assert link["delta_files"] >= 1


def test_damaged_partial_is_repaired_before_publish(cluster: LocalCluster, netns: Netns) -> None:
    size = 128 * MiB
    a, b = throttled_pair(cluster, netns, 400)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    fill(src / "big.bin", size)
    cluster.start()
    wait_for(lambda: partial_size(b) > size * 0.4, 60, "40% of the file on the receiver")
    b.signal(signal.SIGKILL)
    b.kill()
    partials = list((dst / ".replicator" / "partial" / "a").glob("*.part"))
    assert len(partials) == 1
    with partials[0].open("r+b") as f:  # a bad sector, a stray write
        f.seek(5 * MiB + 3)
        byte = f.read(1)
        f.seek(5 * MiB + 3)
        f.write(bytes([byte[0] ^ 0x40]))
    b.start()
    wait_same(src, dst, timeout=120)
    assert sha(dst / "big.bin") == sha(src / "big.bin")
    sessions = b.status()["sessions"]
    assert sessions and sessions[0]["verify_mismatches"] == 1
    assert sessions[0]["verify_failed"] == 0
    log = b.log_path.read_text()
    assert "big.bin from a did not match its block map at offset" in log
    assert a.link("b")["mend_requests"] == 1
