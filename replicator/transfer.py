"""The zero-copy data path: the only module that calls sendfile, splice,
pipe and copy_file_range.

Sender: ``send_range`` loops ``os.sendfile`` from any offset; payload bytes go
from the page cache to the socket without entering Python. Receiver:
``Splicer.to_file`` moves bytes socket → pipe → file with two ``os.splice``
calls per round, again without entering Python. ``Splicer.discard`` drains a
payload nobody wants (an aborted or refused file) into /dev/null the same way.

A delta's unchanged ranges come from the replica's published file with
``copy_range`` (copy_file_range: a reflink on XFS/btrfs, an in-kernel copy
elsewhere; no bytes through Python).

A copy path (``recv_into`` + ``pwrite``) exists for filesystems that do not
support splice; it is chosen per Splicer, never silently: ``mode`` says which
path is in use and status shows it.

This module never decides *what* to send; it moves bytes and reports exactly
how many moved, translating the kernel's partial counts and errors.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

from .errors import PeerClosed, PeerTimeout, SinkError
from .fd import OwnedFd
from .net import wait_readable

#: The pipe size we ask for. The kernel refuses more than
#: /proc/sys/fs/pipe-max-size (1 MiB here) with EPERM for unprivileged users.
PIPE_SIZE = 1 << 20
_FILLER = bytes(64 * 1024)


def _pipe_max() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 64 * 1024


def send_range(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    """Send ``count`` bytes of ``file_fd`` from ``offset`` with sendfile.

    Returns the bytes sent: less than ``count`` only if the file ended early
    (it shrank while we sent it). The socket must be blocking.
    """
    sent = 0
    while sent < count:
        n = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
        if n == 0:
            break
        sent += n
    return sent


def send_filler(sock: socket.socket, count: int) -> None:
    """Complete a chunk whose file shrank: ``count`` zero bytes. The receiver
    discards the file (an Abort follows), so the content does not matter;
    only the stream's framing does."""
    while count > 0:
        n = min(count, len(_FILLER))
        sock.sendall(memoryview(_FILLER)[:n])
        count -= n


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src_fd`` to the same offset of
    ``dst_fd`` in the kernel. SinkError if the source ends early (it changed)
    or the destination cannot be written."""
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src_fd, dst_fd, count - done, offset + done, offset + done)
        except OSError as e:
            raise SinkError(e.errno, e.strerror) from e
        if n == 0:
            raise SinkError(errno.EIO, f"the base file ended at {offset + done} bytes")
        done += n


def write_inline(file_fd: int, data: bytes, offset: int) -> None:
    """Write a small payload that arrived together with its frame header.

    Below ``node.inline_max`` the payload came with the recv that read its
    header, so one pwrite replaces two splices (docs/protocol.md, the
    receiver's "inline" case); the bytes are in Python already.
    """
    view = memoryview(data)
    while view:
        n = os.pwrite(file_fd, view, offset)
        view, offset = view[n:], offset + n


class Splicer:
    """Receives payload bytes from one socket through one pipe."""

    def __init__(self, sock: socket.socket, timeout: float, use_splice: bool = True) -> None:
        self.sock = sock
        self.timeout = timeout
        #: The pipe's ends: only in splice mode (copy mode holds nothing).
        self._r = OwnedFd(-1)
        self._w = OwnedFd(-1)
        self.pipe_size = 0
        self.mode = "splice" if use_splice else "copy"
        self._devnull = OwnedFd(os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC))
        self._buf = bytearray(PIPE_SIZE) if not use_splice else bytearray()
        if use_splice:
            try:
                self._open_pipe()
            except BaseException:
                self.close()
                raise

    def _open_pipe(self) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        self._r, self._w = OwnedFd(r), OwnedFd(w)
        for size in (PIPE_SIZE, min(PIPE_SIZE, _pipe_max())):
            try:
                self.pipe_size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
                break
            except PermissionError:
                continue
        else:
            self.pipe_size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        """Close the pipe and /dev/null (idempotent)."""
        for f in (self._r, self._w, self._devnull):
            f.close()

    def fds_held(self) -> int:
        return sum(not f.closed for f in (self._r, self._w, self._devnull))

    def _wait_readable(self) -> None:
        if not wait_readable(self.sock, self.timeout):
            raise PeerTimeout(f"no payload data for {self.timeout:.0f} s")

    def _from_socket(self, want: int) -> int:
        """Splice up to ``want`` bytes socket → pipe (pipe must be empty)."""
        self._wait_readable()
        try:
            n = os.splice(self.sock.fileno(), self._w.fd, min(want, self.pipe_size))
        except OSError as e:
            raise PeerClosed(f"socket error during payload: {e}") from e
        if n == 0:
            raise PeerClosed("connection closed in the middle of a payload")
        return n

    def _pipe_to(self, fd: int, n: int, offset: int | None) -> None:
        """Move exactly ``n`` bytes from the pipe to ``fd`` (at ``offset``)."""
        while n:
            if offset is None:
                m = os.splice(self._r.fd, fd, n)
            else:
                m = os.splice(self._r.fd, fd, n, offset_dst=offset)
                offset += m
            if m == 0:
                raise OSError(errno.EIO, "splice to file moved no bytes")
            n -= m

    def to_file(self, file_fd: int, offset: int, count: int) -> None:
        """Write ``count`` payload bytes from the socket to ``file_fd`` at ``offset``.

        Raises PeerClosed/PeerTimeout (the stream is broken) or SinkError (the
        file failed; the payload was drained and the stream is still usable).
        """
        if self.mode == "copy":
            return self._copy_to_file(file_fd, offset, count)
        done = 0
        while done < count:
            n = self._from_socket(count - done)
            try:
                self._pipe_to(file_fd, n, offset + done)
            except OSError as e:
                if e.errno == errno.EINVAL and done == 0:
                    # This filesystem cannot be spliced into: switch to the
                    # copy path for good, keeping what is in the pipe.
                    self._drain_pipe_into_file(file_fd, n, offset)
                    self.mode = "copy"
                    self._buf = bytearray(PIPE_SIZE)
                    return self._copy_to_file(file_fd, offset + n, count - n)
                self._drain_pipe(n)
                self.discard(count - done - n)
                raise SinkError(e.errno, f"writing payload: {e.strerror}") from e
            done += n
        return None

    def _drain_pipe_into_file(self, file_fd: int, n: int, offset: int) -> None:
        data = os.read(self._r.fd, n)
        while len(data) < n:
            data += os.read(self._r.fd, n - len(data))
        os.pwrite(file_fd, data, offset)

    def _drain_pipe(self, n: int) -> None:
        """Throw away what is left in the pipe (at most ``n`` bytes)."""
        while n:
            try:
                m = os.splice(self._r.fd, self._devnull.fd, n, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                return
            if m == 0:
                return
            n -= m

    def discard(self, count: int) -> None:
        """Read and throw away ``count`` payload bytes."""
        if self.mode == "copy":
            view = memoryview(self._buf)
            while count:
                self._wait_readable()
                n = self.sock.recv_into(view, min(count, len(view)))
                if n == 0:
                    raise PeerClosed("connection closed in the middle of a payload")
                count -= n
            return
        while count:
            n = self._from_socket(count)
            self._pipe_to(self._devnull.fd, n, None)
            count -= n

    def _copy_to_file(self, file_fd: int, offset: int, count: int) -> None:
        view = memoryview(self._buf)
        done = 0
        while done < count:
            self._wait_readable()
            n = self.sock.recv_into(view, min(count - done, len(view)))
            if n == 0:
                raise PeerClosed("connection closed in the middle of a payload")
            try:
                w = 0
                while w < n:
                    w += os.pwrite(file_fd, view[w:n], offset + done + w)
            except OSError as e:
                self.discard(count - done - n)
                raise SinkError(e.errno, f"writing payload: {e.strerror}") from e
            done += n
