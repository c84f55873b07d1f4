#!/usr/bin/env python3
"""What hashing a file's data costs here: pread alone, pread + a digest, mmap + xxh3.

A block-map delta needs a digest of every block of a file on both sides.
This measures, for one page-cached file of random data (``--size-mib``,
1 GiB; written, fsynced, then read through once, so every run reads from the
page cache and nothing touches the disk), the CPU and the wall time of one
pass over the whole file, one block (``--block-kib``, 256 KiB) at a time:

  pread alone            os.preadv into one reused bytearray of a block: the
                         copy out of the page cache, the floor of every pread row
  pread + xxh3_128       the same, then xxhash.xxh3_128_digest of the block
  pread + blake3         ... blake3.blake3(block).digest() (one thread)
  pread + sha256         ... hashlib.sha256(block).digest()
  mmap, touch only       mmap.mmap(fd, 0, prot=PROT_READ), one byte of every
                         4 KiB page read (bytes(view[::4096])), close: the
                         cost of faulting the mapping in, the floor of mmap rows
  mmap + xxh3_128        the mapping hashed in memoryview slices of a block
                         (no copy), then close (what a receiver could do)
  mmap populated + xxh3  the same with MAP_POPULATE (the kernel maps every
                         page at mmap() time instead of on first touch)

Every block gets its own digest, as a block map needs; at 256 KiB the
per-call overhead is negligible, so it is also what a streaming digest of the
whole file costs. Each measure is ``--runs`` (3) passes, the methods
interleaved; CPU is time.process_time() (user + system of this process) over
one pass, its system share getrusage's ru_stime (the kernel splits user and
system time by sampling at clock ticks: a rough split for short passes);
the medians are quoted with min-max. "hash CPU" is the row's CPU minus its floor (pread
alone for pread rows, mmap touch only for mmap rows). "faults/GiB": minor
page faults of the pass (getrusage ru_minflt), scaled. GB = 10^9 bytes,
GiB = 2^30. The machine may be shared: CPU time is what to read, wall
GB/s is disturbed by whatever else runs.

Usage:  .venv/bin/python bench/digests.py [--size-mib 1024] [--runs 3] [--block-kib 256]
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import xxhash

MiB = 1 << 20
GiB = 1 << 30
PAGE = mmap.PAGESIZE


# -- the passes: each reads the whole file once, one block at a time --------------


def pread_pass(digest: Callable[[memoryview], bytes] | None) -> Callable[[int, int, int], int]:
    """A pass of os.preadv into a reused block buffer, then ``digest`` of the block."""

    def run(fd: int, size: int, block: int) -> int:
        buf = bytearray(block)
        view = memoryview(buf)
        off = n_digests = 0
        while off < size:
            n = os.preadv(fd, [view], off)
            if n <= 0:
                raise EOFError(f"file ended at {off} of {size}")
            if digest is not None:
                digest(view[:n])
                n_digests += 1
            off += n
        return n_digests

    return run


def mmap_pass(populate: bool, hashing: bool) -> Callable[[int, int, int], int]:
    """A pass over a read-only mapping of the file: touch every page, or
    xxh3_128 of every block-sized slice; then unmap."""
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)

    def run(fd: int, size: int, block: int) -> int:
        m = mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ)
        n_digests = 0
        try:
            view = memoryview(m)
            try:
                if hashing:
                    for off in range(0, size, block):
                        xxhash.xxh3_128_digest(view[off : off + block])
                        n_digests += 1
                else:
                    bytes(view[::PAGE])  # one byte of every page: faults each in
            finally:
                view.release()
        finally:
            m.close()
        return n_digests

    return run


@dataclass
class Method:
    name: str
    run: Callable[[int, int, int], int]
    #: Name of the row whose CPU is this row's floor ("" for a floor itself).
    floor: str = ""
    cpu: list[float] = field(default_factory=list)
    sys: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    digests: int = 0


def methods() -> list[Method]:
    pread0, touch = "pread alone", "mmap, touch only"
    return [
        Method(pread0, pread_pass(None)),
        Method("pread + xxh3_128", pread_pass(xxhash.xxh3_128_digest), pread0),
        Method(
            "pread + blake3", pread_pass(lambda v: blake3.blake3(v, max_threads=1).digest()), pread0
        ),
        Method("pread + sha256", pread_pass(lambda v: hashlib.sha256(v).digest()), pread0),
        Method(touch, mmap_pass(populate=False, hashing=False)),
        Method("mmap + xxh3_128", mmap_pass(populate=False, hashing=True), touch),
        Method("mmap populated + xxh3_128", mmap_pass(populate=True, hashing=True), touch),
    ]


# -- the file ----------------------------------------------------------------------


def make_file(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        left = size
        while left:
            n = min(left, 4 * MiB)
            os.write(fd, os.urandom(n))
            left -= n
        os.fsync(fd)  # clean pages: no writeback during the runs
    finally:
        os.close(fd)


def sys_and_faults() -> tuple[float, int]:
    # getrusage, not os.times(): microseconds, not 10 ms clock ticks.
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_stime, ru.ru_minflt


def measure(m: Method, fd: int, size: int, block: int) -> None:
    t0, c0, (s0, f0) = time.perf_counter(), time.process_time(), sys_and_faults()
    m.digests = m.run(fd, size, block)
    c1, (s1, f1), t1 = time.process_time(), sys_and_faults(), time.perf_counter()
    m.cpu.append(c1 - c0)
    m.sys.append(s1 - s0)
    m.wall.append(t1 - t0)
    m.faults.append(f1 - f0)


# -- output ------------------------------------------------------------------------


def med_range(xs: list[float], scale: float, digits: int) -> str:
    ys = [x * scale for x in xs]
    return f"{statistics.median(ys):.{digits}f} ({min(ys):.{digits}f}-{max(ys):.{digits}f})"


def table(ms: list[Method], size: int) -> str:
    per_gib = GiB / size
    by_name = {m.name: m for m in ms}
    head = (
        "method",
        "CPU s/GiB (min-max)",
        "of which sys",
        "hash CPU s/GiB",
        "faults/GiB",
        "GB/s per CPU",
        "GB/s wall (min-max)",
    )
    rows = []
    for m in ms:
        cpu = statistics.median(m.cpu)
        floor = by_name.get(m.floor)
        hash_cpu = "-" if floor is None else f"{(cpu - statistics.median(floor.cpu)) * per_gib:.3f}"
        rows.append(
            (
                m.name,
                med_range(m.cpu, per_gib, 3),
                f"{statistics.median(m.sys) * per_gib:.3f}",
                hash_cpu,
                f"{statistics.median(m.faults) * per_gib:.0f}",
                f"{size / cpu / 1e9:.2f}" if cpu > 0 else "-",
                med_range([size / w / 1e9 for w in m.wall], 1.0, 2),
            )
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            + " |"
        )

    sep = "|" + "|".join(
        ("-" * (w + 1) + ":") if i else "-" * (w + 2) for i, w in enumerate(widths)
    )
    return "\n".join([line(head), sep + "|", *(line(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--block-kib", type=int, default=256, help="read buffer and digest unit")
    ap.add_argument("--tmp", default="/var/tmp", help="parent of the work directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    size, block = args.size_mib * MiB, args.block_kib * 1024
    if block % PAGE:
        ap.error(f"--block-kib must be a multiple of the page size ({PAGE} B)")

    work = Path(tempfile.mkdtemp(prefix="replicator-digests-", dir=args.tmp))
    try:
        path = work / "data.bin"
        print(f"work dir {work}; creating {args.size_mib} MiB of random data ...", flush=True)
        make_file(path, size)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pread_pass(None)(fd, size, 8 * MiB)  # read once: page-cached from here on
            ms = methods()
            for i in range(1, args.runs + 1):
                for m in ms:
                    measure(m, fd, size, block)
                    print(
                        f"run {i}/{args.runs}  {m.name:<26} CPU {m.cpu[-1]:.3f} s "
                        f"(sys {m.sys[-1]:.3f}), {m.faults[-1]} faults, "
                        f"{size / m.wall[-1] / 1e9:.2f} GB/s wall",
                        flush=True,
                    )
        finally:
            os.close(fd)
        print()
        print(
            f"## {args.size_mib} MiB page-cached file, {args.block_kib} KiB blocks "
            f"({ms[1].digests} digests per pass), {args.runs} runs, medians (min-max); "
            f"GB = 10^9 bytes"
        )
        print(
            f"Python {platform.python_version()}, xxhash {xxhash.VERSION}, "
            f"blake3 {getattr(blake3, '__version__', '?')} (max_threads=1), "
            f"{platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}"
        )
        print()
        print(table(ms, size))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
