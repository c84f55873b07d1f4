#!/usr/bin/env python3
"""Live replication, side by side: replicator against lsyncd and rsync.

One run measures, for each tool, against its own fresh source and
destination directories under one temporary directory:

  latency  ``--samples`` files of 4 KiB, one every 10 ms (open, write,
           close on the source). Latency = from close() returning on the
           source to the file being *published* at the destination: the
           IN_MOVED_TO (or IN_CLOSE_WRITE) of its final name, seen by an
           inotify watcher in a separate process (bench/_arrivals.py;
           CLOCK_MONOTONIC on both sides, tens of microseconds resolution
           when idle). Files go into ``lat/``, which exists before the tool
           starts. p50/p90/p99/max by nearest rank.
  burst    ``--burst`` files of 4 KiB written as fast as possible (os.open,
           os.write, os.close) into a new subdirectory ``burst/``. Time from
           just before its mkdir until the last file is published at the
           destination; for replicator also until the sender's link reports
           everything acknowledged (in_flight == 0: durable on the receiver)
           and its queue empty (queue_files == 0), polled every 5 ms once
           all files are there. "burst time" is the latest of these.

Tools:
  (a) replicator: two replicatord processes on loopback (replicator.localcluster);
      the receiver fsyncs files (syncfs for a group of 8+) and their
      directories before publishing and acknowledging. An extra row,
      "catch-up", pauses the link (``pause`` control command) while another
      burst is written, then times from ``resume`` on: comparable with (d).
  (b) lsyncd 2.2 default.rsync with its default delay (15 s), pushing to an
      rsync daemon on loopback. Latency is capped at ``--default-samples``
      (20) samples: every sample waits ~15 s anyway.
  (c) lsyncd default.rsync with delay = 0, to the same rsync daemon.
  (d) one ``rsync -a`` run to the rsync daemon after the burst was written
      (burst only: wall time of the rsync command), and ``rsync -a --fsync``
      (files fsynced; their renames and directories are not).

Neither lsyncd nor rsync fsyncs anything unless said: their "published" is
page cache only. The rsync daemon is started here (generated rsyncd.conf, a
free port on 127.0.0.1, ``--no-detach``) and stopped at the end; lsyncd runs
in the foreground (-nodaemon) with its config in the temporary directory.

The machine may be shared: before each timed workload the script waits (up
to ``--quiet-wait`` s) for other processes to go quiet, and it prints the
CPU seconds everything else used during each burst, naming the biggest
consumers. ext4 without a journal slows file creates down for a minute or
more after mass deletions (DESIGN.md section 9; the kernel skips "recently
deleted" inodes one by one on every create), which slows down every tool's
burst: before each burst the script probes the create cost in that
burst's destination, waits for it to recover (at most ``--settle`` s over the
whole run) and prints it; after deleting its own files it runs syncfs so
that the next run is slowed for ~60 s rather than ~6 min.

Under load (``--under-load``; replicator only, nothing else runs): the same
latency measure for small live changes (4 KiB files into ``lat/``, one every
20 ms from a thread of this script) while the same mirror carries a bulk load,
next to an idle row (the latency workload above, 20 ms apart). Each load has
its own pair of daemons and mirror. ``--loads`` picks from:

  big   a ``--load-big`` MiB file (2 GiB), written to a staging directory on
        the same filesystem, then renamed into the mirror. Sampling starts
        once its partial file on the receiver (.replicator/partial/a/*.part)
        grows and stops when it is published; load time = rename → published.
  cold  ``--load-files`` files (200,000) of 200-1,000 B in one directory per
        20 files, present before the daemons start. Sampling runs from the
        first reconcile (the link reports the mirror listed) until the link
        is drained (queue_files 0, in_flight 0) and every entry is on the
        replica; load time = daemons started → drained.
  tree  /usr/include and the running Python's stdlib, copied (cp -a, not
        timed) into a staging directory, then renamed into the mirror;
        sampling and load time from the rename until drained and complete.

The watcher on the replica watches only ``lat/``, so the load's arrivals do
not cost it anything. CPU: each daemon's, and everybody else's, over the
load. By default (``--fs loop-ext4``) everything runs on a fresh ext4 on a
sparse file (mkfs.ext4, losetup, mount under the temporary directory; undone
on exit): no recently deleted inodes, and a journal. ``--compare`` reads the
``--json`` of an earlier run (e.g. an older commit) for the load throughput
target. The daemons run ``python -m replicator`` from the current directory
and PYTHONPATH, which the report names: to measure an older commit, run from
a worktree of it with PYTHONPATH pointing there.

Usage:  .venv/bin/python bench/live.py [--samples 200] [--burst 10000]
        .venv/bin/python bench/live.py --under-load [--loads big,cold,tree]
            [--load-big 2048] [--load-files 200000] [--fs loop-ext4|tmp]
            [--json out.json] [--compare before.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import grp
import json
import math
import os
import platform
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load
from _arrivals import Arrivals

from replicator.localcluster import LocalCluster, free_port, wait_for

FILE_SIZE = 4096
CLK_TCK = os.sysconf("SC_CLK_TCK")
LAT_DIR = "lat"
BURST_DIR = "burst"
CATCHUP_DIR = "catchup"
#: Seconds between small live changes under load (and in its idle row).
LOAD_INTERVAL = 0.020
LOADS = ("big", "cold", "tree")
#: Targets of the under-load section: p99 ms idle, under load; throughput vs before.
IDLE_P99_MS, LOAD_P99_MS, LOAD_RATE_MIN = 5.0, 50.0, 0.95
#: Seconds to wait for other processes to go quiet before a timed workload.
QUIET_WAIT = 15.0
QUIET_MAX_BUSY = 0.3
#: A create (+ 4 KiB write + close) slower than this means ext4 is skipping
#: recently deleted inodes (normal here: ~25 µs).
CREATE_SLOW_US = 100.0

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- CPU accounting ----------------------------------------------------------------------


def _stat_fields(pid: int | str) -> tuple[str, list[str]] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()


def proc_cpu(pid: int, children: bool = False) -> float:
    """utime + stime of a process (all threads); with ``children``, plus the
    CPU of its children it has reaped (cutime + cstime)."""
    st = _stat_fields(pid)
    if st is None:
        return 0.0
    f = st[1]
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def reaped_children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def machine_busy() -> float:
    """Non-idle CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK


def all_procs() -> dict[int, tuple[str, int, float]]:
    """pid -> (name, ppid, utime + stime) of every process on the machine."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat_fields(d)
            if st is not None:
                f = st[1]
                out[int(d)] = (st[0], int(f[1]), (int(f[11]) + int(f[12])) / CLK_TCK)
    return out


def _ours(pid: int, procs: dict[int, tuple[str, int, float]]) -> bool:
    """This script or one of its descendants."""
    me = os.getpid()
    for _ in range(64):
        if pid == me:
            return True
        if pid not in procs or pid <= 1:
            return False
        pid = procs[pid][1]
    return False


class Meter:
    """CPU over a window: the tool's, and everybody else's (busy CPU of the
    machine minus the tool, this script and its watcher), naming the
    biggest other consumers. Kernel threads count as others, although some
    of them (ksoftirqd for loopback, kworkers writing back) work for us."""

    def __init__(self, tool_cpu: Callable[[], float], watcher_pid: int) -> None:
        self.tool_cpu = tool_cpu
        self.watcher_pid = watcher_pid
        self.procs0 = all_procs()
        self.busy0 = machine_busy()
        self.self0 = self_cpu()
        self.watcher0 = proc_cpu(watcher_pid)
        self.tool0 = tool_cpu()

    def stop(self, row: Row) -> None:
        row.cpu_s = self.tool_cpu() - self.tool0
        ours = self_cpu() - self.self0 + proc_cpu(self.watcher_pid) - self.watcher0
        row.others_cpu_s = max(0.0, machine_busy() - self.busy0 - row.cpu_s - ours)
        procs = all_procs()
        top = sorted(
            (
                (v[2] - self.procs0[pid][2], f"{v[0]}[{pid}]")
                for pid, v in procs.items()
                if pid in self.procs0 and not _ours(pid, procs)
            ),
            reverse=True,
        )
        row.others_top = ", ".join(f"{n} {c:.2f} s" for c, n in top[:3] if c >= 0.05)


def wait_quiet(row: Row, what: str) -> None:
    """Wait until the machine uses less than QUIET_MAX_BUSY CPUs over 0.5 s
    (our own processes are idle at this point); note it if it never did."""
    deadline = time.monotonic() + QUIET_WAIT
    while True:
        p0, b0 = all_procs(), machine_busy()
        time.sleep(0.5)
        busy = (machine_busy() - b0) / 0.5
        if busy < QUIET_MAX_BUSY:
            return
        if time.monotonic() > deadline:
            p1 = all_procs()
            top = sorted(
                ((v[2] - p0[pid][2], f"{v[0]}[{pid}]") for pid, v in p1.items() if pid in p0),
                reverse=True,
            )
            who = ", ".join(n for c, n in top[:3] if c > 0)
            row.notes.append(
                f"{what}: other processes kept {busy:.1f} CPUs busy when it started "
                f"(waited {QUIET_WAIT:.0f} s for quiet; busiest: {who})"
            )
            return


def run_queue_wait(pid: int) -> float:
    """Seconds the threads of ``pid`` have spent runnable but waiting for a
    CPU (/proc/PID/task/TID/schedstat, second field); exited threads are lost."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError, IndexError, ValueError),
                open(f"/proc/{pid}/task/{tid}/schedstat") as f,
            ):
                total += int(f.read().split()[1])
    return total / 1e9


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


# -- files ---------------------------------------------------------------------------------


def write_file(path: str, data: bytes) -> float:
    """Create ``path`` with ``data``; the monotonic time close() returned."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return time.monotonic()


def create_probe(where: Path, n: int = 300) -> float:
    """Microseconds per create + 4 KiB write + close, here and now."""
    where.mkdir(parents=True, exist_ok=True)
    data = os.urandom(FILE_SIZE)
    base = str(where / f"p{time.monotonic_ns()}-")
    t0 = time.perf_counter()
    for i in range(n):
        write_file(f"{base}{i}", data)
    return (time.perf_counter() - t0) / n * 1e6


#: Seconds left for waiting on slow creates, over the whole run (--settle).
SETTLE_BUDGET = [45.0]


def settle_creates(where: Path, row: Row | None = None) -> tuple[float, float]:
    """Wait (out of SETTLE_BUDGET) for creates in ``where`` to be fast again:
    (µs per create, seconds waited). ext4 without a journal skips recently
    deleted inodes one by one, for 60 s after their deletion was written
    back (~6 min before that); a new directory may land in another block
    group than a probe made elsewhere, so each destination is probed."""
    t0 = time.monotonic()
    while True:
        us = create_probe(where)
        waited = time.monotonic() - t0
        if us < CREATE_SLOW_US or waited >= SETTLE_BUDGET[0]:
            SETTLE_BUDGET[0] = max(0.0, SETTLE_BUDGET[0] - waited)
            if row is not None and us >= CREATE_SLOW_US:
                row.notes.append(f"creates in the destination were slow ({us:.0f} µs)")
            return us, waited
        log(f"creates cost {us:.0f} µs in {where.parent} (recent mass deletions); waiting")
        time.sleep(5)


def syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _libc.syncfs(fd)
    finally:
        os.close(fd)


def payload(blob: bytes, i: int) -> bytes:
    return i.to_bytes(8, "little") + blob[8:]


def count_files(d: Path, size: int) -> tuple[int, int]:
    """(files, files of the wrong size) in ``d``, dot-files left out."""
    n = bad = 0
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(d):
            if e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                continue
            n += 1
            bad += e.stat(follow_symlinks=False).st_size != size
    return n, bad


def pct(sorted_ms: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    k = max(1, math.ceil(p / 100 * len(sorted_ms)))
    return sorted_ms[k - 1]


# -- the tools ---------------------------------------------------------------------------


class Tool:
    """A live replicator of ``src`` into ``dst``, started and stopped here."""

    name = ""
    durable = ""
    src: Path
    dst: Path

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def cpu(self) -> float:
        """CPU seconds used so far by all of the tool's processes."""
        raise NotImplementedError

    def drained(self) -> dict[str, bool]:
        """Everything sent and acknowledged? ("acked" and "all" for replicator)"""
        return {"all": True}

    def idle(self) -> bool:
        return True

    def pids(self) -> list[int]:
        """Long-lived processes of the tool (for run-queue waits)."""
        return []

    def logs(self) -> str:
        return ""


class Replicator(Tool):
    name = "replicator"
    durable = "yes: fsync (syncfs for 8+ files) + dir fsync, then rename and ack"

    def __init__(self, root: Path) -> None:
        self.cluster = LocalCluster(root)
        a, b = self.cluster.node("a"), self.cluster.node("b")
        self.cluster.connect("a", "b")
        self.src = a.add_mirror("m", push_to=["b"], rescan_interval=86400.0)
        self.dst = b.add_mirror("m", accept_from=["a"])
        self.a, self.b = a, b

    def start(self) -> None:
        self.cluster.start()
        wait_for(self.listed, 30, "first reconcile")
        wait_for(lambda: (self.dst / LAT_DIR).is_dir(), 30, "lat/ on the replica")
        wait_for(lambda: self.drained()["all"], 30, "the link to go idle")

    def stop(self) -> None:
        self.cluster.stop()

    def cpu(self) -> float:
        return sum(proc_cpu(pid) for pid in self.pids())

    def pids(self) -> list[int]:
        return [n.proc.pid for n in (self.a, self.b) if n.proc is not None]

    def node_cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the sender (a) and the receiver (b)."""
        a, b = (proc_cpu(n.proc.pid) if n.proc is not None else 0.0 for n in (self.a, self.b))
        return a, b

    def listed(self) -> bool:
        """The first reconcile began: the sender knows what the replica holds."""
        return bool(self.a.link("b")["mirrors"].get("m", {}).get("listed"))

    def drained(self) -> dict[str, bool]:
        link = self.a.link("b")
        acked = link["in_flight"] == 0
        return {"acked": acked, "all": acked and link["queue_files"] == 0}

    def control(self, cmd: str) -> None:
        reply = self.a.control(cmd)
        if not reply.get("ok"):
            raise RuntimeError(f"{cmd}: {reply.get('error')}")

    def logs(self) -> str:
        return "\n".join(f"--- node {n.name} ---\n{n.log_tail(30)}" for n in (self.a, self.b))


class Rsyncd:
    """An rsync daemon on 127.0.0.1 with one writable module per name."""

    def __init__(self, root: Path, modules: list[str]) -> None:
        self.root = root
        self.root.mkdir(parents=True)
        self.port = free_port()
        self.paths = {m: root / m for m in modules}
        lines = [
            f"pid file = {root}/rsyncd.pid",
            f"lock file = {root}/rsyncd.lock",
            f"log file = {root}/rsyncd.log",
            f"port = {self.port}",
            "address = 127.0.0.1",
            "use chroot = no",
            "max connections = 0",
        ]
        for m, p in self.paths.items():
            p.mkdir()
            lines += ["", f"[{m}]", f"path = {p}", "read only = no", "list = yes"]
            if os.geteuid() == 0:  # else rsyncd would switch to "nobody"
                lines += [
                    f"uid = {pwd.getpwuid(os.getuid()).pw_name}",
                    f"gid = {grp.getgrgid(os.getgid()).gr_name}",
                ]
        self.conf = root / "rsyncd.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, module: str) -> str:
        return f"rsync://127.0.0.1:{self.port}/{module}/"

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
                raise RuntimeError("rsync --daemon exited: " + self.log_tail())
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_for(up, 10, "rsync daemon")

    def cpu(self) -> float:
        return 0.0 if self.proc is None else proc_cpu(self.proc.pid, children=True)

    def idle(self) -> bool:
        """No connection being served (its forks are reaped, their CPU counted)."""
        return self.proc is None or not children_of(self.proc.pid)

    def log_tail(self) -> str:
        try:
            return (self.root / "rsyncd.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        _terminate(self.proc)
        self.proc = None


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    """SIGTERM a process this script started (then SIGKILL its own session)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: its own group
        proc.wait()


class Lsyncd(Tool):
    """lsyncd default.rsync pushing to a module of the rsync daemon."""

    def __init__(self, root: Path, rsyncd: Rsyncd, module: str, delay: float | None) -> None:
        self.root = root
        self.rsyncd = rsyncd
        self.delay = delay
        self.src = root / "src"
        self.dst = rsyncd.paths[module]
        self.src.mkdir(parents=True)
        self.name = "lsyncd → rsyncd, " + ("default delay (15 s)" if delay is None else "delay=0")
        self.durable = "no (page cache)"
        self.logfile = root / "lsyncd.log"
        extra = "" if delay is None else f", delay = {delay}"
        self.conf = root / "lsyncd.lua"
        self.conf.write_text(
            "settings {\n"
            f'    logfile = "{self.logfile}",\n'
            f'    statusFile = "{root / "lsyncd.status"}",\n'
            "    nodaemon = true,\n"
            "}\n"
            "sync {\n"
            "    default.rsync,\n"
            f'    source = "{self.src}/",\n'
            f'    target = "{rsyncd.url(module)}"{extra},\n'
            "}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = (self.root / "lsyncd.out").open("wb")
        self.proc = subprocess.Popen(
            ["lsyncd", "-nodaemon", str(self.conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

        def started() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError("lsyncd exited:\n" + self.logs())
            text = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            return "Startup of" in text and "finished" in text

        wait_for(started, 60, "lsyncd's startup sync")
        wait_for(lambda: (self.dst / LAT_DIR).is_dir(), 30, "lat/ at the destination")
        wait_for(self.idle, 30, "lsyncd to go idle")

    def idle(self) -> bool:
        return self.proc is not None and not children_of(self.proc.pid) and self.rsyncd.idle()

    def cpu(self) -> float:
        # lsyncd reaps its rsync clients; the daemon reaps its forks: both counted.
        own = 0.0 if self.proc is None else proc_cpu(self.proc.pid, children=True)
        return own + self.rsyncd.cpu()

    def stop(self) -> None:
        _terminate(self.proc)
        self.proc = None

    def rsync_runs(self) -> int:
        try:
            return self.logfile.read_text(errors="replace").count("Calling rsync")
        except OSError:
            return 0

    def logs(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


# -- results -------------------------------------------------------------------------------


@dataclass
class Row:
    tool: str
    durable: str
    lat_ms: list[float] | None = None
    lat_asked: int = 0
    burst_s: float | None = None
    published_s: float | None = None
    acked_s: float | None = None
    write_s: float | None = None
    cpu_s: float | None = None
    others_cpu_s: float | None = None
    others_top: str = ""
    create_us: float | None = None
    arrived: int = 0
    asked: int = 0
    notes: list[str] = field(default_factory=list)

    def lat(self, p: float) -> float | None:
        if not self.lat_ms:
            return None
        return pct(sorted(self.lat_ms), p)

    @property
    def files_per_s(self) -> float | None:
        if self.burst_s is None or self.arrived < self.asked:
            return None
        return self.asked / self.burst_s


@dataclass
class LoadRow(Row):
    """The small live changes written while one load ran (or none: "idle")."""

    load: str = ""
    amount: float = 0.0  # of ``unit``: MB, files, entries
    unit: str = ""
    load_s: float | None = None
    sampled_s: float | None = None
    cpu_a: float | None = None
    cpu_b: float | None = None
    load_mb: float = 0.0

    @property
    def rate(self) -> float | None:
        """The load's throughput: ``unit`` per second."""
        return self.amount / self.load_s if self.load_s else None


# -- workloads ---------------------------------------------------------------------------


def latency(tool: Tool, samples: int, interval: float, timeout: float, row: Row) -> None:
    blob = os.urandom(FILE_SIZE)
    wait_quiet(row, "latency")
    arrivals = Arrivals(tool.dst)
    rq0 = sum(run_queue_wait(pid) for pid in tool.pids())
    busy0 = machine_busy()
    try:
        closed: dict[str, float] = {}
        start = time.monotonic() + 0.05
        for i in range(samples):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            rel = f"{LAT_DIR}/f{i:04d}"
            closed[rel] = write_file(str(tool.src / rel), payload(blob, i))
        arrivals.wait_all(closed, timeout)
        got = {r: arrivals.times[r] for r in closed if r in arrivals.times}
        busy = machine_busy() - busy0
        if tool.pids():
            rq = sum(run_queue_wait(pid) for pid in tool.pids()) - rq0
            row.notes.append(
                f"latency: its threads waited {rq * 1e3:.0f} ms in all for a CPU "
                f"({rq * 1e3 / samples:.2f} ms per sample); all processes on the machine used "
                f"{busy:.1f} CPU-s during the {samples * interval:.1f} s of samples"
            )
    finally:
        arrivals.close()
    row.lat_ms = [(got[r] - closed[r]) * 1e3 for r in closed if r in got]
    row.lat_asked = samples
    if len(got) < samples:
        row.notes.append(f"latency: {samples - len(got)} of {samples} samples never arrived")
    wait_for(tool.idle, 60, f"{tool.name} to go idle")


def _finish_burst(
    tool: Tool, arrivals: Arrivals, top: str, n: int, t0: float, timeout: float, row: Row
) -> None:
    """Wait for all ``n`` files below ``top`` to arrive, then for the tool to
    drain; fill in the times relative to ``t0``."""
    complete = arrivals.wait_count(top, n, timeout)
    row.arrived, row.asked = arrivals.count(top), n
    last = arrivals.last(top)
    row.published_s = None if last is None else last - t0
    if not complete:
        row.notes.append(f"burst: only {row.arrived} of {n} files arrived in {timeout:.0f} s")
        return
    acked = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = tool.drained()
        now = time.monotonic()
        if acked is None and d.get("acked", d["all"]):
            acked = now
        if d["all"]:
            assert row.published_s is not None and acked is not None
            if "acked" in d:
                row.acked_s = acked - t0
            row.burst_s = max(row.published_s, now - t0)
            return
        time.sleep(0.005)
    row.notes.append("burst: never drained")


def _check_dst(d: Path, n: int, row: Row) -> None:
    present, bad = count_files(d, FILE_SIZE)
    if present != n or bad:
        row.notes.append(f"burst: {present} files at the destination, {bad} of the wrong size")


def burst(tool: Tool, n: int, timeout: float, row: Row) -> None:
    blob = os.urandom(FILE_SIZE)
    data = [payload(blob, i) for i in range(n)]
    sub = tool.src / BURST_DIR
    names = [str(sub / f"b{i:05d}") for i in range(n)]
    row.create_us, _ = settle_creates(tool.dst / ".create-probe", row)
    wait_quiet(row, "burst")
    arrivals = Arrivals(tool.dst)
    try:
        meter = Meter(tool.cpu, arrivals.proc.pid)
        t0 = time.monotonic()
        sub.mkdir()
        for path, d in zip(names, data, strict=True):
            write_file(path, d)
        row.write_s = time.monotonic() - t0
        _finish_burst(tool, arrivals, BURST_DIR, n, t0, timeout, row)
        with contextlib.suppress(TimeoutError):
            wait_for(tool.idle, 30, "idle")
        meter.stop(row)
    finally:
        arrivals.close()
    _check_dst(tool.dst / BURST_DIR, n, row)


def catch_up(tool: Replicator, n: int, timeout: float, row: Row) -> None:
    """Pause the link, write the burst, then time from resume to drained."""
    blob = os.urandom(FILE_SIZE)
    sub = tool.src / CATCHUP_DIR
    tool.control("pause")
    try:
        sub.mkdir()
        for i in range(n):
            write_file(str(sub / f"b{i:05d}"), payload(blob, i))
        # every path is in the link's backlog before the clock starts
        wait_for(lambda: tool.a.link("b")["queue_files"] >= n + 1, 60, "the backlog to fill")
    except BaseException:
        tool.control("resume")
        raise
    row.create_us, _ = settle_creates(tool.dst / ".create-probe", row)
    wait_quiet(row, "catch-up")
    arrivals = Arrivals(tool.dst)
    try:
        meter = Meter(tool.cpu, arrivals.proc.pid)
        t0 = time.monotonic()
        tool.control("resume")
        _finish_burst(tool, arrivals, CATCHUP_DIR, n, t0, timeout, row)
        meter.stop(row)
    finally:
        arrivals.close()
    _check_dst(tool.dst / CATCHUP_DIR, n, row)


def run_tool(tool: Tool, samples: int, n: int, lat_timeout: float, rows: list[Row]) -> None:
    row = Row(tool.name, tool.durable)
    rows.append(row)
    try:
        log(f"{tool.name}: starting")
        tool.start()
        log(f"{tool.name}: latency, {samples} samples")
        runs0 = tool.rsync_runs() if isinstance(tool, Lsyncd) else 0
        latency(tool, samples, 0.010, lat_timeout, row)
        if isinstance(tool, Lsyncd):
            row.notes.append(
                f"latency: {samples} files took {tool.rsync_runs() - runs0} rsync runs"
            )
        if n:
            log(f"{tool.name}: burst of {n} files")
            burst(tool, n, 180, row)
        if n and isinstance(tool, Replicator):
            extra = Row(
                "replicator catch-up (paused while the burst is written; timed from resume)",
                tool.durable,
            )
            rows.append(extra)
            log(f"{tool.name}: catch-up of {n} files")
            try:
                catch_up(tool, n, 180, extra)
            except Exception:
                extra.notes.append(_failure())
                log(f"catch-up failed:\n{traceback.format_exc()}\n{tool.logs()}")
    except Exception:
        row.notes.append(_failure())
        log(f"{tool.name} failed:\n{traceback.format_exc()}\n{tool.logs()}")
    finally:
        tool.stop()
    log(f"{tool.name}: done")


def _failure() -> str:
    return "failed: " + traceback.format_exc(limit=3).strip().splitlines()[-1]


def rsync_once(root: Path, rsyncd: Rsyncd, module: str, n: int, fsync: bool, row: Row) -> None:
    """Write the burst first, then time one rsync -a run to the daemon."""
    src = root / "src"
    (src / BURST_DIR).mkdir(parents=True)
    blob = os.urandom(FILE_SIZE)
    for i in range(n):
        write_file(str(src / BURST_DIR / f"b{i:05d}"), payload(blob, i))
    dst = rsyncd.paths[module]
    cmd = ["rsync", "-a", *(["--fsync"] if fsync else []), f"{src}/", rsyncd.url(module)]
    row.create_us, _ = settle_creates(dst / ".create-probe", row)
    wait_for(rsyncd.idle, 30, "the rsync daemon to be idle")
    wait_quiet(row, "burst")
    arrivals = Arrivals(dst)
    try:
        meter = Meter(lambda: reaped_children_cpu() + rsyncd.cpu(), arrivals.proc.pid)
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True)
        t1 = time.monotonic()
        wait_for(rsyncd.idle, 30, "the rsync daemon to reap its connection")
        if res.returncode:
            row.notes.append(f"rsync exited {res.returncode}: {res.stderr.decode()[-300:]}")
        arrivals.wait_count(BURST_DIR, n, 10)
        row.arrived, row.asked = arrivals.count(BURST_DIR), n
        last = arrivals.last(BURST_DIR)
        row.published_s = None if last is None else last - t0
        row.burst_s = t1 - t0
        meter.stop(row)
    finally:
        arrivals.close()
    _check_dst(dst / BURST_DIR, n, row)


# -- under load ------------------------------------------------------------------------------


class Sampler:
    """Writes a 4 KiB file into ``lat`` every ``interval`` s, from a thread,
    between start() and stop(); ``closed`` maps each name (relative to
    ``lat``) to the time its close() returned."""

    def __init__(self, lat: Path, prefix: str, interval: float) -> None:
        self.lat, self.prefix, self.interval = lat, prefix, interval
        self.closed: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        blob = os.urandom(FILE_SIZE)
        start = time.monotonic()
        i = 0
        while not self._stop.wait(max(0.0, start + i * self.interval - time.monotonic())):
            name = f"{self.prefix}{i:06d}"
            self.closed[name] = write_file(str(self.lat / name), payload(blob, i))
            i += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()


def under_load(
    tool: Replicator,
    row: LoadRow,
    begin: Callable[[], None],
    started: Callable[[], bool],
    finished: Callable[[], float | None],
    timeout: float,
) -> None:
    """One load: ``begin()`` starts it (its time is t0), samples are
    written from ``started()`` until ``finished()`` returns the time the
    load was done; then wait for the last samples to arrive."""
    wait_quiet(row, row.load)
    arrivals = Arrivals(tool.dst / LAT_DIR)
    sampler = Sampler(tool.src / LAT_DIR, f"{row.load}-", LOAD_INTERVAL)
    try:
        meter = Meter(tool.cpu, arrivals.proc.pid)
        cpu0 = tool.node_cpu()
        rq0 = sum(run_queue_wait(pid) for pid in tool.pids())
        t0 = time.monotonic()
        begin()
        wait_for(started, timeout, f"{row.load}: the load to start", interval=0.005)
        t1 = time.monotonic()
        sampler.start()
        try:
            done = wait_for(finished, timeout, f"{row.load}: the load to finish", interval=0.01)
        finally:
            sampler.stop()
        row.sampled_s, row.load_s = time.monotonic() - t1, done - t0
        if not arrivals.wait_all(sampler.closed, 30):
            row.notes.append("samples still missing 30 s after the load")
        meter.stop(row)
        row.cpu_a, row.cpu_b = (x - x0 for x, x0 in zip(tool.node_cpu(), cpu0, strict=True))
        rq = sum(run_queue_wait(pid) for pid in tool.pids()) - rq0
        row.notes.append(
            f"the daemons' threads waited {rq:.1f} s in all for a CPU; sampling "
            f"began {t1 - t0:.2f} s into the load and lasted {row.sampled_s:.1f} s"
        )
    finally:
        arrivals.close()
    got = arrivals.times
    row.lat_ms = [(got[r] - t) * 1e3 for r, t in sampler.closed.items() if r in got]
    row.lat_asked = len(sampler.closed)
    t2 = time.monotonic()
    wait_for(lambda: tool.drained()["all"], timeout, f"{row.load}: the link to drain")
    row.notes.append(
        f"the link drained (queue 0, in flight 0) {time.monotonic() - t2:.2f} s "
        f"after the last samples arrived"
    )


def _complete(tool: Replicator, top: Path, entries: int) -> Callable[[], float | None]:
    """finished() of a load of many files: the link is drained but for the
    samples' own residue, and all ``entries`` are below ``top`` on the
    replica. Residue: every sample acknowledged marks lat/ for an mtime
    update 0.1 s later, so while samples are written the queue never
    empties; at most lat/ queued and one sample in flight is allowed. (The
    status is up to 0.25 s old.)"""

    def done() -> float | None:
        link = tool.a.link("b")
        if link["queue_files"] > 1 or link["in_flight"] > 1:
            return None
        t = time.monotonic()
        return t if top.is_dir() and _load.count_entries(top) >= entries else None

    return done


def load_big(tool: Replicator, mib: int, timeout: float, row: LoadRow) -> None:
    staged, src, dst = tool.src.parent / "staging-big", tool.src / "big.bin", tool.dst / "big.bin"
    staged.mkdir()
    _load.write_big(staged / "big.bin", mib)
    os.sync()
    row.amount, row.unit, row.load_mb = mib * (1 << 20) / 1e6, "MB", mib * (1 << 20) / 1e6
    grown = [-1]

    def growing() -> bool:
        size = _load.partial_size(tool.dst)
        if dst.exists():
            row.notes.append("published before its partial file was seen growing")
            return True
        was, grown[0] = grown[0], -1 if size is None else size
        return size is not None and was >= 0 and size > was

    under_load(
        tool,
        row,
        lambda: os.rename(staged / "big.bin", src),
        growing,
        lambda: time.monotonic() if dst.exists() else None,
        timeout,
    )
    if dst.stat().st_size != src.stat().st_size:
        row.notes.append(f"{dst.stat().st_size} bytes on the replica")


def load_cold(tool: Replicator, files: int, timeout: float, row: LoadRow) -> None:
    """The files are there before the daemons start (this starts them)."""
    log(f"cold: writing {files} files")
    entries, size = _load.make_cold_tree(tool.src / "cold", files)
    (tool.src / LAT_DIR).mkdir()
    (tool.dst / LAT_DIR).mkdir()  # for the watcher; the reconcile finds it there
    os.sync()
    row.amount, row.unit, row.load_mb = files, "files", size / 1e6
    under_load(
        tool,
        row,
        lambda: tool.cluster.start(),
        tool.listed,
        _complete(tool, tool.dst / "cold", entries),
        timeout,
    )
    row.notes.append(
        f"{entries} entries, {size / 1e6:.0f} MB of files; timed from starting the "
        f"daemons, sampled from their first reconcile"
    )


def load_tree(tool: Replicator, timeout: float, row: LoadRow) -> None:
    staged = tool.src.parent / "staging-tree" / "tree"
    sources = _load.real_trees()
    log(f"tree: copying {', '.join(map(str, sources))}")
    entries, size = _load.stage_tree(staged, sources)
    os.sync()
    row.amount, row.unit, row.load_mb = entries, "entries", size / 1e6
    row.notes.append(f"{entries} entries, {size / 1e6:.0f} MB of files")
    under_load(
        tool,
        row,
        lambda: os.rename(staged, tool.src / "tree"),
        lambda: True,
        _complete(tool, tool.dst / "tree", entries),
        timeout,
    )


# -- report ----------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".1f", na: str = "n/a") -> str:
    return na if v is None else format(v, spec)


def ratio(v: float | None, ref: float | None) -> str:
    if v is None or ref is None or ref == 0:
        return "n/a"
    return f"{v / ref:.2f}x"


def environment(tmp: Path, create_us: float, waited: float) -> str:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
            return out.splitlines()[0].strip() if out else "?"
        except OSError:
            return "?"

    root = Path(__file__).resolve().parent.parent
    head = first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(root), "status", "--porcelain", "--", "replicator"])
    fs = " ".join(
        first_line(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "--target", str(tmp)]).split()
    )
    return (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, Linux {platform.release()}, "
        f"{os.cpu_count()} CPUs, {tmp.parent} on {fs}; replicator {head}"
        f"{' + uncommitted changes in replicator/' if dirty != '?' else ''}; "
        f"{first_line(['rsync', '--version'])}; lsyncd "
        f"{first_line(['lsyncd', '-version']).split()[-1]}; file create "
        f"{create_us:.0f} µs at the start (after waiting {waited:.0f} s)"
    )


def report(rows: list[Row], args: argparse.Namespace, env: str) -> str:
    ref = rows[0] if rows and rows[0].tool == "replicator" else None
    out = [
        env,
        "",
        f"{FILE_SIZE // 1024} KiB files on loopback. Latency: close() on the source → "
        f"published at the destination (inotify), one file every 10 ms, {args.samples} "
        f"samples. Burst: {args.burst} files into a new directory, from the first write "
        f"(catch-up and rsync rows: from resume / rsync start) until all are published "
        f"(replicator: and acknowledged, link queue empty). Ratios: tool / replicator.",
        "",
        "| tool | durable when published | latency p50 / p99 (ms) | p99 vs replicator "
        "| burst time (s) | burst files/s | files/s vs replicator |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p50, p99 = r.lat(50), r.lat(99)
        lat = "n/a" if p50 is None else f"{p50:.1f} / {p99:.1f}"
        if r.lat_ms is not None and r.lat_asked != args.samples:
            lat += f" (n={len(r.lat_ms)})"
        p99_ratio = "1" if r is ref else ratio(p99, ref.lat(99) if ref else None)
        fps_ratio = "1" if r is ref else ratio(r.files_per_s, ref.files_per_s if ref else None)
        out.append(
            f"| {r.tool} | {r.durable} | {lat} | {p99_ratio} | {fmt(r.burst_s, '.2f')} | "
            f"{fmt(r.files_per_s, ',.0f')} | {fps_ratio} |"
        )
    out += [
        "",
        "Details: latency percentiles in ms; burst times in s from the start: writing the "
        "files on the source, last file published, all acknowledged (replicator: "
        "in_flight 0), drained (queue empty too); CPU = all of the tool's processes during "
        "the burst; others = CPU of everything else on the machine meanwhile (kernel "
        "threads included); create = µs per 4 KiB file create on the destination "
        "filesystem just before the burst (~25 µs is normal here).",
        "",
        "| tool | p50 | p90 | p99 | max | write | last published | acked | burst time "
        "| CPU (s) | others (s) | create (µs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.tool} | {fmt(r.lat(50))} | {fmt(r.lat(90))} | {fmt(r.lat(99))} | "
            f"{fmt(r.lat(100))} | {fmt(r.write_s, '.2f', '—')} | {fmt(r.published_s, '.2f')} | "
            f"{fmt(r.acked_s, '.2f', '—')} | {fmt(r.burst_s, '.2f')} | {fmt(r.cpu_s, '.2f')} | "
            f"{fmt(r.others_cpu_s, '.2f')} | {fmt(r.create_us, '.0f')} |"
        )
    notes = [f"- {r.tool}: {n}" for r in rows for n in r.notes]
    notes += [
        f"- {r.tool}: busiest other processes during the burst: {r.others_top}"
        for r in rows
        if r.others_top and (r.others_cpu_s or 0) >= 0.5
    ]
    if notes:
        out += ["", "Notes:", *notes]
    if ref is not None:
        out += ["", "Targets:"]
        p99 = ref.lat(99)
        out.append(
            f"- replicator latency p99 ≤ 50 ms: {fmt(p99)} ms → "
            + ("n/a" if p99 is None else "MET" if p99 <= 50 else "MISSED")
        )
        catchup = next((r for r in rows if r.tool.startswith("replicator catch-up")), None)
        for r in rows:
            if r.tool.startswith("rsync -a") and r.files_per_s and ref.files_per_s:
                ok = ref.files_per_s >= r.files_per_s
                out.append(
                    f"- replicator burst files/s ≥ {r.tool}: {ref.files_per_s:,.0f} vs "
                    f"{r.files_per_s:,.0f} → {'MET' if ok else 'MISSED'}"
                )
                if catchup is not None and catchup.files_per_s:
                    ok = catchup.files_per_s >= r.files_per_s
                    out.append(
                        f"  - like for like (files already written when the clock starts): "
                        f"catch-up {catchup.files_per_s:,.0f} vs {r.files_per_s:,.0f} → "
                        f"{'MET' if ok else 'MISSED'}"
                    )
    return "\n".join(out)


def report_load(
    rows: list[LoadRow], args: argparse.Namespace, env: str, before: dict[str, dict[str, Any]]
) -> str:
    out = [
        env,
        f"daemons: python -m replicator imports {_load.daemon_import_path()}",
        "",
        f"Small live changes under load, replicator only: {FILE_SIZE // 1024} KiB files into "
        f"lat/, one every {LOAD_INTERVAL * 1e3:.0f} ms; latency = close() on the source → "
        f"published on the replica (inotify on lat/), ms. idle: {args.samples} samples, no load. "
        f"big: a {args.load_big} MiB file renamed into the mirror, sampled while its partial "
        f"file grows, until published. cold: {args.load_files} files of "
        f"{_load.COLD_MIN}-{_load.COLD_MAX} B, {_load.COLD_PER_DIR} a directory, there before "
        f"the daemons start, sampled from the first reconcile until drained. tree: "
        f"{' + '.join(map(str, _load.real_trees()))} renamed into the mirror, sampled until "
        f"drained. Load time: from the rename (cold: starting the daemons) until published "
        f"(big) or drained with every entry on the replica. CPU over the load: sender / "
        f"receiver daemon; others = everything else on the machine.",
        "",
        "| load | samples arrived / written | p50 | p90 | p99 | max | p99 target "
        "| load time (s) | load throughput | vs before (target ≥ 0.95) "
        "| CPU sender / receiver (s) | others (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    targets = []
    for r in rows:
        target = IDLE_P99_MS if r.load == "idle" else LOAD_P99_MS
        p99 = r.lat(99)
        met = "n/a" if p99 is None else "MET" if p99 <= target else "MISSED"
        targets.append(f"- {r.load}: latency p99 ≤ {target:.0f} ms: {fmt(p99)} ms → {met}")
        thr = vs = "—"
        if r.load != "idle":
            thr = f"{fmt(r.rate, ',.0f')} {r.unit}/s"
            if r.unit != "MB" and r.load_s:
                thr += f" ({r.load_mb / r.load_s:,.0f} MB/s)"
            b = before.get(r.load)
            if b is not None:
                b_rate = b["amount"] / b["load_s"] if b.get("load_s") else None
                vs = ratio(r.rate, b_rate)
                ok = r.rate is not None and b_rate is not None and r.rate >= LOAD_RATE_MIN * b_rate
                targets.append(
                    f"- {r.load}: throughput ≥ {LOAD_RATE_MIN} x before: {vs} "
                    f"({fmt(r.rate, ',.0f')} vs {fmt(b_rate, ',.0f')} {r.unit}/s) → "
                    + ("MET" if ok else "MISSED")
                )
        cpu = "—" if r.cpu_a is None else f"{r.cpu_a:.2f} / {fmt(r.cpu_b, '.2f')}"
        out.append(
            f"| {r.load} | {len(r.lat_ms or [])} / {r.lat_asked} | {fmt(r.lat(50))} | "
            f"{fmt(r.lat(90))} | {fmt(p99)} | {fmt(r.lat(100))} | ≤ {target:.0f} ms: {met} | "
            f"{fmt(r.load_s, '.2f', '—')} | {thr} | {vs} | {cpu} | "
            f"{fmt(r.others_cpu_s, '.2f', '—')} |"
        )
    notes = [f"- {r.load}: {n}" for r in rows for n in r.notes]
    notes += [
        f"- {r.load}: busiest other processes during the load: {r.others_top}"
        for r in rows
        if r.others_top and (r.others_cpu_s or 0) >= 0.5
    ]
    if notes:
        out += ["", "Notes:", *notes]
    if not before:
        targets.append("- throughput within 5 % of before: n/a (no --compare)")
    return "\n".join([*out, "", "Targets:", *targets])


def under_load_main(args: argparse.Namespace) -> int:
    loads = [x for x in args.loads.split(",") if x]
    if set(loads) - set(LOADS):
        sys.exit(f"--loads: unknown {', '.join(sorted(set(loads) - set(LOADS)))}")
    before: dict[str, dict[str, Any]] = {}
    if args.compare:
        before = {d["load"]: d for d in json.loads(Path(args.compare).read_text()) if d.get("load")}
    tmp = Path(tempfile.mkdtemp(prefix="replicator-load-", dir=args.tmp))
    log(f"working in {tmp}")
    rows: list[LoadRow] = []
    env = ""
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_load.exit_on_sigterm())
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, True)  # last: after unmounting
        root = tmp
        if args.fs == "loop-ext4":
            root = stack.enter_context(_load.LoopExt4(tmp / "ext4.img", tmp / "mnt", args.fs_size))
            log(f"fresh ext4 ({args.fs_size:g} GiB sparse) mounted on {root}")
        SETTLE_BUDGET[0] = args.settle
        create_us, waited = settle_creates(root / "probe")
        env = environment(root / "probe", create_us, waited)
        for name in ["idle", *loads]:
            row = LoadRow("replicator", Replicator.durable, load=name)
            rows.append(row)
            tool = Replicator(root / name)
            try:
                if name == "cold":
                    load_cold(tool, args.load_files, args.load_timeout, row)
                    continue
                (tool.src / LAT_DIR).mkdir()
                log(f"{name}: starting")
                tool.start()
                log(f"{name}: sampling")
                if name == "idle":
                    latency(tool, args.samples, LOAD_INTERVAL, 30.0, row)
                elif name == "big":
                    load_big(tool, args.load_big, args.load_timeout, row)
                else:
                    load_tree(tool, args.load_timeout, row)
            except Exception:
                row.notes.append(_failure())
                log(f"{name} failed:\n{traceback.format_exc()}\n{tool.logs()}")
            finally:
                tool.stop()
                log(f"{name}: done")
    if args.fs == "tmp" and not args.keep:
        with contextlib.suppress(OSError):
            syncfs(tmp.parent)
    log(f"total {time.monotonic() - t_start:.0f} s")
    print(report_load(rows, args, env, before))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


# -- main ----------------------------------------------------------------------------------


def main() -> int:
    global QUIET_WAIT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=200, help="latency samples (10 ms apart)")
    ap.add_argument("--burst", type=int, default=10000, help="files in the burst (0: none)")
    ap.add_argument(
        "--default-samples",
        type=int,
        default=20,
        help="latency samples for lsyncd with its default 15 s delay",
    )
    ap.add_argument(
        "--tools",
        default="replicator,lsyncd0,lsyncd,rsync,rsync-fsync",
        help="comma-separated subset of: replicator, lsyncd0, lsyncd, rsync, rsync-fsync",
    )
    ap.add_argument("--tmp", default=None, help="parent of the temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--json", default=None, help="also write every measurement to this file")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=QUIET_WAIT,
        help="seconds to wait for other processes to go quiet before each timed workload",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=45.0,
        help="seconds to wait, over the whole run, for file creates to be fast again",
    )
    ul = ap.add_argument_group("under load (replicator only; see the module docstring)")
    ul.add_argument(
        "--under-load",
        action="store_true",
        help="run only the under-load section (no lsyncd/rsync, no burst)",
    )
    ul.add_argument(
        "--loads", default=",".join(LOADS), help="comma-separated subset of: " + ", ".join(LOADS)
    )
    ul.add_argument("--load-big", type=int, default=2048, help="MiB of the big file")
    ul.add_argument(
        "--load-files", type=int, default=200000, help="files of the cold sync (20 a directory)"
    )
    ul.add_argument(
        "--fs",
        choices=("loop-ext4", "tmp"),
        default="loop-ext4",
        help="loop-ext4: a fresh ext4 on a sparse file under the temporary directory; "
        "tmp: the temporary directory's own filesystem",
    )
    ul.add_argument("--fs-size", type=float, default=16.0, help="GiB of the sparse file")
    ul.add_argument(
        "--load-timeout", type=float, default=1800.0, help="seconds allowed for each load"
    )
    ul.add_argument(
        "--compare", default=None, help="--json output of an earlier under-load run (before)"
    )
    args = ap.parse_args()
    QUIET_WAIT = args.quiet_wait
    if args.under_load:
        return under_load_main(args)
    tools = args.tools.split(",")
    for exe in ("rsync", "lsyncd"):
        if shutil.which(exe) is None:
            sys.exit(f"{exe} is missing: run ./packaging/dev-setup.sh")
    if (
        "rsync-fsync" in tools
        and b"--fsync" not in subprocess.run(["rsync", "--help"], capture_output=True).stdout
    ):
        log("this rsync has no --fsync (3.2.4+): skipping rsync -a --fsync")
        tools.remove("rsync-fsync")

    tmp = Path(tempfile.mkdtemp(prefix="replicator-live-", dir=args.tmp))
    log(f"working in {tmp}")
    rows: list[Row] = []
    rsyncd: Rsyncd | None = None
    started: list[Tool] = []
    t_start = time.monotonic()
    env = ""
    try:
        SETTLE_BUDGET[0] = args.settle
        create_us, waited = settle_creates(tmp / "probe")
        env = environment(tmp, create_us, waited)
        rsyncd = Rsyncd(tmp / "rsyncd", ["lsyncd0", "lsyncd", "rsync", "rsync-fsync"])
        rsyncd.start()
        for name in tools:
            if name == "replicator":
                tool: Tool = Replicator(tmp / "replicator")
                samples = args.samples
            elif name in ("lsyncd0", "lsyncd"):
                delay = 0.0 if name == "lsyncd0" else None
                tool = Lsyncd(tmp / name, rsyncd, name, delay)
                samples = args.samples if name == "lsyncd0" else args.default_samples
            else:
                continue
            (tool.src / LAT_DIR).mkdir(parents=True, exist_ok=True)
            started.append(tool)
            run_tool(tool, samples, args.burst, 30.0 if name != "lsyncd" else 60.0, rows)
        for name in ("rsync", "rsync-fsync"):
            if name not in tools or not args.burst:
                continue
            fsync = name == "rsync-fsync"
            row = Row(
                "rsync -a --fsync (once, after the burst)"
                if fsync
                else "rsync -a (once, after the burst)",
                "files fsynced; renames/dirs not" if fsync else "no (page cache)",
            )
            rows.append(row)
            log(f"{row.tool}: burst of {args.burst} files")
            try:
                rsync_once(tmp / name, rsyncd, name, args.burst, fsync, row)
            except Exception:
                row.notes.append(_failure())
                log(f"{row.tool} failed:\n{traceback.format_exc()}")
    finally:
        for t in started:
            with contextlib.suppress(Exception):
                t.stop()
        if rsyncd is not None:
            rsyncd.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            # Write the freed inodes back now: ext4 (no journal) then avoids
            # them for ~60 s instead of ~6 min, slowing creates meanwhile.
            with contextlib.suppress(OSError):
                syncfs(tmp.parent)
    log(f"total {time.monotonic() - t_start:.0f} s")
    print(report(rows, args, env))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
