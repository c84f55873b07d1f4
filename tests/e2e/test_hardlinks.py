"""Hard links stay hard links (rsync -H, ``preserve = ["hardlinks"]``): the
names of one file share one inode on the replica, its data travels once,
and a link a hostile peer asks for never reaches outside the mirror."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import frames as F
from replicator.localcluster import LocalCluster, LocalNode, wait_for, write_key
from replicator.protocol import Established

from ..helpers import make_pair, wait_same
from .test_hostile import Client

SIZE = 256 * 1024


def linked(root: Path, *names: str) -> bool:
    """All ``names`` exist below ``root`` as one inode with that many links
    or more."""
    try:
        sts = [os.lstat(root / n) for n in names]
    except FileNotFoundError:
        return False
    return len({(s.st_dev, s.st_ino) for s in sts}) == 1 and sts[0].st_nlink >= len(names)


def settled(a: LocalNode) -> bool:
    link = a.link("b")
    return bool(link["in_flight"] == 0 and link["queue_files"] == 0)


@pytest.fixture
def linked_pair(cluster: LocalCluster) -> tuple[LocalNode, LocalNode]:
    a, b = make_pair(cluster, preserve=["hardlinks"])
    src = a.mirror_path("m")
    for d in ("x", "y", "z"):
        (src / d).mkdir()
    (src / "x" / "two").write_bytes(os.urandom(SIZE))
    os.link(src / "x" / "two", src / "y" / "two-again")
    (src / "x" / "three").write_bytes(os.urandom(SIZE))
    os.link(src / "x" / "three", src / "y" / "three-b")
    os.link(src / "x" / "three", src / "z" / "three-c")
    (src / "alone").write_bytes(os.urandom(SIZE))
    cluster.start()
    return a, b


def test_cold_sync_links_the_names_and_sends_the_data_once(
    linked_pair: tuple[LocalNode, LocalNode],
) -> None:
    a, b = linked_pair
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    wait_same(src, dst)
    wait_for(lambda: linked(dst, "x/two", "y/two-again"), 30, "the group of two on b")
    wait_for(lambda: linked(dst, "x/three", "y/three-b", "z/three-c"), 30, "the group of 3")
    assert os.lstat(dst / "x" / "three").st_nlink == 3
    assert os.lstat(dst / "alone").st_nlink == 1
    wait_for(lambda: settled(a), 30, "a's link to settle")
    link = a.link("b")
    assert link["hardlinks_sent"] == 3
    # three files' data, each once (five names)
    assert 3 * SIZE <= link["payload_bytes_sent"] < 4 * SIZE


def test_live_links_appends_and_deletes(linked_pair: tuple[LocalNode, LocalNode]) -> None:
    a, b = linked_pair
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    wait_for(lambda: linked(dst, "x/three", "y/three-b", "z/three-c"), 60, "the group of 3")
    wait_for(lambda: settled(a), 30, "a's link to settle")
    before = a.link("b")
    # a new name of an old file (whose link count was 1 when it was sent)
    os.link(src / "alone", src / "z" / "alone-too")
    wait_for(lambda: linked(dst, "alone", "z/alone-too"), 30, "the new link on b")
    # an append through one name: every name shows it, still one inode
    with open(src / "y" / "three-b", "ab") as f:
        f.write(b"appended")
    want = (src / "x" / "three").read_bytes()

    def appended() -> bool:
        names = ("x/three", "y/three-b", "z/three-c")
        return linked(dst, *names) and all((dst / n).read_bytes() == want for n in names)

    wait_for(appended, 30, "the append on every name of the group on b")
    # a name deleted: only that name goes
    os.unlink(src / "x" / "two")
    wait_for(lambda: not (dst / "x" / "two").exists(), 30, "x/two gone on b")
    assert (dst / "y" / "two-again").read_bytes() == (src / "y" / "two-again").read_bytes()
    wait_same(src, dst)
    wait_for(lambda: settled(a), 30, "a's link to settle")
    # the new link sent no data; the appended file went once (it is below
    # the delta threshold: whole), its two other names as links
    after = a.link("b")
    assert after["payload_bytes_sent"] - before["payload_bytes_sent"] == SIZE + len(b"appended")
    assert after["hardlinks_sent"] - before["hardlinks_sent"] == 3


@pytest.fixture
def hostile(cluster: LocalCluster, tmp_path: Path) -> Iterator[tuple[LocalNode, bytes]]:
    b = cluster.node("b")
    key = os.urandom(16).hex().encode()
    b.peers["mallory"] = {
        "address": "127.0.0.1:9",
        "key_file": str(write_key(tmp_path / "keys" / "mallory.key", key)),
    }
    b.add_mirror("m", accept_from=["mallory"])
    cluster.start()
    yield b, key
    assert b.proc is not None and b.proc.poll() is None


def test_a_link_outside_the_mirror_or_to_no_regular_file_is_refused(
    hostile: tuple[LocalNode, bytes], tmp_path: Path
) -> None:
    b, key = hostile
    root = b.mirror_path("m")
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(b"s")
    st = secret.stat()
    (root / "esc").symlink_to(outside)
    (root / "to-secret").symlink_to(secret)
    (root / "dir").mkdir()
    c = Client(b, "mallory", key)
    assert isinstance(c.handshake(), Established)
    c.send(F.Open(1, "m"))
    assert c.expect(F.Opened).code == 0  # type: ignore[attr-defined]
    size, mtime = st.st_size, st.st_mtime_ns
    cases = {
        b"../outside/secret": F.ErrorCode.BAD_PATH,
        str(secret).encode(): F.ErrorCode.BAD_PATH,
        b"esc/secret": F.ErrorCode.BAD_PATH,  # through a symlinked folder (paths.py)
        b"to-secret": F.ErrorCode.LINK_TARGET,  # a symlink
        b"dir": F.ErrorCode.LINK_TARGET,  # a directory
        b"missing": F.ErrorCode.LINK_TARGET,
    }
    codes = {}
    for target, _ in cases.items():
        c.op += 1
        c.send(F.HardLink(c.op, 1, size, mtime, b"stolen", target))
        codes[c.op] = target
    got = {}
    for _ in cases:
        err = c.expect(F.Error)
        assert isinstance(err, F.Error) and not err.fatal
        got[codes[err.op]] = err.code
    assert got == cases
    assert not (root / "stolen").exists()
    assert secret.stat().st_nlink == 1
    # the wrong version of a real file is refused too; the right one is linked
    good = c.push_file(b"real", b"data")
    assert c.expect(F.Ack).op == good  # type: ignore[attr-defined]
    real = (root / "real").stat()
    c.op += 1
    c.send(F.HardLink(c.op, 1, real.st_size + 1, real.st_mtime_ns, b"other", b"real"))
    err = c.expect(F.Error)
    assert err.code == F.ErrorCode.LINK_TARGET  # type: ignore[attr-defined]
    c.op += 1
    c.send(F.HardLink(c.op, 1, real.st_size, real.st_mtime_ns, b"sub/other", b"real"))
    assert c.expect(F.Ack).op == c.op  # type: ignore[attr-defined]
    assert (root / "sub" / "other").stat().st_ino == real.st_ino
    c.close()
    assert [p.name for p in root.iterdir() if p.name.startswith(".replicator-")] == []


def test_a_reconcile_fixes_names_linked_differently_on_the_replica(
    cluster: LocalCluster,
) -> None:
    """The replica holds the right data under every name, but linked the
    wrong way: separate copies of one linked file, one file for names that
    are separate here. The manifest's hints tell; only links travel for the
    first, the data of the names to split for the second."""
    a, b = make_pair(cluster, preserve=["hardlinks"])
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    data, other = os.urandom(SIZE), os.urandom(SIZE)
    for root in (src, dst):
        (root / "one").write_bytes(data)
        (root / "sep1").write_bytes(other)
    os.link(src / "one", src / "one-too")
    (dst / "one-too").write_bytes(data)  # a copy there
    (src / "sep2").write_bytes(other)  # a copy here, as old as the first
    st = os.stat(src / "sep1")
    os.utime(src / "sep2", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.link(dst / "sep1", dst / "sep2")  # a link there
    for name in ("one", "one-too", "sep1", "sep2"):
        st = os.stat(src / name)
        os.utime(dst / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    cluster.start()
    wait_for(lambda: linked(dst, "one", "one-too"), 30, "one and one-too linked on b")
    wait_for(lambda: os.lstat(dst / "sep1").st_ino != os.lstat(dst / "sep2").st_ino, 30, "split")
    wait_same(src, dst)
    wait_for(lambda: settled(a), 30, "a's link to settle")
    link = a.link("b")
    assert link["hardlinks_sent"] == 1
    assert link["payload_bytes_sent"] == SIZE  # one name of the pair to split
