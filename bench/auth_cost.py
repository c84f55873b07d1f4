#!/usr/bin/env python3
"""Cost of frame authentication: a baseline tree against the current one, side by side.

Protocol 2 seals every frame after the handshake with a 16-byte keyed
BLAKE2b tag (replicator/protocol.py: ``Connection._seal`` on sending, the
check in ``next_event`` on receiving); chunk payloads stay zero-copy and are
not covered. This script measures what that costs, in one run, as ratios:

  contenders  "base": a ``git worktree`` of ``--base`` (default 7570fbe, the
              last protocol 1 commit) in the temporary directory; "new": a
              copy of this checkout's replicator/ as it is when the script
              starts (uncommitted changes included; the copy keeps edits made
              while the benchmark runs out of it), or ``--new REF`` for a
              commit. With ``--untagged`` also "untagged": a copy of new whose
              connections never arm their tags (one statement of protocol.py
              replaced), which tells the tags' cost from that of every other
              change between base and new. Each contender's daemons are
              ``python -m replicator`` started in its own tree (cwd and
              PYTHONPATH; the harness is replicator/localcluster.py of this
              checkout); before anything runs, the script checks which tree
              each one imports and which protocol version it speaks.
  (a) 1 GiB   bench/throughput.py's replicator path: one page-cached random
              file hard-linked into the sender's mirror, timed until it is
              published (fsync, rename) at full size on the receiver; CPU =
              utime+stime of both daemons (/proc). Its ballast, quiet-machine
              wait and disturbed-run repetition (other CPU, memory handed back
              to the host) are reused as they are.
  (b) burst   bench/live.py's burst: 10,000 files of 4 KiB written as fast as
              possible into a new directory of the sender's mirror, timed from
              just before its mkdir until all are published on the receiver
              (inotify, bench/_arrivals.py) and the sender's link has them all
              acknowledged (durable) with an empty queue. CPU = both daemons.
              Every run starts after a sync: the receiver's syncfs would also
              write back what earlier runs (or anyone) left dirty.
              A run is repeated (up to ``--attempts`` tries; else the least
              disturbed one counts) when other user-space processes used more
              than ``--max-foreign-cpu-burst`` CPU seconds meanwhile, or
              everything else, kernel threads included (they also write our
              files back), more than ``--max-other-cpu-burst``. The files of
              earlier runs stay (deleting them would slow ext4 creates down
              for minutes), so run k of every contender sees the same tree.
  micro       per frame: ``Connection.send`` then ``receive_data`` +
              ``next_event`` of a Ping (in batches of 16), in memory between
              two established Connections; in a subprocess per tree, three
              processes per tree, alternating, each best of 3. In new the same
              again with the tag states unset: the difference is what sealing
              and checking one tag costs. Also the bare hash
              (``protocol.frame_tag``, which keys BLAKE2b on every call, and a
              copied keyed state as Connection uses). From that and the frames
              each workload sent (extra frame bytes / 16 on the sender, one
              Ack per operation back), the tags' expected share of its CPU.

Runs are interleaved: one warm-up of each contender, then ``--runs`` rounds;
the order of the contenders reverses from round to round. Every contender
has its own pair of daemons (node a pushes mirror "m" to node b over
loopback) per workload. Reported: medians (min-max) of wall time, throughput
and CPU; new/base ratios of the medians against the targets (throughput
>= 0.98 of base for 1 GiB, >= 0.95 for the burst; CPU ratios for
information), and the ratios of the runs paired by round.

Usage:  .venv/bin/python bench/auth_cost.py [--base 7570fbe] [--runs 3] [--untagged]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import live
import throughput as tp
from _arrivals import Arrivals

from replicator.localcluster import LocalCluster, LocalNode, wait_for
from replicator.outgoing import CHUNK

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
#: Frames per receive_data() call in the micro-benchmark.
MICRO_BATCH = 16


def say(msg: str) -> None:
    print(msg, flush=True)


def fmt_range(xs: list[float], digits: int = 2) -> str:
    return tp.fmt_range(xs, digits)


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


# -- the two trees ----------------------------------------------------------------------


@dataclass
class Tree:
    label: str
    desc: str
    path: Path
    #: made with ``git worktree add``: removed with ``git worktree remove``
    worktree: bool
    protocol: int = 0
    #: shown after the protocol version in tables
    suffix: str = ""

    @property
    def title(self) -> str:
        return f"{self.label} (protocol {self.protocol}{self.suffix})"

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(self.path))


def git(*args: str) -> str:
    res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout.strip()


def checkout(label: str, ref: str, dest: Path) -> Tree:
    commit = git("rev-parse", "--short", f"{ref}^{{commit}}")
    git("worktree", "add", "--detach", str(dest), commit)
    subject = git("log", "-1", "--format=%s", commit)
    return Tree(label, f"{commit} ({subject[:60]})", dest, worktree=True)


def snapshot(label: str, dest: Path) -> Tree:
    """A copy of this checkout's replicator/ package as it is now."""
    src = ROOT / "replicator"
    shutil.copytree(src, dest / "replicator", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for p in sorted((dest / "replicator").rglob("*.py")):
        digest.update(p.relative_to(dest).as_posix().encode() + b"\0" + p.read_bytes())
    head = git("rev-parse", "--short", "HEAD")
    changed = git("status", "--porcelain", "--", "replicator").splitlines()
    return Tree(
        label,
        f"working tree of {ROOT}: {head} + {len(changed)} changed/new files in replicator/ "
        f"(copied {time.strftime('%H:%M:%S')}, sha256 of its *.py {digest.hexdigest()[:12]})",
        dest,
        worktree=False,
    )


#: The statement of protocol.Connection._on_auth that arms the tags; the
#: untagged variant replaces it.
ARM_TAGS = "self._tx_tag, self._rx_tag = _tag_state(tx), _tag_state(rx)"


def untagged(new: Tree, label: str, dest: Path) -> Tree:
    """A copy of ``new`` whose connections never arm their tags: the same
    code and wire format except that frames travel without tags (both of its
    daemons agree). What is left of the difference to ``new`` is the tags."""
    shutil.copytree(
        new.path / "replicator", dest / "replicator", ignore=shutil.ignore_patterns("__pycache__")
    )
    p = dest / "replicator" / "protocol.py"
    text = p.read_text()
    if text.count(ARM_TAGS) != 1:
        raise RuntimeError(f"--untagged: {ARM_TAGS!r} is not once in {new.label}'s protocol.py")
    p.write_text(text.replace(ARM_TAGS, "self._tx_tag = self._rx_tag = None  # auth_cost.py"))
    return Tree(
        label,
        f"{new.label} with the tags never armed (protocol.py: {ARM_TAGS} → None): no seal, "
        "no check, 16 bytes less per frame; everything else identical to it",
        dest,
        worktree=False,
        suffix=", no tags",
    )


def identify(tree: Tree) -> None:
    """Check that a daemon started in ``tree`` imports that tree, and learn
    its protocol version."""
    code = (
        "import json, replicator, replicator.frames as F; "
        "print(json.dumps([replicator.__file__, F.VERSION_MIN, F.VERSION_MAX]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree.path,
        env=tree.env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    where, vmin, vmax = json.loads(out)
    if not Path(where).resolve().is_relative_to(tree.path.resolve()):
        raise RuntimeError(f"{tree.label}: python imports replicator from {where}")
    tree.protocol = vmax
    tree.desc += f", protocol {vmin}..{vmax}" if vmin != vmax else f", protocol {vmax}"


def remove_tree(tree: Tree) -> None:
    if tree.worktree:
        res = subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree.path)],
            capture_output=True,
            text=True,
        )
        if res.returncode:
            say(f"WARNING: git worktree remove {tree.path}: {res.stderr.strip()}")


@dataclass
class TreeNode(LocalNode):
    """A daemon that runs the code of ``tree`` (``python -m`` puts its cwd
    first on sys.path; PYTHONPATH for good measure)."""

    tree: Path = Path()

    def start(self, wait: bool = True, extra_env: dict[str, str] | None = None) -> None:
        env = {"PYTHONPATH": str(self.tree), **(extra_env or {})}
        with contextlib.chdir(self.tree):
            super().start(wait, env)


class TreeCluster(LocalCluster):
    def __init__(self, workdir: Path, tree: Tree) -> None:
        super().__init__(workdir)
        self.tree = tree

    def node(self, name: str, **kw: Any) -> LocalNode:
        n = TreeNode(name, self.workdir, tree=self.tree.path, **kw)
        self.nodes[name] = n
        return n


# -- (a) 1 GiB ----------------------------------------------------------------------------


class BigPair(tp.ReplicatorPair):
    """bench/throughput.py's pair (a pushes "m" to b), daemons run from ``tree``."""

    def __init__(
        self, tree: Tree, workdir: Path, src: Path, size: int, ballast: tp.Ballast
    ) -> None:
        self.tree = tree
        self.src, self.size, self.ballast = src, size, ballast
        self.cluster = TreeCluster(workdir, tree)
        self.transfers = 0
        self.a = self.cluster.node("a")
        self.b = self.cluster.node("b")
        self.cluster.connect("a", "b")
        self.src_dir = self.a.add_mirror("m", push_to=["b"])
        self.dst_dir = self.b.add_mirror("m", accept_from=["a"])
        self.cluster.start()
        wait_for(lambda: self._listed(0, 0.0), 30, "the first reconcile of a → b")


def rounds(trees: list[Any], runs: int) -> Iterable[tuple[int, str, Any]]:
    """(round, label, contender) in the interleaved order: warm-up first, the
    order reversing from round to round."""
    for i in range(runs + 1):
        label = "warm-up" if i == 0 else f"run {i}/{runs}"
        yield from ((i, label, t) for t in (trees if i % 2 == 0 else trees[::-1]))


def run_big(trees: list[Tree], work: Path, args: argparse.Namespace) -> dict[str, list[tp.Sample]]:
    size = args.size_mib * MiB
    src = work / "source.bin"
    say(f"\n# (a) {args.size_mib} MiB file: creating random data ...")
    tp.make_source(src, size)
    tp.read_through(src)
    ballast = tp.Ballast(work / "ballast", size)
    pairs: list[BigPair] = []
    samples: dict[str, list[tp.Sample]] = {t.label: [] for t in trees}
    try:
        for t in trees:
            pairs.append(BigPair(t, work / f"big-{t.label}", src, size, ballast))
        by_label = {p.tree.label: p for p in pairs}
        for i, label, pair in rounds(pairs, args.runs):
            name = pair.tree.label
            for attempt in range(1, args.attempts + 1):
                s = pair.run()
                if not tp.same_content(src, pair.dst):
                    raise RuntimeError(f"{name}: destination differs from the source")
                ballast.take(pair.dst)
                disturbed = (
                    s.extra["other_cpu"] > args.max_other_cpu
                    or s.extra["reported_mib"] > args.max_reported_mib
                )
                retry = disturbed and attempt < args.attempts
                say(
                    f"{label:>9}  {name:<8} {size / s.wall / 1e9:5.2f} GB/s  {s.wall:6.3f} s  "
                    f"CPU {s.cpu:.2f} s (send {s.cpu_send:.2f} + recv {s.cpu_recv:.2f}); "
                    f"meanwhile: other CPU {s.extra['other_cpu']:.2f} s "
                    f"({s.extra['others'] or '-'}), memory handed to the host "
                    f"{s.extra['reported_mib']:.0f} MiB"
                    + (" DISTURBED: repeated" if retry else " DISTURBED: kept" if disturbed else "")
                )
                if not retry:
                    break
            if i:
                s.extra["framing"] = (
                    s.extra["link_bytes_sent"] - s.extra["link_payload_bytes_sent"]
                ) / by_label[name].transfers
                samples[name].append(s)
    finally:
        for p in pairs:
            p.close()
        tp.remove(src)
        tp.remove(ballast.path)
    return samples


# -- (b) burst ------------------------------------------------------------------------------


class BurstPair(live.Replicator):
    """bench/live.py's replicator (a pushes "m" to b, no periodic rescans),
    daemons run from ``tree``."""

    def __init__(self, tree: Tree, root: Path) -> None:
        self.tree = tree
        self.name = tree.label
        self.cluster = TreeCluster(root, tree)
        a, b = self.cluster.node("a"), self.cluster.node("b")
        self.cluster.connect("a", "b")
        self.src = a.add_mirror("m", push_to=["b"], rescan_interval=86400.0)
        self.dst = b.add_mirror("m", accept_from=["a"])
        self.a, self.b = a, b
        # live.Replicator.start waits for this directory to reach the replica.
        (self.src / live.LAT_DIR).mkdir()


@dataclass
class BurstSample:
    row: live.Row
    #: sender's link counters over the run: frame bytes (sent minus payload),
    #: operations sent and acknowledged
    framing: int = 0
    ops_sent: int = 0
    ops_acked: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return self.row.burst_s or float("nan")

    @property
    def cpu(self) -> float:
        return self.row.cpu_s or float("nan")


def burst_run(tool: BurstPair, n: int, top: str, timeout: float) -> BurstSample:
    """live.py's burst, into directory ``top`` (new for every run)."""
    row = live.Row(tool.name, tool.durable)
    blob = os.urandom(live.FILE_SIZE)
    data = [live.payload(blob, i) for i in range(n)]
    sub = tool.src / top
    names = [str(sub / f"b{i:05d}") for i in range(n)]
    row.create_us, _ = live.settle_creates(tool.dst / ".create-probe", row)
    # Nothing dirty left over (the previous run's files, anyone's): the
    # receiver's syncfs would write it back, in its own CPU time.
    os.sync()
    live.wait_quiet(row, "quiet wait")
    link0 = tool.a.link("b")
    arrivals = Arrivals(tool.dst)
    try:
        meter = live.Meter(tool.cpu, arrivals.proc.pid)
        procs0 = live.all_procs()
        t0 = time.monotonic()
        sub.mkdir()
        for path, d in zip(names, data, strict=True):
            live.write_file(path, d)
        row.write_s = time.monotonic() - t0
        live._finish_burst(tool, arrivals, top, n, t0, timeout, row)
        meter.stop(row)
        foreign = foreign_cpu(procs0, live.all_procs())
    finally:
        arrivals.close()
    live._check_dst(tool.dst / top, n, row)
    if row.burst_s is None or any(x.startswith("burst:") for x in row.notes):
        raise RuntimeError(f"{tool.name}: burst failed: {row.notes}\n{tool.logs()}")
    link1 = tool.a.link("b")

    def delta(k: str) -> int:
        return int(link1[k] - link0[k])

    return BurstSample(
        row,
        framing=delta("bytes_sent") - delta("payload_bytes_sent"),
        ops_sent=delta("ops_sent"),
        ops_acked=delta("ops_acked"),
        extra={"foreign": foreign[0], "foreign_top": foreign[1]},
    )


def foreign_cpu(
    p0: dict[int, tuple[str, int, float]], p1: dict[int, tuple[str, int, float]]
) -> tuple[float, str]:
    """CPU seconds that user-space processes other than this script and its
    children used between two ``live.all_procs()`` (kernel threads, which
    also write our files back, left out), and the busiest of them."""
    used = []
    for pid, (name, ppid, cpu) in p1.items():
        if pid in p0 and cpu > p0[pid][2] and 2 not in (pid, ppid) and not live._ours(pid, p1):
            used.append((cpu - p0[pid][2], f"{name}[{pid}]"))
    used.sort(reverse=True)
    return sum(c for c, _ in used), ", ".join(f"{n} {c:.2f}" for c, n in used[:3])


def run_burst(
    trees: list[Tree], work: Path, args: argparse.Namespace
) -> dict[str, list[BurstSample]]:
    n = args.burst
    say(f"\n# (b) burst of {n:,} x {live.FILE_SIZE // 1024} KiB files")
    tools: list[BurstPair] = []
    samples: dict[str, list[BurstSample]] = {t.label: [] for t in trees}
    try:
        for t in trees:
            tool = BurstPair(t, work / f"burst-{t.label}")
            tools.append(tool)
            tool.start()
        for i, label, tool in rounds(tools, args.runs):
            tries: list[BurstSample] = []
            for attempt in range(1, args.attempts + 1):
                s = burst_run(tool, n, f"burst{i}-{attempt}", 180.0)
                r = s.row
                others = r.others_cpu_s or 0.0
                s.extra["disturbed"] = disturbed = (
                    s.extra["foreign"] > args.max_foreign_cpu_burst
                    or others > args.max_other_cpu_burst
                )
                tries.append(s)
                retry = disturbed and attempt < args.attempts
                say(
                    f"{label:>9}  {tool.name:<8} {n / s.wall:7,.0f} files/s  {s.wall:6.3f} s "
                    f"(written {r.write_s:.2f}, last published {r.published_s:.2f}, "
                    f"acked {r.acked_s:.2f})  CPU {s.cpu:.2f} s; meanwhile: other processes "
                    f"{s.extra['foreign']:.2f} s ({s.extra['foreign_top'] or '-'}), everything "
                    f"else incl. kernel threads {others:.2f} s ({r.others_top or '-'}); "
                    f"create {r.create_us:.0f} µs"
                    + "".join(f"; {x}" for x in r.notes)
                    + (" DISTURBED: repeated" if retry else " DISTURBED" if disturbed else "")
                )
                if not retry:
                    break
            if i:
                # all disturbed: the least disturbed one
                best = min(tries, key=lambda x: (x.extra["disturbed"], x.extra["foreign"]))
                if best.extra["disturbed"]:
                    say(f"{'':>9}  {tool.name}: kept the least disturbed of {len(tries)} tries")
                samples[tool.name].append(best)
    except Exception:
        for tool in tools:
            say(tool.logs())
        raise
    finally:
        for tool in tools:
            with contextlib.suppress(Exception):
                tool.stop()
    return samples


# -- micro: per-frame cost ----------------------------------------------------------------

MICRO_CODE = r"""
import gc, json, os, struct, sys, time
from replicator import frames as F, protocol as P

N, BATCH, REPS = (int(x) for x in sys.argv[1:4])


def established():
    key = os.urandom(32)
    a = P.Connection(P.Role.INITIATOR, "a", os.urandom(F.NONCE_SIZE), lambda n: key)
    b = P.Connection(P.Role.ACCEPTOR, "b", os.urandom(F.NONCE_SIZE), lambda n: key)
    a.start()
    up = set()
    for _ in range(8):
        for x, y in ((a, b), (b, a)):
            out = x.data_to_send()
            if out:
                y.receive_data(out)
            while True:
                ev = y.next_event()
                if isinstance(ev, P.Established):
                    up.add(y.role)
                if ev is P.NEED_DATA or isinstance(ev, P.Established):
                    break
    assert len(up) == 2, up
    return a, b


def once(tags_off):
    a, b = established()
    if tags_off:  # the same code path with the tag states unset: no seal, no check
        a._tx_tag = b._rx_tag = None
    pings = [F.Ping(i) for i in range(N)]
    t0 = time.perf_counter()
    out = [a.send(p) for p in pings]
    t1 = time.perf_counter()
    blobs = [(b"".join(out[i : i + BATCH]), min(BATCH, N - i)) for i in range(0, N, BATCH)]
    t2 = time.perf_counter()
    for blob, k in blobs:
        b.receive_data(blob)
        for _ in range(k):
            ev = b.next_event()
    t3 = time.perf_counter()
    assert ev == pings[-1] and b.next_event() is P.NEED_DATA
    return len(out[0]), (t1 - t0) / N * 1e6, (t3 - t2) / N * 1e6


tagged = hasattr(P, "frame_tag")
variants = ["", "_tags_off"] if tagged else [""]
res = {"protocol": F.VERSION_MAX}
gc.disable()
for _ in range(REPS):
    for v in variants:
        size, send, recv = once(v == "_tags_off")
        res["frame_bytes" + v] = size
        res["send_us" + v] = min(res.get("send_us" + v, 1e9), send)
        res["recv_us" + v] = min(res.get("recv_us" + v, 1e9), recv)
if tagged:
    key, frame = os.urandom(32), b"\0" * 16
    state = P._tag_state(key) if hasattr(P, "_tag_state") else None
    seq = struct.Struct("!Q")
    for _ in range(REPS):
        t0 = time.perf_counter()
        for i in range(N):
            P.frame_tag(key, i, frame)
        t1 = time.perf_counter()
        res["frame_tag_us"] = min(res.get("frame_tag_us", 1e9), (t1 - t0) / N * 1e6)
        if state is not None:
            t0 = time.perf_counter()
            for i in range(N):
                h = state.copy()
                h.update(seq.pack(i))
                h.update(frame)
                h.digest()
            t1 = time.perf_counter()
            res["copied_tag_us"] = min(res.get("copied_tag_us", 1e9), (t1 - t0) / N * 1e6)
print(json.dumps(res))
"""


def run_micro(trees: list[Tree], frames: int, rounds: int = 3) -> dict[str, dict[str, Any]]:
    """Each tree's micro-benchmark in its own process, alternating, ``rounds``
    times; per figure the best (smallest) of all."""
    say(f"\n# micro: per-frame cost, {frames:,} Ping frames, best of {rounds} x 3")
    out: dict[str, dict[str, Any]] = {}
    for r in range(rounds):
        for t in trees if r % 2 == 0 else trees[::-1]:
            tp.QUIET.wait()
            res = subprocess.run(
                [sys.executable, "-c", MICRO_CODE, str(frames), str(MICRO_BATCH), "3"],
                cwd=t.path,
                env=t.env(),
                capture_output=True,
                text=True,
            )
            if res.returncode:
                say(f"{t.label}: micro-benchmark failed:\n{res.stderr[-2000:]}")
                continue
            got = json.loads(res.stdout)
            say(f"{t.label:>9}  " + ", ".join(f"{k} {v:.3g}" for k, v in got.items()))
            best = out.setdefault(t.label, got)
            for k, v in got.items():
                best[k] = min(best[k], v) if "_us" in k else v
    return out


# -- report ----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def paired(new: list[float], base: list[float]) -> str:
    """new/base of the runs of the same round (adjacent in time)."""
    rs = [n / b for n, b in zip(new, base, strict=True) if b]
    return fmt_range(rs) if rs else "n/a"


def tag_cost(m: dict[str, Any]) -> float | None:
    """µs to seal and check one tag: the same Connection code with and without tags."""
    if "send_us_tags_off" not in m:
        return None
    return float(m["send_us"] + m["recv_us"] - m["send_us_tags_off"] - m["recv_us_tags_off"])


def micro_table(trees: list[Tree], micro: dict[str, dict[str, Any]], frames: int) -> list[str]:
    lines = [
        "micro: per frame, a Ping (8-byte header + 8-byte body): Connection.send, then "
        f"receive_data + next_event in batches of {MICRO_BATCH} frames, in memory between two "
        f"established Connections; best of 9 x {frames:,} frames",
        "",
        "| code | frame bytes on the wire | send µs | receive µs | send + receive µs |",
        "|---|---|---|---|---|",
    ]

    def row(name: str, m: dict[str, Any], v: str = "") -> None:
        lines.append(
            f"| {name} | {m['frame_bytes' + v]} | {m['send_us' + v]:.2f} "
            f"| {m['recv_us' + v]:.2f} | {m['send_us' + v] + m['recv_us' + v]:.2f} |"
        )

    for t in trees:
        m = micro.get(t.label)
        if not m:
            continue
        row(f"{t.label} (protocol {m['protocol']})", m)
        if "send_us_tags_off" in m:
            row(f"{t.label}, tag states unset (no seal, no check)", m, "_tags_off")
    notes = []
    for t in trees:
        m = micro.get(t.label, {})
        tag = tag_cost(m)
        if tag is not None:
            notes.append(
                f"- {t.label}: sealing + checking one tag costs {tag:.2f} µs per frame "
                f"(send {m['send_us'] - m['send_us_tags_off']:+.2f}, receive "
                f"{m['recv_us'] - m['recv_us_tags_off']:+.2f}); the bare hash: "
                f"protocol.frame_tag() {m['frame_tag_us']:.2f} µs (keys BLAKE2b on every "
                f"call), a copied keyed state as Connection does "
                f"{m.get('copied_tag_us', float('nan')):.2f} µs"
            )
    if len(trees) >= 2 and all(t.label in micro for t in trees[:2]):
        mb, mn = micro[trees[0].label], micro[trees[1].label]
        d = mn["send_us"] + mn["recv_us"] - mb["send_us"] - mb["recv_us"]
        notes.append(
            f"- {trees[1].label} - {trees[0].label}: {d:+.2f} µs per frame sent and received "
            "(tags and every other change to Connection)"
        )
    return [*lines, "", *notes, ""]


def tag_estimate(
    what: str,
    frames: float,
    tag_us: float,
    cpu_base: float,
    cpu_diff: float,
    rate_base: float,
    rate_new: float,
) -> str:
    """What tags should cost in a workload: its tagged frames times the
    micro-benchmark's cost per tag."""
    est = frames * tag_us / 1e6
    return (
        f"- {what}: ~{frames:,.0f} tagged frames per run x {tag_us:.2f} µs = {est * 1e3:.1f} "
        f"CPU-ms of tags, {est / cpu_base * 100:.2f} % of the reference's CPU; measured: CPU "
        f"{cpu_diff * 1e3:+.0f} ms ({cpu_diff / cpu_base * 100:+.1f} %), throughput "
        f"{(rate_new / rate_base - 1) * 100:+.1f} %"
    )


def spread(xs: list[float]) -> float:
    """Half the range of ``xs`` relative to their median."""
    return (max(xs) - min(xs)) / 2 / median(xs) if len(xs) > 1 else 0.0


def ratios(
    what: str,
    rate: dict[str, list[float]],
    cpu: dict[str, list[float]],
    target: float,
    comparisons: list[tuple[str, str, str, bool]],
) -> list[str]:
    out = []
    for num, den, shows, targeted in comparisons:
        r = median(rate[num]) / median(rate[den])
        goal, ok = (f"≥ {target:.2f}", verdict(r >= target)) if targeted else ("(info)", "")
        noise = max(spread(rate[num]), spread(rate[den]))
        if targeted and abs(r - target) < noise:
            ok += f" (within the runs' spread, ±{noise * 100:.0f} %: not resolved)"
        out.append(
            f"| {what} throughput, {num} ÷ {den} ({shows}) | {r:.3f} | {goal} | {ok} "
            f"| {paired(rate[num], rate[den])} |"
        )
        c = median(cpu[num]) / median(cpu[den])
        out.append(
            f"| {what} CPU of both daemons, {num} ÷ {den} | {c:.3f} | (info) | "
            f"| {paired(cpu[num], cpu[den])} |"
        )
    return out


def report(
    trees: list[Tree],
    args: argparse.Namespace,
    big: dict[str, list[tp.Sample]] | None,
    burst: dict[str, list[BurstSample]] | None,
    micro: dict[str, dict[str, Any]],
) -> str:
    base, new = trees[0].label, trees[1].label
    ref = trees[2].label if len(trees) > 2 else base
    #: (numerator, denominator, what the ratio shows, whether the target applies)
    comparisons = [(new, base, "the issue's figure", True)]
    if ref != base:
        comparisons += [
            (new, ref, "the tags alone", True),
            (ref, base, "every other change", False),
        ]
    desc = {t.label: f"{t.label}: {t.desc}" for t in trees}
    lines = [
        "",
        f"## Cost of frame authentication: {args.runs} runs (+1 warm-up) per contender, "
        "interleaved; medians (min-max)",
        "",
        *[f"- {d}" for d in desc.values()],
        "",
    ]
    ratio_rows: list[str] = []
    if big:
        size = args.size_mib * MiB
        lines += [
            f"(a) {args.size_mib} MiB page-cached random file: appears in the sender's mirror "
            "→ published on the receiver (GB = 10^9 bytes; CPU = both daemons)",
            "",
            "| tree | GB/s | wall s | CPU s, both | sender CPU s | receiver CPU s "
            "| frame bytes/transfer |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in trees:
            ss = big[t.label]
            lines.append(
                f"| {t.title} "
                f"| {fmt_range([size / s.wall / 1e9 for s in ss])} "
                f"| {fmt_range([s.wall for s in ss], 3)} | {fmt_range([s.cpu for s in ss])} "
                f"| {median(s.cpu_send for s in ss):.2f} | {median(s.cpu_recv for s in ss):.2f} "
                f"| {median(s.extra['framing'] for s in ss):,.0f} |"
            )
        ratio_rows += ratios(
            f"{args.size_mib} MiB",
            {k: [size / s.wall for s in v] for k, v in big.items()},
            {k: [s.cpu for s in v] for k, v in big.items()},
            0.98,
            comparisons,
        )
        lines.append("")
    if burst:
        n = args.burst
        lines += [
            f"(b) burst of {n:,} x {live.FILE_SIZE // 1024} KiB files written into the sender's "
            "mirror → all published and acknowledged (durable) on the receiver",
            "",
            "| tree | files/s | burst s | CPU s, both | CPU µs/file "
            "| sender frame bytes/file (link counter) "
            "| ops sent | ops acked |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in trees:
            bs = burst[t.label]
            lines.append(
                f"| {t.title} | {fmt_range([n / s.wall for s in bs], 0)} "
                f"| {fmt_range([s.wall for s in bs], 3)} | {fmt_range([s.cpu for s in bs])} "
                f"| {median(s.cpu for s in bs) / n * 1e6:.0f} "
                f"| {median(s.framing for s in bs) / n:.1f} "
                f"| {median(s.ops_sent for s in bs):,.0f} "
                f"| {median(s.ops_acked for s in bs):,.0f} |"
            )
        ratio_rows += ratios(
            "burst",
            {k: [n / s.wall for s in v] for k, v in burst.items()},
            {k: [s.cpu for s in v] for k, v in burst.items()},
            0.95,
            comparisons,
        )
        lines.append("")
    if ratio_rows:
        lines += [
            "Ratios: of the medians, and of the runs paired by round (run next to each other); "
            "throughput = 1 / wall time",
            "",
            "| ratio | of the medians | target | verdict | paired runs, median (min-max) |",
            "|---|---|---|---|---|",
            *ratio_rows,
            "",
        ]
    if micro:
        lines += micro_table(trees, micro, args.micro_frames)
        tag_us = tag_cost(micro.get(new, {}))
        if tag_us is not None and (big or burst):
            lines.append(
                "What the tags should cost, from the frames each workload sent and the cost "
                f"per tag above, against what was measured ({new} - {ref}):"
            )
            if big:
                size = args.size_mib * MiB
                bn, bb = big[new], big[ref]
                lines.append(
                    tag_estimate(
                        f"(a) {args.size_mib} MiB",
                        # File, its Chunks, End; an Ack back
                        2 + -(-size // CHUNK) + 1,
                        tag_us,
                        median(s.cpu for s in bb),
                        median(s.cpu for s in bn) - median(s.cpu for s in bb),
                        median(size / s.wall for s in bb),
                        median(size / s.wall for s in bn),
                    )
                )
            if burst:
                n = args.burst
                cn, cb = burst[new], burst[ref]
                lines.append(
                    tag_estimate(
                        "(b) burst",
                        # per operation its frame (File, Mkdir) and an Ack back;
                        # per 4 KiB file also one Chunk and End
                        median(s.ops_sent + s.ops_acked for s in cn) + 2 * n,
                        tag_us,
                        median(s.cpu for s in cb),
                        median(s.cpu for s in cn) - median(s.cpu for s in cb),
                        median(n / s.wall for s in cb),
                        median(n / s.wall for s in cn),
                    )
                )
    return "\n".join(lines)


def environment(work: Path) -> str:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
            return out.splitlines()[0].strip() if out else "?"
        except OSError:
            return "?"

    fs = " ".join(
        first_line(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "--target", str(work)]).split()
    )
    return (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, Linux {platform.release()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {work.parent} on {fs}"
    )


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="7570fbe", help="baseline commit (protocol 1)")
    ap.add_argument(
        "--new",
        default=None,
        help="commit to compare (default: this checkout's replicator/ as it is, "
        "uncommitted changes included)",
    )
    ap.add_argument(
        "--untagged",
        action="store_true",
        help="add a third contender: the new tree with its tags never armed (tells the "
        "tags' cost from that of the other changes between base and new)",
    )
    ap.add_argument("--runs", type=int, default=3, help="timed runs per contender and workload")
    ap.add_argument("--size-mib", type=int, default=1024, help="(a): size of the file")
    ap.add_argument("--burst", type=int, default=10000, help="(b): files in the burst")
    ap.add_argument("--micro-frames", type=int, default=100_000, help="frames per micro timing")
    ap.add_argument(
        "--workloads",
        default="micro,big,burst",
        help="comma-separated subset of: micro, big, burst",
    )
    ap.add_argument("--tmp", default="/tmp", help="parent of the work directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="wait up to this many seconds for other work on the machine to pause before "
        "each timed run",
    )
    ap.add_argument(
        "--max-other-cpu",
        type=float,
        default=0.3,
        help="(a): repeat a run during which other processes used more CPU seconds than this",
    )
    ap.add_argument(
        "--max-reported-mib",
        type=float,
        default=64.0,
        help="(a): repeat a run during which the VM handed more memory than this to its host",
    )
    ap.add_argument(
        "--max-foreign-cpu-burst",
        type=float,
        default=0.2,
        help="(b): repeat a run during which user-space processes other than ours used more "
        "CPU seconds than this",
    )
    ap.add_argument(
        "--max-other-cpu-burst",
        type=float,
        default=1.5,
        help="(b): repeat a run during which everything else (kernel threads included: they "
        "write our files back) used more CPU seconds than this",
    )
    ap.add_argument("--attempts", type=int, default=4, help="tries per disturbed run")
    args = ap.parse_args(argv)
    workloads = set(args.workloads.split(","))
    if workloads - {"micro", "big", "burst"}:
        ap.error(f"unknown workload in {args.workloads!r}")
    tp.QUIET.timeout = args.idle_timeout
    live.QUIET_WAIT = args.idle_timeout

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="replicator-auth-cost-", dir=args.tmp))
    trees: list[Tree] = []
    t_start = time.monotonic()
    try:
        trees.append(checkout("base", args.base, work / "base"))
        if args.new is None:
            trees.append(snapshot("new", work / "new"))
        else:
            trees.append(checkout("new", args.new, work / "new"))
        if args.untagged:
            trees.append(untagged(trees[1], "untagged", work / "untagged"))
        for t in trees:
            identify(t)
        say(environment(work))
        for t in trees:
            say(f"{t.label}: {t.desc}")
        busy, top = tp.busy_processes()
        if busy > 0.15:
            say(
                f"WARNING: the machine is busy before the benchmark ({busy:.2f} CPUs in use; "
                + ", ".join(f"{name}: {cpu:.2f}" for cpu, name in top)
                + ")"
            )
        micro = run_micro(trees[:2], args.micro_frames) if "micro" in workloads else {}
        big = run_big(trees, work, args) if "big" in workloads else None
        burst = run_burst(trees, work, args) if "burst" in workloads else None
        say(report(trees, args, big, burst, micro))
        say(
            f"\n{tp.QUIET.waited:.0f} s spent waiting for a quiet machine in (a)/micro; "
            f"total {time.monotonic() - t_start:.0f} s"
        )
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        for t in trees:
            remove_tree(t)
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            # Write the freed inodes back now: ext4 (no journal) then avoids
            # them for ~60 s instead of ~6 min, slowing creates meanwhile.
            with contextlib.suppress(OSError):
                live.syncfs(work.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
