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
import uuid

from .paths import STATE_DIR

log = logging.getLogger(__name__)

MARKER = STATE_DIR + b"/marker"


class Marker:
    def __init__(self, state_dir: str, mirror: str, root: str) -> None:
        self.mirror = mirror
        self.root = os.fsencode(root)
        self.record = os.path.join(state_dir, "markers", mirror)
        self._warned = False
        self.expected: str | None = None

    def _read(self, path: bytes | str) -> str | None:
        try:
            with open(path, "rb") as f:
                return f.read(200).decode("ascii", "replace").strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def ensure(self) -> bool:
        """At start: create the marker on first use, adopt an existing one if
        the state was lost; True if the mirror is usable for deletions."""
        recorded = self._read(self.record)
        on_disk = self._read(os.path.join(self.root, MARKER))
        if recorded is None:
            if on_disk is None:
                if not os.path.isdir(self.root):
                    self.expected = None
                    return self.ok()
                on_disk = uuid.uuid4().hex
                d = os.path.join(self.root, STATE_DIR)
                os.makedirs(d, mode=0o700, exist_ok=True)
                _write_atomic(os.path.join(self.root, MARKER), on_disk)
                log.info(
                    "mirror %s: created marker %s in %s",
                    self.mirror,
                    MARKER.decode(),
                    os.fsdecode(self.root),
                    extra={"MIRROR": self.mirror},
                )
            os.makedirs(os.path.dirname(self.record), mode=0o750, exist_ok=True)
            _write_atomic(self.record, on_disk)
        self.expected = self._read(self.record)
        return self.ok()

    def ok(self) -> bool:
        """Whether the marker is in place. Never cached: a disk can vanish
        between two deletions, and one open+read costs microseconds."""
        found = self._read(os.path.join(self.root, MARKER))
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


def _write_atomic(path: bytes | str, text: str) -> None:
    tmp = os.fsencode(path) + b".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
