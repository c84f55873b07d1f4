"""Expiry of partial files the daemon no longer needs.

A receiving session writes into ``<mirror>/.replicator/partial/<peer>/``
(publisher.Inbox) and a session's own listing drops what cannot be resumed;
but nothing else ever looks at those folders again. So, run by the daemon's
main thread at start, after every reload and every ``INTERVAL`` seconds,
``Janitor.run`` removes, in every mirror of the running config:

- the partial folder of a peer that is not (or no longer) in the mirror's
  ``accept_from``, unless a session from that peer still has the mirror
  open (a reload just removed it; the folder goes at the next run);
- in the folders of accepted peers, partial files (``*.part``, their
  ``*.side`` sidecars and ``*.side.tmp``) untouched for ``node.partial_max_age``
  seconds, unless this process holds one of them open (a transfer in
  progress, or being resumed). Writing or resuming a partial updates its
  mtime, so only abandoned ones get that old.

Out of reach: the partials of a mirror removed from the config, because its
path is no longer known. They stay until the mirror comes back (its partials
are then judged as above) or an operator removes
``<path>/.replicator/partial`` by hand.

Mirrors are written by users we do not trust: everything below the mirror
root (the operator's configured path) is opened from directory fds,
component by component, never following a symlink; a symlink planted in
these folders is removed as itself, and nothing it points to is touched.

A partial found expired and not open can still be opened by a session (a
peer resuming it) in the moment between the check and the unlink. That
transfer then fails on the receiver and the sender sends the file again
(from the start, at its next scan): slower, never wrong.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import MirrorConfig
from .paths import STATE_DIR, open_dir_at, open_root, remove_at, show

log = logging.getLogger("replicator")

#: Seconds between two runs of the janitor (besides start and reloads).
INTERVAL = 300.0
#: Name endings of the files in a peer's partial folder (publisher.Inbox).
SUFFIXES = (b".side.tmp", b".part", b".side")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A missing folder, a file where a folder should be, or a symlink.
_NOT_A_FOLDER = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})

#: (mirror, peer) of every inbound session that has the mirror open.
Receiving = Callable[[], set[tuple[str, str]]]


@dataclass
class Sweep:
    """What one run removed."""

    files: int = 0
    freed: int = 0
    folders: int = 0
    errors: list[str] = field(default_factory=list)


def _listdir(fd: int) -> Iterator[bytes]:
    return iter(sorted(os.fsencode(n) for n in os.listdir(fd)))


def _base(name: bytes) -> bytes | None:
    """The partial a file in a peer's folder belongs to; None if it is not
    one of the daemon's."""
    for suffix in SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


class OpenFiles:
    """Regular files this process holds open, as (device, inode), read from
    /proc/self/fd once, when first asked. If it cannot be read, every file
    counts as open: nothing is expired rather than something in use."""

    def __init__(self) -> None:
        self._ids: set[tuple[int, int]] | None = None
        self._known = True

    def _load(self) -> set[tuple[int, int]]:
        if self._ids is None:
            ids = set()
            try:
                names = os.listdir("/proc/self/fd")
            except OSError:
                self._known = False
                names = []
            for n in names:
                try:
                    st = os.stat(f"/proc/self/fd/{n}")
                except OSError:
                    continue  # closed meanwhile, or the listing's own fd
                if stat.S_ISREG(st.st_mode):
                    ids.add((st.st_dev, st.st_ino))
            self._ids = ids
        return self._ids

    def holds(self, st: os.stat_result) -> bool:
        ids = self._load()
        return not self._known or (st.st_dev, st.st_ino) in ids


class Janitor:
    """Removes partial files nobody will finish (see the module docstring).
    Used by one thread (the daemon's main thread); ``status`` may be read
    from any: it copies."""

    def __init__(self, max_age: float, receiving: Receiving) -> None:
        self.max_age = max_age
        self.receiving = receiving
        self.runs = 0
        self.last_run: float | None = None
        self.last: Sweep = Sweep()
        self.files_removed = 0
        self.bytes_freed = 0
        self.folders_removed = 0
        self._next = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def run_soon(self) -> None:
        """Have ``due`` say yes (after a reload: other peers, other mirrors)."""
        self._next = 0.0

    def status(self) -> dict[str, Any]:
        last = self.last
        return {
            "last_run": self.last_run,
            "runs": self.runs,
            "partial_max_age": self.max_age,
            "files_removed": self.files_removed,
            "bytes_freed": self.bytes_freed,
            "folders_removed": self.folders_removed,
            "last_files_removed": last.files,
            "last_bytes_freed": last.freed,
            "last_errors": list(last.errors),
        }

    def run(self, mirrors: Mapping[str, MirrorConfig]) -> Sweep:
        """One pass over every mirror in ``mirrors`` (the running config)."""
        self._next = time.monotonic() + INTERVAL
        sweep = Sweep()
        cutoff = time.time() - self.max_age
        busy = self.receiving()
        held = OpenFiles()
        for name, m in sorted(mirrors.items()):
            try:
                self._mirror(name, m, cutoff, busy, held, sweep)
            except OSError as e:
                msg = f"mirror {name}: cannot clean up partial files in {m.path}: {e}"
                sweep.errors.append(msg)
                log.warning("%s", msg, extra={"MIRROR": name})
        self.runs += 1
        self.last_run = time.time()
        self.last = sweep
        self.files_removed += sweep.files
        self.bytes_freed += sweep.freed
        self.folders_removed += sweep.folders
        if sweep.files or sweep.folders:
            log.info(
                "janitor: removed %d partial files (%d bytes) and %d partial folders of "
                "peers no longer accepted",
                sweep.files,
                sweep.freed,
                sweep.folders,
            )
        return sweep

    def _mirror(
        self,
        name: str,
        m: MirrorConfig,
        cutoff: float,
        busy: set[tuple[str, str]],
        held: OpenFiles,
        sweep: Sweep,
    ) -> None:
        try:
            root = open_root(m.path)
        except OSError as e:
            if e.errno in _NOT_A_FOLDER:
                return  # a missing root is reported elsewhere (marker, config check)
            raise
        try:
            top = open_dir_at(root, (STATE_DIR, b"partial"))
        except OSError as e:
            if e.errno in _NOT_A_FOLDER:
                return  # never received anything (or not ours: never followed)
            raise
        finally:
            os.close(root)
        accepted = {os.fsencode(p) for p in m.accept_from}
        try:
            for entry in _listdir(top):
                peer = entry.decode("utf-8", "surrogateescape")
                if entry in accepted and self._expire(name, peer, top, entry, cutoff, held, sweep):
                    continue
                if (name, peer) in busy:
                    continue  # still receiving: the next run removes it
                self._drop_folder(name, peer, top, entry, held, sweep)
        finally:
            os.close(top)

    def _expire(
        self,
        mirror: str,
        peer: str,
        top: int,
        entry: bytes,
        cutoff: float,
        held: OpenFiles,
        sweep: Sweep,
    ) -> bool:
        """Remove the expired partials in an accepted peer's folder. False
        if the entry is not a folder (then it is nobody's: dropped)."""
        try:
            fd = os.open(entry, _DIR_FLAGS, dir_fd=top)
        except OSError as e:
            if e.errno in _NOT_A_FOLDER:
                return False
            raise
        try:
            groups: dict[bytes, list[tuple[bytes, os.stat_result]]] = {}
            for n in _listdir(fd):
                base = _base(n)
                if base is None:
                    continue
                try:
                    st = os.stat(n, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    groups.setdefault(base, []).append((n, st))
            for base, files in groups.items():
                # a partial and its sidecar go together: by the newer of them
                newest = max(st.st_mtime for _, st in files)
                if newest >= cutoff:
                    continue
                if any(stat.S_ISREG(st.st_mode) and held.holds(st) for _, st in files):
                    continue
                path = _sidecar_path(fd, base)
                for n, st in files:
                    try:
                        os.unlink(n, dir_fd=fd)
                    except FileNotFoundError:
                        continue
                    sweep.files += 1
                    if stat.S_ISREG(st.st_mode):
                        sweep.freed += st.st_size
                log.info(
                    "janitor: mirror %s: removed a partial file from %s%s, untouched for %.1f days",
                    mirror,
                    peer,
                    "" if path is None else f" ({show(path)})",
                    (time.time() - newest) / 86400,
                    extra={"PEER": peer, "MIRROR": mirror},
                )
        finally:
            os.close(fd)
        return True

    def _drop_folder(
        self, mirror: str, peer: str, top: int, entry: bytes, held: OpenFiles, sweep: Sweep
    ) -> None:
        """Remove the partial folder of a peer the mirror does not accept."""
        try:
            st = os.stat(entry, dir_fd=top, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):  # a planted symlink or file: itself only
            os.unlink(entry, dir_fd=top)
            sweep.files += 1
            sweep.freed += st.st_size if stat.S_ISREG(st.st_mode) else 0
            return
        files, nbytes = _remove_tree(top, entry, held)
        if files < 0:
            return  # something in it is open
        sweep.files += files
        sweep.freed += nbytes
        sweep.folders += 1
        log.info(
            "janitor: mirror %s: removed the partial files of %s (%d files, %d bytes): "
            "the mirror does not accept it",
            mirror,
            peer,
            files,
            nbytes,
            extra={"PEER": peer, "MIRROR": mirror},
        )


def _sidecar_path(fd: int, base: bytes) -> bytes | None:
    """The source path a partial's sidecar names (for the log), if any."""
    try:
        sfd = os.open(
            base + b".side", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd
        )
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(sfd).st_mode):
            return None
        doc = json.loads(os.read(sfd, 65536))
        return bytes.fromhex(str(doc["path"])) if isinstance(doc, dict) else None
    except (OSError, ValueError, KeyError):
        return None
    finally:
        os.close(sfd)


def _remove_tree(parent: int, name: bytes, held: OpenFiles) -> tuple[int, int]:
    """Remove the folder ``name`` in ``parent`` with everything in it, never
    following a symlink (``paths.remove_at``): (files removed, their bytes).
    (-1, 0) and nothing removed if a regular file directly in it is open in
    this process."""
    top = os.open(name, _DIR_FLAGS, dir_fd=parent)
    try:
        in_use = any(
            stat.S_ISREG(st.st_mode) and held.holds(st)
            for st in (_lstat_at(top, n) for n in _listdir(top))
            if st is not None
        )
    finally:
        os.close(top)
    if in_use:
        return -1, 0
    gone: list[os.stat_result] = []
    remove_at(parent, name, gone.append)
    return len(gone), sum(st.st_size for st in gone if stat.S_ISREG(st.st_mode))


def _lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
