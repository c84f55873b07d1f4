#!/usr/bin/env python3
"""Throughput of one link with and without a peer's ``bwlimit``.

Two replicatord processes on loopback (replicator.localcluster): node a
pushes mirror "m" to node b. Each phase moves a new file of random data
(``--size-mib``, 64 MiB, staged outside the mirror) into a's mirror and
times it from the rename to b holding the whole file and the link being
idle (published, acknowledged). The phases, on one link:

  no limit            as started, without bwlimit
  limit (reload)      a reload sets bwlimit = --limit (16 MiB/s): applied
                      to the live connection
  limit (reconnect)   b is restarted: the new connection gets the limit
  no limit (reload)   a reload removes bwlimit: the live socket loses its cap

For each phase it prints the time, the throughput, the limit, what the
daemon's socket reports (``bwlimit_applied``, SO_MAX_PACING_RATE read back
with getsockopt) and the ratio of the throughput to the limit; then the
ratio of the limited to the unlimited throughput. The link's connection
count is printed at the end: the reloads must not have reconnected it.

The time includes what follows the transfer (b verifies, fsyncs and
renames the file; a hears the Ack), which matters without a limit only.

The daemons run ``python -m replicator`` from the current directory and
PYTHONPATH.

Usage:  .venv/bin/python bench/bwlimit.py [--size-mib 64] [--limit 16MiB] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from replicator.control import request
from replicator.localcluster import LocalCluster, LocalNode, wait_for
from replicator.rates import parse_rate, show_rate

MiB = 1 << 20


def reload(node: LocalNode) -> str:
    node.write_config()
    reply = request(node.control_socket, {"cmd": "reload"}, timeout=60)
    if not reply.get("ok"):
        raise SystemExit(f"reload failed: {reply.get('error')}")
    return str(reply.get("message"))


def send(a: LocalNode, b: LocalNode, staged: Path, name: str, size: int) -> float:
    """Seconds from moving ``staged`` into a's mirror to b holding it, acknowledged."""
    dst = b.mirror_path("m") / name
    t0 = time.monotonic()
    os.rename(staged, a.mirror_path("m") / name)

    def done() -> bool:
        if not dst.exists() or dst.stat().st_size != size:
            return False
        ln = a.link("b")
        return bool(ln["in_flight"] == 0 and ln["queue_files"] == 0)

    wait_for(done, 600, f"{name} on b", interval=0.005)
    return time.monotonic() - t0


def stage(workdir: Path, size: int) -> Path:
    path = workdir / "staged.bin"
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(block)
        f.write(block[: size % MiB])
        f.flush()
        os.fsync(f.fileno())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--limit", default="16MiB", help='a bwlimit value, e.g. "16MiB" or "100Mbit"')
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    size = args.size_mib * MiB
    limit = parse_rate(args.limit)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="replicator-bwlimit-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"work dir {workdir}")
    cluster = LocalCluster(workdir)
    rows: list[tuple[str, int, int | None, float]] = []
    try:
        a, b = cluster.node("a"), cluster.node("b")
        cluster.connect("a", "b")
        a.add_mirror("m", push_to=["b"])
        b.add_mirror("m", accept_from=["a"])
        cluster.start()

        def phase(label: str, rate: int) -> None:
            wait_for(lambda: a.link("b")["bwlimit_applied"] == rate, 30, f"{label}: the socket")
            applied = a.link("b")["bwlimit_applied"]
            staged = stage(workdir, size)
            took = send(a, b, staged, f"{len(rows)}.bin", size)
            rows.append((label, rate, applied, took))
            print(f"  {label}: {size / took / MiB:.1f} MiB/s ({took:.2f} s)", flush=True)

        phase("no limit", 0)
        a.peers["b"]["bwlimit"] = args.limit
        print(f"  {reload(a)}")
        phase("limit (reload)", limit)
        b.stop()
        b.start()
        wait_for(lambda: a.link("b")["state"] == "connected", 30, "the link back")
        phase("limit (reconnect)", limit)
        del a.peers["b"]["bwlimit"]
        print(f"  {reload(a)}")
        phase("no limit (reload)", 0)
        connects = a.link("b")["connects"]
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n## one link on loopback, {args.size_mib} MiB of random data per phase\n")
    row = "| {:<18} | {:<12} | {:<14} | {:>7} | {:>12} | {:>7} |"
    print(row.format("phase", "bwlimit", "socket reports", "time", "throughput", "÷ limit"))
    print(row.format(*("-" * n for n in (18, 12, 14, 7, 12, 7))))
    for label, rate, applied, took in rows:
        bps = size / took
        ratio = f"{bps / rate:.3f}" if rate else "-"
        cells = (label, show_rate(rate), show_rate(applied), f"{took:.2f}s", show_rate(bps), ratio)
        print(row.format(*cells))
    free = [size / took for _, rate, _, took in rows if not rate]
    paced = [size / took for _, rate, _, took in rows if rate]
    print(
        f"\nlimited ÷ unlimited throughput: {min(paced) / max(free):.3f} "
        f"(slowest limited {show_rate(min(paced))}, fastest unlimited {show_rate(max(free))})"
    )
    print(f"connections made by the link: {connects} (1 reconnect expected: b was restarted)")


if __name__ == "__main__":
    main()
