"""One file's exchange (replicator/outgoing.py): the File frame it starts
with, the resume offset it picks, the frames it ends with (its block map)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from replicator import frames as F
from replicator import outgoing
from replicator.blockmap import MIN_BLOCK, XXH3_128, BlockMap, map_bytes
from replicator.outgoing import FileSend, Step, version_of
from replicator.paths import Source
from replicator.protocol import PAYLOAD

from .test_protocol import established_pair


def begin(
    root: Path, name: bytes, held: F.Partial | None = None, base: BlockMap | None = None
) -> tuple[FileSend, F.File]:
    found = Source(os.fsencode(root)).locate(name)
    assert found is not None
    out = FileSend.begin(7, 3, "m", (3, name), found, 1.5, held, base=base)
    assert out is not None
    return out


def test_begin_builds_the_file_frame(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    os.chmod(tmp_path / "f", 0o640)
    s, frame = begin(tmp_path, b"f")
    try:
        st = os.stat(tmp_path / "f")
        assert frame == F.File(
            7,
            3,
            0,
            100,
            0o640,
            st.st_mtime_ns,
            st.st_uid,
            st.st_gid,
            XXH3_128,
            MIN_BLOCK,
            version_of(st),
            b"",
            b"f",
        )
        assert (s.offset, s.left, s.resumed) == (0, 100, 0)
        assert s.map == map_bytes(b"x" * 100, XXH3_128, MIN_BLOCK)  # hashed at once
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
        # one block: its file digest says it all, no Blocks
        assert s.finish(Step.DONE) == [F.End(7, map_bytes(b"x", XXH3_128, MIN_BLOCK).file_digest)]
        assert s.finish(Step.CHANGED) == [F.Abort(7, F.AbortReason.SOURCE_CHANGED)]
        assert s.finish(Step.GONE) == [F.Abort(7, F.AbortReason.SOURCE_GONE)]
        assert s.cancel() == F.Abort(7, F.AbortReason.CANCELLED)
        with pytest.raises(ValueError):
            s.finish(Step.MORE)
    finally:
        s.close()


def test_a_file_of_several_blocks_ends_with_its_digests_in_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outgoing, "DIGESTS_PER_FRAME", 2)
    data = bytes(range(256)) * (MIN_BLOCK * 5 // 256) + b"tail"  # 6 blocks, the last 4 bytes
    (tmp_path / "f").write_bytes(data)
    s, frame = begin(tmp_path, b"f")
    try:
        bmap = map_bytes(data, XXH3_128, MIN_BLOCK)
        assert (frame.algo, frame.block_size, frame.base) == (XXH3_128, MIN_BLOCK, b"")
        assert s.map == bmap and bmap.count == 6
        d = bmap.digests
        assert s.finish(Step.DONE) == [
            F.Blocks(7, 0, d[0:32]),
            F.Blocks(7, 2, d[32:64]),
            F.Blocks(7, 4, d[64:96]),
            F.End(7, bmap.file_digest),
        ]
    finally:
        s.close()


def test_digests_per_frame_fit_a_blocks_frame() -> None:
    assert outgoing.DIGESTS_PER_FRAME * 32 <= F.MAX_DATA  # even BLAKE3's
    F.encode(F.Blocks(1, 0, b"d" * 32 * outgoing.DIGESTS_PER_FRAME))


def test_a_delta_names_its_base_and_keeps_its_block_size(tmp_path: Path) -> None:
    data = b"n" * (MIN_BLOCK * 3)
    (tmp_path / "f").write_bytes(data)
    base = map_bytes(b"o" * (MIN_BLOCK * 2), XXH3_128, 4 * MIN_BLOCK)
    s, frame = begin(tmp_path, b"f", base=base)
    try:
        assert frame.base == base.file_digest and frame.block_size == 4 * MIN_BLOCK
        assert s.base is base and s.todo is None  # what to send follows from the map
        assert s.map == map_bytes(data, XXH3_128, 4 * MIN_BLOCK)
        assert s.left == len(data)
    finally:
        s.close()


def test_a_base_of_another_algorithm_is_no_base(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 10)
    other = BlockMap(2, 10, MIN_BLOCK, b"\0" * 32)  # BLAKE3
    s, frame = begin(tmp_path, b"f", base=other)
    try:
        assert frame.base == b"" and s.base is None and frame.block_size == MIN_BLOCK
    finally:
        s.close()


def test_a_mend_sends_the_ranges_and_repeats_the_digest(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"y" * 1000)
    version = version_of(os.stat(tmp_path / "f"))
    src = Source(os.fsencode(tmp_path))
    found = src.locate(b"f")
    assert found is not None
    s = FileSend.mend(7, (3, b"f"), "m", found, 1.5, version, b"D" * 16, [(0, 10), (500, 20)])
    assert s is not None
    try:
        assert list(s.todo or []) == [(False, 0, 10), (False, 500, 20)] and s.left == 30
        assert s.finish(Step.DONE) == [F.End(7, b"D" * 16)]  # no Blocks again
    finally:
        s.close()
    # the source is no longer the version sent: no mend (the caller aborts)
    found = src.locate(b"f")
    assert found is not None
    try:
        assert FileSend.mend(7, (3, b"f"), "m", found, 1.5, b"old", b"D" * 16, [(0, 1)]) is None
    finally:
        found.close()


def test_holes_are_found_with_seek_data_and_split_out_of_runs(tmp_path: Path) -> None:
    from replicator.outgoing import HOLE, HOLE_MIN, SEND, holes, split_holes

    f = tmp_path / "sparse"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        os.pwrite(fd, b"y" * 4096, 1 << 20)
        os.ftruncate(fd, 2 << 20)
        hs = holes(fd, os.fstat(fd))
    finally:
        os.close(fd)
    assert hs == [(4096, (1 << 20) - 4096), ((1 << 20) + 4096, (1 << 20) - 4096)]
    runs = split_holes([(SEND, 0, 2 << 20)], hs)
    assert runs == [
        (SEND, 0, 4096),
        (HOLE, 4096, (1 << 20) - 4096),
        (SEND, 1 << 20, 4096),
        (HOLE, (1 << 20) + 4096, (1 << 20) - 4096),
    ]
    dense = tmp_path / "dense"
    dense.write_bytes(b"z" * HOLE_MIN * 2)
    fd = os.open(dense, os.O_RDONLY)
    try:
        assert holes(fd, os.fstat(fd)) == []
    finally:
        os.close(fd)


def test_a_small_file_goes_out_from_memory_with_its_frames(tmp_path: Path) -> None:
    """Read once for its block map and its payload: the Chunk and the bytes
    join the queued frames (nothing is written to the socket by the step),
    and the peer parses File, Chunk, payload, End as from sendfile."""
    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    pair = established_pair()
    pair.open(3)
    conn, peer = pair.initiator, pair.acceptor
    s, frame = begin(tmp_path, b"f")
    a, b = socket.socketpair()
    try:
        assert s.data == data
        wbuf = bytearray(conn.send(frame))
        assert s.step(a, conn, wbuf) == (Step.DONE, 3000)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)
        for ev in s.finish(Step.DONE):
            wbuf += conn.send(ev)
        peer.receive_data(bytes(wbuf))
        assert peer.next_event() == frame
        assert peer.next_event() == F.Chunk(7, 0, 3000)
        assert peer.next_event() is PAYLOAD
        assert bytes(peer.payload_from_buffer(3000)) == data
        end = peer.next_event()
        assert end == F.End(7, map_bytes(data, XXH3_128, MIN_BLOCK).file_digest)
    finally:
        s.close()
        a.close()
        b.close()


def test_a_small_file_with_holes_or_a_big_one_is_sent_with_sendfile(tmp_path: Path) -> None:
    with (tmp_path / "sparse").open("wb") as f:
        f.truncate(outgoing.SEND_INLINE_MAX - 10)
        f.seek(outgoing.SEND_INLINE_MAX - 10)
        f.write(b"tail")
    (tmp_path / "big").write_bytes(b"b" * (outgoing.SEND_INLINE_MAX + 1))
    (tmp_path / "small").write_bytes(b"s" * outgoing.SEND_INLINE_MAX)
    for name, inline in ((b"sparse", False), (b"big", False), (b"small", True)):
        s, _ = begin(tmp_path, name)
        try:
            holes = any(kind != outgoing.SEND for kind, _, _ in s.todo or ())
            if name == b"sparse" and not holes:
                continue  # this filesystem reports no hole in it
            assert (s.data is not None) is inline, name
        finally:
            s.close()
