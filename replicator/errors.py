"""Every exception replicator raises on purpose, in one tree::

    ReplicatorError
    ├── ConfigError              the TOML config is invalid (names file and key path)
    ├── KeyFileError             a key file is missing, empty or readable by others
    ├── ProtocolError            the wire protocol was broken; .code is a frames.ErrorCode
    │   ├── LocalProtocolError   we were about to break it (a bug here)
    │   └── RemoteProtocolError  the peer broke it: send Error, close the connection
    ├── LinkError                the connection failed (reset, EOF, timeout)
    ├── BadPath                  a path from the wire is not confined to its mirror
    ├── ApplyError               the receiver could not apply an operation; .code says
    │                            why (NO_SPACE, IO_ERROR, CONFLICT...) and whether the
    │                            sender should retry
    └── ControlError             the control socket refused or broke a request

Lower-layer errors (OSError from sockets and files) are translated into these at
the boundary of the module that met them, so callers see one vocabulary.
"""

from __future__ import annotations

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
