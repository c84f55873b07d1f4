"""Frames of the replicator wire protocol: events, limits and their byte codec.

Every frame is an 8-byte header followed by a body::

    kind: u8 | flags: u8 (0) | reserved: u16 (0) | body_length: u32

all big-endian. Once the handshake is complete every frame also carries a
``TAG_SIZE``-byte tag right after its body (not counted in ``body_length``;
``protocol.Connection`` adds and checks it, this codec never sees it). A
``Chunk`` frame is followed by ``length`` raw payload bytes that are *not*
part of its body: the transfer layer moves them with sendfile/splice, so they
never enter Python. See docs/protocol.md.

This module is pure: it imports no socket and no os. It knows nothing about
connection state; that is ``protocol.Connection``'s job.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, ClassVar

# The protocol's numbers live in codes.py; they are used as frames.ErrorCode etc.
from .codes import FILE_LIVE as FILE_LIVE
from .codes import RETRYABLE as RETRYABLE
from .codes import AbortReason as AbortReason
from .codes import EntryKind as EntryKind
from .codes import ErrorCode as ErrorCode

#: Protocol versions this implementation speaks. Version 1 did not
#: authenticate frames after the handshake; version 2 had no block maps
#: (nothing verified a replica, no deltas). Both are refused.
VERSION_MIN = 3
VERSION_MAX = 3
MAGIC = b"RPLC"

HEADER = struct.Struct("!BBHI")
HEADER_SIZE = HEADER.size
#: Largest frame body (a path and a symlink target fit with room to spare).
MAX_BODY = 16 * 1024
#: Longest path on the wire, in bytes (Linux PATH_MAX).
MAX_PATH = 4096
#: Longest name of one path component (Linux NAME_MAX).
MAX_NAME = 255
#: Largest payload one Chunk may declare.
MAX_CHUNK = 16 * 1024 * 1024
#: Files the sender may have begun (File) and not yet ended (End/Abort).
MAX_OPEN_FILES = 64
#: Operations the sender may have sent and not had acknowledged.
MAX_UNACKED = 8192
NONCE_SIZE = 32
#: Bytes of the tag that follows the body of every frame once established.
TAG_SIZE = 16
#: Longest human-readable message (Error, Opened), in UTF-8 bytes.
MAX_TEXT = 4096
#: Longest packed array in one frame (Blocks digests, Want ranges).
MAX_DATA = 8192
#: A Want frame's byte ranges: offset, length.
RANGE = struct.Struct("!QQ")


def clip_text(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to fit ``limit`` UTF-8 bytes (messages often quote paths,
    which can be long; an unsendable error must never wedge a connection)."""
    raw = text.encode("utf-8", "backslashreplace")
    if len(raw) <= limit:
        return raw.decode("utf-8")
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


class FrameError(Exception):
    """A frame is malformed or violates a limit; ``code`` says which."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- field codecs -----------------------------------------------------------

_FIXED = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "i64": "q"}
# Variable-length fields: (length prefix format, maximum length, decoded type)
_VAR: dict[str, tuple[str, int, str]] = {
    "name": ("B", 255, "str"),  # node / mirror names, UTF-8
    "blob": ("B", 255, "bytes"),  # nonces, proofs, version tokens
    "path": ("H", MAX_PATH, "bytes"),  # file system paths: bytes, as Linux has them
    "text": ("H", MAX_TEXT, "str"),  # human-readable messages, UTF-8
    "data": ("H", MAX_DATA, "bytes"),  # packed arrays: block digests, byte ranges
}


class Event:
    """Base of all frames. Subclasses are frozen dataclasses with a LAYOUT."""

    KIND: ClassVar[int]
    #: "field:type" items; fixed-size fields first, then variable ones.
    LAYOUT: ClassVar[str]
    _fixed: ClassVar[struct.Struct]
    _nfixed: ClassVar[int]
    _var: ClassVar[tuple[tuple[str, str], ...]]
    _names: ClassVar[tuple[str, ...]]
    #: For ``encode``: the fixed fields' values as a tuple; per variable
    #: field (name, its length prefix's pack, limit, is text).
    _get_fixed: ClassVar[Callable[[Any], tuple[Any, ...]]]
    _var_enc: ClassVar[tuple[tuple[str, Callable[..., bytes], int, bool], ...]]


EVENTS: dict[int, type[Event]] = {}


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """The values of ``names`` of an event, as a tuple (attrgetter returns
    a bare value for one name)."""
    if len(names) >= 2:
        return attrgetter(*names)
    if names:
        name = names[0]
        return lambda ev: (getattr(ev, name),)
    return lambda ev: ()


def _frame(kind: int, layout: str) -> Any:
    def register(cls: type[Event]) -> type[Event]:
        items = [item.split(":") for item in layout.split()]
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        if [n for n, _ in items] != names:
            raise TypeError(f"{cls.__name__}: layout {layout!r} does not match fields {names}")
        fixed = [(n, t) for n, t in items if t in _FIXED]
        var = [(n, t) for n, t in items if t not in _FIXED]
        if items[: len(fixed)] != [list(x) for x in fixed]:
            raise TypeError(f"{cls.__name__}: fixed fields must come first")
        cls.KIND = kind
        cls.LAYOUT = layout
        cls._names = tuple(names)
        cls._fixed = struct.Struct("!" + "".join(_FIXED[t] for _, t in fixed))
        cls._nfixed = len(fixed)
        cls._var = tuple((n, t) for n, t in var)
        cls._get_fixed = _getter(tuple(n for n, _ in fixed))
        cls._var_enc = tuple(
            (n, struct.Struct("!" + _VAR[t][0]).pack, _VAR[t][1], _VAR[t][2] == "str")
            for n, t in var
        )
        EVENTS[kind] = cls
        return cls

    return register


# --- the frames -------------------------------------------------------------
# Handshake


@_frame(1, "version_min:u16 version_max:u16 magic:blob name:name nonce:blob")
@dataclass(frozen=True)
class Hello(Event):
    version_min: int
    version_max: int
    magic: bytes
    name: str
    nonce: bytes


@_frame(2, "proof:blob")
@dataclass(frozen=True)
class Auth(Event):
    proof: bytes


# Mirrors and manifests


@_frame(3, "mirror:u16 name:name")
@dataclass(frozen=True)
class Open(Event):
    """Sender → receiver: the sender will push mirror ``name`` as ``mirror``."""

    mirror: int
    name: str


@_frame(4, "mirror:u16 code:u16 preserve:u8 message:text")
@dataclass(frozen=True)
class Opened(Event):
    """Receiver → sender: mirror accepted (``code`` 0) or refused (an
    ErrorCode). ``preserve``: what the receiver applies as sent (bit 0 owners,
    bit 1 setuid/setgid/sticky; ``manifest.Preserve``), so the sender does not
    resend what would not change."""

    mirror: int
    code: int
    preserve: int
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", clip_text(self.message))


@_frame(5, "mirror:u16 list_id:u32")
@dataclass(frozen=True)
class List(Event):
    """Sender → receiver: report what you hold in this mirror."""

    mirror: int
    list_id: int


@_frame(
    6, "mirror:u16 kind:u8 mode:u32 size:u64 mtime_ns:i64 uid:u32 gid:u32 path:path target:path"
)
@dataclass(frozen=True)
class Entry(Event):
    """Receiver → sender: one item of a manifest."""

    mirror: int
    kind: int
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    path: bytes
    target: bytes


@_frame(7, "mirror:u16 held:u64 version:blob path:path")
@dataclass(frozen=True)
class Partial(Event):
    """Receiver → sender: a partial file it holds, ``held`` bytes of ``version``."""

    mirror: int
    held: int
    version: bytes
    path: bytes


@_frame(8, "mirror:u16 list_id:u32 count:u32")
@dataclass(frozen=True)
class ListEnd(Event):
    mirror: int
    list_id: int
    count: int


# File data


@_frame(
    9,
    "op:u32 mirror:u16 offset:u64 size:u64 mode:u32 mtime_ns:i64 uid:u32 gid:u32 "
    "algo:u8 block_size:u32 version:blob base:blob path:path",
)
@dataclass(frozen=True)
class File(Event):
    """Begin (offset 0) or resume sending a ``size``-byte file; its block map
    (``algo``, ``block_size``; blockmap.py) comes before End. ``base``: the
    file digest of the version published at ``path`` this is a delta of.
    ``mode``: permission bits, and ``FILE_LIVE`` for a live change."""

    op: int
    mirror: int
    offset: int
    size: int
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    algo: int
    block_size: int
    version: bytes
    base: bytes
    path: bytes


@_frame(10, "op:u32 offset:u64 length:u32")
@dataclass(frozen=True)
class Chunk(Event):
    """``length`` raw payload bytes of file ``op`` at ``offset`` follow this frame."""

    op: int
    offset: int
    length: int


@_frame(11, "op:u32 digest:blob")
@dataclass(frozen=True)
class End(Event):
    """All bytes of file ``op`` were sent and the source did not change:
    publish it once it matches ``digest`` (the file digest of its block map)."""

    op: int
    digest: bytes


@_frame(12, "op:u32 reason:u16")
@dataclass(frozen=True)
class Abort(Event):
    """Discard file ``op``: its source changed (``AbortReason``)."""

    op: int
    reason: int


# Namespace operations


@_frame(13, "op:u32 mirror:u16 mode:u32 mtime_ns:i64 uid:u32 gid:u32 path:path")
@dataclass(frozen=True)
class Mkdir(Event):
    op: int
    mirror: int
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    path: bytes


@_frame(14, "op:u32 mirror:u16 mtime_ns:i64 uid:u32 gid:u32 path:path target:path")
@dataclass(frozen=True)
class Symlink(Event):
    op: int
    mirror: int
    mtime_ns: int
    uid: int
    gid: int
    path: bytes
    target: bytes


@_frame(15, "op:u32 mirror:u16 path:path")
@dataclass(frozen=True)
class Delete(Event):
    """Remove ``path`` (recursively, if it is a directory)."""

    op: int
    mirror: int
    path: bytes


@_frame(16, "op:u32 mirror:u16 src:path dst:path")
@dataclass(frozen=True)
class Rename(Event):
    op: int
    mirror: int
    src: bytes
    dst: bytes


@_frame(17, "op:u32 mirror:u16 mode:u32 mtime_ns:i64 uid:u32 gid:u32 path:path")
@dataclass(frozen=True)
class Meta(Event):
    """Set mode, mtime and (as root) owner of an existing entry; no data."""

    op: int
    mirror: int
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    path: bytes


# Acknowledgements, liveness, errors


@_frame(18, "op:u32")
@dataclass(frozen=True)
class Ack(Event):
    """Operation ``op`` is durable on the receiver."""

    op: int


@_frame(19, "nonce:u64")
@dataclass(frozen=True)
class Ping(Event):
    nonce: int


@_frame(20, "nonce:u64")
@dataclass(frozen=True)
class Pong(Event):
    nonce: int


@_frame(21, "code:u16 op:u32 fatal:u8 message:text")
@dataclass(frozen=True)
class Error(Event):
    """``fatal``: the connection closes after this frame. Otherwise it refuses
    operation ``op`` (never 0); the sender retries if the code is RETRYABLE."""

    code: int
    op: int
    fatal: int
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", clip_text(self.message))


# Block maps


@_frame(22, "op:u32 offset:u64 length:u64")
@dataclass(frozen=True)
class Copy(Event):
    """Delta: take ``length`` bytes at ``offset`` of file ``op`` from its base."""

    op: int
    offset: int
    length: int


@_frame(23, "op:u32 first:u32 digests:data")
@dataclass(frozen=True)
class Blocks(Event):
    """Block digests ``first``… of file ``op``'s map (after its data, before End)."""

    op: int
    first: int
    digests: bytes


@_frame(24, "op:u32 ranges:data")
@dataclass(frozen=True)
class Want(Event):
    """Receiver → sender: file ``op`` is bad in these byte ranges (packed
    ``RANGE``s, ascending): send them again, then End."""

    op: int
    ranges: bytes


@_frame(27, "op:u32 offset:u64 length:u64")
@dataclass(frozen=True)
class Hole(Event):
    """``length`` bytes at ``offset`` of file ``op`` are a hole (zeros the
    source does not store): leave a hole there, nothing follows."""

    op: int
    offset: int
    length: int


@_frame(28, "kind:u8 id:u32 name:name")
@dataclass(frozen=True)
class Owner(Event):
    """Sender → receiver: its user (``kind`` 1) or group (2) ``id`` is named
    ``name`` (owners.py: mapped by name on the receiver)."""

    kind: int
    id: int
    name: str


@_frame(29, "more:u8 name:name value:data")
@dataclass(frozen=True)
class Xattr(Event):
    """Sender → receiver: an extended attribute of the entry of the next
    operation (``more``: the value goes on in the next Xattr frame)."""

    more: int
    name: str
    value: bytes


# Hard links (preserve = ["hardlinks"], hardlinks.py)


@_frame(30, "op:u32 mirror:u16 size:u64 mtime_ns:i64 path:path target:path")
@dataclass(frozen=True)
class HardLink(Event):
    """Make ``path`` another name of the published regular file at
    ``target`` (same mirror), which must be the ``size``-byte version with
    mtime ``mtime_ns``; otherwise refuse with LINK_TARGET (send the data)."""

    op: int
    mirror: int
    size: int
    mtime_ns: int
    path: bytes
    target: bytes


# Scrub (replicatorctl verify)


@_frame(25, "op:u32 mirror:u16 algo:u8 block_size:u32 path:path")
@dataclass(frozen=True)
class Check(Event):
    """Sender → receiver: send the block map of your file at ``path``, read
    from disk, in this geometry (Checked frames); or refuse ``op``."""

    op: int
    mirror: int
    algo: int
    block_size: int
    path: bytes


@_frame(26, "op:u32 size:u64 first:u32 digests:data")
@dataclass(frozen=True)
class Checked(Event):
    """Receiver → sender: block digests ``first``… of the ``size``-byte file
    a Check asked for (it is answered when all came; 0 bytes: none)."""

    op: int
    size: int
    first: int
    digests: bytes


def pack_ranges(ranges: list[tuple[int, int]]) -> bytes:
    return b"".join(RANGE.pack(o, n) for o, n in ranges)


def unpack_ranges(raw: bytes) -> list[tuple[int, int]]:
    if not raw or len(raw) % RANGE.size:
        raise FrameError(ErrorCode.MALFORMED, f"Want: {len(raw)} bytes of ranges")
    return [RANGE.unpack_from(raw, i) for i in range(0, len(raw), RANGE.size)]


#: Frames that carry an operation id acknowledged by Ack / refused by Error.
OPERATIONS: tuple[type[Event], ...] = (File, Mkdir, Symlink, Delete, Rename, Meta, HardLink)


# --- codec ------------------------------------------------------------------


def encode(event: Event) -> bytes:
    """The whole frame (header + body) for ``event``; raises FrameError on limits.

    Per frame class, the getter of its fixed fields and the packers of its
    variable ones' length prefixes are made once (``_frame``): the sender
    encodes several frames per file (issue 13)."""
    cls = type(event)
    try:
        body = cls._fixed.pack(*cls._get_fixed(event))
    except struct.error as e:
        raise FrameError(ErrorCode.MALFORMED, f"{cls.__name__}: {e}") from None
    if cls._var_enc:
        parts = [body]
        for name, prefix, limit, text in cls._var_enc:
            value = getattr(event, name)
            raw = value.encode("utf-8") if text else bytes(value)
            if len(raw) > limit:
                raise FrameError(
                    ErrorCode.TOO_LARGE, f"{cls.__name__}.{name}: {len(raw)} bytes > {limit}"
                )
            parts.append(prefix(len(raw)))
            parts.append(raw)
        body = b"".join(parts)
        if len(body) > MAX_BODY:
            raise FrameError(ErrorCode.TOO_LARGE, f"{cls.__name__}: body {len(body)} > {MAX_BODY}")
    return HEADER.pack(cls.KIND, 0, 0, len(body)) + body


def decode_header(header: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(kind, body length) of an 8-byte header; raises FrameError."""
    kind, flags, reserved, length = HEADER.unpack(header)
    if kind not in EVENTS:
        raise FrameError(ErrorCode.MALFORMED, f"unknown frame kind {kind}")
    if flags or reserved:
        raise FrameError(
            ErrorCode.MALFORMED, f"reserved header bits set ({flags:#x}, {reserved:#x})"
        )
    if length > MAX_BODY:
        raise FrameError(ErrorCode.TOO_LARGE, f"frame body of {length} bytes > {MAX_BODY}")
    return kind, length


def decode_body(kind: int, body: bytes | bytearray | memoryview) -> Event:
    """The event of frame ``kind`` whose body is exactly ``body``."""
    cls = EVENTS[kind]
    fixed = cls._fixed
    if len(body) < fixed.size:
        raise FrameError(ErrorCode.MALFORMED, f"{cls.__name__}: body too short")
    values: list[Any] = list(fixed.unpack_from(body, 0))
    pos = fixed.size
    for name, typ in cls._var:
        prefix, limit, kind_ = _VAR[typ]
        psize = 1 if prefix == "B" else 2
        if pos + psize > len(body):
            raise FrameError(ErrorCode.MALFORMED, f"{cls.__name__}.{name}: truncated")
        (n,) = struct.unpack_from("!" + prefix, body, pos)
        pos += psize
        if n > limit:
            raise FrameError(ErrorCode.TOO_LARGE, f"{cls.__name__}.{name}: {n} bytes > {limit}")
        if pos + n > len(body):
            raise FrameError(ErrorCode.MALFORMED, f"{cls.__name__}.{name}: truncated")
        raw = bytes(body[pos : pos + n])
        pos += n
        if kind_ == "str":
            try:
                values.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise FrameError(ErrorCode.MALFORMED, f"{cls.__name__}.{name}: not UTF-8") from None
        else:
            values.append(raw)
    if pos != len(body):
        raise FrameError(
            ErrorCode.MALFORMED, f"{cls.__name__}: {len(body) - pos} stray bytes in body"
        )
    return cls(*values)
