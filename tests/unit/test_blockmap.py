"""Block maps (replicator/blockmap.py): block sizes, maps computed from
memory, from a file and incrementally, file digests, what a new version has
to send of its base. The hasher thread: tests/unit/test_hashing.py."""

from __future__ import annotations

import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from replicator import blockmap as B
from replicator.blockmap import (
    BLAKE3,
    DIGEST_SIZE,
    KEEP_BLOCKS,
    MAX_BLOCK,
    MIN_BLOCK,
    READ_SIZE,
    TARGET_BLOCKS,
    XXH3_128,
    BlockMap,
    Progress,
    block_size_for,
    map_bytes,
    map_fd,
    thread_buffer,
)
from replicator.errors import SourceShrank

BS = MIN_BLOCK
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def noise(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def changed(data: bytes, at: int, new: bytes) -> bytes:
    """``data`` with ``new`` written over it at ``at``."""
    return data[:at] + new + data[at + len(new) :]


@pytest.fixture
def fd_of(tmp_path: Path) -> Iterator[object]:
    """``fd_of(data)``: a read-only descriptor of a file holding ``data``."""
    fds: list[int] = []

    def make(data: bytes) -> int:
        path = tmp_path / f"f{len(fds)}"
        path.write_bytes(data)
        fds.append(os.open(path, os.O_RDONLY))
        return fds[-1]

    yield make
    for fd in fds:
        os.close(fd)


# -- block sizes -------------------------------------------------------------------


def test_constants() -> None:
    assert (MIN_BLOCK, MAX_BLOCK) == (131_072, 16_777_216)  # 128 KiB, 16 MiB
    assert (TARGET_BLOCKS, KEEP_BLOCKS) == (2000, 16000)
    assert DIGEST_SIZE == {XXH3_128: 16, BLAKE3: 32} and (XXH3_128, BLAKE3) == (1, 2)
    assert B.NAMES == {"xxh3-128": XXH3_128, "blake3": BLAKE3}


@pytest.mark.parametrize(
    ("size", "block"),
    [
        (0, 128 * KiB),
        (1, 128 * KiB),
        (100 * MiB, 128 * KiB),
        (TARGET_BLOCKS * 128 * KiB, 128 * KiB),  # 250 MiB: exactly 2,000 blocks
        (TARGET_BLOCKS * 128 * KiB + 1, 256 * KiB),
        (256 * MiB, 256 * KiB),  # 1,024 blocks
        (1 * GiB, 1 * MiB),
        (10 * GiB, 8 * MiB),
        (1 << 40, 16 * MiB),  # 65,536 blocks: the largest block size caps it
    ],
)
def test_block_size_for_a_new_file(size: int, block: int) -> None:
    assert block_size_for(size) == block
    assert -(-size // block) <= TARGET_BLOCKS or block == MAX_BLOCK


def test_block_size_keeps_the_base_block_size_up_to_keep_blocks() -> None:
    # A delta needs one geometry: a file that grew keeps its base's blocks...
    assert block_size_for(1 * GiB, 128 * KiB) == 128 * KiB  # 8,192 blocks
    assert block_size_for(KEEP_BLOCKS * 128 * KiB, 128 * KiB) == 128 * KiB
    assert block_size_for(10, 1 * MiB) == 1 * MiB  # shrank: still the base's
    # ...until that would make more than KEEP_BLOCKS blocks: a fresh size then
    assert block_size_for(KEEP_BLOCKS * 128 * KiB + 1, 128 * KiB) == 2 * MiB
    assert block_size_for(KEEP_BLOCKS * 128 * KiB + 1) == 2 * MiB


# -- maps: from memory, from a file, incrementally ------------------------------------

#: 3 whole blocks and a short one.
DATA = noise(3 * BS + 12_345)


def test_map_bytes() -> None:
    m = map_bytes(DATA, XXH3_128, BS)
    assert (m.algo, m.size, m.block_size, m.count, m.dsize) == (XXH3_128, len(DATA), BS, 4, 16)
    for i in range(4):
        off, n = m.block(i)
        assert (off, n) == (i * BS, BS if i < 3 else 12_345)
        assert m.digest(i) == xxhash.xxh3_128_digest(DATA[off : off + n])
    assert m.digests == b"".join(m.digest(i) for i in range(4))


def test_file_digest_is_the_documented_formula() -> None:
    """docs/protocol.md §5.6: H("replicator block map v1" || size u64 ||
    block_size u32 || digest_0 || ...)."""
    m = map_bytes(DATA, XXH3_128, BS)
    raw = b"replicator block map v1" + struct.pack("!QI", len(DATA), BS) + m.digests
    assert m.file_digest == xxhash.xxh3_128_digest(raw)
    assert m.file_digest == B.file_digest(XXH3_128, len(DATA), BS, m.digests)


def test_an_empty_file_has_no_blocks_but_a_digest() -> None:
    m = map_bytes(b"", XXH3_128, BS)
    assert (m.count, m.digests) == (0, b"")
    assert m.file_digest == xxhash.xxh3_128_digest(
        b"replicator block map v1" + struct.pack("!QI", 0, BS)
    )
    p = Progress(XXH3_128, 0, BS)
    assert p.complete and p.result() == m


@pytest.mark.parametrize(
    "data",
    [DATA, DATA[: 2 * BS], DATA[:1], DATA[: BS + 1], DATA[:1900], DATA[:BS]],
    ids=[
        "blocks and a tail",
        "whole blocks",
        "one byte",
        "a block and a byte",
        "a small file",
        "one whole block",
    ],
)
def test_map_fd_equals_map_bytes(data: bytes, fd_of: object) -> None:
    fd = fd_of(data)  # type: ignore[operator]
    want = map_bytes(data, XXH3_128, BS)
    assert map_fd(fd, len(data), XXH3_128, BS) == want
    # any buffer size: one pread per block, or many
    for size in (1000, BS - 1, BS + 7, READ_SIZE):
        assert map_fd(fd, len(data), XXH3_128, BS, bytearray(size)) == want


def test_map_fd_of_a_prefix(fd_of: object) -> None:
    """The map covers ``size`` bytes, even if the file has more."""
    fd = fd_of(DATA)  # type: ignore[operator]
    assert map_fd(fd, BS + 5, XXH3_128, BS) == map_bytes(DATA[: BS + 5], XXH3_128, BS)


#: Piece sizes: bytes, a block less or more one, a read buffer, odd ones.
PIECES = [1, 7, 4096, BS - 1, BS + 3, 65_537, 3, READ_SIZE + 1]


def test_progress_fed_bytes_in_odd_pieces() -> None:
    want = map_bytes(DATA, XXH3_128, BS)
    for rotate in range(len(PIECES)):
        sizes = PIECES[rotate:] + PIECES[:rotate]
        p = Progress(XXH3_128, len(DATA), BS)
        off = i = 0
        while off < len(DATA):
            n = min(sizes[i % len(sizes)], len(DATA) - off)
            assert p.feed_bytes(off, DATA[off : off + n])
            off += n
            i += 1
            assert p.done == off and p.complete is (off == len(DATA))
        assert p.result() == want


def test_progress_fed_from_memory_and_the_file_in_turns(fd_of: object) -> None:
    """The receiver: inline payloads from memory, spliced ones read back."""
    fd = fd_of(DATA)  # type: ignore[operator]
    want = map_bytes(DATA, XXH3_128, BS)
    buf = bytearray(5000)
    for first_from_file in (False, True):
        p = Progress(XXH3_128, len(DATA), BS)
        off, i = 0, 0
        from_file = first_from_file
        while off < len(DATA):
            n = min(PIECES[i % len(PIECES)], len(DATA) - off)
            if from_file:
                p.feed_fd(fd, off + n, buf)
            else:
                assert p.feed_bytes(off, memoryview(DATA)[off : off + n])
            off += n
            i += 1
            from_file = not from_file
            assert p.done == off
        assert p.result() == want


def test_progress_whole_blocks_only(fd_of: object) -> None:
    """Hashing behind the writes stops at the last whole block, except at
    the end of the file."""
    fd = fd_of(DATA)  # type: ignore[operator]
    p = Progress(XXH3_128, len(DATA), BS)
    p.feed_fd(fd, BS - 1, thread_buffer(), whole_blocks=True)
    assert p.done == 0
    p.feed_fd(fd, 2 * BS + 100, thread_buffer(), whole_blocks=True)
    assert p.done == 2 * BS
    p.feed_fd(fd, BS, thread_buffer())  # behind what was hashed: nothing to do
    assert p.done == 2 * BS
    p.feed_fd(fd, len(DATA), thread_buffer(), whole_blocks=True)
    assert p.complete and p.result() == map_bytes(DATA, XXH3_128, BS)


def test_progress_refuses_bytes_that_do_not_continue_it() -> None:
    p = Progress(XXH3_128, 10, BS)
    assert not p.feed_bytes(1, b"x")  # a gap
    assert p.feed_bytes(0, b"abc")
    assert not p.feed_bytes(0, b"abc")  # a repeat
    assert not p.feed_bytes(3, b"x" * 8)  # past the size
    assert p.done == 3
    with pytest.raises(ValueError, match="incomplete"):
        p.result()
    assert p.feed_bytes(3, b"defghij") and p.result() == map_bytes(b"abcdefghij", XXH3_128, BS)


def test_map_fd_of_a_file_shorter_than_its_size_raises(fd_of: object) -> None:
    fd = fd_of(DATA[: 2 * BS + 10])  # type: ignore[operator]
    with pytest.raises(SourceShrank, match="ended at"):
        map_fd(fd, len(DATA), XXH3_128, BS)
    with pytest.raises(SourceShrank):
        map_fd(fd_of(b""), 1, XXH3_128, BS)  # type: ignore[operator]
    with pytest.raises(SourceShrank, match="ended at 100 "):  # within one block
        map_fd(fd_of(DATA[:100]), 200, XXH3_128, BS)  # type: ignore[operator]
    p = Progress(XXH3_128, len(DATA), BS)
    with pytest.raises(SourceShrank):
        p.feed_fd(fd, len(DATA), thread_buffer())


def test_map_fd_cancelled_between_blocks(fd_of: object) -> None:
    fd = fd_of(DATA)  # type: ignore[operator]
    asked: list[int] = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) == 2

    with pytest.raises(SourceShrank, match="cancelled"):
        map_fd(fd, len(DATA), XXH3_128, BS, cancelled=cancelled)
    assert len(asked) == 2


# -- file digests ---------------------------------------------------------------------


@pytest.mark.parametrize("at", [0, 1, BS - 1, BS, 2 * BS + 77, len(DATA) - 1])
def test_any_changed_byte_changes_one_block_and_the_file_digest(at: int) -> None:
    m = map_bytes(DATA, XXH3_128, BS)
    other = map_bytes(changed(DATA, at, bytes([DATA[at] ^ 1])), XXH3_128, BS)
    assert other.file_digest != m.file_digest
    assert other.differing(m) == [at // BS]


def test_the_file_digest_covers_size_block_size_and_algorithm() -> None:
    m = map_bytes(DATA, XXH3_128, BS)
    assert map_bytes(DATA + b"\0", XXH3_128, BS).file_digest != m.file_digest
    assert map_bytes(DATA, XXH3_128, 2 * BS).file_digest != m.file_digest
    assert map_bytes(DATA, XXH3_128, BS).file_digest == m.file_digest  # deterministic
    # an empty file's digest still tells block sizes apart
    assert map_bytes(b"", XXH3_128, BS).file_digest != map_bytes(b"", XXH3_128, 2 * BS).file_digest


def test_a_map_checks_its_geometry() -> None:
    with pytest.raises(ValueError, match="unknown digest algorithm"):
        BlockMap(3, 0, BS, b"")
    with pytest.raises(ValueError, match="geometry"):
        BlockMap(XXH3_128, 1, 0, b"")
    with pytest.raises(ValueError, match="geometry"):
        BlockMap(XXH3_128, -1, BS, b"")
    with pytest.raises(ValueError, match="has 2 digests"):
        BlockMap(XXH3_128, BS + 1, BS, b"d" * 16)
    with pytest.raises(ValueError):
        BlockMap(XXH3_128, 1, BS, b"d" * 15)


def test_encode_and_decode() -> None:
    m = map_bytes(DATA, XXH3_128, BS)
    raw = m.encode()
    assert raw == struct.pack("!BQI", XXH3_128, len(DATA), BS) + m.digests
    assert BlockMap.decode(raw) == m and BlockMap.decode(memoryview(raw)) == m
    empty = map_bytes(b"", XXH3_128, MAX_BLOCK)
    assert BlockMap.decode(empty.encode()) == empty
    with pytest.raises(ValueError):
        BlockMap.decode(raw[:-1])  # a digest cut short


# -- what a new version sends of its base ----------------------------------------------


def plan_of(new: bytes, base: bytes, start: int = 0) -> list[tuple[bool, int, int]]:
    return map_bytes(new, XXH3_128, BS).plan(map_bytes(base, XXH3_128, BS), start)


def test_an_unchanged_file_is_copied_whole() -> None:
    m = map_bytes(DATA, XXH3_128, BS)
    assert m.differing(m) == [] and m.ranges([]) == []
    assert m.plan(m) == [(True, 0, len(DATA))]


def test_an_append_copies_the_whole_blocks_and_sends_the_last_partial_one_and_the_tail() -> None:
    base = DATA[: 2 * BS + 100]  # blocks 0, 1 and 100 bytes of block 2
    new = map_bytes(DATA, XXH3_128, BS)
    old = map_bytes(base, XXH3_128, BS)
    assert new.differing(old) == [2, 3]  # block 2 grew (same bytes, longer)
    assert new.ranges([2, 3]) == [(2 * BS, BS + 12_345)]
    assert new.plan(old) == [(True, 0, 2 * BS), (False, 2 * BS, BS + 12_345)]


def test_an_in_place_4_kib_overwrite_sends_one_block() -> None:
    data = noise(4 * BS, seed=2)
    new = changed(data, BS + 1000, noise(4096, seed=3))
    m, old = map_bytes(new, XXH3_128, BS), map_bytes(data, XXH3_128, BS)
    assert m.differing(old) == [1] and m.ranges([1]) == [(BS, BS)]
    assert m.plan(old) == [(True, 0, BS), (False, BS, BS), (True, 2 * BS, 2 * BS)]
    # 4 KiB across a block boundary: both blocks
    new = changed(data, 2 * BS - 2048, noise(4096, seed=3))
    assert plan_of(new, data) == [(True, 0, BS), (False, BS, 2 * BS), (True, 3 * BS, BS)]


def test_truncate_then_extend_sends_everything_from_the_cut_block() -> None:
    data = noise(4 * BS, seed=4)
    new = data[: BS + 7] + noise(3 * BS, seed=5)  # cut in block 1, then written on
    m, old = map_bytes(new, XXH3_128, BS), map_bytes(data, XXH3_128, BS)
    assert m.differing(old) == [1, 2, 3, 4]
    assert m.ranges(m.differing(old)) == [(BS, 3 * BS + 7)]
    assert m.plan(old) == [(True, 0, BS), (False, BS, 3 * BS + 7)]


def test_a_shrunk_file_copies_what_is_left() -> None:
    data = noise(4 * BS, seed=6)
    assert plan_of(data[: 2 * BS], data) == [(True, 0, 2 * BS)]
    # cut inside a block: that block is shorter than the base's, so it is sent
    assert plan_of(data[: 2 * BS + 1], data) == [(True, 0, 2 * BS), (False, 2 * BS, 1)]


def test_ranges_merge_adjacent_blocks_only() -> None:
    m = map_bytes(DATA, XXH3_128, BS)
    assert m.ranges([0, 1, 3]) == [(0, 2 * BS), (3 * BS, 12_345)]
    assert m.ranges([0, 2]) == [(0, BS), (2 * BS, BS)]


def test_another_geometry_shares_nothing() -> None:
    m = map_bytes(DATA, XXH3_128, BS)
    assert m.differing(map_bytes(DATA, XXH3_128, 2 * BS)) == [0, 1, 2, 3]
    assert m.plan(map_bytes(DATA, XXH3_128, 2 * BS)) == [(False, 0, len(DATA))]


def test_a_plan_from_a_resume_offset() -> None:
    """A resumed delta: only what lies past ``start``, in order."""
    data = noise(4 * BS, seed=7)
    new = changed(data, BS + 1000, b"x" * 4096)
    assert plan_of(new, data, BS + 10) == [(False, BS + 10, BS - 10), (True, 2 * BS, 2 * BS)]
    assert plan_of(new, data, 10) == [
        (True, 10, BS - 10),
        (False, BS, BS),
        (True, 2 * BS, 2 * BS),
    ]
    assert plan_of(new, data, 2 * BS) == [(True, 2 * BS, 2 * BS)]
    assert plan_of(new, data, 4 * BS) == []


# -- BLAKE3 ---------------------------------------------------------------------------


def test_blake3_maps(fd_of: object) -> None:
    blake3 = pytest.importorskip("blake3")
    assert B.available(BLAKE3)
    m = map_bytes(DATA, BLAKE3, BS)
    assert (m.dsize, m.count, len(m.digests)) == (32, 4, 128)
    assert m.digest(3) == blake3.blake3(DATA[3 * BS :]).digest()
    raw = b"replicator block map v1" + struct.pack("!QI", len(DATA), BS) + m.digests
    assert m.file_digest == blake3.blake3(raw).digest()
    assert map_fd(fd_of(DATA), len(DATA), BLAKE3, BS) == m  # type: ignore[operator]
    p = Progress(BLAKE3, len(DATA), BS)
    for off in range(0, len(DATA), 50_000):
        p.feed_bytes(off, DATA[off : off + 50_000])
    assert p.result() == m
    assert m.file_digest != map_bytes(DATA, XXH3_128, BS).file_digest


def test_unknown_algorithms() -> None:
    assert B.available(XXH3_128) and not B.available(3)
    with pytest.raises(ValueError, match="unknown digest algorithm"):
        B.new_hash(0)


# -- buffers and the hasher thread ------------------------------------------------------


def test_thread_buffer_is_per_thread() -> None:
    mine = thread_buffer()
    assert len(mine) == READ_SIZE and thread_buffer() is mine
    theirs: list[bytearray] = []
    threads = [threading.Thread(target=lambda: theirs.append(thread_buffer())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(theirs) == 2 and theirs[0] is not theirs[1]
    assert all(b is not mine and len(b) == READ_SIZE for b in theirs)


def test_plan_sends_forced_ranges_even_where_the_base_matches() -> None:
    """A scrub found the peer's copy damaged: its map (the base) still says
    the blocks are fine, so the repair forces them (byte ranges, whatever
    geometry the scrub hashed in)."""
    data = os.urandom(4 * MIN_BLOCK)
    m = map_bytes(data, XXH3_128, MIN_BLOCK)
    assert m.plan(m) == [(True, 0, 4 * MIN_BLOCK)]
    forced = m.plan(m, force=[(MIN_BLOCK + 5, 10), (3 * MIN_BLOCK - 1, 2)])
    assert forced == [
        (True, 0, MIN_BLOCK),
        (False, MIN_BLOCK, 3 * MIN_BLOCK),
    ]
    # a range in a coarser geometry (2 blocks) maps onto this one's blocks
    assert m.plan(m, force=[(2 * MIN_BLOCK, 2 * MIN_BLOCK)]) == [
        (True, 0, 2 * MIN_BLOCK),
        (False, 2 * MIN_BLOCK, 2 * MIN_BLOCK),
    ]
