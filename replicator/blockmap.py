"""Block maps: what one version of a file holds, block by block.

A file of ``size`` bytes is cut into blocks of ``block_size`` bytes (the
last one shorter). Each block has a digest (xxh3-128 by default, BLAKE3
where a cryptographic digest is wanted), and the file has one digest over
its size, block size and block digests (``BlockMap.file_digest``): equal
file digests mean equal block maps, and so equal contents.

The block size follows Syncthing's rule: the smallest power of two from
128 KiB to 16 MiB that cuts the file into at most ``TARGET_BLOCKS`` blocks
(a 256 MiB file: 1,024 blocks of 256 KiB). A delta needs the same block
size in both versions, so a new version keeps its base's block size while
that gives at most ``KEEP_BLOCKS`` blocks (``block_size_for``).

The sender hashes its source with ``pread`` into a reused buffer
(``map_fd``), never through mmap: a source truncated under a mapping kills
the process with SIGBUS. The receiver hashes its private partial file the
same way, incrementally as data lands (``Progress``), and bytes it already
holds in Python (inline payloads) without reading them back.

Both hash functions release the GIL, so hashing on another thread overlaps
with the transfer.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import xxhash

from .errors import SourceShrank

#: Digest algorithms on the wire (``File.algo``) and their digest sizes.
XXH3_128 = 1
BLAKE3 = 2
DIGEST_SIZE = {XXH3_128: 16, BLAKE3: 32}
#: Names used in the configuration.
NAMES = {"xxh3-128": XXH3_128, "blake3": BLAKE3}

MIN_BLOCK = 128 << 10
MAX_BLOCK = 16 << 20
#: A new map aims at no more blocks than this (Syncthing: < 2,000).
TARGET_BLOCKS = 2000
#: A new version keeps its base's block size up to this many blocks.
KEEP_BLOCKS = 8 * TARGET_BLOCKS
#: Bytes read per pread while hashing (one reused buffer per hasher).
READ_SIZE = 256 << 10

_MAP_DOMAIN = b"replicator block map v1"


class _Hash(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


def _blake3() -> Callable[[], _Hash]:
    try:
        import blake3
    except ImportError:
        raise ValueError(
            "digest 'blake3' needs the blake3 package (pip install blake3, or the "
            "replicator[blake3] extra)"
        ) from None
    return cast(Callable[[], _Hash], blake3.blake3)


def new_hash(algo: int) -> _Hash:
    """A fresh incremental hash of ``algo``."""
    if algo == XXH3_128:
        return xxhash.xxh3_128()
    if algo == BLAKE3:
        return _blake3()()
    raise ValueError(f"unknown digest algorithm {algo}")


def available(algo: int) -> bool:
    try:
        new_hash(algo)
    except ValueError:
        return False
    return True


def digest_of(algo: int, data: bytes | bytearray | memoryview) -> bytes:
    if algo == XXH3_128:
        return xxhash.xxh3_128_digest(data)
    h = new_hash(algo)
    h.update(data)
    return h.digest()


def block_size_for(size: int, base_block_size: int | None = None) -> int:
    """The block size of a map of a ``size``-byte file (see module docstring)."""
    if base_block_size is not None and -(-size // base_block_size) <= KEEP_BLOCKS:
        return base_block_size
    bs = MIN_BLOCK
    while bs < MAX_BLOCK and -(-size // bs) > TARGET_BLOCKS:
        bs *= 2
    return bs


@dataclass(frozen=True)
class BlockMap:
    algo: int
    size: int
    block_size: int
    #: The block digests, concatenated (``count`` of ``DIGEST_SIZE[algo]`` bytes).
    digests: bytes

    def __post_init__(self) -> None:
        if self.algo not in DIGEST_SIZE:
            raise ValueError(f"unknown digest algorithm {self.algo}")
        if self.block_size <= 0 or self.size < 0:
            raise ValueError(f"bad block map geometry: size {self.size}, block {self.block_size}")
        if len(self.digests) != blocks(self.size, self.block_size) * DIGEST_SIZE[self.algo]:
            raise ValueError(
                f"a block map of {self.size} bytes in blocks of {self.block_size} has "
                f"{blocks(self.size, self.block_size)} digests, not "
                f"{len(self.digests) / DIGEST_SIZE[self.algo]:g}"
            )

    @property
    def count(self) -> int:
        return blocks(self.size, self.block_size)

    @property
    def dsize(self) -> int:
        return DIGEST_SIZE[self.algo]

    def digest(self, i: int) -> bytes:
        d = self.dsize
        return self.digests[i * d : (i + 1) * d]

    def block(self, i: int) -> tuple[int, int]:
        """(offset, length) of block ``i``."""
        off = i * self.block_size
        return off, min(self.block_size, self.size - off)

    @functools.cached_property
    def file_digest(self) -> bytes:
        return file_digest(self.algo, self.size, self.block_size, self.digests)

    def same_geometry(self, other: BlockMap) -> bool:
        return self.algo == other.algo and self.block_size == other.block_size

    def differing(self, other: BlockMap) -> list[int]:
        """Blocks of this map whose content ``other`` does not hold at the
        same place (all of them if the geometries differ)."""
        if not self.same_geometry(other):
            return list(range(self.count))
        out = []
        for i in range(self.count):
            if (
                i >= other.count
                or self.block(i) != other.block(i)
                or self.digest(i) != other.digest(i)
            ):
                out.append(i)
        return out

    def ranges(self, indexes: Iterable[int]) -> list[tuple[int, int]]:
        """Byte ranges (offset, length) of the blocks ``indexes`` (sorted),
        adjacent blocks merged."""
        out: list[tuple[int, int]] = []
        for i in indexes:
            off, n = self.block(i)
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((off, n))
        return out

    def plan(
        self, base: BlockMap, start: int = 0, force: Iterable[tuple[int, int]] = ()
    ) -> list[tuple[bool, int, int]]:
        """How to build this version from ``base``: (copy, offset, length)
        runs covering ``start``..size in order; copy runs come from the
        base at the same offset, the rest is sent (and every block touching
        a byte range of ``force``: the base is known to be damaged there)."""
        send = set(self.differing(base))
        bs = self.block_size
        for off, n in force:
            send.update(range(off // bs, min(self.count, -(-(off + n) // bs))))
        out: list[tuple[bool, int, int]] = []
        for i in range(self.count):
            off, n = self.block(i)
            if off + n <= start:
                continue
            if off < start:
                off, n = start, off + n - start
            copy = i not in send
            if out and out[-1][0] == copy and out[-1][1] + out[-1][2] == off:
                out[-1] = (copy, out[-1][1], out[-1][2] + n)
            else:
                out.append((copy, off, n))
        return out

    def encode(self) -> bytes:
        return _GEOMETRY.pack(self.algo, self.size, self.block_size) + self.digests

    @classmethod
    def decode(cls, raw: bytes) -> BlockMap:
        if len(raw) < _GEOMETRY.size:
            raise ValueError(f"a block map of {len(raw)} bytes")
        algo, size, bs = _GEOMETRY.unpack_from(raw)
        return cls(algo, size, bs, bytes(raw[_GEOMETRY.size :]))


_GEOMETRY = struct.Struct("!BQI")


_local = threading.local()


def thread_buffer() -> bytearray:
    """A READ_SIZE buffer of the calling thread's own (pread releases the
    GIL: two threads must never read into one buffer)."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(READ_SIZE)
    return buf


def blocks(size: int, block_size: int) -> int:
    return -(-size // block_size)


def file_digest(algo: int, size: int, block_size: int, digests: bytes) -> bytes:
    h = new_hash(algo)
    h.update(_MAP_DOMAIN + struct.pack("!QI", size, block_size))
    h.update(digests)
    return h.digest()


def map_bytes(data: bytes | bytearray | memoryview, algo: int, block_size: int) -> BlockMap:
    """The map of ``data`` (a whole file already in memory)."""
    view = memoryview(data)
    size = len(view)
    ds = b"".join(
        digest_of(algo, view[off : off + block_size]) for off in range(0, size, block_size)
    )
    return BlockMap(algo, size, block_size, ds)


def _read_blocks(
    fd: int, start: int, stop: int, block_size: int, buf: bytearray
) -> Iterator[memoryview | None]:
    """Bytes of ``fd`` from ``start`` to ``stop`` (block-aligned ``start``),
    as pieces of the reused ``buf``; None after the last piece of each
    block. SourceShrank if the file ends before ``stop``."""
    view = memoryview(buf)
    off = start
    while off < stop:
        end = min(stop, off + block_size - off % block_size)
        while off < end:
            want = min(len(view), end - off)
            got = os.preadv(fd, [view[:want]], off)
            if got == 0:
                raise SourceShrank(f"the file ended at {off} bytes while hashing up to {stop}")
            yield view[:got]
            off += got
        yield None


def read_block(fd: int, size: int, buf: bytearray) -> memoryview:
    """The first ``size`` bytes of ``fd`` (at most ``len(buf)``), read
    into ``buf``; SourceShrank if the file is shorter."""
    view = memoryview(buf)[:size]
    got = 0
    while got < size:
        n = os.preadv(fd, [view[got:]], got)
        if n == 0:
            raise SourceShrank(f"the file ended at {got} bytes while hashing up to {size}")
        got += n
    return view


def map_fd(
    fd: int,
    size: int,
    algo: int,
    block_size: int,
    buf: bytearray | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> BlockMap:
    """The map of the first ``size`` bytes of ``fd``, read with pread into
    ``buf`` (reused; READ_SIZE by default). SourceShrank if the file is
    shorter, or if ``cancelled()`` (asked between blocks) says so."""
    if buf is None:
        buf = thread_buffer()
    if 0 < size <= min(block_size, len(buf)):
        # One block that fits the buffer (most files of a real tree): one
        # pread and one digest, without the general machinery (issue 13).
        view = read_block(fd, size, buf)
        return BlockMap(algo, size, block_size, digest_of(algo, view))
    p = Progress(algo, size, block_size)
    p.feed_fd(fd, size, buf, cancelled)
    return p.result()


class Progress:
    """A block map being built from the start of a file, as its bytes
    become available (from the file, or from memory)."""

    def __init__(self, algo: int, size: int, block_size: int) -> None:
        self.algo = algo
        self.size = size
        self.block_size = block_size
        #: Bytes hashed so far (from the start).
        self.done = 0
        self._digests = bytearray()
        self._h: _Hash | None = None

    def _take(self, piece: memoryview | bytes) -> None:
        """Hash ``piece`` (within the current block)."""
        if self._h is None:
            if len(piece) == min(self.block_size, self.size - self.done):
                self._digests += digest_of(self.algo, piece)  # a whole block at once
                self.done += len(piece)
                return
            self._h = new_hash(self.algo)
        self._h.update(piece)
        self.done += len(piece)
        if self.done % self.block_size == 0 or self.done == self.size:
            self._digests += self._h.digest()
            self._h = None

    def feed_bytes(self, offset: int, data: bytes | memoryview) -> bool:
        """Bytes at ``offset`` that are already in memory. False (and
        nothing hashed) unless they continue exactly what was hashed."""
        if offset != self.done or self.done + len(data) > self.size:
            return False
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            room = self.block_size - self.done % self.block_size
            n = min(room, len(view) - pos)
            self._take(view[pos : pos + n])
            pos += n
        return True

    def feed_fd(
        self,
        fd: int,
        upto: int,
        buf: bytearray,
        cancelled: Callable[[], bool] = lambda: False,
        whole_blocks: bool = False,
    ) -> None:
        """Hash ``fd`` from where we are up to ``upto`` (only up to the last
        whole block below it if ``whole_blocks``)."""
        if whole_blocks and upto < self.size:
            upto -= upto % self.block_size
        upto = min(upto, self.size)
        if upto <= self.done:
            return
        # Finish a block begun from memory, then whole blocks.
        start = self.done
        for piece in _read_blocks(fd, start, upto, self.block_size, buf):
            if piece is None:
                if cancelled():
                    raise SourceShrank("hashing was cancelled")
                continue
            self._take(piece)

    @property
    def complete(self) -> bool:
        return self.done == self.size

    def digests(self) -> bytes:
        """The digests of the blocks hashed so far."""
        return bytes(self._digests)

    def result(self) -> BlockMap:
        if not self.complete:
            raise ValueError(f"block map incomplete: {self.done} of {self.size} bytes hashed")
        return BlockMap(self.algo, self.size, self.block_size, bytes(self._digests))
