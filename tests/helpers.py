"""Helpers shared by tests in several folders (unit, e2e, system)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from replicator.localcluster import LocalCluster, LocalNode, diff_trees, tree, wait_for

MiB = 1 << 20


def ipv6_missing(*interfaces: str) -> str | None:
    """Why IPv6 cannot be tested on this machine (None if it can): disabled
    for ``all`` interfaces or one of ``interfaces`` (``lo`` for ::1)."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    for name in ("all", *interfaces):
        flag = Path("/proc/sys/net/ipv6/conf", name, "disable_ipv6")
        try:
            if flag.read_text().strip() != "0":
                return f"IPv6 is disabled on this machine ({flag} is not 0)"
        except OSError:
            return f"IPv6 is not available on this machine (no {flag})"
    return None


def fill(path: Path, size: int, seed: int = 0) -> None:
    """``size`` pseudo-random bytes (fast: a repeated random block)."""
    block = os.urandom(MiB) if size >= MiB else os.urandom(max(size, 1))
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def converged(src: Path, dst: Path) -> bool:
    return not diff_trees(tree(src), tree(dst)) and owners(src) == owners(dst)


def owners(root: Path) -> dict[str, tuple[int, int]]:
    """uid/gid of every entry (replicated when the receiver runs as root)."""
    if os.geteuid() != 0:
        return {}
    return {
        str(p.relative_to(root)): (p.lstat().st_uid, p.lstat().st_gid)
        for p in root.rglob("*")
        if ".replicator" not in p.parts
    }


def wait_same(src: Path, dst: Path, timeout: float = 60) -> None:
    try:
        wait_for(lambda: converged(src, dst), timeout, f"{dst} to equal {src}")
    except TimeoutError:
        raise AssertionError("\n".join(diff_trees(tree(src), tree(dst))[:20])) from None


def only_session(node: LocalNode) -> dict[str, Any]:
    """The status of ``node``'s one inbound session."""
    sessions = node.status()["sessions"]
    assert len(sessions) == 1, sessions
    return sessions[0]  # type: ignore[no-any-return]


def make_pair(cluster: LocalCluster, **mirror: object) -> tuple[LocalNode, LocalNode]:
    """Node a pushes mirror "m" to node b; both started."""
    a, b = cluster.node("a"), cluster.node("b")
    cluster.connect("a", "b")
    a.add_mirror("m", push_to=["b"], **mirror)
    b.add_mirror("m", accept_from=["a"])
    return a, b


def make_chain(cluster: LocalCluster) -> tuple[LocalNode, LocalNode, LocalNode, Path, Path, Path]:
    """a → b → c, mirror "m": b accepts from a and pushes to c. Returns the
    nodes and their mirror roots (not started)."""
    a, b, c = cluster.node("a"), cluster.node("b"), cluster.node("c")
    cluster.connect("a", "b")
    cluster.connect("b", "c")
    src = a.add_mirror("m", push_to=["b"])
    relay = b.add_mirror("m", accept_from=["a"], push_to=["c"])
    end = c.add_mirror("m", accept_from=["b"])
    return a, b, c, src, relay, end


def make_deep(root: Path, depth: int, width: int) -> bytes:
    """Directories ``depth`` levels deep with names ``width`` bytes long,
    made fd by fd (the whole path is longer than PATH_MAX); returns the
    relative path of a file at the bottom."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    parts = []
    try:
        for i in range(depth):
            name = (b"%03d" % i) + b"d" * (width - 3)
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            parts.append(name)
        wfd = os.open(b"bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(wfd, b"deep")
        os.close(wfd)
    finally:
        os.close(fd)
    return b"/".join([*parts, b"bottom.txt"])
