"""Receiver-side pieces against a real filesystem."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import frames as F
from replicator import inbox as inbox_mod
from replicator.inbox import Inbox, PartialFile
from replicator.paths import Root, remove_at
from replicator.publisher import Publisher


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


# -- PartialFile.wrote ----------------------------------------------------------------


@pytest.fixture
def partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[PartialFile, list]]:
    monkeypatch.setattr(inbox_mod, "WRITEBACK_BYTES", 100)
    monkeypatch.setattr(inbox_mod, "CHECKPOINT_BYTES", 250)
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(inbox_mod, "start_writeback", lambda fd, off, n: started.append((off, n)))
    root = Root(str(tmp_path))
    inbox = Inbox(root, "peer")
    ev = F.File(1, 1, 0, inbox_mod.RESUME_MIN, 0o644, 0, 0, 0, b"v", b"big")
    p = inbox.begin(ev, (b"big",))
    yield p, started
    p.discard()
    inbox.close()
    root.close()


def test_wrote_starts_writeback_every_writeback_bytes(partial: tuple[PartialFile, list]) -> None:
    p, started = partial
    p.wrote(60)
    assert started == [] and p.written == 60
    p.wrote(60)
    assert started == [(0, 120)] and p.flushed == 120
    p.wrote(99)
    assert started == [(0, 120)]
    p.wrote(1)
    assert started == [(0, 120), (120, 100)] and p.flushed == 220


def test_wrote_checkpoints_a_resumable_file(partial: tuple[PartialFile, list]) -> None:
    p, _ = partial
    os.pwrite(p.fd, b"x" * 300, 0)
    p.wrote(200)
    assert p.checkpointed == 0
    p.wrote(100)
    assert p.checkpointed == 300
    side = json.loads(os.read(os.open(p.name + b".side", os.O_RDONLY, dir_fd=p.inbox.fd), 4096))
    assert side["durable"] == 300


def test_wrote_never_checkpoints_a_small_file(partial: tuple[PartialFile, list]) -> None:
    p, _ = partial
    p.resumable = False
    p.wrote(1000)
    assert p.checkpointed == 0 and p.written == 1000
