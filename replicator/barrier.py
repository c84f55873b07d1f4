"""Barriers: has a peer made durable what a path held when a wait began?

``replicatorctl wait PATH...`` (waits.py) lists each path — a file, or a
directory and everything below it — with the state each entry had and when
it was looked at (``Captured``), and hands the entries to the link of every
target a slice at a time (``Expect``; ``Expected`` once all were handed
over). The link routes those messages, and its answers from the peer, to
its ``Barriers``; everything here but ``Wait`` runs on the link thread, like
the rest of the link.

An entry is *durable there* once one of these holds:

* what the peer holds as far as the link knows (``RemoteMirror.known``:
  every listing, every Ack) is the captured state, as the peer applies it
  (``SourceMirror.compare``) — in a two-way mirror, or a version of the
  peer's as new or newer (the rule of ``plan.reconcile``);
* an operation on the path started after the entry was captured was
  acknowledged: it carried the entry as it was then, or newer;
* looked at again with nothing pending or in flight for it, the entry is
  gone here (deleted or renamed away since the wait began: not followed),
  or what the peer holds is its current, newer state.

A directory counts once the peer holds a directory there with its mode
and owner; its mtime is not waited for. It moves on the peer whenever an
entry lands in it, and the link puts it back with a ``Meta`` only once no
operation on a child is in flight: a file in it rewritten all along (after
the wait began) would keep the wait from ever ending.

An entry that is none of these and has nothing pending or in flight (its
event is still on its way from the watcher, or was lost) is marked dirty
again, so a wait never depends on an event arriving. A path the peer
refuses for good (an ``Error`` that is not retried) or a mirror it refuses
fails the wait on this link with the peer's reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from . import frames as F
from .backlog import Backlog, Key
from .changes import Flag
from .inflight import InFlight, Record
from .manifest import Change, EntryState, lstat_entry
from .mirror import SourceMirror
from .paths import show
from .remote import RemoteMirror

#: One entry of a waited-for path: its path relative to the mirror root,
#: its state, and when it was looked at (monotonic, taken after its lstat).
Captured = tuple[bytes, EntryState, float]

#: Entries looked at again per step at most (an lstat each, for those with
#: nothing pending): the link goes back to its other work in between.
SWEEP_SLICE = 500
#: Seconds between two looks at the entries not yet durable.
SWEEP_EVERY = 0.5
#: An entry marked dirty again without result is marked again after
#: MARK_MIN s, doubling up to MARK_MAX s (a file this node cannot read).
MARK_MIN, MARK_MAX = 0.5, 30.0


# -- what the links and the control thread share ---------------------------------------


@dataclass
class Progress:
    """What one target's link reported of a wait."""

    #: Entries handed to the link so far, and of those not yet durable there.
    entries: int = 0
    left: int = 0
    done: bool = False
    #: Why it cannot end well: the peer's refusal, or the link was replaced.
    failure: str | None = None
    #: The failure is the peer's refusal (else this node's link gave up).
    refused: bool = False


class Wait:
    """One ``replicatorctl wait``: the only object the links and the
    control thread share about it. Counts are written by each target's link
    and read without a lock (a hint); an outcome is settled under the lock,
    once per target, and wakes whoever waits for it."""

    def __init__(self, wid: int, peers: Iterable[str]) -> None:
        self.id = wid
        self.progress = {p: Progress() for p in peers}
        #: The listing of the paths is over: every entry was handed over.
        self.listed = False
        #: Nobody waits any more: links drop it.
        self.cancelled = False
        #: This node could not list the paths.
        self.error: str | None = None
        self._cond = threading.Condition()

    def report(self, peer: str, entries: int, left: int) -> None:
        p = self.progress[peer]
        p.entries, p.left = entries, left

    def settled(self, peer: str) -> bool:
        p = self.progress[peer]
        return p.done or p.failure is not None

    def settle(self, peer: str, failure: str | None = None, refused: bool = False) -> None:
        """``peer`` holds everything (``failure`` None), or never will."""
        with self._cond:
            p = self.progress[peer]
            if p.done or p.failure is not None:
                return
            if failure is None:
                p.done, p.left = True, 0
            else:
                p.failure, p.refused = failure, refused
            self._cond.notify_all()

    def fail(self, error: str) -> None:
        """This node could not list the paths."""
        with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify_all()

    def state(self) -> str:
        """``error`` (this node), ``refused`` (a target), ``interrupted`` (a
        link gave up), ``done`` (durable on every target), or ``waiting``."""
        if self.error is not None:
            return "error"
        ps = list(self.progress.values())
        if any(p.refused for p in ps):
            return "refused"
        if any(p.failure is not None for p in ps):
            return "interrupted"
        return "done" if all(p.done for p in ps) else "waiting"

    def wait(self, timeout: float) -> bool:
        """Until it ended (True) or ``timeout`` s passed."""
        with self._cond:
            return self._cond.wait_for(lambda: self.state() != "waiting", timeout)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(frozen=True)
class Expect:
    """To a link: entries of ``wait`` in ``mirror`` to see durable on its peer."""

    wait: Wait
    mirror: str
    entries: tuple[Captured, ...]


@dataclass(frozen=True)
class Expected:
    """To a link: every entry of ``wait`` for it was handed over."""

    wait: Wait


# -- the link's side --------------------------------------------------------------------


def covered(m: SourceMirror, r: RemoteMirror, state: EntryState, held: EntryState | None) -> bool:
    """Whether the peer holding ``held`` holds ``state`` as it applies it (or,
    two-way, a version of its own as new or newer); a directory's mtime
    does not count."""
    if held is not None and state.kind is F.EntryKind.DIR and held.kind is F.EntryKind.DIR:
        state = replace(state, mtime_ns=held.mtime_ns)
    if m.compare(state, held, r.preserve) is Change.NONE:
        return True
    return m.two_way and held is not None and held.mtime_ns >= state.mtime_ns


@dataclass(slots=True)
class _Entry:
    state: EntryState
    #: When it was captured (monotonic).
    at: float
    #: When it may be marked dirty again, and how often it was.
    next_mark: float = 0.0
    marks: int = 0


@dataclass
class _Watch:
    """One wait as one link sees it."""

    wait: Wait
    #: Entries not yet durable there.
    left: dict[Key, _Entry] = field(default_factory=dict)
    #: Entries handed over.
    entries: int = 0
    #: ``Expected`` arrived.
    complete: bool = False


class Barriers:
    """The waits one link takes part in (see the module docstring)."""

    def __init__(
        self,
        peer: str,
        mirrors: Mapping[int, SourceMirror],
        remote: Mapping[int, RemoteMirror],
        backlog: Backlog,
        inflight: InFlight,
    ) -> None:
        self._peer = peer
        self._mirrors = mirrors
        self._by_name = {m.name: m for m in mirrors.values()}
        self._remote = remote
        self._backlog = backlog
        self._inflight = inflight
        self._watches: dict[int, _Watch] = {}
        #: The look at every entry not yet durable, in progress.
        self._sweep: Iterator[tuple[_Watch, Key]] | None = None
        self._next_sweep = 0.0
        #: Per mirror, whether its marker was there at the start of the sweep.
        self._mounted: dict[int, bool] = {}

    def __len__(self) -> int:
        return len(self._watches)

    # -- messages -------------------------------------------------------------------

    def expect(self, msg: Expect) -> None:
        w = self._watch(msg.wait)
        if w is None:
            return
        m = self._by_name.get(msg.mirror)
        if m is None:  # cannot happen: waits.py posts only to the mirror's targets
            self._fail(w, f"mirror {msg.mirror} is not pushed to {self._peer}", refused=False)
            return
        r = self._remote[m.id]
        known = r.known
        for rel, state, at in msg.entries:
            w.entries += 1
            if not covered(m, r, state, known.get(rel)):
                w.left[(m.id, rel)] = _Entry(state, at)
        if r.refused is not None and w.left:
            self._fail(w, f"mirror {m.name} refused by {self._peer}: {r.refused}")
            return
        self._next_sweep = 0.0  # look at the new ones soon
        self._report(w)

    def expected(self, msg: Expected) -> None:
        w = self._watch(msg.wait)
        if w is not None:
            w.complete = True
            self._report(w)

    def _watch(self, wait: Wait) -> _Watch | None:
        if wait.cancelled or wait.settled(self._peer):
            self._watches.pop(wait.id, None)
            return None
        w = self._watches.get(wait.id)
        if w is None:
            w = self._watches[wait.id] = _Watch(wait)
        return w

    # -- the peer's answers ---------------------------------------------------------------

    def acked(self, rec: Record | None) -> None:
        """The peer acknowledged ``rec`` (after the link applied it)."""
        if rec is None or not self._watches:
            return
        for key in rec.paths():
            m, r = self._mirrors[key[0]], self._remote[key[0]]
            for w in list(self._watches.values()):
                e = w.left.get(key)
                if e is None:
                    continue
                if rec.sent >= e.at or covered(m, r, e.state, r.known.get(key[1])):
                    del w.left[key]
                    self._report(w)

    def refused(self, rec: Record | None, message: str) -> None:
        """The peer refused ``rec`` for good: a wait for its path fails."""
        if rec is None or not self._watches:
            return
        for key in rec.paths():
            for w in list(self._watches.values()):
                if key in w.left:
                    name = self._mirrors[key[0]].name
                    self._fail(w, f"{self._peer} refused {name}:{show(key[1])}: {message}")

    # -- looking again -------------------------------------------------------------------

    def due(self) -> float | None:
        """When ``step`` has work (monotonic), if it has any."""
        if not self._watches:
            return None
        return time.monotonic() if self._sweep is not None else self._next_sweep

    def step(self) -> bool:
        """Look again at up to SWEEP_SLICE entries not yet durable, once
        every SWEEP_EVERY s; True if entries remain for the next step."""
        if not self._watches:
            return False
        now = time.monotonic()
        if self._sweep is None:
            if now < self._next_sweep:
                return False
            for w in [w for w in self._watches.values() if w.wait.cancelled]:
                del self._watches[w.wait.id]
            self._mounted = {
                mid: m.marker is None or m.marker.ok() for mid, m in self._mirrors.items()
            }
            self._sweep = iter([(w, k) for w in self._watches.values() for k in list(w.left)])
        n = 0
        for w, key in self._sweep:
            if self._watches.get(w.wait.id) is w and key in w.left:
                self._look(w, key, now)
                n += 1
                if n >= SWEEP_SLICE:
                    return True
        self._sweep = None
        self._next_sweep = now + SWEEP_EVERY
        for w in list(self._watches.values()):
            self._report(w)
        return False

    def _look(self, w: _Watch, key: Key, now: float) -> None:
        mid, rel = key
        m, r = self._mirrors[mid], self._remote[mid]
        if r.refused is not None:
            self._fail(w, f"mirror {m.name} refused by {self._peer}: {r.refused}")
            return
        e = w.left[key]
        held = r.known.get(rel)
        if covered(m, r, e.state, held):
            del w.left[key]
            return
        if not r.listed or self._backlog.holds(key) or self._inflight.busy(key):
            return  # the link will get to it
        try:
            here = None if m.excludes(rel) else lstat_entry(m.root, rel)
        except OSError:
            return
        if here is None and not self._mounted.get(mid, True):
            return  # the disk is not mounted: nothing is gone
        if here is None or covered(m, r, here, held):
            del w.left[key]  # gone here since, or its newer state is there
            return
        if now >= e.next_mark:
            self._backlog.mark(key, (time.time(), here.size, Flag.DATA), persist=False)
            e.marks += 1
            e.next_mark = now + min(MARK_MAX, MARK_MIN * 2 ** (e.marks - 1))

    # -- outcomes --------------------------------------------------------------------------

    def _report(self, w: _Watch) -> None:
        w.wait.report(self._peer, w.entries, len(w.left))
        if w.complete and not w.left:
            w.wait.settle(self._peer)
            self._watches.pop(w.wait.id, None)

    def _fail(self, w: _Watch, why: str, refused: bool = True) -> None:
        w.wait.report(self._peer, w.entries, len(w.left))
        w.wait.settle(self._peer, why, refused)
        self._watches.pop(w.wait.id, None)
