#!/usr/bin/env python3
"""Bytes on the wire for in-place edits of a big file: replicator against rsync's delta transfer.

One run makes a file of random data (``--size-mib``, 256 MiB), replicates
it once in full, then applies these edits one after the other, each to the
result of the previous one, and replicates each version:

  append 1 MiB         1 MiB of new random data written at the end (O_APPEND)
  overwrite 4 KiB      os.pwrite of 4 KiB of new data at size/2: in place,
                       same inode, same size
  truncate + extend    ftruncate to 3/4 of the size, then 1 MiB of new data
                       written at that offset (one open, one close)

Each contender has its own source copy; both are edited identically (the
same new bytes; each edit is one open ... close, which the watcher sees as
one IN_CLOSE_WRITE):

  replicator  two replicatord processes on loopback (replicator.localcluster):
              node a pushes mirror "m" to node b. The base file is renamed
              into a's mirror. After each step the bench waits until b's copy
              has the source's size and mtime and the link to b is idle (no
              queue, nothing in flight), then until its operation counters
              (sent, acknowledged, in flight) stay put for a second. Bytes on
              the wire are the growth of the link's counters over the step:
              ``bytes_sent`` (frames and payload, what went into the socket;
              acknowledgements coming back are not counted) and, of it,
              ``payload_bytes_sent`` (file data). The link sends a heartbeat
              every second; its rate, measured on the idle link first, is
              printed, not subtracted.
  rsync       ``rsync -a --no-whole-file --stats FILE rsync://127.0.0.1:PORT/dst/``
              to an rsync daemon started here (generated rsyncd.conf, one
              module, ``use chroot = no``, a free port on 127.0.0.1,
              ``--no-detach``, stopped at the end): the default delta
              algorithm (no --inplace: the receiver builds a new file from
              the old one and the literal data). Bytes on the wire are the
              client's "Total bytes sent" (literal data, block matches and
              the file list); "Total bytes received" (the receiver's block
              checksums, going the other way) is shown next to it.

After every step the sha256 of all four files (both sources, both replicas)
is computed and printed; the run fails if any differs. Wall times (edit
closed → published for replicator, the rsync command for rsync) are shown
for information: this measures bytes, not speed.

What the replicator sends is measured, never assumed. Since protocol 3 it
sends a delta (docs/blockmap.md): the blocks whose digests changed, and
Copy frames for the rest. Before, it re-sent the whole file (≈100 %).

The daemons run ``python -m replicator`` from the current directory and
PYTHONPATH; the report names the tree they loaded. To measure a commit
rather than a work tree being edited, run from an export of it, e.g.
``git archive HEAD | tar -x -C DIR``, copying this script into DIR/bench.

Usage:  .venv/bin/python bench/delta.py [--size-mib 256] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replicator.localcluster import LocalCluster, free_port, wait_for

MiB = 1 << 20
NAME = "big.bin"
#: Longest wait for one step to be replicated.
TIMEOUT = 300.0
#: The link's counters must stay put this long before a step is counted as done.
QUIET = 1.0
#: More reconnects of the link than this during the run: it is failing.
MAX_RECONNECTS = 3


# -- files ---------------------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        left = size
        while left:
            n = min(left, 4 * MiB)
            os.write(fd, os.urandom(n))
            left -= n
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(MiB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    done = 0
    while done < len(data):
        chunk = data[done:]
        done += os.write(fd, chunk) if offset is None else os.pwrite(fd, chunk, offset + done)


@dataclass
class Edit:
    name: str
    #: (fd open for writing, current size) -> applies the edit.
    apply: Callable[[int, int], None]
    open_flags: int = os.O_WRONLY

    def to(self, path: Path) -> None:
        fd = os.open(path, self.open_flags | os.O_CLOEXEC)
        try:
            self.apply(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)  # IN_CLOSE_WRITE: the watcher's cue


def edits(with_truncate: bool) -> list[Edit]:
    """The edit patterns; the new data of each is drawn once, for both copies."""
    appended, patch, tail = os.urandom(MiB), os.urandom(4096), os.urandom(MiB)

    def truncate_extend(fd: int, size: int) -> None:
        cut = size * 3 // 4
        os.ftruncate(fd, cut)
        write_all(fd, tail, cut)

    out = [
        Edit("append 1 MiB", lambda fd, _: write_all(fd, appended), os.O_WRONLY | os.O_APPEND),
        Edit("overwrite 4 KiB at size/2", lambda fd, size: write_all(fd, patch, size // 2)),
    ]
    if with_truncate:
        out.append(Edit("truncate to 3/4 + 1 MiB", truncate_extend))
    return out


# -- replicator ----------------------------------------------------------------------


class Replicator:
    """Node a pushes mirror "m" to node b (two replicatord processes on loopback)."""

    def __init__(self, workdir: Path) -> None:
        self.cluster = LocalCluster(workdir)
        self.a = self.cluster.node("a")
        self.b = self.cluster.node("b")
        self.cluster.connect("a", "b")
        self.src = self.a.add_mirror("m", push_to=["b"]) / NAME
        self.dst = self.b.add_mirror("m", accept_from=["a"]) / NAME
        self.watched = False
        self._connects = 0

    def start(self) -> None:
        self.cluster.start()
        self._connects = int(self.a.link("b")["connects"])
        self.poll(self._listed, "the first reconcile of a → b")
        self.watched = bool(self.a.status()["mirrors"]["m"].get("watched", False))

    def _listed(self) -> bool:
        st = self.a.link("b")
        m = st["mirrors"].get("m", {})
        return bool(st["state"] == "connected" and m.get("listed") and st["in_flight"] == 0)

    def counters(self) -> tuple[int, int]:
        ln = self.a.link("b")
        return int(ln["bytes_sent"]), int(ln["payload_bytes_sent"])

    def nudge(self) -> None:
        """A daemon that does not watch its mirror is told to reconcile."""
        if not self.watched:
            reply = self.a.control("sync", mirror="m")
            if not reply.get("ok"):
                raise RuntimeError(f"sync refused: {reply}")

    def check(self) -> None:
        """Fail at once, not at the timeout, when a daemon died or the link
        keeps failing (it reconnects after an internal error)."""
        for n in (self.a, self.b):
            if n.proc is None or n.proc.poll() is not None:
                raise RuntimeError(f"node {n.name} exited\n{self.logs()}")
        ln = self.a.link("b")
        err = ln.get("last_error") or ""
        if (
            err.startswith("internal error")
            or int(ln["connects"]) > self._connects + MAX_RECONNECTS
        ):
            raise RuntimeError(
                f"link a → b is failing ({int(ln['connects']) - self._connects} reconnects, "
                f"last error: {err or '-'})\n{self.logs()}"
            )

    def poll(self, cond: Callable[[], bool], what: str, interval: float = 0.02) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            self.check()
            try:
                if cond():
                    return
            except (OSError, KeyError):  # the replica is not there yet; status mid-update
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"timed out after {TIMEOUT:.0f} s waiting for {what}\n{self.logs()}"
                )
            time.sleep(interval)

    def wait_replicated(self) -> float:
        """Wait until b holds a's version and the link is quiet; returns the
        seconds until b's copy had a's size and mtime."""
        t0 = time.monotonic()
        st = os.stat(self.src)

        def published() -> bool:
            d = os.stat(self.dst)
            return d.st_size == st.st_size and d.st_mtime_ns == st.st_mtime_ns

        self.poll(published, "b's copy to have a's size and mtime", interval=0.005)
        took = time.monotonic() - t0
        last: tuple[object, float] = (None, 0.0)

        def quiet() -> bool:
            # Not bytes_sent: the link sends a heartbeat Ping every second.
            nonlocal last
            ln = self.a.link("b")
            now = time.monotonic()
            key = tuple(ln[k] for k in ("ops_sent", "ops_acked", "files_sent", "in_flight"))
            if key != last[0] or ln["in_flight"] or ln["queue_files"]:
                last = (key, now)
                return False
            return now - last[1] >= QUIET

        self.poll(quiet, "the link a → b to go quiet", interval=0.05)
        return took

    def idle_rate(self, seconds: float = 3.0) -> float:
        """Bytes per second the idle link sends (heartbeats)."""
        b0, t0 = self.counters()[0], time.monotonic()
        time.sleep(seconds)
        return (self.counters()[0] - b0) / (time.monotonic() - t0)

    def logs(self) -> str:
        return "\n".join(f"--- node {n.name} ---\n{n.log_tail(30)}" for n in (self.a, self.b))

    def stop(self) -> None:
        self.cluster.stop()


# -- rsync ---------------------------------------------------------------------------


class Rsyncd:
    """An rsync daemon on 127.0.0.1 with one writable module, "dst"."""

    MODULE = "dst"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.port = free_port()
        self.path = root / self.MODULE
        self.path.mkdir()
        lines = [
            f"pid file = {root}/rsyncd.pid",
            f"lock file = {root}/rsyncd.lock",
            f"log file = {root}/rsyncd.log",
            f"port = {self.port}",
            "address = 127.0.0.1",
            "use chroot = no",
            "",
            f"[{self.MODULE}]",
            f"path = {self.path}",
            "read only = no",
        ]
        if os.geteuid() == 0:  # else rsyncd would switch to "nobody"
            lines += [
                f"uid = {pwd.getpwuid(os.getuid()).pw_name}",
                f"gid = {grp.getgrgid(os.getgid()).gr_name}",
            ]
        self.conf = root / "rsyncd.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rsync://127.0.0.1:{self.port}/{self.MODULE}/"

    def start(self) -> None:
        out = (self.root / "rsyncd.out").open("wb")
        self.proc = subprocess.Popen(
            ["rsync", "--daemon", "--no-detach", f"--config={self.conf}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsync --daemon exited: {self.log_tail()}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_for(up, 10, "the rsync daemon")

    def log_tail(self) -> str:
        try:
            return (self.root / "rsyncd.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: its own group
            proc.wait()


@dataclass
class RsyncRun:
    sent: int
    received: int
    literal: int
    matched: int
    wall: float


def rsync_push(src: Path, url: str) -> RsyncRun:
    cmd = ["rsync", "-a", "--no-whole-file", "--stats", str(src), url]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-2000:]}")

    def stat(label: str) -> int:
        m = re.search(rf"^{label}: ([\d,]+)", res.stdout, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"no {label!r} in rsync --stats output:\n{res.stdout}")
        return int(m.group(1).replace(",", ""))

    return RsyncRun(
        stat("Total bytes sent"),
        stat("Total bytes received"),
        stat("Literal data"),
        stat("Matched data"),
        wall,
    )


# -- one run -------------------------------------------------------------------------


@dataclass
class Row:
    edit: str
    size: int
    rep_bytes: int
    rep_payload: int
    rep_wall: float
    #: Seconds between the two reads of the link's counters (heartbeats included).
    rep_window: float
    rsync: RsyncRun


def check_same(label: str, files: dict[str, Path]) -> str:
    digests = {who: sha256(p) for who, p in files.items()}
    if len(set(digests.values())) != 1:
        lines = "\n".join(f"  {who:<14} {d}  {files[who]}" for who, d in digests.items())
        raise RuntimeError(f"{label}: the copies DIFFER:\n{lines}")
    digest = next(iter(digests.values()))
    print(f"  sha256 {digest}: identical on {', '.join(digests)}", flush=True)
    return digest


def step(
    label: str,
    rep: Replicator,
    rsync_src: Path,
    rsyncd: Rsyncd,
    change: Callable[[Path], None],
) -> Row:
    """Apply ``change`` to both sources, replicate both, check, count."""
    print(f"{label} ...", flush=True)
    b0, p0 = rep.counters()
    t0 = time.monotonic()
    change(rep.src)
    rep.nudge()
    rep_wall = rep.wait_replicated()
    b1, p1 = rep.counters()
    window = time.monotonic() - t0
    change(rsync_src)
    rs = rsync_push(rsync_src, rsyncd.url)
    size = os.stat(rep.src).st_size
    print(
        f"  replicator: {b1 - b0:,} bytes sent ({p1 - p0:,} payload; counted over "
        f"{window:.1f} s, heartbeats included) published in {rep_wall:.2f} s; "
        f"rsync: {rs.sent:,} bytes sent, {rs.received:,} received "
        f"(literal {rs.literal:,}, matched {rs.matched:,}) in {rs.wall:.2f} s",
        flush=True,
    )
    check_same(
        label,
        {
            "replicator a": rep.src,
            "replicator b": rep.dst,
            "rsync source": rsync_src,
            "rsync replica": rsyncd.path / NAME,
        },
    )
    return Row(label, size, b1 - b0, p1 - p0, rep_wall, window, rs)


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def pct(n: int, size: int) -> str:
    return f"{100 * n / size:.3g} %" if size else "-"


def ratio(a: int, b: int) -> str:
    if not b:
        return "-"
    r = a / b
    return f"{r:,.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def table(rows: list[Row]) -> str:
    head = (
        "edit",
        "file size",
        "replicator bytes on wire",
        "(of it payload)",
        "rsync bytes sent",
        "(rsync received)",
        "replicator ÷ rsync",
        "time repl / rsync",
    )
    body = [
        (
            r.edit,
            fmt_bytes(r.size),
            f"{r.rep_bytes:,} ({pct(r.rep_bytes, r.size)})",
            f"{r.rep_payload:,}",
            f"{r.rsync.sent:,} ({pct(r.rsync.sent, r.size)})",
            f"{r.rsync.received:,}",
            ratio(r.rep_bytes, r.rsync.sent),
            f"{r.rep_wall:.2f} / {r.rsync.wall:.2f} s",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    sep = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths))
    return "\n".join([line(head), sep + "|", *(line(x) for x in body)])


def run(work: Path, size: int, with_truncate: bool) -> tuple[list[Row], float]:
    rep = Replicator(work / "cluster")
    rsyncd = Rsyncd(work / "rsyncd")
    try:
        rep.start()
        rsyncd.start()
        idle = rep.idle_rate()
        print(f"idle link a → b sends {idle:.0f} B/s (heartbeats)", flush=True)
        rsync_src = work / "rsync-src" / NAME
        rsync_src.parent.mkdir()
        staged = work / NAME
        print(f"creating {fmt_bytes(size)} of random data ...", flush=True)
        write_random(staged, size)
        shutil.copyfile(staged, rsync_src)

        def place(path: Path) -> None:
            if path == rep.src:
                os.rename(staged, path)  # moved into a's mirror: one event, same inode

        rows = [step("initial copy", rep, rsync_src, rsyncd, place)]
        for e in edits(with_truncate):
            rows.append(step(e.name, rep, rsync_src, rsyncd, e.to))
        return rows, idle
    finally:
        rsyncd.stop()
        rep.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument(
        "--workdir",
        type=Path,
        help="work directory (must be new or empty; default: a new one under /var/tmp)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-truncate", action="store_true", help="skip the truncate + extend edit")
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    if size < 4 * MiB:
        ap.error("--size-mib must be at least 4")
    if shutil.which("rsync") is None:
        ap.error("rsync is not installed")

    # SIGTERM must run the cleanup below like Ctrl-C does; and Ctrl-C must
    # raise KeyboardInterrupt even where SIGINT was ignored (a background job).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="replicator-delta-", dir="/var/tmp"))
    else:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            ap.error(f"--workdir {work} is not empty")
    print(f"work dir {work}", flush=True)
    print(f"daemons run replicator from {daemon_source()}", flush=True)
    try:
        rows, idle = run(work, size, not args.no_truncate)
        print()
        print(
            f"## bytes on the wire per step, {args.size_mib} MiB file of random data, "
            f"loopback; {first_line(['rsync', '--version'])}"
        )
        print()
        print(table(rows))
        print()
        print(
            "replicator: growth of the sending link's bytes_sent (frames + payload; its "
            "payload_bytes_sent in brackets); rsync: the client's Total bytes sent "
            "(its Total bytes received, the block checksums, in brackets). "
            "% of the file's size after the step."
        )
        longest = max(r.rep_window for r in rows)
        print(
            f"The replicator figures include the idle link's heartbeats ({idle:.0f} B/s, "
            f"at most {idle * longest:.0f} B in a step: counted over {longest:.1f} s at most)."
        )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def daemon_source() -> str:
    """Where the daemons load replicator from (they run ``python -m replicator``
    with this process's current directory and PYTHONPATH), and its git state."""
    code = "import os, replicator; print(os.path.dirname(os.path.abspath(replicator.__file__)))"
    pkg = first_line([sys.executable, "-c", code])
    root = os.path.dirname(pkg)
    head = first_line(["git", "-C", root, "rev-parse", "--short", "HEAD"])
    if head == "?":
        return f"{pkg} (not in a git work tree)"
    dirty = subprocess.run(
        ["git", "-C", root, "status", "--porcelain", "--", "replicator"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    state = f", {len(dirty)} files of replicator/ modified or new" if dirty else ", clean"
    return f"{pkg} (git {head}{state})"


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "?"
    return out.splitlines()[0].strip() if out else "?"


if __name__ == "__main__":
    sys.exit(main())
