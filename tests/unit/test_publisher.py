"""Receiver-side pieces against a real filesystem."""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import frames as F
from replicator import inbox as inbox_mod
from replicator.blockmap import MIN_BLOCK, XXH3_128, Progress, map_bytes
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
    ev = F.File(1, 1, 0, 1, 0o644, 0, 0, 0, XXH3_128, MIN_BLOCK, b"v", b"", b"p")
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
    ev = F.File(
        1, 1, 0, inbox_mod.RESUME_MIN, 0o644, 0, 0, 0, XXH3_128, MIN_BLOCK, b"v", b"", b"big"
    )
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


# -- PartialFile.verify ---------------------------------------------------------------

BS = MIN_BLOCK


@pytest.fixture
def inbox(tmp_path: Path) -> Iterator[Inbox]:
    root = Root(str(tmp_path))
    box = Inbox(root, "peer")
    yield box
    box.close()
    root.close()


def noise(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def written(box: Inbox, data: bytes, op: int = 1, inline: bool = False) -> PartialFile:
    """A partial that received all of ``data`` (from the socket, so hashed
    from the disk, or ``inline``: hashed from memory as it came) and the
    sender's block digests (Blocks)."""
    ev = F.File(op, 1, 0, len(data), 0o644, 0, 0, 0, XXH3_128, BS, b"v", b"", b"p%d" % op)
    p = box.begin(ev, (ev.path,))
    for off in range(0, len(data), 100_000):
        piece = data[off : off + 100_000]
        if inline:
            p.hash_inline(off, piece)
        os.pwrite(p.fd, piece, off)
        p.wrote(len(piece))
    bmap = map_bytes(data, XXH3_128, BS)
    if bmap.count > 1:
        assert p.theirs is not None
        p.theirs += bmap.digests
    return p


def flip(p: PartialFile, at: int) -> None:
    """Damage one byte of the partial on disk."""
    (byte,) = os.pread(p.fd, 1, at)
    os.pwrite(p.fd, bytes([byte ^ 0x40]), at)


DATA = noise(4 * BS + 1000)  # 5 blocks, the last 1000 bytes
DIGEST = map_bytes(DATA, XXH3_128, BS).file_digest


@pytest.mark.parametrize("inline", [False, True], ids=["read back", "inline"])
def test_verify_matching_data(inbox: Inbox, inline: bool) -> None:
    p = written(inbox, DATA, inline=inline)
    try:
        assert p.verify(DIGEST) is None
        assert p.bmap == map_bytes(DATA, XXH3_128, BS)
    finally:
        p.discard()


@pytest.mark.parametrize(
    ("damaged", "bad"),
    [
        ([2 * BS + 5], [(2 * BS, BS)]),
        ([0], [(0, BS)]),
        ([4 * BS + 999], [(4 * BS, 1000)]),  # the short last block
        ([5, 3 * BS], [(0, BS), (3 * BS, BS)]),
        ([BS - 1, BS], [(0, 2 * BS)]),  # adjacent blocks: one range
    ],
)
def test_verify_names_the_bad_blocks_of_a_multi_block_file(
    inbox: Inbox, damaged: list[int], bad: list[tuple[int, int]]
) -> None:
    p = written(inbox, DATA)
    try:
        for at in damaged:
            flip(p, at)
        assert p.verify(DIGEST) == bad
        assert p.bmap is None
    finally:
        p.discard()


def test_verify_catches_bad_bytes_that_came_inline(inbox: Inbox) -> None:
    bad = bytearray(DATA)
    bad[3 * BS + 17] ^= 1
    p = written(inbox, bytes(bad), inline=True)
    assert p.theirs is not None
    p.theirs[:] = map_bytes(DATA, XXH3_128, BS).digests  # what the sender had
    try:
        assert p.verify(DIGEST) == [(3 * BS, BS)]
    finally:
        p.discard()


def test_verify_of_a_single_block_file_wants_all_of_it(inbox: Inbox) -> None:
    data = noise(5000, seed=2)
    p = written(inbox, data)
    try:
        assert p.theirs == bytearray()  # one block: no Blocks frame
        flip(p, 4321)
        assert p.verify(map_bytes(data, XXH3_128, BS).file_digest) == [(0, 5000)]
    finally:
        p.discard()


def test_verify_without_the_block_digests_wants_the_whole_file(inbox: Inbox) -> None:
    """The file digest differs but the sender's block digests all match
    ours, or were not all sent: nothing tells which blocks, so all."""
    p = written(inbox, DATA)
    try:
        assert p.verify(b"\0" * 16) == [(0, len(DATA))]
        assert p.theirs is not None
        del p.theirs[16:]
        flip(p, 5)
        p.progress = Progress(XXH3_128, len(DATA), BS)  # hash the damaged disk again
        assert p.verify(DIGEST) == [(0, len(DATA))]
    finally:
        p.discard()


def test_verify_of_an_empty_file(inbox: Inbox) -> None:
    p = written(inbox, b"")
    try:
        assert p.verify(b"\0" * 16) == []  # wrong digest, and nothing to send again
        assert p.verify(map_bytes(b"", XXH3_128, BS).file_digest) is None
    finally:
        p.discard()


def test_mending_rehashes_what_was_sent_again(inbox: Inbox) -> None:
    p = written(inbox, DATA)
    try:
        flip(p, BS + 3)
        assert p.verify(DIGEST) == [(BS, BS)]
        p.mending()
        assert (p.mends, p.mend_at) == (1, 0)
        assert p.progress is not None and p.progress.done == 0
        # the range again, in two chunks: wrote() moves mend_at, not written
        for off, n in ((BS, 1000), (BS + 1000, BS - 1000)):
            p.mend_at = off  # Inbound.chunk: where this chunk's bytes go
            p.hash_inline(off, DATA[off : off + n])  # ignored while mending
            os.pwrite(p.fd, DATA[off : off + n], off)
            p.wrote(n)
            assert p.mend_at == off + n and p.written == len(DATA)
        assert p.progress.done == 0
        assert p.verify(DIGEST) is None
    finally:
        p.discard()
