"""Extended attributes and POSIX ACLs (rsync -X -A), for mirrors that opt in:
applied before a file is published, kept in step when only they change,
removed when the source drops them (values over several frames: unit
tests; ext4 holds at most a block of them per inode)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from replicator.localcluster import LocalCluster, LocalNode, wait_for

from ..helpers import make_pair, wait_same


def attrs(p: Path) -> dict[str, bytes]:
    return {n: os.getxattr(p, n) for n in os.listxattr(p) if n.startswith("user.")}


def pair(cluster: LocalCluster, preserve: list[str]) -> tuple[LocalNode, LocalNode]:
    a, b = make_pair(cluster)
    b.mirrors["m"]["preserve"] = preserve
    cluster.start()
    return a, b


def test_user_xattrs_follow_the_source(cluster: LocalCluster) -> None:
    a, b = pair(cluster, ["xattrs"])
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    f = src / "doc.txt"
    f.write_text("content")
    os.setxattr(f, "user.origin", b"scanner-7")
    os.setxattr(f, "user.big", os.urandom(3000))  # ext4: one block per inode
    (src / "dir").mkdir()
    os.setxattr(src / "dir", "user.project", b"apollo")
    wait_same(src, dst)
    wait_for(lambda: attrs(dst / "doc.txt") == attrs(f), 30, "the file's attributes on b")
    wait_for(lambda: attrs(dst / "dir") == attrs(src / "dir"), 30, "the directory's on b")
    # only an attribute changes: it follows (a Meta carries them)
    os.setxattr(f, "user.origin", b"scanner-8")
    os.removexattr(f, "user.big")
    wait_for(lambda: attrs(dst / "doc.txt") == {"user.origin": b"scanner-8"}, 30, "the change")


def test_attributes_are_not_applied_without_opting_in(cluster: LocalCluster) -> None:
    a, b = pair(cluster, [])
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    f = src / "doc.txt"
    f.write_text("content")
    os.setxattr(f, "user.origin", b"scanner-7")
    wait_same(src, dst)
    assert attrs(dst / "doc.txt") == {}


@pytest.mark.skipif(shutil.which("setfacl") is None, reason="needs setfacl (apt: acl)")
def test_posix_acls(cluster: LocalCluster) -> None:
    a, b = pair(cluster, ["acls"])
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    (src / "shared").mkdir()
    f = src / "shared" / "f"
    f.write_text("x")
    subprocess.run(["setfacl", "-m", "u:nobody:rw", str(f)], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:nogroup:rx", str(src / "shared")], check=True)
    wait_same(src, dst)

    def acl(p: Path) -> str:
        out = subprocess.run(["getfacl", "-c", str(p)], check=True, capture_output=True, text=True)
        return out.stdout

    wait_for(lambda: acl(dst / "shared" / "f") == acl(f), 30, "the file's ACL on b")
    wait_for(lambda: acl(dst / "shared") == acl(src / "shared"), 30, "the default ACL on b")
    assert "user:nobody:rw-" in acl(dst / "shared" / "f")
