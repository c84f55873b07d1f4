"""OwnedFd: one file descriptor and the duty to close it, exactly once.

fd numbers are reused at once: after ``os.close(5)`` the next ``open`` in any
thread may get 5 again, so closing an fd a second time closes somebody
else's file. An ``OwnedFd`` forgets its number (``fd`` becomes -1) before it
closes it, so ``close`` is idempotent, and ``detach`` hands the number to a
new owner without closing it. It never closes anything on its own (no
``__del__``): whoever holds it closes it, or uses it as a context manager.
"""

from __future__ import annotations

import os
from types import TracebackType


class OwnedFd:
    """Holds an open fd until ``close`` or ``detach``; ``OwnedFd(-1)`` holds
    nothing (closed from the start)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if fd < -1:
            raise ValueError(f"not a file descriptor: {fd}")
        self._fd = fd

    @property
    def fd(self) -> int:
        """The fd, or -1 once closed or detached (a syscall given -1 fails
        with EBADF, it never reaches another file)."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The fd; ValueError once closed or detached, like a closed file."""
        if self._fd < 0:
            raise ValueError("the file descriptor is closed")
        return self._fd

    def close(self) -> None:
        """Close the fd, the first time only."""
        # Forget the number first: if os.close raises (EINTR, EIO), the fd
        # is released all the same (close(2)), and must not be closed again.
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        """The fd, which the caller now owns; this holder closes nothing any
        more. ValueError if it was closed or detached already."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<OwnedFd {self._fd}>" if self._fd >= 0 else "<OwnedFd closed>"
