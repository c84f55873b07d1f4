"""One file's exchange (replicator/outgoing.py): the File frame it starts
with, the resume offset it picks, the frame it ends with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replicator import frames as F
from replicator.outgoing import FileSend, Step, version_of
from replicator.paths import Source


def begin(root: Path, name: bytes, held: F.Partial | None = None) -> tuple[FileSend, F.File]:
    found = Source(os.fsencode(root)).locate(name)
    assert found is not None
    out = FileSend.begin(7, 3, "m", (3, name), found, 1.5, held)
    assert out is not None
    return out


def test_begin_builds_the_file_frame(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    os.chmod(tmp_path / "f", 0o640)
    s, frame = begin(tmp_path, b"f")
    try:
        st = os.stat(tmp_path / "f")
        assert frame == F.File(
            7, 3, 0, 100, 0o640, st.st_mtime_ns, st.st_uid, st.st_gid, version_of(st), b"f"
        )
        assert (s.offset, s.left, s.resumed) == (0, 100, 0)
    finally:
        s.close()


@pytest.mark.parametrize(
    ("held_bytes", "same_version", "want"),
    [(40, True, 40), (40, False, 0), (0, True, 0), (101, True, 0)],
)
def test_resume_only_a_partial_of_this_version(
    tmp_path: Path, held_bytes: int, same_version: bool, want: int
) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    st = os.stat(tmp_path / "f")
    version = version_of(st) if same_version else b"other"
    s, frame = begin(tmp_path, b"f", F.Partial(3, held_bytes, version, b"f"))
    try:
        assert frame.offset == want and s.resumed == want and s.left == 100 - want
    finally:
        s.close()


def test_gone_or_not_a_file_is_none(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    found = Source(os.fsencode(tmp_path)).locate(b"d")
    assert found is not None
    try:
        assert FileSend.begin(1, 1, "m", (1, b"d"), found, 0.0) is None
    finally:
        found.close()


def test_how_it_ends(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    s, _ = begin(tmp_path, b"f")
    try:
        assert s.finish(Step.DONE) == F.End(7)
        assert s.finish(Step.CHANGED) == F.Abort(7, F.AbortReason.SOURCE_CHANGED)
        assert s.finish(Step.GONE) == F.Abort(7, F.AbortReason.SOURCE_GONE)
        assert s.cancel() == F.Abort(7, F.AbortReason.CANCELLED)
        with pytest.raises(ValueError):
            s.finish(Step.MORE)
    finally:
        s.close()
