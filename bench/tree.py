#!/usr/bin/env python3
"""Real trees, durably: replicator against rsync and cp (issue 13).

Tree run. Each contender gets its own freshly made ext4 (bench/_load.py's
LoopExt4: mkfs.ext4 on a sparse file, a loop device, mounted; journaled),
the same tree copied onto it (``cp -a`` of ``--trees``, default
/usr/include and this Python's standard library), then ``sync`` and a drop
of the page cache. Timed from there:

  replicator        two replicatord processes on loopback (node a pushes
                    mirror m to node b, both mirrors on the loop fs). The
                    staged tree is renamed into a's mirror at once; done when
                    a's link to b is drained (nothing queued, nothing in
                    flight: every file acknowledged, i.e. fsynced and
                    published on b) and b holds every entry. A
                    ``replicatorctl wait`` on the tree confirms it afterwards
                    (untimed, not in the CPU figures).
  rsync --fsync     ``rsync -a --fsync`` to a new directory (files fsynced,
                    not their directories or renames).
  rsync + sync      ``rsync -a``, then one sync of the filesystem.
  cp + sync         ``cp -a``, then one sync of the filesystem.

Printed: wall time, ratio against rsync -a + sync (how many times as fast:
> 1 is faster), CPU seconds of each replicator daemon (sender a, receiver b)
and µs per entry.

Cold run (``--scale N``; 0 skips it): N files of 200-1,000 B in N/20
directories written into a's mirror before the daemons start; timed from
starting both daemons until b holds every entry and the link is drained.
Printed: files/s, watch set-up time (from start until the sender's inotify
fd holds a watch for every directory, read from /proc/PID/fdinfo), peak RSS
(VmHWM) and CPU of both daemons.

``--quick``: /usr/include/linux and a 5,000-file cold run, one round
(about a minute). Root is needed (losetup, mount, drop_caches).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load
from live import CLK_TCK, LAT_DIR, Replicator, _stat_fields, log, reaped_children_cpu, syncfs

from replicator.localcluster import wait_for

CONTENDERS = ("replicator", "rsync-fsync", "rsync-sync", "cp-sync")
REFERENCE = "rsync-sync"
#: Targets of issue 13.
TARGET_RATIO, TARGET_COLD_FPS, TARGET_US = 0.8, 6000.0, 100.0


@dataclass
class Result:
    what: str
    round: int
    entries: int = 0
    wall: float | None = None
    cpu: float = 0.0  # rsync/cp: their own CPU
    cpu_a: float = 0.0  # replicator: sender
    cpu_b: float = 0.0  # receiver
    sys_a: float = 0.0  # of which in the kernel
    sys_b: float = 0.0
    hwm_a: int = 0  # KiB
    hwm_b: int = 0
    watch_s: float | None = None
    notes: list[str] = field(default_factory=list)


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        log(f"cannot drop caches: {e}")


def sys_cpu(pid: int) -> float:
    """stime of a process (all threads), seconds."""
    st = _stat_fields(pid)
    return 0.0 if st is None else int(st[1][12]) / CLK_TCK


def vm_hwm(pid: int) -> int:
    """Peak resident set (VmHWM) of a process, KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def inotify_watches(pid: int) -> int:
    """Inotify watches the process holds (all its inotify fds)."""
    n = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
                n += sum(1 for line in f if line.startswith("inotify wd:"))
    return n


#: Seconds between looks at the status (itself up to 0.25 s old): each look
#: costs the sender ~0.65 ms of CPU (a control connection, a snapshot, JSON);
#: every 20 ms that was 7-13 % of its CPU in the tree run.
POLL = 0.1


def drained_and_there(rep: Replicator, top: Path, entries: int) -> Callable[[], float | None]:
    """Done: the link has nothing queued or in flight (the status is up to
    0.25 s old) and ``top`` holds every entry on the replica."""

    def done() -> float | None:
        link = rep.a.link("b")
        if link["queue_files"] or link["in_flight"]:
            return None
        t = time.monotonic()
        return t if top.is_dir() and _load.count_entries(top) >= entries else None

    return done


def confirm_wait(rep: Replicator, path: Path, res: Result) -> None:
    """``replicatorctl wait`` on ``path`` (sender's view): exit 0 = durable."""
    cmd = [sys.executable, "-m", "replicator.ctl", "--socket", rep.a.control_socket]
    r = subprocess.run([*cmd, "wait", "--timeout", "120", str(path)], capture_output=True)
    if r.returncode:
        res.notes.append(f"replicatorctl wait exited {r.returncode}: {r.stderr.decode()[-200:]}")


def profile(rep: Replicator, out: Path | None, tag: str) -> list[subprocess.Popen[bytes]]:
    """py-spy (next to this Python, or on PATH) sampling both daemons into
    ``out``/<tag>-a.txt and -b.txt (collapsed stacks, Python frames only,
    idle threads left out); stopped with SIGINT by ``unprofile``."""
    if out is None:
        return []
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if spy is None:
        raise SystemExit("--profile: py-spy not found (pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, pid in zip("ab", rep.pids(), strict=True):
        cmd = [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
        cmd += ["--gil"] if os.environ.get("TREE_PROFILE_GIL") else []
        cmd += ["--output", str(out / f"{tag}-{name}.txt")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # attached
    return procs


def unprofile(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        p.wait(60)


def run_replicator(
    root: Path, staged: Path, entries: int, timeout: float, res: Result, prof: Path | None
) -> None:
    rep = Replicator(root / "rep")
    (rep.src / LAT_DIR).mkdir()
    spies: list[subprocess.Popen[bytes]] = []
    try:
        rep.start()
        drop_caches()
        spies = profile(rep, prof, f"tree{res.round}")
        a0, b0 = rep.node_cpu()
        sa0, sb0 = (sys_cpu(p) for p in rep.pids())
        t0 = time.monotonic()
        os.rename(staged, rep.src / "tree")
        done = drained_and_there(rep, rep.dst / "tree", entries)
        t1 = wait_for(done, timeout, "the tree", interval=POLL)
        a1, b1 = rep.node_cpu()
        sa1, sb1 = (sys_cpu(p) for p in rep.pids())
        res.wall, res.cpu_a, res.cpu_b = t1 - t0, a1 - a0, b1 - b0
        res.sys_a, res.sys_b = sa1 - sa0, sb1 - sb0
        unprofile(spies)
        spies = []
        pa, pb = rep.pids()
        res.hwm_a, res.hwm_b = vm_hwm(pa), vm_hwm(pb)
        confirm_wait(rep, rep.src / "tree", res)
    except Exception as e:
        res.notes.append(f"failed: {e}")
        log(f"replicator failed: {e}\n{rep.logs()}")
    finally:
        unprofile(spies)
        rep.stop()


def run_copy(root: Path, staged: Path, what: str, res: Result) -> None:
    dst = root / "dst"
    if what == "cp-sync":
        cmd = ["cp", "-a", str(staged), str(dst)]
    else:
        dst.mkdir()
        cmd = [
            "rsync",
            "-a",
            *(["--fsync"] if what == "rsync-fsync" else []),
            f"{staged}/",
            f"{dst}/",
        ]
    drop_caches()
    c0 = reaped_children_cpu()
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True)
    if what != "rsync-fsync":
        syncfs(root)
    res.wall = time.monotonic() - t0
    res.cpu = reaped_children_cpu() - c0
    if r.returncode:
        res.notes.append(f"{cmd[0]} exited {r.returncode}: {r.stderr.decode()[-200:]}")
    got = _load.count_entries(dst)
    if got != res.entries:
        res.notes.append(f"{got} entries copied of {res.entries}")


def tree_round(args: argparse.Namespace, tmp: Path, rnd: int, out: list[Result]) -> None:
    for what in args.contenders:
        res = Result(what, rnd)
        out.append(res)
        with _load.LoopExt4(tmp / "ext4.img", tmp / "mnt", args.fs_size) as root:
            log(f"round {rnd}, {what}: staging {', '.join(map(str, args.trees))}")
            res.entries, _size = _load.stage_tree(root / "staging" / "tree", args.trees)
            staged = root / "staging" / "tree"
            log(f"round {rnd}, {what}: {res.entries} entries; running")
            if what == "replicator":
                run_replicator(root, staged, res.entries, args.timeout, res, args.profile)
            else:
                run_copy(root, staged, what, res)
            log(f"round {rnd}, {what}: {fmt(res.wall)} s {'; '.join(res.notes)}")


def cold_round(args: argparse.Namespace, tmp: Path, rnd: int, out: list[Result]) -> None:
    res = Result("cold", rnd)
    out.append(res)
    with _load.LoopExt4(tmp / "ext4.img", tmp / "mnt", args.fs_size) as root:
        rep = Replicator(root / "rep")
        log(f"cold round {rnd}: writing {args.scale} files")
        res.entries, _ = _load.make_cold_tree(rep.src / "cold", args.scale)
        (rep.src / LAT_DIR).mkdir()
        dirs = -(-args.scale // _load.COLD_PER_DIR) + 3  # + root, lat, cold
        drop_caches()
        seen: dict[str, float] = {}
        stop = threading.Event()

        def watch_count() -> None:  # until the sender watches every directory
            while not stop.is_set():
                proc = rep.a.proc
                if proc is not None and inotify_watches(proc.pid) >= dirs:
                    seen["watch"] = time.monotonic()
                    return
                stop.wait(0.05)

        th = threading.Thread(target=watch_count, daemon=True)
        t0 = time.monotonic()
        th.start()
        try:
            rep.cluster.start()
            done = drained_and_there(rep, rep.dst / "cold", res.entries)
            t1 = wait_for(done, args.timeout, "cold", interval=POLL)
            res.wall = t1 - t0
            res.cpu_a, res.cpu_b = rep.node_cpu()
            pa, pb = rep.pids()
            res.sys_a, res.sys_b = sys_cpu(pa), sys_cpu(pb)
            res.hwm_a, res.hwm_b = vm_hwm(pa), vm_hwm(pb)
            if "watch" in seen:
                res.watch_s = seen["watch"] - t0
            else:
                res.notes.append(f"sender holds {inotify_watches(pa)} watches of {dirs}")
        except Exception as e:
            res.notes.append(f"failed: {e}")
            log(f"cold failed: {e}\n{rep.logs()}")
        finally:
            stop.set()
            th.join()
            rep.stop()
        log(f"cold round {rnd}: {fmt(res.wall)} s {'; '.join(res.notes)}")


# -- report ----------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def rng(vals: list[float], spec: str = ".1f") -> str:
    if not vals:
        return "n/a"
    lo, hi = min(vals), max(vals)
    return format(lo, spec) if format(lo, spec) == format(hi, spec) else f"{lo:{spec}}-{hi:{spec}}"


def report(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"trees: {', '.join(map(str, args.trees))}; rounds: {args.rounds}; "
        f"fs: fresh ext4 per contender ({args.fs_size:g} GiB sparse loop, journaled)",
        f"machine: {os.cpu_count()} CPUs, {os.uname().release}; daemons import "
        f"{_load.daemon_import_path()}",
        "",
    ]
    tree = [r for r in results if r.what != "cold"]
    if tree:
        ref = {r.round: r.wall for r in tree if r.what == REFERENCE}
        lines.append(
            f"{'tree':<12} {'entries':>8} {'wall s':>7} {'x ' + REFERENCE:>14} {'CPU s':>11} "
            f"{'µs/entry':>15}  notes"
        )
        for r in tree:
            x = ref.get(r.round)
            ratio = f"{x / r.wall:.2f}x" if x and r.wall else "n/a"
            if r.what == "replicator":
                cpu = f"{r.cpu_a:.1f}/{r.cpu_b:.1f}"
                us = f"{r.cpu_a / r.entries * 1e6:.0f}/{r.cpu_b / r.entries * 1e6:.0f}"
            else:
                cpu, us = f"{r.cpu:.1f}", f"{r.cpu / max(1, r.entries) * 1e6:.0f}"
            lines.append(
                f"{r.what:<12} {r.entries:>8} {fmt(r.wall):>7} {ratio:>14} {cpu:>11} {us:>15}  "
                + "; ".join(r.notes)
            )
        reps = [r for r in tree if r.what == "replicator" and r.wall]
        ratios = [x / r.wall for r in reps if (x := ref.get(r.round)) and r.wall]
        ua = [r.cpu_a / r.entries * 1e6 for r in reps]
        ub = [r.cpu_b / r.entries * 1e6 for r in reps]
        lines += [
            "  (replicator CPU and µs/entry: sender a / receiver b; of it in the kernel: "
            + ", ".join(f"{r.sys_a:.1f}/{r.sys_b:.1f} s" for r in reps)
            + "; peak RSS "
            + ", ".join(f"{r.hwm_a // 1024}/{r.hwm_b // 1024} MB" for r in reps)
            + ")",
            f"  target: >= {TARGET_RATIO}x {REFERENCE}: {rng(ratios, '.2f')}x; "
            f"<= {TARGET_US:.0f} µs/entry per side: sender {rng(ua, '.0f')}, "
            f"receiver {rng(ub, '.0f')}",
            "",
        ]
    cold = [r for r in results if r.what == "cold"]
    if cold:
        lines.append(
            f"{'cold':<12} {'files':>8} {'wall s':>7} {'files/s':>8} {'watch s':>8} "
            f"{'CPU s a/b':>11} {'µs/entry a/b':>13} {'peak RSS MB a/b':>16}  notes"
        )
        for r in cold:
            fps = f"{args.scale / r.wall:.0f}" if r.wall else "n/a"
            us = f"{r.cpu_a / r.entries * 1e6:.0f}/{r.cpu_b / r.entries * 1e6:.0f}"
            lines.append(
                f"{'cold':<12} {args.scale:>8} {fmt(r.wall):>7} {fps:>8} {fmt(r.watch_s):>8} "
                f"{r.cpu_a:>5.1f}/{r.cpu_b:<5.1f} {us:>13} "
                f"{f'{r.hwm_a // 1024}/{r.hwm_b // 1024}':>16}  " + "; ".join(r.notes)
            )
        lines.append(
            "  (CPU in the kernel a/b: "
            + ", ".join(f"{r.sys_a:.1f}/{r.sys_b:.1f} s" for r in cold)
            + ")"
        )
        fps_all = [args.scale / r.wall for r in cold if r.wall]
        lines.append(f"  target: >= {TARGET_COLD_FPS:.0f} files/s: {rng(fps_all, '.0f')}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--trees",
        default=None,
        help="comma-separated directories copied as the tree (default: /usr/include "
        "and this Python's standard library)",
    )
    ap.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated, in order (default: {','.join(CONTENDERS)}; none: skip)",
    )
    ap.add_argument("--rounds", type=int, default=2, help="tree rounds (every contender each)")
    ap.add_argument("--scale", type=int, default=200000, help="cold run files (0: skip)")
    ap.add_argument("--cold-rounds", type=int, default=1)
    ap.add_argument("--fs-size", type=float, default=None, help="GiB of each sparse fs")
    ap.add_argument("--timeout", type=float, default=900.0, help="s for one replicator run")
    ap.add_argument("--tmp", default=None, help="parent of the temporary directory")
    ap.add_argument(
        "--profile", type=Path, default=None, help="py-spy both daemons in the tree runs, into DIR"
    )
    ap.add_argument("--quick", action="store_true", help="small tree and 5,000 cold files")
    args = ap.parse_args()
    if args.quick:
        args.trees = args.trees or "/usr/include/linux"
        args.scale, args.rounds = min(args.scale, 5000), 1
    args.trees = [Path(p) for p in args.trees.split(",")] if args.trees else _load.real_trees()
    args.contenders = [c for c in args.contenders.split(",") if c and c != "none"]
    if set(args.contenders) - set(CONTENDERS):
        sys.exit(f"--contenders: unknown {', '.join(set(args.contenders) - set(CONTENDERS))}")
    if args.fs_size is None:  # tree twice + inodes for the cold run twice (-i 8192)
        need = max(2.5 * sum(_load.tree_bytes(t) for t in args.trees), args.scale * 2 * 8192 * 1.5)
        args.fs_size = max(1.0, need / (1 << 30) + 0.5)
    tmp = Path(tempfile.mkdtemp(prefix="replicator-tree-", dir=args.tmp))
    log(f"working in {tmp}")
    results: list[Result] = []
    t_start = time.monotonic()
    try:
        with _load.exit_on_sigterm():
            for rnd in range(1, args.rounds + 1):
                if args.contenders:
                    tree_round(args, tmp, rnd, results)
            for rnd in range(1, args.cold_rounds + 1 if args.scale else 1):
                cold_round(args, tmp, rnd, results)
    finally:
        shutil.rmtree(tmp, True)
    log(f"total {time.monotonic() - t_start:.0f} s")
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
