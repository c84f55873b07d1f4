"""TCP plumbing shared by links and sessions: addresses, socket options,
reads with deadlines. No protocol knowledge lives here."""

from __future__ import annotations

import select
import socket
import struct
import time

from .errors import LinkError

#: Read size when looking ahead at frames with MSG_PEEK (many small files'
#: frames and payloads in one read)...
PEEK_SIZE = 256 * 1024
#: ...and right after a spliced payload, when more payload is likely queued.
SMALL_PEEK = 4096


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def tune(sock: socket.socket, dead_after: float) -> None:
    """Options every replication socket gets.

    NODELAY: a frame must not wait ~40 ms for Nagle + delayed ACK (the sender
    corks deliberately instead). Keepalive and TCP_USER_TIMEOUT make the
    kernel give up on a peer that vanished, so no thread blocks forever in
    sendfile or splice. The socket stays blocking: settimeout() would make it
    non-blocking underneath and raw os.sendfile would raise BlockingIOError.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(dead_after / 2))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_after * 1000))
    # A send that makes no progress for this long fails instead of hanging.
    sec = int(dead_after * 4)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, 0))


def cork(sock: socket.socket, on: bool) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has data (or EOF) within ``timeout`` seconds. poll,
    not select: select cannot watch fd numbers above 1023."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    return bool(p.poll(max(0, int(timeout * 1000))))


def recv_some(sock: socket.socket, deadline: float, size: int = 65536) -> bytes:
    """Up to ``size`` bytes before ``deadline`` (monotonic); LinkError on EOF
    or timeout."""
    if not wait_readable(sock, deadline - time.monotonic()):
        raise LinkError("timed out waiting for the peer")
    try:
        data = sock.recv(size)
    except OSError as e:
        raise LinkError(f"connection failed: {e.strerror or e}") from e
    if not data:
        raise LinkError("connection closed by the peer")
    return data


def consume(sock: socket.socket, n: int, scratch: bytearray) -> None:
    """Drop ``n`` bytes we already peeked at from the socket's queue."""
    view = memoryview(scratch)
    while n:
        got = sock.recv_into(view, min(n, len(view)))
        if got == 0:
            raise LinkError("connection closed by the peer")
        n -= got


def send_last(sock: socket.socket, data: bytes, drain_max: int = 4 << 20) -> None:
    """Send ``data`` (a fatal Error frame), then close gently: closing with
    unread input makes the kernel send a RST, which can destroy the frame
    before the peer reads it. So: shut down our side, drain briefly. Never
    raises: the connection is ending anyway."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 2.0
        drained = 0
        while drained < drain_max and wait_readable(sock, deadline - time.monotonic()):
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except Exception:
        pass
