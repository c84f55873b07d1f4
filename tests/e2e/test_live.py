"""Live replication: every kind of change reaches the replica through inotify,
with no rescan asked for. Each test ends with the replica identical to the
source (content, mode, mtime_ns, tree shape)."""

from __future__ import annotations

import mmap
import os
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from replicator.localcluster import LocalCluster, LocalNode, wait_for

from ..helpers import MiB, fill, make_pair, wait_same

# A rescan would hide a watcher bug: make sure none runs during a test.
NO_RESCAN = {"rescan_interval": 86400.0}


def deep_tree(top: Path, dirs: int, files: int, data: Callable[[int, int], bytes]) -> None:
    """top/dNN/deep/er/fNNN: ``dirs`` directories of ``files`` files."""
    for d in range(dirs):
        sub = top / f"d{d:02d}" / "deep" / "er"
        sub.mkdir(parents=True)
        for i in range(files):
            (sub / f"f{i:03d}").write_bytes(data(d, i))


@pytest.fixture
def live(cluster: LocalCluster) -> Iterator[tuple[LocalNode, Path, Path]]:
    a, b = make_pair(cluster, **NO_RESCAN)
    b.mirrors["m"]["preserve"] = ["owners", "special_bits"]  # owners travel (as root)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    cluster.start()
    wait_for(lambda: a.link("b")["mirrors"].get("m", {}).get("listed"), 30, "first reconcile")
    yield a, src, dst
    wait_same(src, dst)
    # nothing was found by a rescan: everything came from the watcher
    assert a.link("b")["mirrors"]["m"]["last_scan"] == pytest.approx(
        a.link("b")["mirrors"]["m"]["last_scan"]
    )


def test_create_write_close(live: tuple[LocalNode, Path, Path]) -> None:
    _, src, _ = live
    (src / "new.txt").write_text("hello\n")
    fill(src / "blob", 3 * MiB)


def test_overwrite_in_place(live: tuple[LocalNode, Path, Path]) -> None:
    _, src, dst = live
    (src / "f").write_bytes(b"a" * 10000)
    wait_same(src, dst)
    with (src / "f").open("r+b") as f:
        f.seek(5000)
        f.write(b"b" * 100)


def test_append_in_several_writes_with_pauses(live: tuple[LocalNode, Path, Path]) -> None:
    _, src, dst = live
    with (src / "log").open("ab") as f:
        for i in range(5):
            f.write(f"line {i}\n".encode() * 1000)
            f.flush()
            time.sleep(0.15)  # the writer pauses; the file is not closed yet
    for i in range(3):  # and appends in separate open/close rounds
        with (src / "log").open("ab") as f:
            f.write(f"round {i}\n".encode())
        wait_same(src, dst)


def test_truncate(live: tuple[LocalNode, Path, Path]) -> None:
    _, src, dst = live
    fill(src / "t", 2 * MiB)
    wait_same(src, dst)
    os.truncate(src / "t", 1000)
    wait_same(src, dst)
    with (src / "t").open("r+b") as f:
        f.truncate(0)


def test_editor_save_temp_then_rename(live: tuple[LocalNode, Path, Path]) -> None:
    _, src, dst = live
    (src / "doc.txt").write_text("version 1\n")
    wait_same(src, dst)
    tmp = src / ".doc.txt.swp"
    tmp.write_text("version 2, saved atomically\n")
    os.chmod(tmp, 0o640)
    os.rename(tmp, src / "doc.txt")


def test_rsync_into_source(live: tuple[LocalNode, Path, Path], tmp_path: Path) -> None:
    _, src, _ = live
    other = tmp_path / "other"
    (other / "x" / "y").mkdir(parents=True)
    for i in range(50):
        (other / "x" / "y" / f"r{i}").write_bytes(os.urandom(3000))
    (other / "x" / "link").symlink_to("y/r1")
    subprocess.run(["rsync", "-a", f"{other}/", f"{src}/"], check=True)


def test_cp_r_and_tar_x_of_2500_files(live: tuple[LocalNode, Path, Path], tmp_path: Path) -> None:
    _, src, dst = live
    tree = tmp_path / "tree"
    deep_tree(tree, 25, 50, lambda d, i: os.urandom(512))
    subprocess.run(["cp", "-r", str(tree), str(src / "copied")], check=True)
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as t:
        t.add(tree, arcname="untarred")
    wait_same(src, dst, timeout=120)
    subprocess.run(["tar", "xf", str(archive), "-C", str(src)], check=True)
    wait_same(src, dst, timeout=120)
    assert sum(1 for _ in (dst / "untarred").rglob("f*")) == 1250


def test_mkdir_p_and_files_inside_at_once(live: tuple[LocalNode, Path, Path]) -> None:
    _, src, _ = live
    subprocess.run(
        f"mkdir -p {src}/a/b/c && echo 1 > {src}/a/b/c/one && "
        f"echo 2 > {src}/a/b/two && touch {src}/a/b/c/empty",
        shell=True,
        check=True,
    )


def test_mv_directory_within_into_and_out_of_tree(
    live: tuple[LocalNode, Path, Path], tmp_path: Path
) -> None:
    a, src, dst = live
    (src / "d1" / "sub").mkdir(parents=True)
    for i in range(20):
        (src / "d1" / "sub" / f"f{i}").write_bytes(os.urandom(8192))
    wait_same(src, dst)
    sent = a.link("b")["payload_bytes_sent"]
    os.rename(src / "d1", src / "d2")  # within
    wait_same(src, dst)
    assert a.link("b")["payload_bytes_sent"] == sent, "a rename re-sent data"
    outside = tmp_path / "outside"
    (outside / "in").mkdir(parents=True)
    (outside / "in" / "g").write_text("moved in")
    os.rename(outside / "in", src / "d2" / "came-in")  # into
    wait_same(src, dst)
    os.rename(src / "d2" / "sub", tmp_path / "gone")  # out of
    wait_same(src, dst)
    assert not (dst / "d2" / "sub").exists()


def test_tree_moved_in_with_a_directory_swapped_mid_transfer(
    live: tuple[LocalNode, Path, Path], tmp_path: Path
) -> None:
    """A tree moved in is sent path by path, the sender keeping directory
    fds only for one pump round (paths.DirFds): a directory replaced by
    another of the same name once its first files arrived must be looked
    up anew, so its new files (same names, other content) are sent."""
    _, src, dst = live
    staged = tmp_path / "staged"
    deep_tree(staged, 20, 100, lambda d, i: b"old %d %d\n" % (d, i) * 50)
    os.rename(staged, src / "tree")
    first = dst / "tree" / "d00" / "deep" / "er"
    wait_for(lambda: first.is_dir() and any(first.iterdir()), 30, "the first files")
    os.rename(src / "tree" / "d00", tmp_path / "old-d00")
    new = src / "tree" / "d00.new" / "deep" / "er"
    new.mkdir(parents=True)
    for i in range(100):
        (new / f"f{i:03d}").write_bytes(b"NEW %d\n" % i * 50)
    os.rename(src / "tree" / "d00.new", src / "tree" / "d00")
    wait_same(src, dst)
    assert (dst / "tree" / "d00" / "deep" / "er" / "f000").read_bytes().startswith(b"NEW")


def test_files_written_deep_in_a_tree_just_moved_in(
    live: tuple[LocalNode, Path, Path], tmp_path: Path
) -> None:
    """The watches below a tree moved in are added off watchdog's thread,
    after the move: a file written deep inside at once (maybe before its
    directory's watch) and one written once the tree is across (only its
    watch can tell: no rescan runs here) both reach the replica."""
    _, src, dst = live
    staged = tmp_path / "staged"
    deep_tree(staged, 40, 20, lambda d, i: b"%d %d\n" % (d, i))
    os.rename(staged, src / "tree")
    (src / "tree" / "d39" / "deep" / "er" / "at-once").write_text("at once\n")
    wait_same(src, dst)
    for d in (0, 20, 39):
        (src / "tree" / f"d{d:02d}" / "deep" / "er" / "later").write_text("later\n")
    # Sooner than the scanner's first check of the watches after the start
    # (scanner.WATCH_CHECK_INTERVAL), which would find unwatched directories.
    wait_same(src, dst, timeout=30)


def test_directory_mtime_changed_by_entries_never_sent(
    live: tuple[LocalNode, Path, Path], tmp_path: Path
) -> None:
    """A directory's mtime changes with its entries, and the watcher does
    not report the directory itself: a temp file made and removed before
    the link looked, a subdirectory made and renamed over before the link
    looked, and a directory replaced by one moved in each change the
    parent's mtime with nothing else to send for it (no ack of a child
    tells the link). The parent's Meta must follow all the same, and what
    the replaced directories held must not stay on the replica."""
    _, src, dst = live
    for d in ("a", "b", "c", "d"):
        (src / d / "sub").mkdir(parents=True)
        (src / d / "sub" / "f").write_text(d)
    (tmp_path / "other" / "in").mkdir(parents=True)
    (tmp_path / "other" / "in" / "g").write_text("g")
    wait_same(src, dst)
    time.sleep(0.05)  # a new mtime, distinct from the synced one
    (src / "a" / "tmp").write_text("x")
    (src / "a" / "tmp").unlink()
    (src / "b" / "sub.new").mkdir()
    os.rename(src / "b" / "sub.new", src / "b" / "sub2")
    os.rename(src / "b" / "sub2", src / "b" / "sub3")
    os.rmdir(src / "b" / "sub3")
    os.rename(src / "c" / "sub", tmp_path / "old-sub")
    os.rename(tmp_path / "other" / "in", src / "c" / "sub")
    shutil.rmtree(src / "d" / "sub")
    (src / "d" / "sub").mkdir()
    (src / "d" / "sub" / "h").write_text("h")
    wait_same(src, dst)
    assert not (dst / "c" / "sub" / "f").exists()
    assert not (dst / "d" / "sub" / "f").exists()


def test_rm_rf_tree(live: tuple[LocalNode, Path, Path]) -> None:
    _, src, dst = live
    for d in range(5):
        (src / "tree" / f"d{d}").mkdir(parents=True)
        for f in range(20):
            (src / "tree" / f"d{d}" / f"f{f}").write_text("x")
    wait_same(src, dst)
    shutil.rmtree(src / "tree")


def test_chmod_and_touch_send_no_data(live: tuple[LocalNode, Path, Path]) -> None:
    a, src, dst = live
    fill(src / "big", 4 * MiB)
    (src / "dir").mkdir()
    wait_same(src, dst)
    sent = a.link("b")["payload_bytes_sent"]
    os.chmod(src / "big", 0o600)
    wait_same(src, dst)
    os.utime(src / "big", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    wait_same(src, dst)
    os.utime(src / "big")  # touch to now, as utimensat does
    os.chmod(src / "dir", 0o705)
    subprocess.run(["touch", "-h", str(src / "dir")], check=True)
    if os.geteuid() == 0:
        os.chown(src / "big", 1234, 5678)
    wait_same(src, dst)
    assert a.link("b")["payload_bytes_sent"] == sent, "metadata changes re-sent data"
    if os.geteuid() == 0:
        st = (dst / "big").stat()
        assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_touch_command_resends_rather_than_risk_an_mmap_write(
    live: tuple[LocalNode, Path, Path],
) -> None:
    """GNU touch opens the file for writing (IN_ATTRIB + IN_CLOSE_WRITE), like
    an mmap write followed by chmod: the data is sent again (slower, never
    wrong). The mmap case is the one that must not be mistaken for metadata."""
    a, src, dst = live
    (src / "f").write_bytes(b"A" * 8192)
    wait_same(src, dst)
    fd = os.open(src / "f", os.O_RDWR)
    with mmap.mmap(fd, 0) as mm:  # IN_CLOSE_WRITE only, no IN_MODIFY
        mm[0:4] = b"BBBB"
        mm.flush()
    os.close(fd)
    os.chmod(src / "f", 0o640)  # IN_ATTRIB
    wait_same(src, dst)
    assert (dst / "f").read_bytes()[:4] == b"BBBB"
    sent = a.link("b")["payload_bytes_sent"]
    subprocess.run(["touch", str(src / "f")], check=True)
    wait_same(src, dst)
    assert a.link("b")["payload_bytes_sent"] == sent + 8192


def test_close_after_chmod_of_an_open_mmap_sends_the_data(
    live: tuple[LocalNode, Path, Path],
) -> None:
    """An mmap write raises no IN_MODIFY; a chmod while the file is still
    open is all the watcher sees, and is sent as metadata. The close that
    follows must send the data, although size and mtime then match."""
    _, src, dst = live
    (src / "g").write_bytes(b"A" * 8192)
    wait_same(src, dst)
    fd = os.open(src / "g", os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as mm:
            mm[0:4] = b"CCCC"
            mm.flush()
            os.chmod(src / "g", 0o640)  # IN_ATTRIB, the file still open for writing
            wait_for(
                lambda: stat.S_IMODE((dst / "g").stat().st_mode) == 0o640,
                30,
                "the chmod to arrive while the file is open",
            )
    finally:
        os.close(fd)  # IN_CLOSE_WRITE
    wait_same(src, dst)
    assert (dst / "g").read_bytes()[:4] == b"CCCC"


def test_symlink_and_hard_link(live: tuple[LocalNode, Path, Path]) -> None:
    _, src, dst = live
    (src / "target").write_text("t")
    (src / "sym").symlink_to("target")
    os.link(src / "target", src / "hard")
    wait_same(src, dst)
    (src / "sym").unlink()
    (src / "sym").symlink_to("elsewhere")
    wait_same(src, dst)
    assert os.readlink(dst / "sym") == "elsewhere"


@pytest.mark.slow
def test_rename_of_256_mib_file_sends_no_data(live: tuple[LocalNode, Path, Path]) -> None:
    a, src, dst = live
    fill(src / "huge.bin", 256 * MiB)
    wait_same(src, dst, timeout=120)
    sent = a.link("b")["payload_bytes_sent"]
    renames = a.link("b")["renames"]
    os.rename(src / "huge.bin", src / "renamed.bin")
    wait_same(src, dst)
    assert a.link("b")["payload_bytes_sent"] == sent
    assert a.link("b")["renames"] == renames + 1
