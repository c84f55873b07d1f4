"""`replicatorctl verify`: a scrub finds replicas damaged after they were
published (a flipped byte with its mtime put back, a file deleted on the
replica), lists each with its first differing offset, and `--repair` fixes
them. Real daemons, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from replicator.blockmap import block_size_for
from replicator.localcluster import LocalCluster, LocalNode, wait_for

from ..helpers import MiB, fill, make_pair, wait_same


def ctl(node: LocalNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator.ctl", "--socket", node.control_socket, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def flip(path: Path, offset: int) -> None:
    """Damage one byte as a failing disk would: size and mtime unchanged."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def report(a: LocalNode) -> dict[str, Any]:
    return a.link("b")["mirrors"]["m"]["verify"]  # type: ignore[no-any-return]


def test_verify_finds_and_repairs_damaged_replicas(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    fill(src / "big.bin", 8 * MiB)
    (src / "d").mkdir()
    (src / "d" / "small.txt").write_bytes(os.urandom(3000))
    fill(src / "d" / "gone.bin", 2 * MiB)
    (src / "same.txt").write_text("untouched")
    wait_same(src, dst)
    wait_for(lambda: a.link("b")["in_flight"] == 0, 30)

    # a clean mirror verifies clean
    r = ctl(a, "verify", "m")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 files" in r.stdout and "0 differ" in r.stdout

    flip(dst / "big.bin", 5 * MiB + 3)
    flip(dst / "d" / "small.txt", 10)
    (dst / "d" / "gone.bin").unlink()
    damaged = (dst / "big.bin").read_bytes()

    # found, listed with offsets, nothing changed without --repair
    r = ctl(a, "verify", "m")
    assert r.returncode == 5, r.stdout + r.stderr
    big_block = (5 * MiB + 3) // block_size_for(8 * MiB) * block_size_for(8 * MiB)
    assert f"big.bin: differs from offset {big_block} " in r.stdout, r.stdout
    assert "d/small.txt: differs from offset 0 " in r.stdout
    assert "d/gone.bin: differs from offset 0 (2097152 bytes here, missing there)" in r.stdout
    rep = report(a)
    assert rep["state"] == "done" and rep["files_checked"] == 4 and rep["differing"] == 3
    assert (dst / "big.bin").read_bytes() == damaged
    log = a.log_path.read_text()
    assert "verify: mirror m: big.bin differs on the peer from offset" in log

    # --repair sends them again; the replica is whole and verifies clean
    r = ctl(a, "verify", "m", "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 repaired" in r.stdout
    wait_same(src, dst)
    r = ctl(a, "verify", "m")
    assert r.returncode == 0 and "0 differ" in r.stdout, r.stdout + r.stderr
    # status shows the last scrub
    st = ctl(a, "status")
    assert "mirror m: verify done" in st.stdout


def test_verify_skips_what_is_not_in_sync_and_stops_without_a_link(
    cluster: LocalCluster,
) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    src = a.mirror_path("m")
    (src / "f").write_text("x")
    wait_same(src, b.mirror_path("m"))
    a.control("pause")
    (src / "pending").write_text("not sent yet")
    time.sleep(0.3)
    r = ctl(a, "verify", "--no-wait")
    assert r.returncode == 0, r.stderr
    a.control("resume")
    wait_for(lambda: report(a)["state"] == "done", 30)
    rep = report(a)
    assert rep["files_checked"] >= 1
    b.stop()
    wait_for(lambda: a.link("b")["state"] != "connected", 30)
    r = ctl(a, "verify", "m")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "not up" in r.stderr
