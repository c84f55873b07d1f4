"""Mirror root markers: tell a real mirror from an unmounted or emptied one.

At a mirror's first start the daemon writes ``<root>/.replicator/marker``
(a random id) and records the id in ``<state_dir>/markers/<mirror>``. From
then on, a root without that marker is not the mirror it was: a disk that
is not mounted shows an empty mount point, and replicating that emptiness
would delete every replica. Without the marker the daemon propagates no
deletions from the mirror (sending side) and accepts no writes into it
(receiving side), and says so in the log and in status.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid

from .paths import STATE_DIR, open_dir_at, open_root

log = logging.getLogger(__name__)

MARKER_NAME = b"marker"
MARKER = STATE_DIR + b"/" + MARKER_NAME


class Marker:
    def __init__(self, state_dir: str, mirror: str, root: str) -> None:
        self.mirror = mirror
        self.root = os.fsencode(root)
        self.record = os.path.join(state_dir, "markers", mirror)
        self._warned = False
        self.expected: str | None = None

    def _read_record(self) -> str | None:
        try:
            with open(self.record, "rb") as f:
                return _parse(f.read(200))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _read_marker(self) -> str | None:
        """The marker in the root, read confined: the mirror is written by
        untrusted users, who may swap .replicator for a symlink or the marker
        for a fifo."""
        try:
            rfd = open_root(self.root)
        except OSError:
            return None
        try:
            dfd = open_dir_at(rfd, [STATE_DIR])
        except OSError:
            return None
        finally:
            os.close(rfd)
        try:
            fd = os.open(
                MARKER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd
            )
        except OSError:
            return None
        finally:
            os.close(dfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return _parse(os.read(fd, 200))
        finally:
            os.close(fd)

    def _write_marker(self, text: str) -> None:
        rfd = open_root(self.root)
        try:
            try:
                os.mkdir(STATE_DIR, 0o700, dir_fd=rfd)
            except FileExistsError:
                pass
            dfd = open_dir_at(rfd, [STATE_DIR])
        finally:
            os.close(rfd)
        try:
            _write_atomic(MARKER_NAME, text, dfd)
        finally:
            os.close(dfd)

    def ensure(self) -> bool:
        """At start: create the marker on first use, adopt an existing one if
        the state was lost; True if the mirror is usable for deletions."""
        recorded = self._read_record()
        on_disk = self._read_marker()
        if recorded is None:
            if on_disk is None:
                if not os.path.isdir(self.root):
                    self.expected = None
                    return self.ok()
                on_disk = uuid.uuid4().hex
                self._write_marker(on_disk)
                log.info(
                    "mirror %s: created marker %s in %s",
                    self.mirror,
                    MARKER.decode(),
                    os.fsdecode(self.root),
                    extra={"MIRROR": self.mirror},
                )
            os.makedirs(os.path.dirname(self.record), mode=0o750, exist_ok=True)
            _write_atomic(self.record, on_disk)
        self.expected = self._read_record()
        return self.ok()

    def ok(self) -> bool:
        """Whether the marker is in place. Never cached: a disk can vanish
        between two deletions, and one open+read costs microseconds."""
        found = self._read_marker()
        ok = self.expected is not None and found == self.expected
        if not ok and not self._warned:
            log.error(
                "mirror %s: marker %s is missing in %s (disk not mounted? tree emptied?): "
                "deletions from and writes into this mirror are suspended until it is back",
                self.mirror,
                MARKER.decode(),
                os.fsdecode(self.root),
                extra={"MIRROR": self.mirror},
            )
            self._warned = True
        elif ok and self._warned:
            log.warning(
                "mirror %s: marker is back; resuming deletions",
                self.mirror,
                extra={"MIRROR": self.mirror},
            )
            self._warned = False
        return ok


def _parse(raw: bytes) -> str | None:
    return raw.decode("ascii", "replace").strip() or None


def _write_atomic(path: bytes | str, text: str, dir_fd: int | None = None) -> None:
    tmp = os.fsencode(path) + b".tmp"
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        os.write(fd, text.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
