"""Confining paths from the wire to a mirror root.

A path from a peer is only ever used as a list of components, each opened
relative to its parent's directory fd with O_NOFOLLOW: no string is ever
handed to the kernel as a whole path, so neither ``..`` nor a symlink planted
in the replica can lead outside the root. ``check`` rejects what is not a
plain relative path before any file system call is made.

This module must never follow a symlink in a path that came from the wire.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator

from .errors import BadPath
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
        self.fd = os.open(path, _DIR_FLAGS)
        self._cache: OrderedDict[tuple[bytes, ...], int] = OrderedDict()
        self._stale: list[int] = []

    def close(self) -> None:
        self.forget()
        self.reap()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

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


def remove_at(dir_fd: int, name: bytes) -> bool:
    """Remove ``name`` in ``dir_fd``, recursively, never following symlinks.

    Iterative (an explicit stack of directory fds): a tree 2,000 levels deep
    is legal (PATH_MAX) and must not exhaust Python's recursion limit."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
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
    finally:
        for fd, *_ in stack:
            os.close(fd)
    return True


def _listdir(fd: int) -> Iterator[bytes]:
    # os.listdir(fd) returns str names; re-encode to keep them as bytes.
    return iter([os.fsencode(name) for name in os.listdir(fd)])
