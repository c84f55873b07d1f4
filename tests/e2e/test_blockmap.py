"""Block maps end to end: deltas for real edit patterns, verification before
publish, and a replica changed under us. Two real daemons on loopback."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from replicator.blockmap import MIN_BLOCK, block_size_for
from replicator.localcluster import LocalCluster, LocalNode, wait_for

from ..helpers import MiB, fill, make_pair, only_session, wait_same

SIZE = 24 * MiB


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replicated(a: LocalNode, b: LocalNode, name: str = "f.bin") -> None:
    src, dst = a.mirror_path("m") / name, b.mirror_path("m") / name
    wait_for(
        lambda: dst.exists() and src.stat().st_size == dst.stat().st_size and sha(src) == sha(dst),
        60,
        f"{name} on b to equal a's",
    )
    # ...and acknowledged, so the next change is a delta of this version
    wait_for(lambda: a.link("b")["in_flight"] == 0 and a.link("b")["queue_files"] == 0, 30)


def start(cluster: LocalCluster) -> tuple[LocalNode, LocalNode, Path]:
    a, b = make_pair(cluster)
    cluster.start()
    f = a.mirror_path("m") / "f.bin"
    fill(f, SIZE)
    replicated(a, b)
    return a, b, f


def sent(a: LocalNode) -> int:
    return int(a.link("b")["payload_bytes_sent"])


def test_append_sends_only_the_new_tail(cluster: LocalCluster) -> None:
    a, b, f = start(cluster)
    before, deltas = sent(a), a.link("b")["delta_files"]
    with f.open("ab") as out:
        out.write(os.urandom(MiB))
    replicated(a, b)
    link = a.link("b")
    on_wire = link["payload_bytes_sent"] - before
    # the new MiB, plus the old last block if it was partial (it is not: 24 MiB)
    assert on_wire <= MiB + block_size_for(SIZE), on_wire
    assert link["delta_files"] == deltas + 1
    assert only_session(b)["delta_bytes_copied"] >= SIZE - block_size_for(SIZE)
    assert only_session(b)["verify_mismatches"] == 0


def test_in_place_write_sends_one_block(cluster: LocalCluster) -> None:
    a, b, f = start(cluster)
    before = sent(a)
    fd = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xa5" * 4096, SIZE // 2 + 100)  # inside one block
    finally:
        os.close(fd)
    replicated(a, b)
    on_wire = sent(a) - before
    assert 0 < on_wire <= block_size_for(SIZE), on_wire


def test_truncate_then_extend(cluster: LocalCluster) -> None:
    a, b, f = start(cluster)
    before = sent(a)
    keep = SIZE * 3 // 4 + 12345  # not on a block boundary
    os.truncate(f, keep)
    with f.open("ab") as out:
        out.write(os.urandom(2 * MiB))
    replicated(a, b)
    on_wire = sent(a) - before
    # the two new MiB and the block that was cut (it may also have been sent
    # once more if the watcher saw the truncate on its own)
    assert on_wire <= 2 * MiB + 2 * block_size_for(SIZE) + (keep % block_size_for(SIZE)), on_wire
    assert (b.mirror_path("m") / "f.bin").stat().st_size == keep + 2 * MiB


def test_editor_save_replaces_the_replica_whole(cluster: LocalCluster) -> None:
    """An editor writes a new file and renames it over the old one. The
    temporary file is a new path (deltas are per path: it goes whole), and
    the replica ends up exactly the new version, verified."""
    a, b, f = start(cluster)
    data = bytearray(f.read_bytes())
    data[1000:1010] = b"0123456789"
    tmp = f.with_name(".f.bin.swp")
    tmp.write_bytes(bytes(data))
    os.rename(tmp, f)
    replicated(a, b)
    wait_same(a.mirror_path("m"), b.mirror_path("m"))
    assert only_session(b)["verify_mismatches"] == 0


def test_replica_changed_locally_gets_the_whole_file(cluster: LocalCluster) -> None:
    """Someone wrote into b's copy: a delta against it would publish a mix
    of their bytes and ours. b refuses the delta and gets the whole file."""
    a, b, f = start(cluster)
    replica = b.mirror_path("m") / "f.bin"
    fd = os.open(replica, os.O_WRONLY)
    try:
        os.pwrite(fd, b"local junk", 5 * MiB)
    finally:
        os.close(fd)
    before = sent(a)
    with f.open("ab") as out:
        out.write(os.urandom(MiB))
    replicated(a, b)
    assert sha(replica) == sha(f)
    assert only_session(b)["base_changed"] >= 1
    assert sent(a) - before >= SIZE  # the whole file, after the refused delta


def test_small_files_are_verified_and_never_deltas(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    cluster.start()
    src = a.mirror_path("m")
    for i in range(50):
        (src / f"s{i}").write_bytes(os.urandom(i * 997))
    fill(src / "mid.bin", MIN_BLOCK * 3 + 7)
    wait_same(src, b.mirror_path("m"))
    s = only_session(b)
    assert s["verify_mismatches"] == 0 and s["delta_files"] == 0
