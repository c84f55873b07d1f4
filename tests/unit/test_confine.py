"""The sending side's confinement (paths.Source, paths.walk, manifest.scan,
outgoing.FileSend.begin, the mirror marker): a symlink anywhere below a mirror
root is never followed, a directory swapped for a symlink mid-walk is not
entered, and paths longer than PATH_MAX work because no path string longer
than one component reaches the kernel."""

from __future__ import annotations

import gc
import os
import stat
from pathlib import Path

import pytest

from replicator.frames import EntryKind
from replicator.localcluster import wait_for
from replicator.manifest import Excludes, lstat_entry, scan
from replicator.marker import Marker
from replicator.paths import DirFds, Source, walk

from ..helpers import make_deep

NOTHING = Excludes(())


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    """A mirror root and an outside folder holding a secret."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"TOPSECRET")
    (outside / "sub").mkdir()
    (outside / "sub" / "deeper.txt").write_bytes(b"TOPSECRET too")
    return root, outside


def test_plain_lookups(trees: tuple[Path, Path]) -> None:
    root, _ = trees
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"hello")
    os.symlink("f", root / "d" / "link")
    src = Source(os.fsencode(root))
    found = src.lstat(b"d/f")
    assert found is not None and found[0].st_size == 5 and found[1] == b""
    found = src.lstat(b"d/link")
    assert found is not None and stat.S_ISLNK(found[0].st_mode) and found[1] == b"f"
    assert src.lstat(b"d/missing") is None
    assert src.lstat(b"d/f/under-a-file") is None
    opened = src.open_file(b"d/f")
    assert opened is not None
    fd, st = opened
    try:
        assert os.read(fd, 100) == b"hello" and st.st_size == 5
    finally:
        os.close(fd)
    assert src.open_file(b"d/link") is None  # a symlink is not opened, even to a file inside
    assert src.open_file(b"d") is None


def test_symlinked_directory_component_names_nothing(trees: tuple[Path, Path]) -> None:
    root, outside = trees
    os.symlink(outside, root / "d")
    os.symlink("../outside", root / "rel")
    src = Source(os.fsencode(root))
    for path in (b"d/secret.txt", b"rel/secret.txt", b"d/sub/deeper.txt"):
        assert src.lstat(path) is None, path
        assert src.open_file(path) is None, path
        assert lstat_entry(os.fsencode(root), path) is None, path
        found = src.locate(path)
        assert found is None, path
    # the symlink itself is an entry of its own, replicated as a symlink
    st = lstat_entry(os.fsencode(root), b"d")
    assert st is not None and st.kind is EntryKind.SYMLINK and st.target == os.fsencode(outside)
    assert src.listing(b"d") is None


def test_scan_never_enters_symlinks(trees: tuple[Path, Path]) -> None:
    root, outside = trees
    (root / "a").mkdir()
    (root / "a" / "x").write_bytes(b"x")
    os.symlink(outside, root / "a" / "out")
    os.symlink(outside / "secret.txt", root / "s")
    got = dict(scan(os.fsencode(root), NOTHING))
    assert set(got) == {b"a", b"a/x", b"a/out", b"s"}
    assert got[b"a/out"].kind is EntryKind.SYMLINK
    assert got[b"s"].kind is EntryKind.SYMLINK and got[b"s"].size == 0
    # a scan of a subtree reached through a symlink finds nothing
    assert list(scan(os.fsencode(root), NOTHING, b"a/out")) == []


def test_directory_swapped_for_symlink_mid_walk_is_not_entered(
    trees: tuple[Path, Path],
) -> None:
    root, outside = trees
    (root / "d").mkdir()
    (root / "d" / "secret.txt").write_bytes(b"harmless")
    swapped = []

    def skip(rel: bytes) -> bool:
        # Called while the root is being listed, before "d" is entered: the
        # attacker's swap lands between the listing and the descent.
        if rel == b"d" and not swapped:
            os.rename(root / "d", root / "d.old")
            os.symlink(outside, root / "d")
            swapped.append(rel)
        return False

    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen = [rel for rel, *_ in walk(rfd, skip)]
    finally:
        os.close(rfd)
    assert swapped
    assert not any(rel.startswith(b"d/") for rel in seen), seen


def test_walk_closes_its_fds_when_abandoned(trees: tuple[Path, Path]) -> None:
    root, _ = trees
    d = root
    for i in range(20):
        d = d / f"level{i}"
        d.mkdir()
        (d / "f").write_bytes(b"x")
    # Earlier tests may leave objects holding fds in reference cycles
    # (test_backlog's unclosed Stores: 3 fds each); collected mid-test,
    # they would make the count drop.
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    src = Source(os.fsencode(root))
    it = src.walk(NOTHING)
    for _ in range(25):
        next(it)
    it.close()
    assert len(os.listdir("/proc/self/fd")) == before
    assert len(list(src.walk(NOTHING))) == 40
    assert len(os.listdir("/proc/self/fd")) == before


def test_paths_longer_than_path_max(trees: tuple[Path, Path]) -> None:
    root, _ = trees
    rel = make_deep(root, 24, 200)
    assert len(os.fsencode(root)) + len(rel) > 4096
    (root / "plain.txt").write_bytes(b"plain")
    src = Source(os.fsencode(root))
    found = src.lstat(rel)
    assert found is not None and found[0].st_size == 4
    opened = src.open_file(rel)
    assert opened is not None
    os.close(opened[0])
    got = dict(scan(os.fsencode(root), NOTHING))
    assert rel in got and b"plain.txt" in got
    assert src.listing(rel.rpartition(b"/")[0]) is not None


def test_fifo_swapped_in_does_not_block(trees: tuple[Path, Path]) -> None:
    root, _ = trees
    os.mkfifo(root / "f")
    assert Source(os.fsencode(root)).open_file(b"f") is None


def test_marker_is_read_confined(tmp_path: Path, trees: tuple[Path, Path]) -> None:
    root, outside = trees
    m = Marker(str(tmp_path / "state"), "m", str(root))
    assert m.ensure()
    marker = root / ".replicator" / "marker"
    assert marker.is_file()
    # a local user swaps the daemon's folder for a symlink to a copy of it
    (outside / ".replicator").mkdir()
    (outside / ".replicator" / "marker").write_bytes(marker.read_bytes())
    os.rename(root / ".replicator", root / "old")
    os.symlink(outside / ".replicator", root / ".replicator")
    assert not m.ok()
    os.unlink(root / ".replicator")
    os.rename(root / "old", root / ".replicator")
    assert m.ok()
    # a fifo in the marker's place must not hang the daemon
    os.rename(marker, root / "marker.saved")
    os.mkfifo(marker)
    assert not m.ok()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_dir_fds_find_what_a_fresh_walk_finds(trees: tuple[Path, Path]) -> None:
    """A lookup through DirFds (one pump round) gives what an uncached one
    gives, symlinked components included, and holds no fd once closed."""
    root, outside = trees
    for d in ("a", "a/b", "a/b/c", "z"):
        (root / d).mkdir()
    for f in ("top", "a/f", "a/b/f", "a/b/c/f", "z/f"):
        (root / f).write_bytes(f.encode())
    os.symlink(outside, root / "a" / "out")
    os.symlink("b", root / "a" / "b2")
    before = _fds()
    dirs = DirFds(os.fsencode(root))
    cached, fresh = Source(os.fsencode(root), dirs), Source(os.fsencode(root))
    paths = [b"a/b/c/f", b"a/b/f", b"a/f", b"top", b"z/f", b"a/b/c", b"a/out/secret.txt"]
    paths += [b"a/b2/f", b"a/missing/f", b"a/f/under-a-file", b"a/b/c/f"]
    for path in paths:
        got, want = cached.lstat(path), fresh.lstat(path)
        assert (got is None) == (want is None), path
        if got is not None and want is not None:
            assert (got[0].st_ino, got[1]) == (want[0].st_ino, want[1]), path
    opened = cached.open_file(b"a/b/c/f")
    assert opened is not None
    os.close(opened[0])
    assert _fds() > before  # a/b/c, a/b, a and the root are held
    dirs.close()
    assert _fds() == before


def test_dir_fds_do_not_outlive_their_round(trees: tuple[Path, Path]) -> None:
    """Within a round a held directory answers; after ``close``, a
    directory renamed meanwhile (or swapped for a symlink to the outside)
    is looked up anew and names nothing."""
    root, outside = trees
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"mine")
    dirs = DirFds(os.fsencode(root))
    src = Source(os.fsencode(root), dirs)
    assert src.lstat(b"d/f") is not None
    os.rename(root / "d", root / "d.old")
    os.symlink(outside, root / "d")
    os.symlink(outside / "secret.txt", outside / "f")
    found = src.lstat(b"d/f")  # the same round: the directory found first
    assert found is not None and found[1] == b""
    dirs.close()
    assert src.lstat(b"d/f") is None  # a new round walks again: a symlink, not entered
    assert src.lstat(b"d.old/f") is not None
    dirs.close()


def test_dir_fds_hold_a_bounded_number(tmp_path: Path) -> None:
    for i in range(DirFds.MAX + 10):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "f").write_bytes(b"x")
    before = _fds()
    dirs = DirFds(os.fsencode(tmp_path))
    src = Source(os.fsencode(tmp_path), dirs)
    for i in range(DirFds.MAX + 10):
        assert src.lstat(f"d{i}/f".encode()) is not None
        assert _fds() <= before + DirFds.MAX
    dirs.close()
    assert _fds() == before


def test_dir_fds_keep_the_directories_on_the_way(tmp_path: Path) -> None:
    """A lookup keeps every directory it opened on the way down (and the
    root): a sibling below them opens only what differs."""
    for d in ("a/b/c", "a/b/x"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "f").write_bytes(b"x")
    before = _fds()
    dirs = DirFds(os.fsencode(tmp_path))
    src = Source(os.fsencode(tmp_path), dirs)
    assert src.lstat(b"a/b/c/f") is not None
    assert _fds() == before + 4  # the root, a, a/b, a/b/c
    assert src.lstat(b"a/b/x/f") is not None
    assert _fds() == before + 5  # and a/b/x, opened from a/b
    dirs.close()
    assert _fds() == before


def test_a_lookup_through_dir_fds_borrows_their_fd(tmp_path: Path) -> None:
    """A pump round's lookups borrow the round's directory fds (no copy, no
    close per entry); ``own`` copies one for what goes on after the round."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    before = _fds()
    dirs = DirFds(os.fsencode(tmp_path))
    src = Source(os.fsencode(tmp_path), dirs)
    found = src.locate(b"d/f")
    assert found is not None
    held = _fds()
    found.close()
    assert _fds() == held  # borrowed: the round's fd stays open
    found = src.locate(b"d/f")
    assert found is not None and _fds() == held  # and no copy is made
    kept = found.own()
    assert found.dir_fd == -1 and kept.dir_fd >= 0 and _fds() == held + 1
    found.close()
    dirs.close()
    assert _fds() == before + 1
    assert kept.inode() == (tmp_path / "d" / "f").stat().st_ino  # usable after the round
    assert kept.own() is kept
    kept.close()
    assert _fds() == before


def _cached(path: Path) -> bool:
    """Whether the first page of ``path`` is in the page cache now."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_readahead_reads_regular_files_only(trees: tuple[Path, Path]) -> None:
    """``DirFds.readahead`` brings a regular file into the page cache; it
    never opens through a symlink, and a missing path, a fifo or a
    directory are no error."""
    root, outside = trees
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(os.urandom(1 << 16))
    (outside / "big").write_bytes(os.urandom(1 << 16))
    os.symlink(outside / "big", root / "d" / "link")
    os.symlink(outside, root / "out")
    os.mkfifo(root / "d" / "fifo")
    for p in (root / "d" / "f", outside / "big"):
        _evict(p)
    if _cached(root / "d" / "f"):
        pytest.skip("this filesystem keeps clean pages cached (tmpfs?)")
    dirs = DirFds(os.fsencode(root))
    try:
        for rel in (b"d/link", b"out/big", b"d/fifo", b"d", b"d/missing", b"nodir/f"):
            dirs.readahead(rel, 1 << 20)
        assert not _cached(outside / "big")
        dirs.readahead(b"d/f", 1 << 20)
        wait_for(lambda: _cached(root / "d" / "f"), 10, "the readahead")
    finally:
        dirs.close()
