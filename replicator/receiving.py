"""One mirror a peer pushes into this node, as seen by the receiving session.

``ReceivingMirror`` owns the mirror's root, the peer's inbox of partial
files, its publisher, the files in progress and the operations refused
mid-flight. Its handlers (file begin/end, namespace operations, list,
commit) never touch the connection: they return ``Answer``s — ``Ack``,
``Refuse`` (code and message for the sender) and ``Tell`` (a message for
the daemon: echo suppression, or "our version must reach the peer") — in
the order they happened, and the session turns them into frames.

``admit`` opens a mirror for a peer or raises ``Refused``: the one place
that decides whether a peer may push a mirror here.

Never: trust a path the peer sent (everything goes through ``paths.check``
and ``paths.Root``); write into a mirror whose marker is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import frames as F
from . import paths
from .blockmap import available
from .changes import AgreedWith, Dirty, Flag, PeerHas
from .checking import CheckJob, start_check
from .config import Config
from .conflictlog import ConflictLog, Recorder
from .conflicts import Base, Verdict, changed_below, decide, keep_local_on_delete
from .errors import ApplyError, BadPath, Refused, RemoteProtocolError
from .hardlinks import first_names
from .inbox import Inbox, PartialFile, apply_error
from .manifest import EntryState, Excludes, Preserve, scan, scan_stat
from .maps import PublishedMaps, database
from .publisher import Publisher
from .stats import SessionStats
from .verifying import Bad, Failed, Outcome, Verifier, delta_base
from .xattrs import Pairs

log = logging.getLogger(__name__)

#: What an open mirror needs: its root and its partial folder.
MIRROR_FDS = 2
#: Kept free for one operation: directory walks, a sidecar, a partial file.
OP_FDS = 8


@dataclass(frozen=True)
class Ack:
    """Operation ``op`` is durable."""

    op: int


@dataclass(frozen=True)
class Refuse:
    """Operation ``op`` was not applied (an Error frame for the sender)."""

    op: int
    code: F.ErrorCode
    message: str
    path: bytes | None = None


@dataclass(frozen=True)
class Mend:
    """File ``op`` did not match its block map in ``ranges``: ask for them
    again (a Want frame)."""

    op: int
    ranges: list[tuple[int, int]]


@dataclass(frozen=True)
class Tell:
    """A message for the daemon's links (``PeerHas``, ``AgreedWith`` or ``Dirty``)."""

    message: PeerHas | AgreedWith | Dirty


Answer = Ack | Refuse | Mend | Tell


@dataclass
class ReceivingMirror:
    """One mirror ``peer`` pushes into this node over one connection."""

    name: str
    peer: str
    #: This node's name (conflict copies and messages name it).
    me: str
    root: paths.Root
    inbox: Inbox
    publisher: Publisher
    stats: SessionStats
    #: This node also pushes the mirror to the sending peer (conflicts.py).
    two_way: bool = False
    #: What both sides last held at a path (two-way mirrors; conflicts.Base).
    base: Callable[[bytes], Base] = lambda path: Base()
    #: Files being received, by operation.
    files: dict[int, PartialFile] = field(default_factory=dict)
    #: Operations refused mid-flight: their chunks are drained, End ignored.
    refused: set[int] = field(default_factory=set)
    #: The block maps of the files published here (deltas are made against them).
    maps: PublishedMaps | None = None
    #: Owners are mapped by name (owners.py), not applied as numbers.
    owner_names: bool = True
    #: Where the conflicts decided here are recorded (conflictlog.py).
    recorder: Recorder | None = None
    #: Files whose End came, judged against their block maps.
    verifier: Verifier = field(init=False)
    #: Two-way: what each pending operation makes both sides hold (path,
    #: state or None for a delete, source of a rename), told to the link
    #: once it is published (``AgreedWith``, history.py).
    agree: dict[int, tuple[bytes, EntryState | None, bytes | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.verifier = Verifier(self.name, self.peer, self.stats)

    # -- resources -------------------------------------------------------------

    def fds_held(self) -> int:
        """Descriptors held now, plus one per pending operation: its commit
        may open a directory for it (partial files not counted)."""
        root = self.root
        cached = len(root._cache) + len(root._stale)  # directory fds of the walk cache
        return MIRROR_FDS + cached + 2 * self.publisher.pending

    def release_fds(self) -> None:
        """Drop cached directories (commit first: pending ones need them)."""
        self.root.forget()
        self.root.reap()

    def close(self) -> None:
        """Close the files in progress (resumable ones checkpointed, the
        rest discarded) and the mirror. Commit first to publish what is
        complete."""
        for p in self.files.values():
            if p.resumable:
                try:
                    p.checkpoint()
                except OSError:
                    pass
                p.close()
            else:
                p.discard()
        self.files.clear()
        self.publisher.close()
        self.inbox.close()
        self.root.close()

    # -- files -----------------------------------------------------------------

    def begin(self, ev: F.File) -> list[Answer]:
        """A file starts (fresh, or resumed at ``ev.offset``; a delta of the
        version published here if ``ev.base``)."""
        base = None
        if not available(ev.algo):
            self.refused.add(ev.op)
            msg = (
                f"mirror {self.name!r} on {self.me!r}: cannot check {paths.show(ev.path)}: "
                "its block map uses BLAKE3 and the blake3 package is not installed here "
                '(install it, or set digest = "xxh3-128" for the mirror on the sender)'
            )
            log.error("%s", msg, extra={"PEER": self.peer, "MIRROR": self.name})
            return [Refuse(ev.op, F.ErrorCode.FORBIDDEN, msg, ev.path)]
        try:
            parts = paths.check(ev.path)
            if ev.base:
                base = delta_base(self.maps, self.root, ev, parts)
            p = self.inbox.begin(ev, parts)
        except BadPath as e:
            if base is not None:
                base.close()
            self.refused.add(ev.op)
            return [Refuse(ev.op, F.ErrorCode.BAD_PATH, f"mirror {self.name!r}: {e}", ev.path)]
        except ApplyError as e:
            if base is not None:
                base.close()
            self.refused.add(ev.op)
            if e.code is F.ErrorCode.BASE_CHANGED:
                self.stats.base_changed += 1
            return [Refuse(ev.op, e.code, f"mirror {self.name!r}: {e}", ev.path)]
        p.delta_base = base
        if base is not None:
            self.stats.delta_files += 1
        if self.two_way:
            p.base = self.base(ev.path)
        self.files[ev.op] = p
        return self._tell(ev.path, p.state)

    def wrote(self, p: PartialFile, n: int) -> list[Answer]:
        """``n`` bytes were written to ``p`` at ``p.written``."""
        try:
            p.wrote(n)
        except OSError as e:
            return self.fail(p, e)
        return []

    def fail(self, p: PartialFile, e: OSError) -> list[Answer]:
        """Writing ``p`` failed: discard it, drain the rest of its chunks."""
        err = apply_error(e, paths.show(p.path))
        self.agree.pop(p.op, None)
        if self.files.pop(p.op, None) is not None:
            self.refused.add(p.op)  # still open: its remaining chunks are drained
        self.verifier.forget(p)
        p.discard()
        return [Refuse(p.op, err.code, f"{err}; the partial file was discarded", p.path)]

    def base_failed(self, p: PartialFile, e: OSError) -> list[Answer]:
        """Copying from the published version failed (it shrank, or the
        filesystem cannot copy_file_range): the sender sends it whole."""
        if self.files.pop(p.op, None) is not None:
            self.refused.add(p.op)
        p.discard()
        self.stats.base_changed += 1
        msg = (
            f"mirror {self.name!r}: {paths.show(p.path)}: cannot copy from the version published "
            f"here ({e.strerror or e}); send it whole"
        )
        return [Refuse(p.op, F.ErrorCode.BASE_CHANGED, msg, p.path)]

    def abort(self, op: int) -> None:
        """The sender gave up on ``op``."""
        p = self.files.pop(op, None)
        if p is not None:
            p.discard()
        self.refused.discard(op)

    def copied(self, p: PartialFile, n: int) -> None:
        self.stats.delta_bytes_copied += n

    def end(self, op: int, digest: bytes) -> list[Answer]:
        """All of ``op``'s data is here: publish it with the next commit if
        it matches its block map (verifying.py; in a two-way mirror, after
        deciding a conflict); else ask for the ranges that do not. A file
        with much left to hash is judged later (``verify_step``)."""
        p = self.files.get(op)
        if p is None:
            self.refused.discard(op)
            return []
        try:
            outcome = self.verifier.end(p, digest)
        except OSError as e:
            return self.fail(p, e)
        return [] if outcome is None else self._judged(p, outcome)

    def verify_step(self) -> list[Answer]:
        """Hash a slice of a file waiting to be judged (see ``end``)."""
        out: list[Answer] = []
        for p, outcome in self.verifier.step():
            if isinstance(outcome, OSError):
                out += self.fail(p, outcome)
            else:
                out += self._judged(p, outcome)
        return out

    def _judged(self, p: PartialFile, outcome: Outcome) -> list[Answer]:
        if isinstance(outcome, Bad):
            return [Mend(p.op, outcome.ranges)]
        del self.files[p.op]
        if isinstance(outcome, Failed):
            p.discard()
            return [Refuse(p.op, F.ErrorCode.VERIFY_FAILED, outcome.message, p.path)]
        out: list[Answer] = []
        decision = local = None
        if self.two_way:
            local = self._local(p.parts)
            decision = decide(p.parts[-1], local, p.state, p.base, self.me, self.peer)
            if decision.verdict is not Verdict.INCOMING_AS_COPY:
                self.agree[p.op] = (p.path, p.state, None)  # also a conflict it wins
            if decision.verdict is Verdict.SAME:
                p.discard()
                self.publisher.add_noop(p.op)
                return []
            if decision.verdict is not Verdict.APPLY:
                log.warning(
                    "conflict on %s: changed here and on %s; %s wins, the other version is "
                    "kept as %s",
                    paths.show(p.path),
                    self.peer,
                    self.peer if decision.verdict is Verdict.KEEP_LOCAL_COPY else self.me,
                    paths.show(decision.copy_name),
                    extra={"PEER": self.peer, "MIRROR": self.name, "PATH": paths.show(p.path)},
                )
                self.stats.conflicts += 1
                out.append(Tell(Dirty(self.name, p.path, Flag.DATA | Flag.CLOSED)))
        try:
            self.publisher.add_file(p, decision)
        except OSError as e:
            return out + self.fail(p, e)
        self.stats.files_received += 1
        if decision is not None and local is not None and self.recorder is not None:
            self.recorder.decided(p, decision, local, self.root, self.maps)
        return out

    def check(self, ev: F.Check) -> CheckJob | Refuse:
        """A scrub asks for the block map of our file at ``ev.path``."""
        try:
            return start_check(self.root, ev)
        except BadPath as e:
            return Refuse(ev.op, F.ErrorCode.BAD_PATH, f"mirror {self.name!r}: {e}", ev.path)
        except ApplyError as e:
            return Refuse(ev.op, e.code, f"mirror {self.name!r}: {e}", ev.path)

    # -- namespace operations --------------------------------------------------

    def namespace(self, ev: F.Event, attrs: Pairs | None = None) -> list[Answer]:
        """Apply Mkdir, Symlink, Meta, Delete, Rename or HardLink (durable, and acked,
        with the next commit)."""
        op: int = ev.op  # type: ignore[attr-defined]
        shown: bytes = getattr(ev, "path", None) or getattr(ev, "src", b"") or b""
        out: list[Answer] = []
        try:
            done = self._apply(ev, out, attrs)
        except BadPath as e:
            return [*out, Refuse(op, F.ErrorCode.BAD_PATH, f"mirror {self.name!r}: {e}", shown)]
        except ApplyError as e:
            msg = f"mirror {self.name!r}: {paths.show(shown)}: {e}"
            return [*out, Refuse(op, e.code, msg, shown)]
        except (ValueError, RecursionError) as e:  # never fatal for the whole session
            msg = f"mirror {self.name!r}: {paths.show(shown)}: cannot apply: {e}"
            return [*out, Refuse(op, F.ErrorCode.IO_ERROR, msg, shown)]
        if not done:
            return out
        self.stats.ops_applied += 1
        told = len(out)
        if isinstance(ev, F.Rename):
            out += self._tell(ev.dst, None, src=ev.src)
        elif isinstance(ev, F.Delete):
            out += self._tell(ev.path, None)
        elif isinstance(ev, F.Mkdir):
            state = EntryState(F.EntryKind.DIR, ev.mode & 0o7777, 0, ev.mtime_ns, ev.uid, ev.gid)
            out += self._tell(ev.path, state)
        elif isinstance(ev, F.Symlink):
            state = EntryState(
                F.EntryKind.SYMLINK, 0o777, 0, ev.mtime_ns, ev.uid, ev.gid, ev.target
            )
            out += self._tell(ev.path, state)
        elif isinstance(ev, F.Meta | F.HardLink):
            st = self._local(paths.check(ev.path))
            if st is not None:
                out += self._tell(ev.path, st)
        for a in out[told:]:
            if isinstance(a, Tell) and isinstance(a.message, PeerHas):
                h = a.message
                self.agree[op] = (h.path, h.state, h.src)
        return out

    def _apply(self, ev: F.Event, out: list[Answer], attrs: Pairs | None = None) -> bool:
        """Apply ``ev``, appending the answers of any commit it needed to
        ``out``. False: a two-way conflict kept our version instead.

        An operation commits what is pending first only when it depends on
        it: a file waiting to be published at, above or below a path it
        removes or replaces (or a link's target). Otherwise it is applied
        at once and acked with the next round: a moved-in tree's Meta per
        directory does not cost a whole commit round. A Meta of a path with
        files waiting at or below it is deferred until they are placed."""
        pub = self.publisher
        if isinstance(ev, F.Rename):
            src, dst = paths.check(ev.src), paths.check(ev.dst)
            if pub.related(src) or pub.related(dst):
                out += self.commit()
            pub.rename(ev, src, dst)
            if self.maps is not None:  # the rows would only be refused later
                self.maps.forget(ev.src)
                self.maps.forget(ev.dst)
            return True
        if isinstance(ev, F.HardLink):
            parts, target = paths.check(ev.path), paths.check(ev.target)
            if pub.blocks(target) or pub.related(parts):
                out += self.commit()  # the target is a file waiting in this round
            pub.hardlink(ev, parts, target)
            if self.maps is not None:
                self.maps.forget(ev.path)
            return True
        parts = paths.check(ev.path)  # type: ignore[attr-defined]
        if not isinstance(ev, (F.Mkdir, F.Symlink, F.Meta, F.Delete)):
            raise RemoteProtocolError(F.ErrorCode.UNEXPECTED, f"unexpected {ev}")
        if isinstance(ev, F.Mkdir) and pub.blocks(parts):
            out += self.commit()  # e.g. "rm p; mkdir -p p/q" while file p is pending
        if isinstance(ev, F.Mkdir):
            pub.mkdir(ev, parts, attrs)
        elif isinstance(ev, F.Symlink):
            if not ev.target or b"\0" in ev.target:
                raise BadPath(f"symlink target {ev.target!r} is empty or has a NUL byte")
            if pub.related(parts):
                out += self.commit()
            pub.symlink(ev, parts)
        elif isinstance(ev, F.Meta):
            if pub.under(parts) and not pub.blocks(parts[:-1]) and not self.two_way:
                pub.defer_meta(ev, parts, attrs)
                return True
            if pub.related(parts):
                out += self.commit()
            pub.meta(ev, parts, attrs)
        else:
            if pub.related(parts):
                out += self.commit()
            if self.two_way and self._keep_on_delete(ev.path, parts):
                log.warning(
                    "conflict on %s: deleted on %s but changed here; keeping it (it goes "
                    "back to %s)",
                    paths.show(ev.path),
                    self.peer,
                    self.peer,
                    extra={"PEER": self.peer, "MIRROR": self.name, "PATH": paths.show(ev.path)},
                )
                self.stats.conflicts += 1
                pub.add_noop(ev.op)
                out += self._tell(ev.path, None)
                out.append(Tell(Dirty(self.name, ev.path, Flag.DATA | Flag.CLOSED)))
                return False
            pub.delete(ev, parts)
            if self.maps is not None:
                self.maps.forget(ev.path)
        return True

    # -- listing and publishing ------------------------------------------------

    def listing(self, mid: int, list_id: int) -> Iterator[F.Event]:
        """The mirror's entries and the resumable partials held for the
        peer, then ListEnd (commit first, so the listing shows it)."""
        count = 0
        walk = scan_stat(os.fsencode(self.root.path), Excludes(()))
        for rel, st, hint in first_names(walk):
            # A file's target: the first name of its inode, if it has more.
            target = st.target or hint
            yield F.Entry(mid, st.kind, st.mode, st.size, st.mtime_ns, st.uid, st.gid, rel, target)
            count += 1
        for held in self.inbox.partials():
            yield F.Partial(mid, held.held, held.version, held.path)
        yield F.ListEnd(mid, list_id, count)

    def bulk_under_way(self) -> bool:
        """Files not from the peer's live lane are being received or wait
        to be published (groupcommit.py)."""
        return bool(self.publisher.pending_bulk) or any(not p.live for p in self.files.values())

    def commit(self, live_only: bool = False) -> list[Answer]:
        """Publish what is pending (``live_only``: the live files and the
        namespace operations applied; Publisher.commit): acks in effect
        order, then refusals."""
        pub = self.publisher
        if not pub.pending or (live_only and not pub.pending_live and not pub.pending_ops):
            return []
        out = pub.commit(live_only)
        self.stats.commits += 1
        if self.recorder is not None:
            self.recorder.published(out.acked)
        answers: list[Answer] = []
        if self.agree:
            items = [self.agree.pop(op) for op in out.acked if op in self.agree]
            for op, _ in out.failed:
                self.agree.pop(op, None)
            if items:  # told before the Acks
                answers.append(Tell(AgreedWith(self.peer, self.name, tuple(items))))
        answers += [Ack(op) for op in out.acked]
        answers += [Refuse(op, err.code, f"mirror {self.name!r}: {err}") for op, err in out.failed]
        return answers

    # -- helpers ---------------------------------------------------------------

    def _tell(
        self, path: bytes, state: EntryState | None, src: bytes | None = None
    ) -> list[Answer]:
        """The peer holds ``path`` as ``state`` now: tell our link to it
        (echo suppression)."""
        if not self.two_way:
            return []
        return [Tell(PeerHas(self.peer, self.name, path, state, src))]

    def _keep_on_delete(self, path: bytes, parts: tuple[bytes, ...]) -> bool:
        """Two-way: the peer deleted ``path``, but it is new or changed
        here since the version last agreed (for a directory: anything
        below it)."""
        local = self._local(parts)
        if keep_local_on_delete(local, self.base(path)):
            return True
        if local is None or local.kind is not F.EntryKind.DIR:
            return False
        below = scan(os.fsencode(self.root.path), Excludes(()), path)
        return changed_below(below, self.base) is not None

    def _local(self, parts: tuple[bytes, ...]) -> EntryState | None:
        try:
            st = self.root.lstat(parts)
        except (OSError, BadPath):
            return None
        return None if st is None else EntryState.from_stat(st)


def admit(
    cfg: Config,
    name: str,
    peer: str,
    stats: SessionStats,
    marker_ok: Callable[[str], bool],
    make_room: Callable[[int], str | None],
    base: Callable[[str, bytes], Base],
) -> ReceivingMirror:
    """Open mirror ``name`` for ``peer`` to push into, or raise ``Refused``.

    ``marker_ok(name)``: the mirror's marker is there (its disk is mounted).
    ``make_room(n)``: free ``n`` descriptors, or say why the connection
    cannot. ``base(name, path)``: what the peer last had at ``path``."""
    mcfg = cfg.mirrors.get(name)
    me = cfg.node.name
    if mcfg is None:
        raise Refused(
            F.ErrorCode.UNKNOWN_MIRROR,
            f"node {me!r} has no mirror {name!r}",
            f"peer {peer} pushes mirror {name!r}, which this node does not have",
        )
    if peer not in mcfg.accept_from:
        msg = (
            f"node {me!r} does not accept mirror {name!r} from {peer!r} "
            f"(add it to mirrors.{name}.accept_from)"
        )
        raise Refused(F.ErrorCode.FORBIDDEN, msg, f"refused: {msg}")
    if not marker_ok(name):
        msg = (
            f"mirror {name!r} on {me!r}: its marker is missing in {mcfg.path} "
            "(disk not mounted?); refusing to write into it"
        )
        raise Refused(F.ErrorCode.IO_ERROR, msg, level=logging.ERROR)
    # Room for this mirror and, after that, for every partial file the
    # protocol allows in flight plus one operation's walk.
    short = make_room(MIRROR_FDS + F.MAX_OPEN_FILES + OP_FDS)
    if short is not None:
        raise Refused(F.ErrorCode.LIMIT, f"mirror {name!r} on {me!r}: {short}")
    try:
        root = paths.Root(mcfg.path)
    except OSError as e:
        msg = f"mirror {name!r} on {me!r}: cannot open {mcfg.path}: {e.strerror}"
        raise Refused(F.ErrorCode.IO_ERROR, msg, level=logging.ERROR) from e
    try:
        inbox = Inbox(root, peer, Preserve.from_names(mcfg.preserve))
    except OSError as e:
        root.close()
        msg = f"mirror {name!r} on {me!r}: cannot create partial folder: {e.strerror}"
        raise Refused(F.ErrorCode.IO_ERROR, msg, level=logging.ERROR) from e
    db = database(cfg.node.state_dir)
    maps = PublishedMaps(db, name)
    two_way = peer in mcfg.push_to
    return ReceivingMirror(
        name,
        peer,
        me,
        root,
        inbox,
        Publisher(root, inbox, maps),
        stats,
        two_way=two_way,
        base=lambda path: base(name, path),
        maps=maps,
        owner_names=mcfg.owners == "names",
        recorder=Recorder(name, peer, me, ConflictLog(db)) if two_way else None,
    )
