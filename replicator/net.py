"""TCP plumbing shared by links and sessions: addresses, socket options,
reads with deadlines. No protocol knowledge lives here."""

from __future__ import annotations

import ipaddress
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
    """``host:port`` or ``[v6]:port`` → (host, port), an IPv6 host in its
    canonical form (``[FD00:0::1]`` → ``fd00::1``); ValueError saying what
    to write instead if malformed.

    Refused: an IPv6 address without brackets (``::1:7301`` is ambiguous),
    brackets around anything else, scoped (``%eth0``) and link-local
    (fe80::/10) addresses (they name an interface, not a host: use a global
    or unique-local address of that interface), and IPv4-mapped ones
    (``::ffff:a.b.c.d``: write the IPv4 address).
    """
    if text.startswith("[") and text.endswith("]"):
        raise ValueError(f"{text!r} has no port: write '{text}:PORT'")
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if ":" in host and not bracketed:
        _unbracketed(text, host, port)
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT ({_EXAMPLES})")
    if not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be 1 to 65535")
    if not bracketed:
        if "[" in host or "]" in host:
            raise ValueError(f"{text!r}: unbalanced brackets ({_EXAMPLES})")
        return host, int(port)
    inner = host[1:-1]
    try:
        ip = ipaddress.IPv6Address(inner.partition("%")[0])
    except ValueError:
        raise ValueError(
            f"{text!r}: {inner!r} is not an IPv6 address; brackets are for IPv6 only "
            "(write IPv4 addresses and host names without them)"
        ) from None
    _usable(text, inner, ip, port)
    return ip.compressed, int(port)


_EXAMPLES = "e.g. '198.18.0.2:7301', or '[fd00::2]:7301' for IPv6"


def _usable(text: str, written: str, ip: ipaddress.IPv6Address, port: str) -> None:
    """ValueError if ``ip`` (written ``written``) cannot name a peer or a
    listen address by itself."""
    if "%" in written or ip.is_link_local:
        raise ValueError(
            f"{text!r}: link-local and scoped IPv6 addresses (fe80::/10, %interface) are not "
            "supported: use a global or unique-local (fd00::/8) address of that interface"
        )
    if ip.ipv4_mapped is not None:
        raise ValueError(
            f"{text!r} is an IPv4-mapped IPv6 address: write '{ip.ipv4_mapped}:{port}' instead"
        )


def _unbracketed(text: str, host: str, port: str) -> None:
    """An IPv6 address written without brackets: ValueError saying how to
    write it (``fd00::2:7301`` is read as address fd00::2, port 7301)."""
    for written, p in ((host, port), (text, "PORT")):
        if written is host and not port.isdigit():
            continue
        try:
            ip = ipaddress.IPv6Address(written.partition("%")[0])
        except ValueError:
            continue
        _usable(text, written, ip, p)
        raise ValueError(
            f"{text!r}: write an IPv6 address in brackets, then the port: '[{ip.compressed}]:{p}'"
        )
    raise ValueError(f"{text!r} is not HOST:PORT ({_EXAMPLES})")


def format_address(host: str, port: int) -> str:
    """(host, port) → ``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical_address(text: str) -> str:
    """``text`` as ``format_address`` writes it (an IPv6 host in canonical
    form); ValueError as ``parse_address``."""
    return format_address(*parse_address(text))


def is_unspecified(host: str) -> bool:
    """``0.0.0.0`` or ``::``: every address of this host, not one of them."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def peer_host(host: str) -> str:
    """The address a connection came from, as people write it: an IPv4
    client of a dual-stack listener shows as ``::ffff:a.b.c.d``; this
    returns ``a.b.c.d``."""
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return host if mapped is None else str(mapped)


def listen_socket(text: str, backlog: int) -> socket.socket:
    """A listening TCP socket on ``text`` (OSError if unusable).

    ``[::]:PORT`` is dual-stack: it takes IPv4 clients too (as
    ``::ffff:a.b.c.d``), whatever net.ipv6.bindv6only says, as "every
    address" means; ``0.0.0.0:PORT`` is IPv4 only, a specific address that
    address only. A host name is resolved, its first IPv4 address preferred
    (as before IPv6 support), else its first IPv6 one.
    """
    host, port = parse_address(text)
    family: int
    if ":" in host:
        family, addr = socket.AF_INET6, (host, port)
    else:
        try:
            ipaddress.IPv4Address(host)
            family, addr = socket.AF_INET, (host, port)
        except ValueError:
            family, addr = _resolve(host, port)
    ls = socket.socket(family, socket.SOCK_STREAM)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and is_unspecified(host):
            ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind(addr)
        ls.listen(backlog)
    except OSError:
        ls.close()
        raise
    return ls


def _resolve(host: str, port: int) -> tuple[int, tuple[str, int]]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    infos.sort(key=lambda i: i[0] != socket.AF_INET)  # stable: IPv4 first, else as resolved
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


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
    # Not-yet-sent data stays small (see LOWAT); pace() may change it.
    if not lowat(sock):
        set_lowat(sock, LOWAT)


def cork(sock: socket.socket, on: bool) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)


#: <asm-generic/socket.h> and <linux/tcp.h> (Python 3.11's socket module
#: lacks them; SO_MAX_PACING_RATE is 47 on x86 and arm).
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
#: What SO_MAX_PACING_RATE holds when there is no cap (~0UL).
NO_PACING = (1 << 64) - 1
#: Bytes queued in a paced socket but not yet sent: a quarter of a second
#: at the rate, within these bounds.
LOWAT_MIN, LOWAT_MAX = 16 << 10, 32 << 20
#: Bytes queued in a socket without a limit but not yet sent. Without it
#: the kernel queues up to the send buffer (4 MB here) ahead of the next
#: frame — ~30 ms at 150 MB/s, which a small file sent after a big file's
#: chunk waited on top of the chunk. It does not limit what is in flight
#: (the congestion window), so throughput stays (bench/throughput.py).
LOWAT = 256 << 10


def pace(sock: socket.socket, rate: int) -> int:
    """Cap what the kernel sends on ``sock`` at ``rate`` bytes per second
    (0: no cap); returns the cap the socket reports back (0: none).

    SO_MAX_PACING_RATE makes TCP pace every segment, sendfile's included
    (with the fq qdisc, else TCP's own pacing): the data path stays
    zero-copy. TCP_NOTSENT_LOWAT keeps the not-yet-sent queue to about a
    quarter of a second at that rate, so a frame queued behind file data (a
    Ping, an End) leaves soon, not after megabytes of send buffer. Both can
    change on a live connection.
    """
    low = LOWAT if not rate else max(LOWAT_MIN, min(LOWAT_MAX, rate // 4))
    sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, struct.pack("Q", rate or NO_PACING))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, low)
    return pacing(sock)


def set_lowat(sock: socket.socket, size: int) -> None:
    """TCP_NOTSENT_LOWAT: what the socket may hold not yet sent."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, size)


def lowat(sock: socket.socket) -> int:
    """The TCP_NOTSENT_LOWAT ``sock`` reports (0: unset, the sysctl's)."""
    return int(sock.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT))


def rtt(sock: socket.socket) -> float:
    """The connection's round trip in seconds as the kernel estimates it
    for the data it receives (tcpi_rcv_rtt, what its own receive-buffer
    autotuning uses), else for what it sends (tcpi_rtt); 0.0 if unknown.
    On a receiver tcpi_rtt times its few small frames, whose acks wait
    behind the sender's queued data: 3-4.5 ms on loopback against 25 µs."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return 0.0
    if len(info) < 96:
        return 0.0
    # struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_rtt is the
    # 16th of them, tcpi_rcv_rtt the 22nd (microseconds).
    fields = struct.unpack_from("=8x22I", info)
    return float(fields[21] or fields[15]) / 1e6


def rmem_max() -> int:
    """net.core.rmem_max: the most SO_RCVBUF may ask for (unprivileged)."""
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 212992  # the kernel's default


def set_rcvbuf(sock: socket.socket, size: int) -> None:
    """SO_RCVBUF (the kernel doubles it for its bookkeeping; autotuning stops)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def pacing(sock: socket.socket) -> int:
    """The SO_MAX_PACING_RATE ``sock`` reports, in bytes per second (0: none)."""
    (got,) = struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, 8))
    return 0 if got == NO_PACING else int(got)


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
