"""Receiving side of a mirror: atomic publish, group commit.

Incoming file data lands in partial files (inbox.py). Publishing a file
means: mode, owner and mtime set on the partial, its data made durable,
renamed into place, the directory made durable — and only then the Ack.
``Publisher`` does this for many files at once (one sync round for a whole
group), which is where small-file speed comes from.

Never: publish a file that has not been fsynced; publish a file whose sender
aborted it; write anywhere but through ``paths.Root``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import frames as F
from .blockmap import BlockMap
from .conflicts import Decision, Verdict
from .errors import ApplyError, BadPath
from .inbox import IS_ROOT, SYNCFS_MIN, Inbox, PartialFile, apply_error, syncfs
from .manifest import TEMP_PREFIX, Preserve
from .maps import DELTA_MIN, Identity, PublishedMaps
from .paths import Root, remove_at, show
from .xattrs import Pairs
from .xattrs import apply as apply_xattrs

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Round:
    files: list[PartialFile] = field(default_factory=list)
    #: Operations applied but not yet durable, acked after the next sync.
    ops: list[int] = field(default_factory=list)
    #: Directories whose entries changed (dup'ed fds; closed after the sync).
    dirs: dict[tuple[int, int], int] = field(default_factory=dict)
    nbytes: int = 0
    #: Directories were made on the way to a path (Root.parent): only a
    #: syncfs makes the whole new chain durable.
    tree_grew: bool = False
    paths: set[tuple[bytes, ...]] = field(default_factory=set)
    #: Of ``files``, those from the peer's live lane.
    live: int = 0
    #: Meta operations waiting for the files at or below their path to be
    #: placed (a directory's mtime is set after its entries changed).
    deferred: list[tuple[F.Meta, tuple[bytes, ...], Pairs | None]] = field(default_factory=list)
    #: Every path of ``files`` and ``deferred`` and each of its parents:
    #: how many of them are at or below it.
    below: dict[tuple[bytes, ...], int] = field(default_factory=dict)

    def add(self, p: PartialFile) -> None:
        self.files.append(p)
        self.nbytes += p.size
        self.paths.add(p.parts)
        self.live += p.live
        self._count(p.parts)

    def _count(self, parts: tuple[bytes, ...]) -> None:
        below = self.below
        for i in range(1, len(parts) + 1):
            key = parts[:i]
            below[key] = below.get(key, 0) + 1

    def defer(self, ev: F.Meta, parts: tuple[bytes, ...], attrs: Pairs | None) -> None:
        self.deferred.append((ev, parts, attrs))
        self._count(parts)

    def applied(self, op: int) -> None:
        """Namespace operation ``op`` was applied; it is acked with this round."""
        self.ops.append(op)

    def split_live(self) -> tuple[_Round, _Round]:
        """This round as two: the live files with the namespace operations
        applied so far and their directories (those operations depend on
        nothing still waiting: ``related``), then the bulk files with the
        deferred Meta operations."""
        live, bulk = _Round(), _Round()
        for p in self.files:
            (live if p.live else bulk).add(p)
        live.ops, live.dirs, live.tree_grew = self.ops, self.dirs, self.tree_grew
        for ev, parts, attrs in self.deferred:
            bulk.defer(ev, parts, attrs)
        return live, bulk

    def holds(self, parts: tuple[bytes, ...]) -> bool:
        """A file of this round will be published at ``parts`` or above it."""
        return bool(self.paths) and any(parts[:i] in self.paths for i in range(1, len(parts) + 1))

    def under(self, parts: tuple[bytes, ...]) -> bool:
        """A file or deferred operation of this round is at ``parts`` or below."""
        return parts in self.below

    def related(self, parts: tuple[bytes, ...]) -> bool:
        """An operation on ``parts`` must wait for this round: a file of it
        will be published at, above or below ``parts``, or a deferred Meta
        will be applied at or below it."""
        return self.under(parts) or self.holds(parts)


@dataclass(frozen=True)
class Outcome:
    """Result of a commit round: ops now durable (in effect order), ops that failed."""

    acked: list[int]
    failed: list[tuple[int, ApplyError]]


class Publisher:
    """Applies one peer's operations to one mirror, durably, in groups."""

    def __init__(self, root: Root, inbox: Inbox, maps: PublishedMaps | None = None) -> None:
        self.root = root
        self.inbox = inbox
        #: Where the block maps of published files are remembered (deltas).
        self.maps = maps

        self._round = _Round()

    @property
    def pending(self) -> int:
        r = self._round
        return len(r.files) + len(r.ops) + len(r.deferred)

    @property
    def pending_bytes(self) -> int:
        return self._round.nbytes

    @property
    def pending_live(self) -> int:
        """Files from the peer's live lane waiting (PartialFile.live)."""
        return self._round.live

    @property
    def pending_ops(self) -> int:
        """Namespace operations applied, waiting to be durable (a live
        commit takes them along)."""
        return len(self._round.ops)

    @property
    def pending_bulk(self) -> int:
        """Files not from the live lane waiting."""
        return len(self._round.files) - self._round.live

    def _note_dir(self, fd: int, r: _Round | None = None) -> None:
        """Directory ``fd``'s entries changed: sync it with round ``r`` (the
        one being committed) or else the pending one."""
        dirs = (self._round if r is None else r).dirs
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key not in dirs:
            dirs[key] = os.dup(fd)

    def add_file(self, p: PartialFile, decision: Decision | None = None) -> None:
        """``p`` is complete: publish it with the next commit round (in a
        two-way mirror, as ``decision`` says)."""
        p.finish()
        p.decision = decision
        self._round.add(p)

    def blocks(self, parts: tuple[bytes, ...]) -> bool:
        """Whether a file waiting in this round will be published at
        ``parts`` or at one of its parents: an operation there must wait for
        the round, or the late rename would undo it."""
        return self._round.holds(parts)

    def related(self, parts: tuple[bytes, ...]) -> bool:
        """Whether an operation that replaces or removes ``parts`` must wait
        for this round: a waiting file will be published at, above or below
        it, or a deferred Meta applied at or below it."""
        return self._round.related(parts)

    def under(self, parts: tuple[bytes, ...]) -> bool:
        """Whether a waiting file or deferred Meta is at ``parts`` or below
        it (a Meta of ``parts`` is then deferred: ``defer_meta``)."""
        return self._round.under(parts)

    def add_noop(self, op: int) -> None:
        """Acknowledge ``op`` with the next round without changing anything."""
        self._round.ops.append(op)

    def commit(self, live_only: bool = False) -> Outcome:
        """Make everything pending durable and visible; report what to ack.
        ``live_only``: only the live files and the namespace operations
        applied so far, each file with its own fsync and the directories
        with theirs: a syncfs would also flush the bulk data being written,
        which is what makes a live commit under load slow. The bulk files
        and the Meta operations deferred for them wait."""
        if live_only:
            r, self._round = self._round.split_live()
        else:
            r, self._round = self._round, _Round()
        failed: list[tuple[int, ApplyError]] = []
        files = _sync_files(self.inbox.fd, r.files, failed, syncfs_ok=not live_only)
        acked: list[int] = []
        remember: list[tuple[bytes, Identity, BlockMap]] = []
        for p in files:
            try:
                self._place(p, r)
            except (OSError, BadPath, ApplyError) as e:
                failed.append((p.op, _as_apply_error(e, p.path)))
                p.discard()
                continue
            applied = p.decision is None or p.decision.verdict is not Verdict.INCOMING_AS_COPY
            if p.bmap is not None and p.size >= DELTA_MIN and applied:
                with contextlib.suppress(OSError):
                    # After the rename, which changed its ctime.
                    remember.append((p.path, Identity.of(os.fstat(p.fd)), p.bmap))
            p.close()
            if p.resumable:
                self.inbox.remove(p.name)
            acked.append(p.op)
        if remember and self.maps is not None:
            try:
                self.maps.put_many(remember)
            except sqlite3.Error as e:
                # Only deltas are lost: the next change is sent whole.
                log.warning(
                    "cannot remember block maps of %d published files: %s", len(remember), e
                )
        # Deferred Meta operations: after the files below their paths.
        later: list[int] = []
        for ev, parts, attrs in r.deferred:
            try:
                self._meta(ev, parts, attrs, r)
            except (OSError, BadPath, ApplyError) as e:
                failed.append((ev.op, _as_apply_error(e, ev.path)))
                continue
            later.append(ev.op)
        try:
            _sync_dirs(self.root.fd, r, syncfs_ok=not live_only)
        except OSError as e:
            err = apply_error(e, "syncing directories")
            failed.extend((op, err) for op in r.ops + acked + later)
            return Outcome([], failed)
        finally:
            for fd in r.dirs.values():
                os.close(fd)
            self.root.reap()
        # Acks go out in the order the effects happened: namespace operations
        # were applied when they arrived, files only now. The sender relies on
        # it (an entry's ack after its parent's tells it the parent's mtime
        # changed on the replica); a deferred Meta comes after the files.
        return Outcome(r.ops + acked + later, failed)

    def _place(self, p: PartialFile, r: _Round) -> None:
        """Rename ``p`` into place (or beside it, as its decision says)."""
        parent = self._parent(p.parts, r)
        name = p.parts[-1]
        verdict = p.decision.verdict if p.decision else Verdict.APPLY
        if verdict is Verdict.INCOMING_AS_COPY:
            assert p.decision is not None
            name = p.decision.copy_name
        elif verdict is Verdict.KEEP_LOCAL_COPY:
            # A hard link, not a rename: the watcher must see a new file (the
            # copy travels to the peer), not a move of the path it wins.
            assert p.decision is not None
            copy = p.decision.copy_name
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy, dir_fd=parent)
            with contextlib.suppress(FileNotFoundError):
                os.link(name, copy, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
        self._clear_for(parent, name, want_dir=False)
        os.rename(p.name + b".part", name, src_dir_fd=self.inbox.fd, dst_dir_fd=parent)
        self._note_dir(parent, r)

    def _parent(self, parts: tuple[bytes, ...], r: _Round) -> int:
        try:
            return self.root.parent(parts, create=False)
        except FileNotFoundError:
            r.tree_grew = True
            return self.root.parent(parts, create=True)

    def _clear_for(self, parent: int, name: bytes, want_dir: bool) -> None:
        """Make room for ``name``: a type change removes what is there."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode) and not want_dir:
            self.root.forget()
            remove_at(parent, name)

    # -- namespace operations (applied now, durable with the next round) ----

    def _with_errors(self, what: bytes) -> contextlib.AbstractContextManager[None]:
        return _translate(show(what), self.root)

    def mkdir(self, ev: F.Mkdir, parts: tuple[bytes, ...], attrs: Pairs | None = None) -> None:
        """Make the directory (``attrs``: its extended attributes, if the
        mirror preserves them; xattrs.py)."""
        with self._with_errors(ev.path):
            parent = self._parent(parts, self._round)
            name = parts[-1]
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=parent)
                    raise FileNotFoundError
            except FileNotFoundError:
                os.mkdir(name, 0o700, dir_fd=parent)
                # Synced with its parent: the new directory's own inode too.
                made = os.open(name, _DIR_FLAGS, dir_fd=parent)
                try:
                    self._note_dir(made)
                finally:
                    os.close(made)
            self._set_meta(parent, name, ev.mode, ev.mtime_ns, ev.uid, ev.gid, attrs)
            self._note_dir(parent)
            self._round.applied(ev.op)

    def symlink(self, ev: F.Symlink, parts: tuple[bytes, ...]) -> None:
        with self._with_errors(ev.path):
            parent = self._parent(parts, self._round)
            name = parts[-1]
            tmp = TEMP_PREFIX + hashlib.sha256(name).hexdigest()[:16].encode() + b".lnk"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=parent)
            os.symlink(ev.target, tmp, dir_fd=parent)
            if IS_ROOT and self.inbox.preserve & Preserve.OWNERS:
                os.chown(tmp, ev.uid, ev.gid, dir_fd=parent, follow_symlinks=False)
            os.utime(tmp, ns=(ev.mtime_ns, ev.mtime_ns), dir_fd=parent, follow_symlinks=False)
            self._clear_for(parent, name, want_dir=False)
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            self._note_dir(parent)
            self._round.applied(ev.op)

    def hardlink(self, ev: F.HardLink, parts: tuple[bytes, ...], target: tuple[bytes, ...]) -> None:
        """Make ``parts`` another name of the published regular file at
        ``target``: linked to a temp name beside it, checked, renamed over
        it, durable with the round's directory sync (like a symlink)."""
        with self._with_errors(ev.path):
            self.root.forget()  # walk again: a cached directory may have moved
            tparent, tname = self._link_target(ev, target)
            parent = self._parent(parts, self._round)
            name = parts[-1]
            tmp = TEMP_PREFIX + hashlib.sha256(name).hexdigest()[:16].encode() + b".hln"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=parent)
            # linkat without AT_SYMLINK_FOLLOW: a name swapped for a symlink
            # since the check would be linked itself, never what it points to.
            os.link(tname, tmp, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
            made = os.stat(tmp, dir_fd=parent, follow_symlinks=False)
            if not _same_version(made, ev):
                os.unlink(tmp, dir_fd=parent)
                raise ApplyError(F.ErrorCode.LINK_TARGET, f"{show(ev.target)} changed meanwhile")
            self._clear_for(parent, name, want_dir=False)
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            self._note_dir(parent)
            self._round.applied(ev.op)

    def _link_target(self, ev: F.HardLink, target: tuple[bytes, ...]) -> tuple[int, bytes]:
        """The parent fd and name of ``ev``'s target, reached without
        following a symlink, if it is the regular file and version named."""
        if target[-1].startswith(TEMP_PREFIX):
            raise ApplyError(F.ErrorCode.LINK_TARGET, f"{show(ev.target)} is not published")
        try:
            tparent = self.root.parent(target, create=False)
            st = os.stat(target[-1], dir_fd=tparent, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            raise ApplyError(
                F.ErrorCode.LINK_TARGET, f"no file {show(ev.target)} in the mirror to link to"
            ) from e
        if not stat.S_ISREG(st.st_mode):
            raise ApplyError(F.ErrorCode.LINK_TARGET, f"{show(ev.target)} is not a regular file")
        if not _same_version(st, ev):
            raise ApplyError(
                F.ErrorCode.LINK_TARGET, f"{show(ev.target)} is not the version to link to"
            )
        return tparent, target[-1]

    def meta(self, ev: F.Meta, parts: tuple[bytes, ...], attrs: Pairs | None = None) -> None:
        self._meta(ev, parts, attrs, self._round)
        self._round.applied(ev.op)

    def defer_meta(self, ev: F.Meta, parts: tuple[bytes, ...], attrs: Pairs | None = None) -> None:
        """Apply ``ev`` in the commit round of the files below ``parts``,
        after they are placed (their renames would change the mtime it sets)."""
        self._round.defer(ev, parts, attrs)

    def _meta(self, ev: F.Meta, parts: tuple[bytes, ...], attrs: Pairs | None, r: _Round) -> None:
        with self._with_errors(ev.path):
            parent = self.root.parent(parts, create=False)
            self._set_meta(parent, parts[-1], ev.mode, ev.mtime_ns, ev.uid, ev.gid, attrs)
            self._note_dir(parent, r)

    def delete(self, ev: F.Delete, parts: tuple[bytes, ...]) -> None:
        with self._with_errors(ev.path):
            self.root.forget()
            try:
                parent = self.root.parent(parts, create=False)
            except (FileNotFoundError, NotADirectoryError):
                parent = -1  # already gone: deleting is idempotent
            if parent >= 0:
                remove_at(parent, parts[-1])
                self._note_dir(parent)
            self._round.applied(ev.op)

    def rename(self, ev: F.Rename, src: tuple[bytes, ...], dst: tuple[bytes, ...]) -> None:
        with self._with_errors(ev.src):
            self.root.forget()
            sparent = self.root.parent(src, create=False)
            st = os.stat(src[-1], dir_fd=sparent, follow_symlinks=False)
            dparent = self._parent(dst, self._round)
            self._clear_for(dparent, dst[-1], want_dir=stat.S_ISDIR(st.st_mode))
            os.rename(src[-1], dst[-1], src_dir_fd=sparent, dst_dir_fd=dparent)
            self.root.forget()
            self._note_dir(sparent)
            self._note_dir(dparent)
            self._round.applied(ev.op)

    def _set_meta(
        self,
        parent: int,
        name: bytes,
        mode: int,
        mtime_ns: int,
        uid: int,
        gid: int,
        attrs: Pairs | None = None,
    ) -> None:
        """Apply declared metadata to ``name`` as this mirror's policy allows:
        owners only if it preserves them (else they stay as they are), mode
        without setuid/setgid/sticky unless it preserves those."""
        policy = self.inbox.preserve
        owners = IS_ROOT and bool(policy & Preserve.OWNERS)
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            if owners:
                os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)
            return
        # O_PATH|O_NOFOLLOW pins the very inode we checked; /proc/self/fd
        # lets chmod/utime act on it without resolving the name again.
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            proc = f"/proc/self/fd/{fd}"
            if owners:
                os.chown(proc, uid, gid)
            os.chmod(proc, policy.mode(mode))
            if attrs is not None:
                apply_xattrs(proc, attrs, policy, IS_ROOT)
            os.utime(proc, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)

    def close(self) -> None:
        for p in self._round.files:
            p.close()
        for fd in self._round.dirs.values():
            os.close(fd)
        self._round = _Round()


def _as_apply_error(e: OSError | BadPath | ApplyError, path: bytes) -> ApplyError:
    """What to refuse an operation on ``path`` with, for ``e``."""
    if isinstance(e, ApplyError):
        return e
    if isinstance(e, BadPath):
        return ApplyError(F.ErrorCode.BAD_PATH, str(e))
    return apply_error(e, show(path))


def _same_version(st: os.stat_result, ev: F.HardLink) -> bool:
    return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (ev.size, ev.mtime_ns)


def _sync_files(
    fs_fd: int, files: list[PartialFile], failed: list[tuple[int, ApplyError]], syncfs_ok: bool
) -> list[PartialFile]:
    """Make the data of ``files`` durable (one syncfs of ``fs_fd``'s
    filesystem for many, if ``syncfs_ok``); those that failed go to ``failed``."""
    if syncfs_ok and len(files) >= SYNCFS_MIN:
        try:
            syncfs(fs_fd)
            return files
        except OSError:
            pass  # find out which file(s) failed, one by one
    ok = []
    for p in files:
        try:
            os.fsync(p.fd)
            ok.append(p)
        except OSError as e:
            failed.append((p.op, apply_error(e, show(p.path))))
            p.discard()
    return ok


def _sync_dirs(fs_fd: int, r: _Round, syncfs_ok: bool) -> None:
    if not r.dirs:
        return
    # Directories made for this round: only a syncfs makes the whole
    # new chain durable (their parents' entries too).
    if r.tree_grew or (syncfs_ok and len(r.dirs) >= SYNCFS_MIN):
        syncfs(fs_fd)
        return
    for fd in r.dirs.values():
        os.fsync(fd)


@contextlib.contextmanager
def _translate(what: str, root: Root) -> Iterator[None]:
    try:
        yield
    except BadPath:
        raise
    except OSError as e:
        raise apply_error(e, what) from e
    finally:
        root.reap()
