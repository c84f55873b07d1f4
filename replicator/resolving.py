"""The operator's side of two-way conflicts: list them, count them, settle one.

``replicatorctl conflicts`` lists the conflicts this node decided
(conflictlog.py) whose copy is still there; ``replicatorctl resolve PATH
--keep local|remote|both`` settles one; ``status`` and the metrics count
them (``conflicts_unresolved`` per mirror).

A conflict is unresolved while its copy exists. A copy that is gone —
deleted or moved by hand, or by a resolution on the peer that replicated
here — settles it: its record is dropped when next looked at. Nothing is
dropped while a mirror's marker is missing (an unmounted disk would look
like every copy gone).

Settling changes the mirror like any local user would, so the watcher sees
it and it replicates as usual:

- ``local``: keep the file at PATH as it is now, delete the copy (a delete);
- ``remote``: rename the copy over PATH (atomic; a rename, which travels as
  a rename when the peer holds the copy too);
- ``both``: change nothing, forget the conflict (the copy is an ordinary
  file from now on).

Runs on the control and metrics threads. Paths inside the mirror are walked
component by component with no-follow (paths.py), like everything else the
daemon does below a mirror root.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

from . import paths
from .config import Config, MirrorConfig
from .conflictlog import Conflict, ConflictLog, Version
from .errors import BadPath, ControlError
from .maps import database
from .marker import Marker

log = logging.getLogger(__name__)

#: What ``resolve --keep`` accepts.
KEEP = ("local", "remote", "both")
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class Node(Protocol):
    cfg: Config

    @property
    def markers(self) -> Mapping[str, Marker]: ...


def describe(c: Conflict, v: Version) -> str:
    """``v`` (one of ``c``'s versions) in a few words."""
    local = v is c.local
    who = f"{c.here}'s version (this node)" if local else f"{c.peer}'s version"
    sec, ns = divmod(v.mtime_ns, 1_000_000_000)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec)) + f".{ns:09d} UTC"
    return f"{who}, {v.size} bytes, modified {when}"


class Conflicts:
    """The conflicts of one node, as the operator sees them."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._log: ConflictLog | None = None
        self._lock = threading.Lock()
        #: One check or settling at a time (control and metrics threads):
        #: a copy gone is dropped and logged once.
        self._busy = threading.RLock()

    @property
    def log(self) -> ConflictLog:
        # Opened on first use: the state dir exists once the daemon started.
        with self._lock:
            if self._log is None:
                self._log = ConflictLog(database(self.node.cfg.node.state_dir))
            return self._log

    # -- reading -----------------------------------------------------------------

    def _checked(self, name: str) -> tuple[list[Conflict], list[Conflict]]:
        """(unresolved, gone) conflicts of mirror ``name``; the gone ones
        are dropped. All are unresolved while the mirror cannot be checked."""
        with self._busy:
            return self._check(name)

    def _check(self, name: str) -> tuple[list[Conflict], list[Conflict]]:
        records = self.log.of(name)
        m = self.node.cfg.mirrors.get(name)
        marker = self.node.markers.get(name)
        if not records or m is None or marker is None or not marker.ok():
            return records, []
        try:
            root = paths.open_root(m.path)
        except OSError:
            return records, []
        live: list[Conflict] = []
        gone: list[Conflict] = []
        try:
            for c in records:
                (live if _copy_present(root, c.copy) else gone).append(c)
        finally:
            os.close(root)
        for c in gone:
            self.log.drop(name, c.copy)
            log.info(
                "conflict on %s: its copy %s is gone (deleted or moved, here or on the peer): "
                "settled",
                paths.show(c.path),
                paths.show(c.copy),
                extra={"MIRROR": name, "PATH": paths.show(c.path)},
            )
        return live, gone

    def count(self, name: str) -> int | None:
        """Unresolved conflicts of mirror ``name`` (None if the record
        cannot be read)."""
        try:
            return len(self._checked(name)[0])
        except sqlite3.Error as e:
            log.warning("cannot read the conflicts of mirror %s: %s", name, e)
            return None

    def listing(self, mirror: str | None) -> dict[str, Any]:
        """The reply to ``conflicts``: every unresolved conflict (of ``mirror``)."""
        cfg = self.node.cfg
        if mirror is not None and mirror not in cfg.mirrors:
            raise ControlError(f"no mirror {mirror!r} on this node")
        out = []
        unchecked = []
        for name, m in sorted(cfg.mirrors.items()):
            if mirror is not None and name != mirror:
                continue
            marker = self.node.markers.get(name)
            if marker is not None and not marker.ok():
                unchecked.append(name)
            out += [c.to_json(m.path) for c in self._safe_checked(name)[0]]
        return {"ok": True, "node": cfg.node.name, "conflicts": out, "unchecked": unchecked}

    def _safe_checked(self, name: str) -> tuple[list[Conflict], list[Conflict]]:
        try:
            return self._checked(name)
        except sqlite3.Error as e:
            raise ControlError(f"cannot read the conflicts of mirror {name!r}: {e}") from e

    # -- settling ------------------------------------------------------------------

    def resolve(self, path: str, keep: str) -> dict[str, Any]:
        """Settle the conflict of ``path`` (the file or its copy, absolute)."""
        with self._busy:
            return self._resolve(path, keep)

    def _resolve(self, path: str, keep: str) -> dict[str, Any]:
        if keep not in KEEP:
            raise ControlError(f"--keep must be one of {', '.join(KEEP)}, not {keep!r}")
        if not os.path.isabs(path):
            raise ControlError(f"resolve needs an absolute path, not {path!r}")
        name, m, rel = self._locate(path)
        marker = self.node.markers.get(name)
        if marker is None or not marker.ok():
            raise ControlError(f"mirror {name!r}: its marker is missing (disk not mounted?)")
        live, gone = self._safe_checked(name)
        found = [c for c in live if rel in (c.path, c.copy)]
        if not found:
            lost = [c for c in gone if rel in (c.path, c.copy)]
            if lost:
                raise ControlError(
                    f"{path}: its conflict copy {paths.show(lost[0].copy)} is gone (deleted or "
                    "moved): nothing left to settle, and it is no longer listed"
                )
            raise ControlError(
                f"{path} is not an unresolved conflict on node {self.node.cfg.node.name!r} "
                "(replicatorctl conflicts lists them; each node lists the conflicts it decided)"
            )
        if len(found) > 1:
            copies = ", ".join(paths.show(c.copy) for c in found)
            raise ControlError(
                f"{path} has {len(found)} conflict copies ({copies}): name the copy to settle"
            )
        c = found[0]
        try:
            self._settle(m, c, keep)
        except BadPath as e:
            raise ControlError(f"{path}: {e}") from e
        except OSError as e:
            raise ControlError(f"{path}: cannot settle the conflict: {e.strerror or e}") from e
        message = _settled(c, keep, m.path)
        try:
            self.log.drop(name, c.copy)
        except sqlite3.Error as e:
            message += f" (but its record could not be removed: {e})"
        log.info("%s", message, extra={"MIRROR": name, "PATH": paths.show(c.path)})
        return {"ok": True, "message": message}

    def _locate(self, path: str) -> tuple[str, MirrorConfig, bytes]:
        """The mirror ``path`` is in, and its path relative to the root."""
        best: tuple[int, str, MirrorConfig, str] | None = None
        wanted = {os.path.normpath(path)}
        head, tail = os.path.split(os.path.normpath(path))
        wanted.add(os.path.join(os.path.realpath(head), tail))
        for name, m in self.node.cfg.mirrors.items():
            for root in {os.path.normpath(m.path), os.path.realpath(m.path)}:
                top = root.rstrip("/") + "/"
                for p in wanted:
                    if p.startswith(top) and (best is None or len(top) > best[0]):
                        best = (len(top), name, m, p[len(top) :])
        if best is None:
            raise ControlError(f"{path} is in no mirror of node {self.node.cfg.node.name!r}")
        _, name, m, rel = best
        try:
            paths.check(os.fsencode(rel))
        except BadPath as e:
            raise ControlError(f"{path}: {e}") from e
        return name, m, os.fsencode(rel)

    def _settle(self, m: MirrorConfig, c: Conflict, keep: str) -> None:
        if keep == "both":
            return
        copy, where = paths.check(c.copy), paths.check(c.path)
        if copy[:-1] != where[:-1]:
            raise BadPath("the copy is not next to its file")
        root = paths.open_root(m.path)
        try:
            parent = paths.open_dir_at(root, copy[:-1])
        finally:
            os.close(root)
        try:
            st = os.stat(copy[-1], dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise BadPath(f"the copy {paths.show(c.copy)} is not a regular file any more")
            if keep == "local":
                os.unlink(copy[-1], dir_fd=parent)
            else:
                try:
                    at = os.stat(where[-1], dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    at = None
                if at is not None and stat.S_ISDIR(at.st_mode):
                    raise BadPath("it is a directory now: move it away first")
                # One rename: PATH has the copy's content at once, and the
                # watcher sees a move (it replicates as a rename).
                os.rename(copy[-1], where[-1], src_dir_fd=parent, dst_dir_fd=parent)
            os.fsync(parent)
        finally:
            os.close(parent)


def _copy_present(root: int, copy: bytes) -> bool:
    """Whether the conflict copy is still there (a regular file). Errors
    other than "not there" count as there: nothing is dropped on EIO."""
    try:
        parts = paths.check(copy)
        parent = paths.open_dir_at(root, parts[:-1])
    except BadPath:
        return False
    except OSError as e:
        return e.errno not in _ABSENT
    try:
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    except OSError as e:
        return e.errno not in _ABSENT
    finally:
        os.close(parent)
    return stat.S_ISREG(st.st_mode)


def _settled(c: Conflict, keep: str, root: str) -> str:
    full = root.rstrip("/") + "/" + paths.show(c.path)
    copy = paths.show(c.copy.rpartition(b"/")[2])
    if keep == "local":
        return f"kept {full} as it is; deleted its copy {copy} ({describe(c, c.in_copy)})"
    if keep == "remote":
        return f"replaced {full} with its copy {copy} ({describe(c, c.in_copy)})"
    return (
        f"kept both {full} and {copy}: the conflict is forgotten here, the copy is an "
        f"ordinary file (if {c.peer} lists it too, settle it there)"
    )
