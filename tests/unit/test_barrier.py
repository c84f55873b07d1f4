"""When a link counts a waited-for entry durable on its peer
(replicator/barrier.py), without sockets: the link's state is real (backlog,
in-flight set, what the peer holds), the source a temporary folder."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from replicator import frames as F
from replicator.backlog import Backlog
from replicator.barrier import Barriers, Expect, Expected, Wait, covered
from replicator.frames import EntryKind as K
from replicator.inflight import InFlight, Record
from replicator.manifest import EntryState, Excludes, lstat_entry
from replicator.mirror import SourceMirror
from replicator.remote import RemoteMirror

M = 1
FILE = EntryState(K.FILE, 0o644, 10, 1_000, 0, 0)
DIR = EntryState(K.DIR, 0o755, 0, 1_000, 0, 0)


class Gone:
    """A marker whose disk is not mounted."""

    def ok(self) -> bool:
        return False


class Link:
    """The barriers of a link to "b" and the state they share with it."""

    def __init__(self, root: Path, two_way: bool = False) -> None:
        self.root = root
        self.mirror = SourceMirror(
            M, "m", os.fsencode(root), Excludes([]), True, 60.0, two_way=two_way
        )
        self.remote = RemoteMirror(opened=True, listed=True)
        self.backlog = Backlog({M: "m"})
        self.inflight = InFlight()
        self.barriers = Barriers(
            "b", {M: self.mirror}, {M: self.remote}, self.backlog, self.inflight
        )

    def capture(self, *names: str) -> tuple[tuple[bytes, EntryState, float], ...]:
        out = []
        for n in names:
            st = lstat_entry(self.mirror.root, n.encode())
            assert st is not None
            out.append((n.encode(), st, time.monotonic()))
        return tuple(out)

    def wait_for(self, *names: str) -> Wait:
        w = Wait(1, ["b"])
        self.barriers.expect(Expect(w, "m", self.capture(*names)))
        self.barriers.expected(Expected(w))
        return w

    def sweep(self) -> None:
        self.barriers._next_sweep = 0.0
        while self.barriers.step():
            pass


def test_what_counts_as_held() -> None:
    m = SourceMirror(M, "m", b"/x", Excludes([]), True, 60.0)
    r = RemoteMirror()
    assert covered(m, r, FILE, FILE)
    assert not covered(m, r, FILE, None)
    assert not covered(m, r, FILE, replace(FILE, mtime_ns=2_000))  # newer there: one-way
    assert not covered(m, r, FILE, replace(FILE, size=11))
    assert covered(m, r, DIR, replace(DIR, mtime_ns=-1))  # a folder's mtime is not waited for
    assert not covered(m, r, DIR, replace(DIR, mode=0o700))  # its mode is
    assert not covered(m, r, DIR, FILE)
    two_way = replace(m, two_way=True)
    assert covered(two_way, r, FILE, replace(FILE, mtime_ns=2_000, size=3))  # the peer's is newer
    assert not covered(two_way, r, FILE, replace(FILE, mtime_ns=500, size=3))


def test_entries_the_peer_holds_end_the_wait_at_once(tmp_path: Path) -> None:
    link = Link(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    for rel in ("d", "d/f"):
        st = lstat_entry(link.mirror.root, rel.encode())
        assert st is not None
        link.remote.known[rel.encode()] = st
    w = link.wait_for("d", "d/f")
    assert w.state() == "done" and w.progress["b"].entries == 2
    assert len(link.barriers) == 0


def test_an_ack_counts_if_it_carried_the_captured_version_or_a_later_one(tmp_path: Path) -> None:
    link = Link(tmp_path)
    for n in ("old", "new", "same"):
        (tmp_path / n).write_text(n)
    early = time.monotonic()  # started before the capture, with another version
    w = link.wait_for("old", "new", "same")
    assert w.state() == "waiting" and w.progress["b"].left == 3
    b = link.barriers
    b.acked(Record(F.File, (M, b"old"), 0.0, replace(FILE, size=1), sent=early))
    assert w.progress["b"].left == 3
    b.acked(Record(F.File, (M, b"new"), 0.0, None, sent=time.monotonic()))  # started after
    assert w.progress["b"].left == 2
    st = lstat_entry(link.mirror.root, b"same")
    assert st is not None
    link.remote.known[b"same"] = st  # what the link does on Ack, before telling the barriers
    b.acked(Record(F.File, (M, b"same"), 0.0, st, sent=early))
    assert w.progress["b"].left == 1
    st = lstat_entry(link.mirror.root, b"old")
    assert st is not None
    link.remote.known[b"old"] = st
    b.acked(Record(F.File, (M, b"old"), 0.0, st, sent=time.monotonic()))
    assert w.state() == "done"


def test_a_refusal_fails_the_wait_with_the_peers_reason(tmp_path: Path) -> None:
    link = Link(tmp_path)
    (tmp_path / "x").write_text("x")
    (tmp_path / "y").write_text("y")
    w = link.wait_for("x")
    link.barriers.refused(Record(F.File, (M, b"y"), 0.0), "not this one")  # not waited for
    assert w.state() == "waiting"
    link.barriers.refused(Record(F.File, (M, b"x"), 0.0), "mirror 'm': no")
    assert w.state() == "refused"
    assert w.progress["b"].failure == "b refused m:x: mirror 'm': no"
    assert len(link.barriers) == 0


def test_a_refused_mirror_fails_the_wait(tmp_path: Path) -> None:
    link = Link(tmp_path)
    (tmp_path / "x").write_text("x")
    link.remote.refused = "node 'b' does not accept mirror 'm' from 'a'"
    w = link.wait_for("x")
    assert w.state() == "refused"
    assert w.progress["b"].failure == (
        "mirror m refused by b: node 'b' does not accept mirror 'm' from 'a'"
    )


def test_what_nothing_is_pending_for_is_marked_dirty_again(tmp_path: Path) -> None:
    """An event still on its way from the watcher (or lost) never makes a
    wait hang; what is pending or in flight is the link's business."""
    link = Link(tmp_path)
    for n in ("lost", "queued", "sending"):
        (tmp_path / n).write_text(n)
    w = link.wait_for("lost", "queued", "sending")
    link.backlog.mark((M, b"queued"), (time.time(), 0, 1))
    link.inflight.track(7, Record(F.File, (M, b"sending"), 0.0))
    link.sweep()
    assert link.backlog.holds((M, b"lost"))
    assert not link.backlog.holds((M, b"sending"))
    assert w.progress["b"].left == 3
    link.backlog.pop(M)  # the pump takes it, and fails to read the file, say
    link.backlog.pop(M)
    link.sweep()
    assert not link.backlog.holds((M, b"lost"))  # not again at once: it backs off


def test_not_before_the_peer_listed_the_mirror(tmp_path: Path) -> None:
    link = Link(tmp_path)
    (tmp_path / "x").write_text("x")
    link.remote.listed = False
    w = link.wait_for("x")
    link.sweep()
    assert not link.backlog.holds((M, b"x")) and w.state() == "waiting"


def test_changed_or_gone_since_the_wait_began(tmp_path: Path) -> None:
    link = Link(tmp_path)
    for n in ("gone", "changed", "kept"):
        (tmp_path / n).write_text(n)
    w = link.wait_for("gone", "changed", "kept")
    (tmp_path / "gone").unlink()
    (tmp_path / "changed").write_text("a newer version")
    st = lstat_entry(link.mirror.root, b"changed")
    assert st is not None
    link.remote.known[b"changed"] = st  # the newer version is there
    link.sweep()
    assert w.state() == "waiting" and w.progress["b"].left == 1  # "kept"
    assert link.backlog.holds((M, b"kept"))


def test_nothing_is_gone_while_the_disk_is_not_mounted(tmp_path: Path) -> None:
    link = Link(tmp_path)
    (tmp_path / "x").write_text("x")
    w = link.wait_for("x")
    link.mirror.marker = Gone()  # type: ignore[assignment]
    (tmp_path / "x").unlink()
    link.sweep()
    assert w.state() == "waiting"


def test_cancelled_waits_are_dropped(tmp_path: Path) -> None:
    link = Link(tmp_path)
    (tmp_path / "x").write_text("x")
    w = link.wait_for("x")
    assert len(link.barriers) == 1
    w.cancel()
    link.sweep()
    assert len(link.barriers) == 0
    link.barriers.expect(Expect(w, "m", link.capture("x")))  # late slices are ignored
    assert len(link.barriers) == 0


def test_the_wait_ends_once_per_target_and_wakes_its_poller() -> None:
    w = Wait(3, ["b", "c"])
    woke = threading.Event()

    def poller() -> None:
        if w.wait(30):
            woke.set()

    t = threading.Thread(target=poller)
    t.start()
    w.settle("b")
    assert w.state() == "waiting"
    w.settle("c", "c refused m:x: no", refused=True)
    t.join(30)
    assert woke.is_set() and w.state() == "refused"
    w.settle("c")  # settled once: stays refused
    assert w.state() == "refused"
    w.fail("cannot list /x: Permission denied")
    assert w.state() == "error"
    v = Wait(4, ["b"])
    v.settle("b", "the link to b was rebuilt by a reload; run the wait again")
    assert v.state() == "interrupted"
