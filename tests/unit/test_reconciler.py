"""Opening and listing a link's mirrors, and what a listing marks, without
sockets (replicator/reconciler.py): frames go to a list, the source is a
temporary folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import cast

import pytest

from replicator import frames as F
from replicator.backlog import Backlog
from replicator.changes import Flag
from replicator.frames import EntryKind as K
from replicator.inflight import InFlight
from replicator.linkstatus import LinkStatus
from replicator.logs import Fields
from replicator.manifest import EntryState, Excludes
from replicator.marker import Marker
from replicator.mirror import SourceMirror
from replicator.reconciler import Reconciler
from replicator.remote import RemoteMirror
from replicator.stats import LinkStats

M = 1


class Gone:
    """A marker whose disk is not mounted."""

    def ok(self) -> bool:
        return False


class Link:
    """A reconciler and the state it shares with its link."""

    def __init__(self, root: Path, marker: Marker | None = None) -> None:
        self.mirror = SourceMirror(
            M, "media", os.fsencode(root), Excludes(["*.tmp"]), True, 60.0, marker
        )
        self.remote = RemoteMirror()
        self.backlog = Backlog({M: "media"})
        self.stats = LinkStats("b", "addr")
        self.sent: list[F.Event] = []
        self.listed = 0
        log = Fields(logging.getLogger("replicator.link"), PEER="b")
        status = LinkStatus(
            self.stats, {M: self.mirror}, {M: self.remote}, self.backlog, InFlight(), lambda: 0, log
        )
        self.r = Reconciler(
            {M: self.mirror},
            {M: self.remote},
            self.backlog,
            self.sent.append,
            self.stats,
            status,
            log,
            self._listed,
        )

    def _listed(self) -> None:
        self.listed += 1

    def open(self) -> F.List:
        """Connect, have the mirror opened: the List the reconciler asks for."""
        self.r.open_all()
        assert self.sent == [F.Open(M, "media")]
        self.r.opened(F.Opened(M, 0, 0b11, ""))
        ask = self.sent[-1]
        assert isinstance(ask, F.List) and self.remote.listing == {}
        return ask

    def entry(self, path: bytes, st: EntryState) -> None:
        self.r.entry(F.Entry(M, st.kind, st.mode, st.size, st.mtime_ns, 0, 0, path, b""))

    def dirty(self) -> dict[bytes, int]:
        """What is marked: path -> flags."""
        out = {}
        while self.backlog.has_ready(M):
            (_, rel), (_, _, flags) = self.backlog.pop(M)
            out[rel] = flags
        return out


def here(root: Path, rel: str) -> EntryState:
    st = os.lstat(root / rel)
    return EntryState.from_stat(st)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "same").write_bytes(b"x")
    (tmp_path / "new").write_bytes(b"y")
    (tmp_path / "skip.tmp").write_bytes(b"z")
    return tmp_path


def test_a_listing_marks_what_differs_and_what_is_gone_here(root: Path) -> None:
    link = Link(root)
    ask = link.open()
    link.entry(b"same", here(root, "same"))
    link.entry(b"old", EntryState(K.FILE, 0o644, 1, 1, 0, 0, b""))
    link.r.partial(F.Partial(M, 1, b"v", b"new"))
    link.r.list_end(F.ListEnd(M, ask.list_id, 2))
    assert link.listed == 1 and link.remote.listed and link.remote.listing is None
    assert set(link.remote.known) == {b"same", b"old"} and b"new" in link.remote.partials
    assert link.dirty() == {b"new": Flag.DATA, b"old": Flag.DATA}
    ms = link.stats.mirrors["media"]
    assert ms["remote_entries"] == 2 and ms["source_entries"] == 2  # skip.tmp is excluded
    assert link.remote.next_scan > 0


def test_a_stale_list_end_is_ignored(root: Path) -> None:
    link = Link(root)
    ask = link.open()
    link.r.list_end(F.ListEnd(M, ask.list_id + 1, 0))
    assert link.listed == 0 and not link.remote.listed and link.dirty() == {}


def test_a_missing_marker_withholds_deletions(root: Path) -> None:
    link = Link(root, cast(Marker, Gone()))
    ask = link.open()
    link.entry(b"old", EntryState(K.FILE, 0o644, 1, 1, 0, 0, b""))
    link.r.list_end(F.ListEnd(M, ask.list_id, 1))
    assert b"old" not in link.dirty()
    assert link.stats.mirrors["media"]["marker_missing"] is True


def test_a_refused_mirror_is_not_listed(root: Path) -> None:
    link = Link(root)
    link.r.open_all()
    link.r.opened(F.Opened(M, F.ErrorCode.FORBIDDEN, 0, "not from you"))
    assert link.sent == [F.Open(M, "media")] and link.remote.refused == "not from you"
    assert link.stats.last_error == "not from you"
    assert link.stats.mirrors["media"]["refused"] == "not from you"


def test_rescans_are_scheduled(root: Path) -> None:
    link = Link(root)
    ask = link.open()
    link.r.schedule()  # listing: nothing more
    assert link.sent[-1] == ask
    link.r.list_end(F.ListEnd(M, ask.list_id, 0))
    link.r.schedule()  # not due
    assert link.sent[-1] == ask
    link.r.rescan("other")
    link.r.schedule()
    assert link.sent[-1] == ask
    link.r.rescan("media")
    link.r.schedule()
    again = link.sent[-1]
    assert isinstance(again, F.List) and again.list_id == ask.list_id + 1
