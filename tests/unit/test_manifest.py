"""Entry states and how two of them differ (manifest.py): ``compare`` for
every kind and every outcome, ``EntryState.from_stat`` on real and on
made-up stat results. (Preserve and the special-bit cases: test_modes.py.)"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from replicator.frames import EntryKind as K
from replicator.manifest import Change, EntryState, compare

FILE = EntryState(K.FILE, 0o644, 10, 1_000, 1, 2)
DIR = EntryState(K.DIR, 0o755, 0, 2_000, 1, 2)
LINK = EntryState(K.SYMLINK, 0o777, 0, 3_000, 1, 2, b"target")


def but(st: EntryState, **changed: object) -> EntryState:
    return dataclasses.replace(st, **changed)  # type: ignore[arg-type]


@pytest.mark.parametrize("src", [FILE, DIR, LINK])
def test_identical_is_nothing(src: EntryState) -> None:
    for owners in (False, True):
        for special in (False, True):
            assert compare(src, src, owners, special) is Change.NONE
            assert compare(src, but(src), owners, special) is Change.NONE


@pytest.mark.parametrize("src", [FILE, DIR, LINK])
def test_missing_or_another_kind_is_data(src: EntryState) -> None:
    assert compare(src, None, owners=False) is Change.DATA
    for other in (FILE, DIR, LINK):
        if other.kind is not src.kind:
            assert compare(src, other, owners=False) is Change.DATA


@pytest.mark.parametrize(
    ("src", "dst", "want"),
    [
        # files: size and mtime are the quick check for content
        (FILE, but(FILE, size=11), Change.DATA),
        (FILE, but(FILE, mtime_ns=1_001), Change.DATA),
        (FILE, but(FILE, mode=0o600), Change.META),
        # a symlink's content is its target; its mtime is metadata, its mode is not
        # compared (Linux symlinks have none of their own)
        (LINK, but(LINK, target=b"elsewhere"), Change.DATA),
        (LINK, but(LINK, mtime_ns=1), Change.META),
        (LINK, but(LINK, mode=0o755), Change.NONE),
        # a directory's size means nothing; mode and mtime are metadata
        (DIR, but(DIR, size=4096), Change.NONE),
        (DIR, but(DIR, mtime_ns=-1), Change.META),  # remote.stale_dir
        (DIR, but(DIR, mode=0o700), Change.META),
        # a file's target is never compared (files have none)
        (FILE, but(FILE, target=b"x"), Change.NONE),
    ],
)
def test_what_differs(src: EntryState, dst: EntryState, want: Change) -> None:
    assert compare(src, dst, owners=True) is want


@pytest.mark.parametrize("src", [FILE, DIR, LINK])
@pytest.mark.parametrize("changed", [{"uid": 0}, {"gid": 0}, {"uid": 5, "gid": 6}])
def test_owners_count_only_when_asked(src: EntryState, changed: dict[str, int]) -> None:
    dst = but(src, **changed)
    assert compare(src, dst, owners=True) is Change.META
    assert compare(src, dst, owners=False) is Change.NONE


def test_data_wins_over_meta() -> None:
    dst = but(FILE, size=1, mode=0o600, uid=9)
    assert compare(FILE, dst, owners=True) is Change.DATA


def test_special_bits_count_only_when_applied() -> None:
    setuid = but(FILE, mode=0o4644)
    assert compare(setuid, FILE, owners=False, special=True) is Change.META
    assert compare(setuid, FILE, owners=False, special=False) is Change.NONE
    # the permission bits themselves always count
    assert compare(but(FILE, mode=0o4600), FILE, owners=False, special=False) is Change.META


# -- from_stat ------------------------------------------------------------------------


def made_up(mode: int, size: int = 1234) -> os.stat_result:
    st = (mode, 1, 2, 1, 1000, 1001, size, 0, 0, 0)
    return os.stat_result(st, {"st_mtime_ns": 5_000_000_123})


def test_from_stat_of_made_up_results() -> None:
    f = EntryState.from_stat(made_up(stat.S_IFREG | 0o4755))
    assert f == EntryState(K.FILE, 0o4755, 1234, 5_000_000_123, 1000, 1001)
    # a directory's size is not replicated
    d = EntryState.from_stat(made_up(stat.S_IFDIR | 0o1777))
    assert d == EntryState(K.DIR, 0o1777, 0, 5_000_000_123, 1000, 1001)
    link = EntryState.from_stat(made_up(stat.S_IFLNK | 0o777, size=6), b"target")
    assert link == EntryState(K.SYMLINK, 0o777, 0, 5_000_000_123, 1000, 1001, b"target")
    for other in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
        assert EntryState.from_stat(made_up(other | 0o644)) is None


def test_from_stat_of_real_entries(tmp_path: Path) -> None:
    f, d, link = tmp_path / "f", tmp_path / "d", tmp_path / "l"
    f.write_bytes(b"x" * 1000)
    f.chmod(0o640)
    d.mkdir()
    d.chmod(0o750)
    link.symlink_to("f")
    os.utime(f, ns=(1, 1_234_567_891_011))
    fs = os.lstat(f)
    assert EntryState.from_stat(fs) == EntryState(
        K.FILE, 0o640, 1000, 1_234_567_891_011, fs.st_uid, fs.st_gid
    )
    ds = EntryState.from_stat(os.lstat(d))
    assert ds is not None and (ds.kind, ds.mode, ds.size) == (K.DIR, 0o750, 0)
    ls = EntryState.from_stat(os.lstat(link), os.readlink(os.fsencode(link)))
    assert ls is not None and (ls.kind, ls.size, ls.target) == (K.SYMLINK, 0, b"f")
