"""``replicatorctl wait``: the daemon's side.

``Waits.start`` maps each path (absolute, as the client resolved it) to its
mirror and to the targets to wait for, and refuses what cannot be waited
for with a message for the operator (``Unwaitable``: outside every mirror,
excluded, not there, a peer the mirror does not push to). Then a thread of
its own lists the paths — a file, or a directory and everything below it —
and hands the entries to the link of each target a slice at a time
(barrier.py): neither a control thread nor a link is held up by a tree of a
million files.

``poll`` says how far a wait got: done, refused (the peer's reason),
interrupted (a reload replaced a link), or still waiting and why (the link
is down, paused, the last error). It waits up to POLL_MAX s for the end,
but at most LONG_POLLS polls wait at once, so waits never take every
control connection (control.MAX_CLIENTS). The client keeps the time (ctl.py);
a wait nobody polled for EXPIRE s is cancelled, and the links forget it.

Called from the control threads, several at a time: the table of waits has
a lock; each ``Wait`` has its own.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .barrier import Captured, Expect, Expected, Wait
from .config import Config
from .errors import ControlError
from .frames import EntryKind
from .manifest import EntryState, Excludes, scan
from .paths import STATE_DIR, Source
from .stats import LinkStats

log = logging.getLogger(__name__)

#: Entries per message to a link.
SLICE = 512
#: A poll waits at most this long for the wait to end.
POLL_MAX = 2.0
#: Polls that wait at the same time at most; the others answer at once.
LONG_POLLS = 8
#: Waits in progress at most.
MAX_WAITS = 64
#: A wait nobody polled for this long is dropped.
EXPIRE = 30.0


class Unwaitable(Exception):
    """A path or peer that cannot be waited for (a usage error: exit 2)."""


class TargetMirror(Protocol):
    """What a wait reads of a link's mirror (mirror.SourceMirror)."""

    root: bytes
    excludes: Excludes


class TargetLink(Protocol):
    """What a wait needs of a link (link.Link)."""

    stats: LinkStats

    @property
    def by_name(self) -> Mapping[str, TargetMirror]: ...

    def post(self, msg: object) -> None: ...

    def is_alive(self) -> bool: ...


@dataclass(frozen=True)
class Target:
    """One path to wait for."""

    #: As the client named it.
    path: str
    mirror: str
    root: bytes
    rel: bytes
    peers: tuple[str, ...]


def mirror_of(cfg: Config, path: str) -> tuple[str, str] | None:
    """(mirror, path relative to its root; "" for the root) of an absolute
    ``path`` by its name, else after resolving symlinks outside the mirrors
    (a mirror reached through a symlinked folder); None if it is in none."""

    def find(p: str, roots: Mapping[str, str]) -> tuple[str, str] | None:
        for name, root in roots.items():
            if p == root:
                return name, ""
            prefix = root if root.endswith("/") else root + "/"
            if p.startswith(prefix):
                return name, p[len(prefix) :]
        return None

    path = os.path.normpath(path)
    found = find(path, {n: m.path for n, m in cfg.mirrors.items()})
    if found is not None:
        return found
    # Not the last component: a symlink there is the entry waited for.
    head, tail = os.path.split(path)
    real = os.path.join(os.path.realpath(head), tail) if tail else os.path.realpath(path)
    return find(real, {n: os.path.realpath(m.path) for n, m in cfg.mirrors.items()})


def resolve(cfg: Config, links: Mapping[str, TargetLink], path: str, peer: str | None) -> Target:
    """The mirror, entry and targets of ``path``; Unwaitable if there are none."""
    if not isinstance(path, str) or not os.path.isabs(path):
        raise Unwaitable(f"{path!r}: not an absolute path")
    found = mirror_of(cfg, path)
    if found is None:
        where = ", ".join(f"{n} ({m.path})" for n, m in sorted(cfg.mirrors.items()))
        raise Unwaitable(f"{path}: not inside any mirror of this node (mirrors: {where or 'none'})")
    name, rel_s = found
    mcfg = cfg.mirrors[name]
    if peer is not None and peer not in mcfg.push_to:
        pushes = ", ".join(mcfg.push_to) or "nobody"
        raise Unwaitable(f"{path}: mirror {name} does not push to {peer!r} (it pushes to {pushes})")
    peers = tuple(p for p in mcfg.push_to if (peer is None or p == peer) and p in links)
    if not peers:
        raise Unwaitable(
            f"{path}: mirror {name} is pushed to no peer from this node: nothing to wait for"
        )
    if any(name not in links[p].by_name for p in peers):  # the config changed, the links not yet
        raise ControlError(f"{path}: a reload is changing the links of mirror {name}; try again")
    m = links[peers[0]].by_name[name]
    rel = os.fsencode(rel_s)
    if rel and m.excludes(rel):
        why = (
            f"the daemon's own {STATE_DIR.decode()} folder"
            if rel.split(b"/")[0] == STATE_DIR
            else f"excluded from mirror {name} (exclude = {list(m.excludes.patterns)})"
        )
        raise Unwaitable(f"{path}: {why}: it is not replicated")
    if rel:
        try:
            found_st = Source(m.root).lstat(rel)
        except OSError as e:
            raise Unwaitable(f"{path}: {e.strerror}") from None
        if found_st is None:
            raise Unwaitable(
                f"{path}: no such file or directory in mirror {name} "
                "(or a folder on the way is a symlink: those are not followed)"
            )
        if EntryState.from_stat(*found_st) is None:
            raise Unwaitable(f"{path}: not a file, directory or symlink: it is not replicated")
    elif not os.path.isdir(m.root):
        raise Unwaitable(f"{path}: the root of mirror {name} is missing")
    return Target(path, name, m.root, rel, peers)


def capture(root: bytes, top: bytes, excludes: Excludes) -> Iterator[tuple[Captured, ...]]:
    """The entries of ``top`` (and below it, a directory), in slices, each
    stamped with a time taken after its lstat."""
    batch: list[tuple[bytes, EntryState]] = []

    def stamped() -> tuple[Captured, ...]:
        at = time.monotonic()
        out = tuple((rel, st, at) for rel, st in batch)
        batch.clear()
        return out

    if top:
        found = Source(root).lstat(top)
        state = None if found is None else EntryState.from_stat(*found)
        if state is None:
            return  # gone since: nothing to wait for
        batch.append((top, state))
        if state.kind is not EntryKind.DIR:
            yield stamped()
            return
    for rel, st in scan(root, excludes, top):
        batch.append((rel, st))
        if len(batch) >= SLICE:
            yield stamped()
    if batch:
        yield stamped()


@dataclass
class _Entry:
    wait: Wait
    targets: list[Target]
    #: The link each target's entries went to.
    links: dict[str, TargetLink]
    polled: float
    #: Wall clock: link errors older than the wait are not its cause.
    started: float


class Waits:
    """The waits of one node."""

    def __init__(
        self, cfg: Callable[[], Config], links: Callable[[], Mapping[str, TargetLink]]
    ) -> None:
        self._cfg = cfg
        self._links = links
        self._lock = threading.Lock()
        self._waits: dict[int, _Entry] = {}
        self._ids = itertools.count(1)
        self._long = threading.BoundedSemaphore(LONG_POLLS)

    def start(self, req: Mapping[str, Any]) -> dict[str, Any]:
        """Begin a wait (``paths``, optional ``peer``); Unwaitable if it cannot be."""
        paths, peer = req.get("paths"), req.get("peer")
        if not isinstance(paths, list) or not paths:
            raise Unwaitable("name at least one path")
        cfg, links = self._cfg(), self._links()
        if peer is not None and peer not in links:
            raise Unwaitable(f"this node does not push to a peer {peer!r}")
        targets = [resolve(cfg, links, p, peer) for p in paths]
        peers = sorted({p for t in targets for p in t.peers})
        with self._lock:
            self._expire()
            if len(self._waits) >= MAX_WAITS:
                raise ControlError(f"too many waits in progress ({MAX_WAITS})")
            wait = Wait(next(self._ids), peers)
            used = {p: links[p] for p in peers}
            self._waits[wait.id] = _Entry(wait, targets, used, time.monotonic(), time.time())
        threading.Thread(
            target=self._list, args=(wait, targets, used), name=f"wait-{wait.id}", daemon=True
        ).start()
        return {"ok": True, "id": wait.id, "peers": peers}

    def _list(self, wait: Wait, targets: list[Target], links: Mapping[str, TargetLink]) -> None:
        """On the wait's own thread: hand every entry to its targets' links."""
        shown = ""
        try:
            for t in targets:
                shown = t.path
                excludes = links[t.peers[0]].by_name[t.mirror].excludes
                for batch in capture(t.root, t.rel, excludes):
                    if wait.cancelled:
                        return
                    for p in t.peers:
                        links[p].post(Expect(wait, t.mirror, batch))
            for link in links.values():
                link.post(Expected(wait))
            wait.listed = True
        except OSError as e:
            wait.fail(f"cannot list {shown}: {e.strerror or e}")
        except Exception as e:
            log.exception("wait %d: listing %s failed", wait.id, shown)
            wait.fail(f"internal error listing {shown}: {e}")

    def _get(self, req: Mapping[str, Any]) -> _Entry:
        with self._lock:
            e = self._waits.get(req.get("id"))  # type: ignore[arg-type]
            if e is None:
                raise ControlError(
                    f"no wait {req.get('id')!r} here (it was dropped after {EXPIRE:.0f} s "
                    "without a poll, or the daemon restarted)"
                )
            e.polled = time.monotonic()
            return e

    def _expire(self) -> None:
        now = time.monotonic()
        for wid, e in list(self._waits.items()):
            if now - e.polled > EXPIRE:
                e.wait.cancel()
                del self._waits[wid]

    def poll(self, req: Mapping[str, Any]) -> dict[str, Any]:
        """How far the wait ``id`` got, after waiting up to ``max`` s (at most
        POLL_MAX) for it to end."""
        e = self._get(req)
        self._check_links(e)
        wait = e.wait
        try:
            limit = min(POLL_MAX, max(0.0, float(req.get("max", 0))))
        except (TypeError, ValueError):
            limit = 0.0
        waited = False
        if limit > 0 and wait.state() == "waiting" and self._long.acquire(blocking=False):
            try:
                waited = True
                wait.wait(limit)
                self._check_links(e)
            finally:
                self._long.release()
        state = wait.state()
        if state != "waiting":
            with self._lock:
                self._waits.pop(wait.id, None)
        return {
            "ok": True,
            "state": state,
            "waited": waited,
            "reasons": self._reasons(e),
            "peers": {p: vars(pr).copy() for p, pr in wait.progress.items()},
            "listed": wait.listed,
        }

    def cancel(self, req: Mapping[str, Any]) -> dict[str, Any]:
        e = self._get(req)
        e.wait.cancel()
        with self._lock:
            self._waits.pop(e.wait.id, None)
        return {"ok": True}

    def _check_links(self, e: _Entry) -> None:
        """A link replaced by a reload (or dead) will never report: say so."""
        current = self._links()
        for p, link in e.links.items():
            if e.wait.settled(p):
                continue
            if current.get(p) is not link:
                e.wait.settle(p, f"the link to {p} was rebuilt by a reload; run the wait again")
            elif not link.is_alive():
                e.wait.settle(p, f"the link to {p} died (see the log); run the wait again")

    def _reasons(self, e: _Entry) -> list[str]:
        """Why the wait is not over, per target; or why it failed."""
        wait = e.wait
        if wait.error is not None:
            return [wait.error]
        ended = wait.state() != "waiting"
        out = []
        for p, pr in sorted(wait.progress.items()):
            if pr.failure is not None:
                out.append(pr.failure)
            elif not pr.done and not ended:
                out.append(f"{p}: {_counts(pr.entries, pr.left, wait.listed)}{_cause(e, p)}")
        return out


def _counts(entries: int, left: int, listed: bool) -> str:
    if not listed:
        return f"still listing the paths here ({entries} entries so far, {left} not yet there)"
    return f"{left} of {entries} entries not yet durable there"


def _cause(e: _Entry, peer: str) -> str:
    st = e.links[peer].stats
    if st.state != "connected":
        err = f": {st.last_error}" if st.last_error else ""
        return f"; link to {peer} is down ({st.state}{err})"
    if st.paused:
        return f"; sending to {peer} is paused (replicatorctl resume)"
    paused = sorted({t.mirror for t in e.targets if st.mirrors.get(t.mirror, {}).get("paused")})
    if paused:
        return f"; mirror {', '.join(paused)} is paused for {peer} (replicatorctl resume)"
    if st.last_error and (st.last_error_at or 0) >= e.started:
        return f"; last error on the link: {st.last_error}"
    return ""
