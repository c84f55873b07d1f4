"""Receiver-side pieces against a real filesystem."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from replicator import frames as F
from replicator.paths import Root, remove_at
from replicator.publisher import Inbox, Publisher


def test_remove_at_handles_trees_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    depth = 1500  # "d/" * 1500 = 3000 bytes: a legal path
    fd = os.open(tmp_path, os.O_RDONLY)
    fds = [fd]
    for _ in range(depth):
        os.mkdir("d", dir_fd=fds[-1])
        fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
    with open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fds[-1]), "w") as f:
        f.write("deep")
    for x in fds[1:]:
        os.close(x)
    try:
        assert remove_at(fd, b"d")
        assert not (tmp_path / "d").exists()
    finally:
        os.close(fd)
        subprocess.run(["rm", "-rf", str(tmp_path / "d")], check=False)


def test_pending_file_blocks_operations_on_its_path_and_below(tmp_path: Path) -> None:
    root = Root(str(tmp_path))
    inbox = Inbox(root, "peer")
    pub = Publisher(root, inbox)
    ev = F.File(1, 1, 0, 1, 0o644, 0, 0, 0, b"v", b"p")
    p = inbox.begin(ev, (b"p",))
    os.write(p.fd, b"x")
    pub.add_file(p)
    assert pub.blocks((b"p",)) and pub.blocks((b"p", b"q"))
    assert not pub.blocks((b"pq",)) and not pub.blocks((b"other", b"p"))
    out = pub.commit()
    assert out.acked == [1] and (tmp_path / "p").read_bytes() == b"x"
    assert not pub.blocks((b"p", b"q"))
    pub.close()
    inbox.close()
    root.close()
