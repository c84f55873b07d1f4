#!/usr/bin/env python3
"""Cost of the two-way archive (history.py), side by side with a base tree.

For each contender (``new``: this tree; ``base``: ``git archive`` of
``--base`` run from a temporary directory), a two-way pair on loopback:

  cold     ``--files`` files of 1 KiB in 50 directories on a, none on b;
           from start until b holds them all and both links are idle.
  restart  b stopped cleanly and started again, nothing changed: until
           both links reconciled and are idle (the archive is loaded and
           compared with every entry).
  deleted  ``--files``/10 files deleted on b while it is down, then b
           started: until the deletes reached a (``new``), or until idle
           (``base`` brings them back: counted).

CPU seconds of both daemons (utime + stime from /proc) for each phase;
wall time is printed but is noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from replicator.localcluster import LocalCluster, LocalNode, wait_for  # noqa: E402


def cpu(n: LocalNode) -> float:
    assert n.proc is not None
    fields = Path(f"/proc/{n.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settled(n: LocalNode, peer: str) -> bool:
    ln = n.link(peer)
    m = ln.get("mirrors", {}).get("m", {})
    return bool(
        ln["state"] == "connected"
        and ln["queue_files"] == 0
        and ln["in_flight"] == 0
        and m.get("last_scan") is not None
    )


def count(root: Path) -> int:
    return sum(1 for p in root.rglob("f*") if p.is_file())


def run(label: str, wrap: list[str], files: int, work: Path) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    c = LocalCluster(work)
    try:
        a, b = c.node("a"), c.node("b")
        a.wrap = b.wrap = wrap
        c.connect("a", "b")
        pa = a.add_mirror("m", push_to=["b"], accept_from=["b"], two_way=True)
        pb = b.add_mirror("m", push_to=["a"], accept_from=["a"], two_way=True)
        for d in range(50):
            (pa / f"d{d}").mkdir()
        for i in range(files):
            (pa / f"d{i % 50}" / f"f{i}").write_bytes(b"x" * 1024)

        def both_settled() -> bool:
            return settled(a, "b") and settled(b, "a")

        t0 = time.monotonic()
        c.start()
        wait_for(lambda: count(pb) >= files and both_settled(), 600, "cold sync")
        out["cold"] = (time.monotonic() - t0, cpu(a) + cpu(b))

        b.stop()
        c0 = cpu(a)
        t0 = time.monotonic()
        b.start()
        wait_for(both_settled, 600, "restart")
        out["restart"] = (time.monotonic() - t0, cpu(a) - c0 + cpu(b))

        b.stop()
        gone = files // 10
        for i in range(gone):
            (pb / f"d{i % 50}" / f"f{i}").unlink()
        c0 = cpu(a)
        t0 = time.monotonic()
        b.start()
        wait_for(both_settled, 600, "deleted: idle")
        wait_for(lambda: count(pa) == count(pb), 600, "deleted: converged")
        out["deleted"] = (time.monotonic() - t0, cpu(a) - c0 + cpu(b))
        back = count(pb) - (files - gone)
        print(f"  {label}: deleted while down: {back} of {gone} came back", flush=True)
    finally:
        c.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="07af4fc")
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-two-way-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        subprocess.run(
            f"git -C {HERE} archive {args.base} replicator | tar -x -C {base}",
            shell=True,
            check=True,
        )
        # The base's daemons run without site (-S: the editable install of
        # this tree would win), with the venv's packages on the path.
        site = [p for p in sys.path if p.endswith("site-packages")]
        runner = Path(tmp) / "run-base"
        runner.write_text(
            "#!/bin/sh\ncd /\nexe=$1; shift\n"
            f'PYTHONPATH={base}:{":".join(site)} exec "$exe" -S "$@"\n'
        )
        runner.chmod(0o755)
        contenders = {"new": [], "base": [str(runner)]}
        print(f"# two-way pair, {args.files} files of 1 KiB; base {args.base}; CPU = both daemons")
        for r in range(args.runs):
            for label, wrap in contenders.items() if r % 2 == 0 else reversed(contenders.items()):
                res = run(label, wrap, args.files, Path(tmp) / f"{label}-{r}")
                line = "  ".join(f"{k} {w:6.2f} s CPU {c:6.2f} s" for k, (w, c) in res.items())
                print(f"run {r + 1} {label:4}  {line}", flush=True)


if __name__ == "__main__":
    main()
