"""Extended attributes and POSIX ACLs (rsync's -X and -A), for mirrors that
opt in: ``preserve = ["xattrs"]`` (the ``user.`` namespace), ``"acls"``
(``system.posix_acl_access`` and ``_default``), ``"security_xattrs"``
(``security.`` and ``trusted.``: only when the receiving daemon runs as
root, which the kernel requires anyway).

The sender reads the attributes of an entry through its open descriptor
and sends them (``Xattr`` frames, a value over several when it is long)
right before the operation that carries the entry — the receiver's
``Opened`` said which namespaces it applies, and only those are sent. The
receiver collects them (``Pending``) and applies exactly that set to the
partial file before it is published (so the file never appears without
them), or to a directory right after it is made, removing attributes of
those namespaces that the source no longer has. Names longer than 255
bytes or values over 64 KiB (the kernel's limits) are refused.
"""

from __future__ import annotations

import errno
import logging
import os

from . import frames as F
from .manifest import Preserve

log = logging.getLogger(__name__)

#: The kernel's limits (XATTR_NAME_MAX, XATTR_SIZE_MAX).
NAME_MAX = 255
VALUE_MAX = 64 * 1024
#: Attributes one entry may carry on the wire, and their bytes.
PENDING_MAX = 512
PENDING_BYTES = 4 << 20
#: What a mirror must preserve for each namespace.
ANY = Preserve.XATTRS | Preserve.ACLS | Preserve.SECURITY_XATTRS
_ACL = ("system.posix_acl_access", "system.posix_acl_default")

Pairs = list[tuple[str, bytes]]


def wanted(name: str, policy: Preserve, privileged: bool) -> bool:
    """Whether a mirror with ``policy`` carries the attribute ``name``."""
    if name.startswith("user."):
        return bool(policy & Preserve.XATTRS)
    if name in _ACL:
        return bool(policy & Preserve.ACLS)
    if name.startswith(("security.", "trusted.")):
        return privileged and bool(policy & Preserve.SECURITY_XATTRS)
    return False


def read(target: int | str, policy: Preserve, privileged: bool) -> Pairs:
    """The attributes of ``target`` (an fd, or a /proc/self/fd path) that
    ``policy`` carries, sorted; none where the filesystem has none."""
    try:
        names = os.listxattr(target)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA):
            return []
        raise
    out = []
    for name in sorted(names):
        if not wanted(name, policy, privileged):
            continue
        if len(os.fsencode(name)) > NAME_MAX:
            continue  # cannot exist: the kernel refuses such names
        try:
            value = os.getxattr(target, name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue  # removed meanwhile
            raise
        out.append((name, value))
    return out


def frames(pairs: Pairs) -> list[F.Event]:
    """The Xattr frames carrying ``pairs`` (long values over several)."""
    out: list[F.Event] = []
    for name, value in pairs:
        pieces = [value[i : i + F.MAX_DATA] for i in range(0, len(value), F.MAX_DATA)] or [b""]
        for i, piece in enumerate(pieces):
            out.append(F.Xattr(int(i < len(pieces) - 1), name, piece))
    return out


class Pending:
    """Receiver: the attributes sent for the next operation."""

    def __init__(self) -> None:
        self._pairs: Pairs = []
        self._bytes = 0
        self._open: tuple[str, bytearray] | None = None
        self.any = False

    def add(self, ev: F.Xattr) -> str | None:
        """Take one frame; a complaint (the connection must close) if it
        breaks the kernel's limits or the protocol."""
        if len(ev.name.encode()) > NAME_MAX or not ev.name:
            return f"extended attribute name {ev.name!r} is empty or over {NAME_MAX} bytes"
        if self._open is not None and self._open[0] != ev.name:
            return f"extended attribute {self._open[0]!r} was not finished"
        name, value = self._open if self._open is not None else (ev.name, bytearray())
        value += ev.value
        self._bytes += len(ev.value)
        if len(value) > VALUE_MAX:
            return f"extended attribute {name!r} of over {VALUE_MAX} bytes (the kernel's limit)"
        if len(self._pairs) >= PENDING_MAX or self._bytes > PENDING_BYTES:
            return f"more than {PENDING_MAX} extended attributes or {PENDING_BYTES} bytes"
        self.any = True
        if ev.more:
            self._open = (name, value)
        else:
            self._open = None
            self._pairs.append((name, bytes(value)))
        return None

    def take(self) -> Pairs:
        """The set for the operation now arriving (empty if none was sent)."""
        pairs, self._pairs, self._bytes, self._open, self.any = self._pairs, [], 0, None, False
        return pairs


def apply(target: int | str, pairs: Pairs, policy: Preserve, privileged: bool) -> None:
    """Make ``target``'s attributes in ``policy``'s namespaces exactly
    ``pairs``. OSError (ENOTSUP: the filesystem has none) if it cannot."""
    have = set()
    try:
        have = {n for n in os.listxattr(target) if wanted(n, policy, privileged)}
    except OSError as e:
        if e.errno != errno.ENOTSUP or not pairs:
            if e.errno == errno.ENOTSUP:
                return
            raise
    keep = set()
    for name, value in pairs:
        if not wanted(name, policy, privileged):
            continue  # not ours to apply (the sender should not have sent it)
        os.setxattr(target, name, value)
        keep.add(name)
    for name in have - keep:
        try:
            os.removexattr(target, name)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
