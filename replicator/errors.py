"""Every exception replicator raises on purpose, in one tree::

    ReplicatorError
    ├── ConfigError              the TOML config is invalid (names file and key path)
    ├── KeyFileError             a key file is missing, empty or readable by others
    ├── ProtocolError            the wire protocol was broken; .code is a frames.ErrorCode
    │   ├── LocalProtocolError   we were about to break it (a bug here)
    │   └── RemoteProtocolError  the peer broke it: send Error, close the connection
    ├── LinkError                the connection failed (reset, EOF, timeout)
    │   ├── AuthFailed           the peer refused our key: retrying will not help
    │   ├── PeerClosed           EOF while payload bytes were still due (also a ConnectionError)
    │   └── PeerTimeout          no payload byte within the timeout (also a TimeoutError)
    ├── BadPath                  a path from the wire is not confined to its mirror
    ├── ApplyError               the receiver could not apply an operation; .code says
    │                            why (NO_SPACE, IO_ERROR, CONFLICT...) and whether the
    │                            sender should retry
    ├── Refused                  a peer may not open a mirror here (code, message, log line)
    ├── SourceShrank             a file ended (or hashing was cancelled) before the
    │                            bytes its block map needed were read
    └── ControlError             the control socket refused or broke a request

    SinkError (an OSError)       writing a payload to its file failed; the stream
                                 was drained and is still in sync (apply_error
                                 translates it like any other OSError)

frames.FrameError stays in the codec (below this tree): the protocol turns it
into a RemoteProtocolError.

Lower-layer errors (OSError from sockets and files) are translated into these at
the boundary of the module that met them, so callers see one vocabulary.
"""

from __future__ import annotations

import logging

from .frames import ErrorCode


class ReplicatorError(Exception):
    pass


class ConfigError(ReplicatorError):
    pass


class KeyFileError(ReplicatorError):
    pass


class ProtocolError(ReplicatorError):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INTERNAL, message)


class RemoteProtocolError(ProtocolError):
    pass


class LinkError(ReplicatorError):
    pass


class BadPath(ReplicatorError):
    code = ErrorCode.BAD_PATH


class ApplyError(ReplicatorError):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ControlError(ReplicatorError):
    pass


class AuthFailed(LinkError):
    pass


class PeerClosed(LinkError, ConnectionError):
    """The socket reached EOF while payload bytes were still due."""


class PeerTimeout(LinkError, TimeoutError):
    """No payload byte arrived within the timeout."""


class SinkError(OSError):
    """Writing the payload to its file failed (ENOSPC, EIO, ...).

    The stream is still in sync: the rest of the payload was drained.
    """


class SourceShrank(ReplicatorError):
    """A file ended before the bytes being hashed (blockmap.py), or the
    hashing was cancelled."""


class Refused(ReplicatorError):
    """A mirror was not opened: ``message`` goes to the peer, ``logged`` to
    the log at ``level``."""

    def __init__(
        self, code: ErrorCode, message: str, logged: str = "", level: int = logging.WARNING
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.logged = logged or message
        self.level = level
