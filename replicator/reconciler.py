"""Reconciling a link's mirrors with its peer: open each mirror, list what
the peer holds, and once the listing is complete mark every path where the
source and the peer differ.

The link routes the peer's Opened / Entry / Partial / ListEnd here. The
comparison itself is ``plan.reconcile`` (pure); this module gathers its
facts (a scan of the source, the peer's manifest) and marks the difference
in the backlog. A mirror is listed on every connection and again every
``rescan_interval`` (or on a ``Reconcile``). Nothing is sent before a mirror's
first listing on a connection is complete (``RemoteMirror.listed``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from . import frames as F
from .backlog import Backlog
from .changes import Flag
from .hardlinks import Ino, multi, regroup
from .linkstatus import LinkStatus
from .logs import Fields
from .manifest import EntryState, Preserve, scan_stat
from .mirror import SourceMirror
from .paths import Source
from .plan import outermost, reconcile
from .remote import RemoteMirror
from .stats import LinkStats


class Reconciler:
    def __init__(
        self,
        mirrors: Mapping[int, SourceMirror],
        remote: Mapping[int, RemoteMirror],
        backlog: Backlog,
        send: Callable[[F.Event], None],
        stats: LinkStats,
        status: LinkStatus,
        log: Fields,
        listed: Callable[[], None],
    ) -> None:
        self._mirrors = mirrors
        self._remote = remote
        self._backlog = backlog
        #: Queues a frame for the peer (``Wire.queue``).
        self._send = send
        self._stats = stats
        self._status = status
        self._log = log
        #: Called when the peer served a whole manifest.
        self._listed = listed
        self._list_ids = 0

    def open_all(self) -> None:
        """A new connection: ask the peer to open every mirror."""
        for m in self._mirrors.values():
            self._remote[m.id].reset()
            self._send(F.Open(m.id, m.name))

    def rescan(self, mirror: str | None) -> None:
        """List ``mirror`` (None: every mirror) again as soon as possible."""
        for mid, r in self._remote.items():
            if mirror is None or self._mirrors[mid].name == mirror:
                r.next_scan = 0.0

    def schedule(self) -> None:
        """List the mirrors whose time has come."""
        now = time.monotonic()
        for mid, r in self._remote.items():
            if r.opened and r.listing is None and now >= r.next_scan:
                self._list(mid)

    def _list(self, mid: int) -> None:
        r = self._remote[mid]
        if not r.opened or r.listing is not None:
            return
        self._list_ids += 1
        r.list_id = self._list_ids
        r.listing = {}
        r.heads_listing = {}
        r.partials = {}
        r.next_scan = float("inf")
        self._send(F.List(mid, r.list_id))

    # -- the peer's side ---------------------------------------------------------------

    def opened(self, ev: F.Opened) -> None:
        m = self._mirrors[ev.mirror]
        r = self._remote[ev.mirror]
        if ev.code:
            r.refused = ev.message
            self._stats.error(ev.message)
            self._stats.mirror(m.name)["refused"] = ev.message
            self._log.at(MIRROR=m.name).error(
                "link to %s: mirror %s refused: %s", self._stats.peer, m.name, ev.message
            )
            return
        r.opened, r.refused = True, None
        r.preserve = Preserve(ev.preserve & sum(Preserve))  # bits we know of
        self._stats.mirror(m.name).pop("refused", None)
        self._list(m.id)

    def entry(self, ev: F.Entry) -> None:
        r = self._remote.get(ev.mirror)
        if r is not None:
            r.entry(ev)

    def partial(self, ev: F.Partial) -> None:
        r = self._remote.get(ev.mirror)
        if r is not None:
            r.partials[ev.path] = ev

    def list_end(self, ev: F.ListEnd) -> None:
        """Reconcile: mark every path where the source and the peer differ."""
        r = self._remote[ev.mirror]
        m = self._mirrors[ev.mirror]
        if r.listing is None or ev.list_id != r.list_id:
            return
        t0 = time.monotonic()
        r.known, r.listing = r.listing, None
        r.heads, r.heads_listing = r.heads_listing, {}
        r.listed = True
        self._listed()
        now = time.time()
        groups: dict[bytes, Ino] = {}
        diff = reconcile(
            _noting(scan_stat(m.root, m.excludes), groups, bool(m.preserve & Preserve.HARDLINKS)),
            r.known,
            lambda a, b: m.compare(a, b, r.preserve),
            m.two_way,
            m.excludes,
            m.delete,
            None if r.agreed is None else r.agreed.records,
        )
        if r.agreed is not None:
            for rel, st in diff.agree:
                r.agreed.put(rel, st)
            for rel in outermost(diff.stale):  # forget() takes what is below
                r.agreed.forget(rel)
        for rel, size in diff.send:
            self._backlog.mark((m.id, rel), (now, size, Flag.DATA), persist=False)
        marked = len(diff.send)
        if m.preserve & Preserve.HARDLINKS:
            src = Source(m.root)
            for rel in regroup(groups, r.heads, r.known, lambda p: src.lstat(p) is not None):
                # Linked differently there: sent again, as a link or as data.
                r.known.pop(rel, None)
                if r.agreed is not None:
                    r.agreed.forget(rel)
                self._backlog.mark((m.id, rel), (now, 0, Flag.DATA), persist=False)
                marked += 1
        if diff.gone and not m.deletes_allowed():
            self._status.marker_missing(m, len(diff.gone))
        else:
            for rel in diff.gone:
                self._backlog.mark((m.id, rel), (now, 0, Flag.DATA), persist=False)
            marked += len(diff.gone)
        dur = time.monotonic() - t0
        r.last_scan, r.last_scan_duration = time.time(), dur
        r.next_scan = time.monotonic() + m.rescan_interval
        self._stats.mirror(m.name).update(
            last_scan=r.last_scan,
            last_scan_duration=dur,
            remote_entries=len(r.known),
            source_entries=diff.entries,
            source_dirs=diff.dirs,
        )
        self._log.at(MIRROR=m.name).info(
            "link to %s: mirror %s reconciled: %d entries here, %d there, %d to send (%.2f s)",
            self._stats.peer,
            m.name,
            diff.entries,
            len(r.known),
            marked,
            dur,
        )


def _noting(
    walk: Iterable[tuple[bytes, EntryState, os.stat_result]],
    groups: dict[bytes, Ino],
    hardlinks: bool,
) -> Iterator[tuple[bytes, EntryState]]:
    """The walk for ``plan.reconcile``, noting the inode of every
    multiply-linked file in ``groups`` on the way (with ``hardlinks``)."""
    for rel, state, st in walk:
        if hardlinks and multi(st):
            groups[rel] = (st.st_dev, st.st_ino)
        yield rel, state
