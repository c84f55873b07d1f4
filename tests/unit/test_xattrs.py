"""Extended attributes: which namespaces a mirror carries, values over
several frames, the kernel's limits, applying exactly the set sent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replicator import frames as F
from replicator.manifest import Preserve
from replicator.xattrs import NAME_MAX, VALUE_MAX, Pending, apply, frames, read, wanted

ALL = Preserve.XATTRS | Preserve.ACLS | Preserve.SECURITY_XATTRS


def test_namespaces_need_their_opt_in() -> None:
    assert wanted("user.x", Preserve.XATTRS, False)
    assert not wanted("user.x", Preserve.ACLS, True)
    assert wanted("system.posix_acl_access", Preserve.ACLS, False)
    assert wanted("system.posix_acl_default", Preserve.ACLS, False)
    assert not wanted("system.nfs4_acl", ALL, True)
    assert wanted("security.selinux", Preserve.SECURITY_XATTRS, True)
    assert not wanted("security.selinux", Preserve.SECURITY_XATTRS, False)  # not root
    assert not wanted("trusted.x", Preserve.XATTRS, True)


def test_long_values_go_over_several_frames_and_come_back_whole() -> None:
    big = os.urandom(3 * F.MAX_DATA + 5)
    fs = frames([("user.a", b"1"), ("user.big", big), ("user.empty", b"")])
    assert [(f.more, f.name) for f in fs if isinstance(f, F.Xattr)] == [
        (0, "user.a"),
        (1, "user.big"),
        (1, "user.big"),
        (1, "user.big"),
        (0, "user.big"),
        (0, "user.empty"),
    ]
    p = Pending()
    for f in fs:
        assert isinstance(f, F.Xattr) and p.add(f) is None
    assert p.take() == [("user.a", b"1"), ("user.big", big), ("user.empty", b"")]
    assert p.take() == []


def test_the_kernels_limits_are_refused() -> None:
    p = Pending()
    assert "over 255 bytes" in (p.add(F.Xattr(0, "user." + "n" * NAME_MAX, b"")) or "")
    p = Pending()
    piece = b"v" * F.MAX_DATA
    complaint = None
    for _ in range(VALUE_MAX // F.MAX_DATA + 1):
        complaint = complaint or p.add(F.Xattr(1, "user.huge", piece))
    assert complaint is not None and "the kernel's limit" in complaint
    p = Pending()
    p.add(F.Xattr(1, "user.a", b"x"))
    assert "was not finished" in (p.add(F.Xattr(0, "user.b", b"y")) or "")


def test_apply_sets_exactly_the_set_in_its_namespaces(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    try:
        os.setxattr(f, "user.old", b"1")
    except OSError as e:
        pytest.skip(f"no user xattrs here: {e}")
    fd = os.open(f, os.O_RDONLY)
    try:
        apply(fd, [("user.new", b"2"), ("trusted.no", b"3")], Preserve.XATTRS, True)
        assert read(fd, Preserve.XATTRS, True) == [("user.new", b"2")]
        apply(fd, [], Preserve.XATTRS, True)
        assert read(fd, Preserve.XATTRS, True) == []
    finally:
        os.close(fd)
