"""Which namespace operations commit what is pending first, which wait in
the round, which are deferred (receiving.ReceivingMirror._apply), and the
order of syncs and acks that keeps an Ack's promise. Order only, no timing."""

from __future__ import annotations

import os
from pathlib import Path

from replicator import frames as F
from replicator.receiving import Ack, ReceivingMirror

from .test_inbound import make_inbound
from .test_live_commit import Syncs, live, mkdir, syncs
from .test_live_commit import receive as receive_in
from .test_receiving import file_ev, mirror, open_mirror, receive

__all__ = ["mirror", "syncs"]  # fixtures

T = 10**18  # an mtime no placement makes


def meta(op: int, path: bytes, mtime_ns: int = T) -> F.Meta:
    return F.Meta(op, 1, 0o750, mtime_ns, os.getuid(), os.getgid(), path)


def test_operations_away_from_pending_files_wait_in_the_round(
    mirror: ReceivingMirror, tmp_path: Path
) -> None:
    """A Meta, Delete, Rename or Symlink that touches nothing pending is
    applied at once and acked with the round: no commit of its own."""
    m = tmp_path / "m"
    for d in (b"a", b"gone", b"old"):
        (m / d.decode()).mkdir()
    assert receive(mirror, 1, b"a/f", b"x") == []
    assert mirror.namespace(meta(2, b"old")) == []
    assert mirror.namespace(F.Delete(3, 1, b"gone")) == []
    assert mirror.namespace(F.Rename(4, 1, b"old", b"new")) == []
    assert mirror.namespace(F.Symlink(5, 1, T, 0, 0, b"l", b"t")) == []
    assert mirror.stats.commits == 0 and not (m / "a" / "f").exists()
    assert not (m / "gone").exists() and (m / "new").stat().st_mtime_ns == T
    # Operations first (applied when they came), then the file (placed now).
    assert mirror.commit() == [Ack(2), Ack(3), Ack(4), Ack(5), Ack(1)]
    assert (m / "a" / "f").read_bytes() == b"x"


def test_operations_on_a_pending_file_or_its_parents_commit_it_first(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "d").mkdir()
    cases: list[tuple[F.Event, list[Ack]]] = [
        (F.Delete(9, 1, b"d"), [Ack(1)]),  # an ancestor of the file
        (F.Delete(9, 1, b"d/f"), [Ack(1)]),  # the file itself
        (F.Rename(9, 1, b"d", b"e"), [Ack(1)]),  # its directory moves
        (F.Rename(9, 1, b"d/f", b"d/g"), [Ack(1)]),
        (F.Symlink(9, 1, T, 0, 0, b"d", b"t"), [Ack(1)]),  # replaces its directory
    ]
    for ev, before in cases:
        m = open_mirror(tmp_path)
        try:
            (tmp_path / "m" / "d").mkdir(exist_ok=True)
            assert receive(m, 1, b"d/f", b"x") == []
            assert m.namespace(ev) == before, ev
            assert m.commit() == [Ack(9)], ev
        finally:
            m.close()
        for leftover in ("d", "e", "x"):
            path = tmp_path / "m" / leftover
            if path.is_symlink():
                path.unlink()


def test_a_rename_onto_a_pending_path_commits_it_first(mirror: ReceivingMirror) -> None:
    assert receive(mirror, 1, b"f", b"x") == []
    assert mirror.namespace(F.Symlink(2, 1, T, 0, 0, b"l", b"t")) == []
    assert mirror.namespace(F.Rename(3, 1, b"l", b"f")) == [Ack(2), Ack(1)]
    assert mirror.commit() == [Ack(3)]


def test_a_meta_of_a_directory_with_pending_files_is_deferred_until_they_are_placed(
    mirror: ReceivingMirror, tmp_path: Path, syncs: Syncs
) -> None:
    """The files' renames would change the mtime it sets: it is applied
    after them in the same round, its directory synced, and acked last."""
    d = tmp_path / "m" / "d"
    d.mkdir()
    assert receive(mirror, 1, b"d/f", b"x") == []
    assert receive(mirror, 2, b"d/sub/g", b"y") == []
    assert mirror.namespace(meta(3, b"d")) == []
    assert mirror.stats.commits == 0 and d.stat().st_mtime_ns != T
    assert mirror.commit() == [Ack(1), Ack(2), Ack(3)]
    assert d.stat().st_mtime_ns == T and d.stat().st_mode & 0o7777 == 0o750
    assert (d / "f").read_bytes() == b"x"
    # Durable before the acks: the file data, then the directories (a
    # syncfs here, as a directory was made on the way to d/sub/g).
    assert syncs.events[-1] == ("syncfs", 0)


def test_a_deferred_meta_makes_later_operations_on_its_path_commit(
    mirror: ReceivingMirror, tmp_path: Path
) -> None:
    (tmp_path / "m" / "d").mkdir()
    assert receive(mirror, 1, b"d/f", b"x") == []
    assert mirror.namespace(meta(2, b"d")) == []
    assert mirror.namespace(F.Rename(3, 1, b"d", b"e")) == [Ack(1), Ack(2)]
    assert mirror.commit() == [Ack(3)]
    assert (tmp_path / "m" / "e").stat().st_mtime_ns == T


def test_a_meta_of_a_pending_file_is_applied_after_it_is_placed(
    mirror: ReceivingMirror, tmp_path: Path
) -> None:
    assert receive(mirror, 1, b"f", b"x") == []
    assert mirror.namespace(meta(2, b"f", mtime_ns=5)) == []
    assert mirror.commit() == [Ack(1), Ack(2)]
    assert (tmp_path / "m" / "f").stat().st_mtime_ns == 5


def test_a_meta_below_a_pending_file_commits_it_first(
    mirror: ReceivingMirror, tmp_path: Path
) -> None:
    """A file waits where the Meta's path needs a directory: commit, then
    the Meta is refused on its own (nothing there)."""
    (tmp_path / "m" / "d").mkdir()
    assert receive(mirror, 1, b"d/f", b"x") == []
    out = mirror.namespace(meta(2, b"d/f/nothing"))
    assert out[0] == Ack(1) and len(out) == 2 and not isinstance(out[1], Ack)


def test_two_way_commits_instead_of_deferring(tmp_path: Path) -> None:
    """Its echo suppression reads the state a Meta left: applied now."""
    m = open_mirror(tmp_path, push="a")
    try:
        (tmp_path / "m" / "d").mkdir()
        receive(m, 1, b"d/f", b"x")  # its Tell
        out = m.namespace(meta(2, b"d"))
        assert Ack(1) in out
    finally:
        m.close()


def test_a_ping_makes_applied_operations_live(tmp_path: Path, syncs: Syncs) -> None:
    """The sender's live lane follows an rm or mkdir with a Ping: the
    operations applied so far then count as live (GroupCommit's deadline)
    and a live commit takes them, never a syncfs, while bulk files wait."""
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    receive_in(inb, file_ev(1, b"bulk", b"b"), b"b")
    inb.nudge()
    assert inb.pending() == (1, 1, 0)  # nothing applied yet: a heartbeat changes nothing
    assert inb.namespace(mkdir(2, b"d")) == []
    assert inb.pending() == (2, 1, 0)
    inb.nudge()
    assert inb.pending() == (2, 1, 1)
    assert inb.commit(live_only=True) == [Ack(2)]
    assert ("syncfs", 0) not in syncs.events
    m = tmp_path / "m"
    fsynced = [ino for what, ino in syncs.events if what == "fsync"]
    assert sorted(fsynced) == sorted([m.stat().st_ino, (m / "d").stat().st_ino])
    assert inb.pending() == (1, 1, 0) and not (m / "bulk").exists()
    assert inb.commit() == [Ack(1)]
    inb.close()


def test_a_live_commit_leaves_deferred_metas_with_the_bulk(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    (tmp_path / "m" / "d").mkdir()
    receive_in(inb, file_ev(1, b"d/bulk", b"b"), b"b")
    assert inb.namespace(meta(2, b"d")) == []
    receive_in(inb, live(file_ev(3, b"live", b"l")), b"l")
    assert inb.commit(live_only=True) == [Ack(3)]
    assert inb.commit() == [Ack(1), Ack(2)]
    assert (tmp_path / "m" / "d").stat().st_mtime_ns == T
    inb.close()
