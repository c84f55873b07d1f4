"""Live files (FILE_LIVE) are published on their own while bulk work goes
on: each fsynced with its directory, never a syncfs (which would flush the
bulk's data too). Order of events only, no timing."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from replicator import frames as F
from replicator import publisher
from replicator.inbound import Inbound
from replicator.receiving import Ack

from .test_inbound import make_inbound
from .test_receiving import file_ev, map_of


def live(ev: F.File) -> F.File:
    return dataclasses.replace(ev, mode=ev.mode | F.FILE_LIVE)


def receive(inb: Inbound, ev: F.File, data: bytes, end: bool = True) -> None:
    assert inb.begin(ev) == []
    inb.chunk(F.Chunk(ev.op, 0, len(data)))
    assert inb.write_inline(data) == []
    if end:
        assert inb.end(ev.op, map_of(data).file_digest) == []


@dataclasses.dataclass
class Syncs:
    """The inodes fsynced and the syncfs calls made, in order."""

    events: list[tuple[str, int]] = dataclasses.field(default_factory=list)


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Syncs:
    out = Syncs()
    real_fsync, real_syncfs = os.fsync, publisher.syncfs

    def fsync(fd: int) -> None:
        out.events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def syncfs(fd: int) -> None:
        out.events.append(("syncfs", 0))
        real_syncfs(fd)

    monkeypatch.setattr(publisher.os, "fsync", fsync)
    monkeypatch.setattr(publisher, "syncfs", syncfs)
    return out


def test_a_live_file_is_published_alone_while_a_bulk_file_waits(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    receive(inb, file_ev(1, b"bulk", b"bulk data"), b"bulk data")
    receive(inb, live(file_ev(2, b"live", b"hi")), b"hi")
    assert inb.pending() == (2, 11, 1)
    assert inb.commit(live_only=True) == [Ack(2)]
    m = tmp_path / "m"
    assert (m / "live").read_bytes() == b"hi"
    assert (m / "live").stat().st_mode & 0o7777 == 0o644  # the flag is not a mode bit
    assert not (m / "bulk").exists()
    assert inb.pending() == (1, 9, 0)
    assert inb.commit(live_only=True) == []  # nothing live: the bulk waits for its group
    assert inb.commit() == [Ack(1)]
    assert (m / "bulk").read_bytes() == b"bulk data"
    inb.close()


def test_live_files_are_fsynced_with_their_directory_never_syncfs(
    tmp_path: Path, syncs: Syncs
) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    receive(inb, file_ev(1, b"big", b"x" * 100), b"x" * 50, end=False)  # bulk, still streaming
    ops = list(range(2, 2 + publisher.SYNCFS_MIN + 1))
    for op in ops:
        receive(inb, live(file_ev(op, b"f%d" % op, b"new")), b"new")
    assert inb.commit(live_only=True) == [Ack(op) for op in ops]
    assert ("syncfs", 0) not in syncs.events
    fsynced = [ino for what, ino in syncs.events if what == "fsync"]
    m = tmp_path / "m"
    # every file before the directory that names it
    assert fsynced[-1] == m.stat().st_ino
    assert sorted(fsynced[:-1]) == sorted((m / f"f{op}").stat().st_ino for op in ops)
    inb.close()


def test_with_no_bulk_work_a_live_commit_is_one_round_for_all(tmp_path: Path, syncs: Syncs) -> None:
    """A burst of live changes keeps its cheap syncfs groups, and namespace
    operations go with them."""
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    assert inb.namespace(mkdir(1, b"d")) == []
    ops = list(range(2, 2 + publisher.SYNCFS_MIN))
    for op in ops:
        receive(inb, live(file_ev(op, b"f%d" % op, b"new")), b"new")
    assert inb.commit(live_only=True) == [Ack(1)] + [Ack(op) for op in ops]
    assert syncs.events[0] == ("syncfs", 0)
    inb.close()


def mkdir(op: int, path: bytes) -> F.Mkdir:
    return F.Mkdir(op, 1, 0o755, 10**18, os.getuid(), os.getgid(), path)


def test_a_live_file_under_a_pending_namespace_operation_is_committed_with_it(
    tmp_path: Path, syncs: Syncs
) -> None:
    """The directory must be durable (and acked) before the file in it: the
    live round takes the operations applied so far along, synced (the new
    directory and its parent) before any ack; the bulk file still waits."""
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    receive(inb, file_ev(1, b"bulk", b"b"), b"b")
    assert inb.namespace(mkdir(2, b"d")) == []
    receive(inb, live(file_ev(3, b"d/live", b"l")), b"l")
    assert inb.commit(live_only=True) == [Ack(2), Ack(3)]
    m = tmp_path / "m"
    fsynced = {ino for what, ino in syncs.events if what == "fsync"}
    assert ("syncfs", 0) not in syncs.events
    assert {m.stat().st_ino, (m / "d").stat().st_ino, (m / "d" / "live").stat().st_ino} <= fsynced
    assert not (m / "bulk").exists() and inb.pending() == (1, 1, 0)
    assert inb.commit() == [Ack(1)]
    inb.close()


def test_a_live_file_goes_ahead_of_bulk_files_not_of_namespace_operations(
    tmp_path: Path,
) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    (tmp_path / "m" / "old").mkdir()
    receive(inb, file_ev(1, b"bulk", b"b"), b"b")
    assert inb.namespace(mkdir(2, b"d")) == []
    receive(inb, live(file_ev(3, b"old/live", b"l")), b"l")
    assert inb.commit(live_only=True) == [Ack(2), Ack(3)]
    assert inb.pending() == (1, 1, 0)
    assert inb.commit() == [Ack(1)]
    inb.close()


def test_a_committed_file_has_its_directory_synced_in_the_same_round(
    tmp_path: Path, syncs: Syncs
) -> None:
    """Its Ack says the rename is durable too (the directory was once
    synced only with the next round)."""
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    receive(inb, file_ev(1, b"f", b"data"), b"data")
    assert inb.commit() == [Ack(1)]
    assert syncs.events == [
        ("fsync", (tmp_path / "m" / "f").stat().st_ino),
        ("fsync", (tmp_path / "m").stat().st_ino),
    ]
    inb.close()
