"""Confinement to a mirror root, on both sides of a link.

Every mirror is written by people we do not trust: a peer (over the wire)
and local users (on disk). So a path inside a mirror is only ever used as a
list of components, each opened relative to its parent's directory fd with
O_NOFOLLOW: no string longer than one component is ever handed to the
kernel, so neither ``..``, nor a symlink planted in a directory's place, nor
a path longer than PATH_MAX can lead anywhere but the entry it names inside
the root. Only the mirror root itself (the operator's configured path) is
opened as a whole path.

- ``check`` rejects what is not a plain relative path before any file
  system call is made (paths from the wire).
- ``Root`` is the receiving side's view: confined operations with a cache
  of parent directory fds, invalidated by the receiver's own shape changes.
- ``Source`` is the sending side's view: lookups, opens and ``walk`` go from
  a freshly opened root fd each time and cache nothing, because other
  processes reshape the tree under it at any moment.

This module must never follow a symlink below a mirror root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator

from .errors import BadPath
from .fd import OwnedFd
from .frames import MAX_NAME, MAX_PATH

#: The daemon's own folder inside every mirror root: partial files, sidecars,
#: the marker. Never replicated, never accepted from the wire.
STATE_DIR = b".replicator"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check(path: bytes) -> tuple[bytes, ...]:
    """The components of a wire path, or BadPath saying what is wrong with it."""
    if not path:
        raise BadPath("empty path")
    if len(path) > MAX_PATH:
        raise BadPath(f"path of {len(path)} bytes exceeds {MAX_PATH}")
    if b"\0" in path:
        raise BadPath(f"path {path!r} contains a NUL byte")
    if path.startswith(b"/"):
        raise BadPath(f"path {path!r} is absolute")
    parts = tuple(path.split(b"/"))
    for part in parts:
        if part in (b"", b".", b".."):
            raise BadPath(f"path {path!r} has a {part.decode() or 'empty'!r} component")
        if len(part) > MAX_NAME:
            raise BadPath(f"path {path!r} has a component longer than {MAX_NAME} bytes")
    if parts[0] == STATE_DIR:
        raise BadPath(f"path {path!r} is inside the daemon's own {STATE_DIR.decode()} folder")
    return parts


def show(path: bytes) -> str:
    """A path for logs and messages (undecodable bytes escaped)."""
    return path.decode("utf-8", "backslashreplace")


#: errno values that mean "there is no such entry inside the mirror": it is
#: gone, or a component is not a directory, or a component is a symlink.
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


def open_regular(dir_fd: int, name: bytes) -> tuple[OwnedFd, os.stat_result] | None:
    """``name`` in ``dir_fd`` open for reading if it is a regular file (never
    through a symlink), and its fstat; None if it is gone or something else."""
    try:
        # O_NONBLOCK: a fifo swapped in must not block us in open().
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd
        )
    except OSError as e:
        if e.errno in _ABSENT or e.errno == errno.ENXIO:  # ENXIO: a socket or fifo
            return None
        raise
    with OwnedFd(fd) as f:  # closed unless handed out below
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return OwnedFd(f.detach()), st


def open_root(root: bytes | str) -> int:
    """A directory fd for a configured mirror root. The operator's path is
    trusted and resolved as usual; nothing below it ever is."""
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir_at(
    dir_fd: int, parts: tuple[bytes, ...] | list[bytes], mkdir_mode: int | None = None
) -> int:
    """A new fd for the directory ``parts`` below ``dir_fd``, each component
    opened no-follow (the caller closes it). OSError with ENOENT, ENOTDIR or
    ELOOP when a component is missing, not a directory, or a symlink. With
    ``mkdir_mode``, missing components are made with that mode first."""
    fd = os.dup(dir_fd)
    try:
        for part in parts:
            if mkdir_mode is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mkdir_mode, dir_fd=fd)
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


class Located:
    """An entry found inside a mirror: the fd of its parent directory (held
    open, so later looks at the entry need no new walk) and its name.

    The fd is owned (closed by ``close``), or borrowed from a ``DirFds``
    (``owned=False``: valid until that closes it at the end of the pump
    round; ``close`` leaves it open, ``own`` makes a copy that outlives
    the round)."""

    __slots__ = ("_fd", "_owned", "name", "st", "target")

    def __init__(
        self, dir_fd: int, name: bytes, st: os.stat_result, target: bytes, owned: bool = True
    ) -> None:
        if dir_fd < 0:
            raise ValueError(f"not a file descriptor: {dir_fd}")
        self._fd = dir_fd
        self._owned = owned
        self.name = name
        #: lstat when it was found
        self.st = st
        #: symlink target, b"" for anything else
        self.target = target

    @property
    def dir_fd(self) -> int:
        """The parent directory's fd; -1 once closed or taken."""
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0 and self._owned:
            os.close(fd)

    def take(self) -> Located:
        """A new holder of the directory fd (its owner if this one owned
        it); this one closes nothing any more."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            raise ValueError("Located: closed or taken already")
        return Located(fd, self.name, self.st, self.target, self._owned)

    def own(self) -> Located:
        """This, if it owns its fd; else one owning a copy of the borrowed fd
        (this one lets go of it)."""
        if self._owned:
            return self
        fd, self._fd = self._fd, -1
        if fd < 0:
            raise ValueError("Located: closed or taken already")
        return Located(os.dup(fd), self.name, self.st, self.target)

    def open_file(self) -> tuple[OwnedFd, os.stat_result] | None:
        """A read-only fd and fstat of the entry if it is a regular file now;
        None if it is gone or something else (look at it again)."""
        return open_regular(self._fd, self.name)

    def inode(self) -> int | None:
        """The inode number under this name in its directory now, or None."""
        try:
            return os.stat(self.name, dir_fd=self._fd, follow_symlinks=False).st_ino
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise


class DirFds:
    """Directory fds of one mirror, found during one short stretch of work
    (a pump round: at most a few ms) and closed at its end (``close``).

    Looking up the paths of a tree one by one walks the same directories
    again and again (an open and a close per component: ~70 µs per entry
    on a real tree, measured for issue 13). Within a stretch, a directory
    found once is reused, and a new one is opened from its nearest found
    ancestor, no-follow like any other walk. A rename that happens
    meanwhile is seen as if it happened right after the lookup, which a
    held ``Located`` allows anyway; once closed, every lookup walks anew.
    """

    #: Directories held at most (the oldest are closed beyond).
    MAX = 64

    def __init__(self, root: bytes) -> None:
        self.root = root
        self._fds: OrderedDict[bytes, OwnedFd] = OrderedDict()

    def borrow(self, rel: bytes) -> tuple[int, bytes]:
        """(the fd of the parent directory of ``rel``, its last component):
        held here, valid until ``close`` (the caller does not close it).
        OSError as ``Source._parent``."""
        head, _, name = rel.rpartition(b"/")
        return self._dir(head), name

    def readahead(self, rel: bytes, length: int) -> None:
        """Ask the kernel to read the first ``length`` bytes of ``rel`` into
        the page cache in the background, if it is a regular file (opened
        no-follow, and only after lstat said so: never a device or fifo).
        Errors are ignored: it is only a hint."""
        head, _, name = rel.rpartition(b"/")
        try:
            dfd = self._dir(head)
            if not stat.S_ISREG(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                return
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd
            )
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _dir(self, rel: bytes) -> int:
        fds = self._fds
        held = fds.get(rel)
        if held is not None:
            fds.move_to_end(rel)
            return held.fd
        # The nearest ancestor held (or the root), then one component at a
        # time, no-follow; every directory opened on the way is kept too, so
        # the next lookup in a sibling opens only what differs (a tree's
        # leaves are often 5-9 levels down: walking again from the root
        # cost ~2.5 opens and closes per entry of a real tree; issue 13).
        up, rest = rel, []
        while up:
            up, _, part = up.rpartition(b"/")
            rest.append(part)
            if up in fds:
                break
        base = fds.get(up)  # None: up is the root, not held yet
        fd = self._keep(b"", open_root(self.root)) if base is None else base.fd
        for part in reversed(rest):
            up = up + b"/" + part if up else part
            fd = self._keep(up, os.open(part, _DIR_FLAGS, dir_fd=fd))
        return fd

    def _keep(self, rel: bytes, fd: int) -> int:
        """Hold ``fd`` as the directory ``rel``, closing the least recently
        used beyond MAX (never this one: it is the newest)."""
        fds = self._fds
        fds[rel] = OwnedFd(fd)
        if len(fds) > self.MAX:
            fds.popitem(last=False)[1].close()
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            fd.close()
        self._fds.clear()


def _found_at(dir_fd: int, name: bytes) -> tuple[os.stat_result, bytes] | None:
    """(lstat, symlink target or b"") of ``name`` in ``dir_fd``; None if
    nothing is there."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else b""
    except OSError as e:
        if e.errno in _ABSENT or e.errno == errno.EINVAL:  # EINVAL: not a symlink any more
            return None
        raise
    return st, target


class Source:
    """A mirror root on the sending side.

    The tree is written by local users and two-way peers while we read it,
    so no directory fd outlives a lookup, except in ``dirs`` (``DirFds``:
    a few ms): each lookup opens the root and walks down component by
    component with no-follow. A path that passes through a symlink names
    nothing (the symlink is replicated as a symlink at its own path). Costs
    an open and a close per component and lookup, and is never wrong
    after a rename.
    """

    def __init__(self, root: bytes, dirs: DirFds | None = None) -> None:
        self.path = root
        self._dirs = dirs

    def _parent(self, rel: bytes) -> tuple[int, bytes]:
        """(an fd of the parent directory of ``rel``, the last component);
        the caller closes the fd. Raises OSError (see _ABSENT)."""
        parts = rel.split(b"/")
        with OwnedFd(open_root(self.path)) as root:
            if len(parts) == 1:
                return root.detach(), parts[0]
            return open_dir_at(root.fd, parts[:-1]), parts[-1]

    def locate(self, rel: bytes) -> Located | None:
        """The entry at ``rel`` with its parent directory held open, or None
        if nothing is there. The caller closes it. With ``dirs``, the
        directory fd is borrowed from them (``Located.own`` to keep it
        beyond their round)."""
        if self._dirs is not None:
            try:
                pfd, name = self._dirs.borrow(rel)
            except OSError as e:
                if e.errno in _ABSENT:
                    return None
                raise
            found = _found_at(pfd, name)
            return None if found is None else Located(pfd, name, *found, owned=False)
        try:
            pfd, name = self._parent(rel)
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise
        with OwnedFd(pfd) as parent:  # closed unless the Located takes it
            found = _found_at(pfd, name)
            return None if found is None else Located(parent.detach(), name, *found)

    def lstat(self, rel: bytes) -> tuple[os.stat_result, bytes] | None:
        """(lstat, symlink target or b"") of ``rel``; None if nothing is there."""
        found = self.locate(rel)
        if found is None:
            return None
        found.close()
        return found.st, found.target

    def open_file(self, rel: bytes) -> tuple[int, os.stat_result] | None:
        """A read-only fd and fstat of the regular file ``rel``; None if it is
        gone or not a regular file any more (look at it again)."""
        found = self.locate(rel)
        if found is None:
            return None
        try:
            opened = found.open_file()
        finally:
            found.close()
        return None if opened is None else (opened[0].detach(), opened[1])

    def listing(self, rel: bytes) -> dict[bytes, os.stat_result] | None:
        """Name → lstat of the directory ``rel`` (b"" for the root); None if
        it is not a directory inside the mirror any more."""
        try:
            rfd = open_root(self.path)
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise
        with OwnedFd(rfd):
            try:
                fd = open_dir_at(rfd, rel.split(b"/") if rel else ())
            except OSError as e:
                if e.errno in _ABSENT:
                    return None
                raise
        with OwnedFd(fd):
            return dict(_entries(fd))

    def walk(
        self, skip: Callable[[bytes], bool], top: bytes = b""
    ) -> Iterator[tuple[bytes, os.stat_result, int, bytes]]:
        """See ``walk``; a missing root or ``top`` yields nothing."""
        try:
            rfd = open_root(self.path)
        except OSError as e:
            if e.errno in _ABSENT:
                return
            raise
        with OwnedFd(rfd):
            yield from walk(rfd, skip, top)


def walk(
    root_fd: int, skip: Callable[[bytes], bool], top: bytes = b""
) -> Iterator[tuple[bytes, os.stat_result, int, bytes]]:
    """Every entry below ``top`` of the tree at ``root_fd``, parents before
    children, as (relative path, lstat, fd of its directory, its name). The
    directory fd is valid only until the next item: use it at once (readlink).

    Walks by directory fds only, no-follow at every step: a directory
    swapped for a symlink is not entered, and depth is bounded by the tree,
    not by PATH_MAX. Entries that vanish mid-walk are skipped; entries for
    which ``skip(rel)`` is true are neither yielded nor entered. Holds one fd
    per level of the current branch."""
    try:
        first = open_dir_at(root_fd, top.split(b"/") if top else ())
    except OSError as e:
        if e.errno in _ABSENT:
            return
        raise
    # (directory fd, its relative path, names of its subdirectories to enter)
    stack: list[tuple[int, bytes, Iterator[bytes]]] = []
    fd, rel_dir = first, top
    try:
        while True:
            subdirs: list[bytes] = []
            for name, st in _entries(fd):
                rel = rel_dir + b"/" + name if rel_dir else name
                if skip(rel):
                    continue
                yield rel, st, fd, name
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(name)
            stack.append((fd, rel_dir, iter(subdirs)))
            fd = -1
            while stack and fd < 0:
                pfd, prel, names = stack[-1]
                child = next(names, None)
                if child is None:
                    stack.pop()
                    os.close(pfd)
                    continue
                try:
                    fd = os.open(child, _DIR_FLAGS, dir_fd=pfd)
                except OSError as e:
                    if e.errno not in _ABSENT:
                        raise
                    continue  # gone, or swapped for a symlink or a file
                rel_dir = prel + b"/" + child if prel else child
            if fd < 0:
                return
    finally:
        if fd >= 0:
            os.close(fd)
        for pfd, _, _ in stack:
            os.close(pfd)


def _entries(dir_fd: int) -> Iterator[tuple[bytes, os.stat_result]]:
    """(name, lstat) of each entry of the directory ``dir_fd``."""
    with os.scandir(dir_fd) as it:
        for de in it:
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield os.fsencode(de.name), st


class Root:
    """A mirror root on the receiving side, with confined operations.

    Directory fds of recently used parents are cached (small files arrive by
    the thousand in the same folders); any operation that can change the
    shape of the tree (delete, rename, a type change) clears the cache with
    ``forget()``. Forgotten fds stay open until ``reap()``, so an fd obtained
    earlier in the same operation is never closed under its user.
    """

    CACHE = 256

    def __init__(self, path: str) -> None:
        self.path = path
        self._root = OwnedFd(os.open(path, _DIR_FLAGS))
        self._cache: OrderedDict[tuple[bytes, ...], int] = OrderedDict()
        self._stale: list[int] = []

    @property
    def fd(self) -> int:
        """The root directory's fd; -1 once closed."""
        return self._root.fd

    def close(self) -> None:
        self.forget()
        self.reap()
        self._root.close()

    def forget(self) -> None:
        """Drop cached directory fds (the tree's shape may have changed)."""
        while self._cache:
            _, fd = self._cache.popitem()
            self._stale.append(fd)

    def reap(self) -> None:
        """Close forgotten fds (call between operations)."""
        stale, self._stale = self._stale, []
        for fd in stale:
            os.close(fd)

    def parent(self, parts: tuple[bytes, ...], create: bool) -> int:
        """A directory fd for the parent of ``parts`` (owned by the cache: do
        not close it). With ``create``, missing directories are made (0755)."""
        key = parts[:-1]
        fd = self._cache.get(key)
        if fd is not None:
            self._cache.move_to_end(key)
            return fd
        fd = self._walk(key, create)
        if key:
            self._cache[key] = fd
            if len(self._cache) > self.CACHE:
                self._stale.append(self._cache.popitem(last=False)[1])
        return fd

    def _walk(self, parts: tuple[bytes, ...], create: bool) -> int:
        if not parts:
            return self.fd
        # Start from the longest cached prefix.
        cur, start = self.fd, 0
        for i in range(len(parts) - 1, 0, -1):
            cached = self._cache.get(parts[:i])
            if cached is not None:
                cur, start = cached, i
                break
        owned = -1
        try:
            for part in parts[start:]:
                nxt = self._open_dir(cur, part, create)
                if owned >= 0:
                    os.close(owned)
                owned = cur = nxt
        except BaseException:
            if owned >= 0:
                os.close(owned)
            raise
        return os.dup(cur) if owned < 0 else owned

    def _open_dir(self, dir_fd: int, name: bytes, create: bool) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise BadPath(
                    f"component {show(name)!r} is a symlink in the replica; "
                    "paths are never resolved through symlinks"
                ) from None
            # A file where the path needs a directory: a type change the
            # sender has not replicated yet. Not an attack, a conflict.
            raise NotADirectoryError(errno.ENOTDIR, f"{show(name)!r} is not a directory") from None
        try:
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        except FileExistsError:
            pass
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)

    def lstat(self, parts: tuple[bytes, ...]) -> os.stat_result | None:
        try:
            pfd = self.parent(parts, create=False)
            return os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def open_file(self, parts: tuple[bytes, ...]) -> tuple[OwnedFd, os.stat_result] | None:
        """The regular file at ``parts``, open for reading (never through a
        symlink), and its fstat; None if there is none."""
        try:
            pfd = self.parent(parts, create=False)
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise
        return open_regular(pfd, parts[-1])


def remove_at(
    dir_fd: int, name: bytes, unlinked: Callable[[os.stat_result], None] | None = None
) -> bool:
    """Remove ``name`` in ``dir_fd``, recursively, never following symlinks;
    ``unlinked`` is told the lstat of every non-directory it removes.

    Iterative (an explicit stack of directory fds): a tree 2,000 levels deep
    is legal (PATH_MAX) and must not exhaust Python's recursion limit."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        if unlinked is not None:
            unlinked(st)
        return True
    top = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    # (fd of a directory, fd of its parent, its name, its remaining children)
    stack: list[tuple[int, int, bytes, Iterator[bytes]]] = [(top, dir_fd, name, _listdir(top))]
    try:
        while stack:
            fd, parent, dname, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                os.close(fd)
                os.rmdir(dname, dir_fd=parent)
                continue
            try:
                cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(cst.st_mode):
                cfd = os.open(child, _DIR_FLAGS, dir_fd=fd)
                stack.append((cfd, fd, child, _listdir(cfd)))
            else:
                os.unlink(child, dir_fd=fd)
                if unlinked is not None:
                    unlinked(cst)
    finally:
        for fd, *_ in stack:
            os.close(fd)
    return True


def _listdir(fd: int) -> Iterator[bytes]:
    # os.listdir(fd) returns str names; re-encode to keep them as bytes.
    return iter([os.fsencode(name) for name in os.listdir(fd)])
