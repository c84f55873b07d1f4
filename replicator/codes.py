"""The numbers of the replicator protocol: error codes, entry kinds, abort
reasons (frames.py re-exports them; docs/protocol.md §11). Pure."""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Reason codes carried by ``Error`` frames."""

    #: A frame could not be decoded.
    MALFORMED = 1
    #: A length field is larger than the protocol allows.
    TOO_LARGE = 2
    #: A frame arrived in a state where it is not allowed.
    UNEXPECTED = 3
    #: No protocol version in common.
    VERSION = 4
    #: Authentication failed (unknown peer or wrong key).
    AUTH = 5
    #: The peer may not push into this mirror here.
    FORBIDDEN = 6
    #: A path is not a safe relative path inside the mirror.
    BAD_PATH = 7
    #: The receiver's filesystem is full; retry later.
    NO_SPACE = 8
    #: The receiver hit an I/O error; retry later.
    IO_ERROR = 9
    #: A resume offset does not match the partial file the receiver holds.
    RESUME_MISMATCH = 10
    #: A limit (open files, unacked operations) was exceeded.
    LIMIT = 11
    #: The receiver is shutting down.
    SHUTTING_DOWN = 12
    #: The mirror is not configured on the receiver.
    UNKNOWN_MIRROR = 13
    #: The receiver failed for a reason of its own.
    INTERNAL = 14
    #: The operation conflicts with what the receiver holds (e.g. a file where
    #: a directory is needed).
    CONFLICT = 15
    #: The peer sent nothing for too long.
    TIMEOUT = 16
    #: A frame failed its integrity check: it was altered, replayed, reordered,
    #: dropped or injected on the way (or the peer has a bug).
    INTEGRITY = 17
    #: A delta's base is not what the receiver holds (its copy changed since
    #: it was published, or it has no record of it): send the whole file.
    BASE_CHANGED = 18
    #: The received file did not match the sender's block map, even after its
    #: bad blocks were sent again; the partial was discarded.
    VERIFY_FAILED = 19
    #: A HardLink's target is not a published regular file of this mirror
    #: holding the version the sender named (gone, replaced, changed, or not
    #: a regular file): send the data of the name instead.
    LINK_TARGET = 20


#: Codes that describe a transient condition on the receiver: the sender keeps
#: the change and retries later.
RETRYABLE = frozenset(
    {
        ErrorCode.NO_SPACE,
        ErrorCode.IO_ERROR,
        ErrorCode.RESUME_MISMATCH,
        ErrorCode.INTERNAL,
        ErrorCode.CONFLICT,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.BASE_CHANGED,
        ErrorCode.VERIFY_FAILED,
    }
)


#: Bit 31 of a ``File`` frame's ``mode``: the sender's live lane started
#: this file (a change its watcher saw; backlog.py). The receiver publishes
#: it within ``groupcommit.COMMIT_DELAY`` on its own, leaving bulk files to
#: their big groups (groupcommit.py). The other bits are permission bits.
FILE_LIVE = 1 << 31


class EntryKind(enum.IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3


class AbortReason(enum.IntEnum):
    #: The source changed or shrank while it was being sent.
    SOURCE_CHANGED = 1
    #: The source vanished or could not be read.
    SOURCE_GONE = 2
    #: The sender is shutting down the transfer.
    CANCELLED = 3
