"""The replicator protocol as a sans-I/O state machine (after h11).

``Connection`` turns bytes into events (``receive_data`` / ``next_event``) and
events into bytes (``send``). It performs the versioned, mutually
authenticated handshake itself and enforces every ordering rule and limit of
docs/protocol.md, raising ``RemoteProtocolError`` when the peer breaks one and
``LocalProtocolError`` when we would.

Once established, every frame carries a tag (keyed BLAKE2b over an implicit
per-direction sequence number, the header and the body) under a key derived
from the handshake for that direction (``frame_keys``): a frame that was
altered, replayed, reordered, dropped or injected on the way fails the check
(``ErrorCode.INTEGRITY``). Chunk payloads are not covered; they never enter
Python.

Chunk payloads are placeholders here: after a ``Chunk`` event the connection
is in the payload state; the caller moves the bytes itself (splice on the
receiver, sendfile on the sender) and reports how many it moved. Bytes that
happen to be buffered already can be taken in-band with ``payload_from_buffer``.

``Connection`` owns the byte streams (buffer, frame numbers and tags, payload
counters) and the connection's state; it delegates to one module per concern:

* ``handshake``: Hello and Auth: version, names, nonces, key confirmation;
* ``frametag``: the per-direction frame keys and the tag of a frame;
* ``ordering``: once established, what each role may send and receive:
  open mirrors, files in flight, unanswered operations and their limits;
* ``frames``: the frames themselves and their byte codec.

Rules of this module (and of those): no sockets, no files, no clocks, no
threads, no locks. One thread drives a connection, both halves (the sender's link thread gets
raw bytes from its reader thread and parses them itself; a receiving
session is one thread).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable

from . import frames as F
from .errors import LocalProtocolError, RemoteProtocolError
from .frametag import frame_keys, frame_tag, tag
from .frametag import tag_state as _tag_state
from .handshake import Established, Handshake, Role, proof
from .ordering import AcceptorRules, InitiatorRules

__all__ = [
    "NEED_DATA",
    "PAYLOAD",
    "Connection",
    "Established",
    "Role",
    "State",
    "frame_keys",
    "frame_tag",
    "proof",
]


class State(enum.Enum):
    #: Waiting for the peer's Hello.
    AWAIT_HELLO = 1
    #: Waiting for the peer's Auth proof.
    AWAIT_AUTH = 2
    #: Authenticated; any frame of the role's table may flow.
    ESTABLISHED = 3
    #: A fatal Error was sent or received; nothing more may flow.
    CLOSED = 4


class _Sentinel(enum.Enum):
    #: More bytes are needed before the next event.
    NEED_DATA = "NEED_DATA"
    #: Chunk payload bytes are due; move them, then call payload_consumed().
    PAYLOAD = "PAYLOAD"


NEED_DATA = _Sentinel.NEED_DATA
PAYLOAD = _Sentinel.PAYLOAD


class Connection:
    """One end of a replicator connection."""

    def __init__(
        self,
        role: Role,
        name: str,
        nonce: bytes,
        key_for: Callable[[str], bytes | None],
        expect_peer: str | None = None,
    ) -> None:
        self._handshake = Handshake(role, name, nonce, key_for, expect_peer)
        self.role = role
        self.name = name
        self.state = State.AWAIT_HELLO
        # Frame tags, once established; each counter belongs to its half.
        self._rx_tag: hashlib.blake2b | None = None
        self._rx_seq = 0
        self._tx_tag: hashlib.blake2b | None = None
        self._tx_seq = 0
        self._out = bytearray()
        # Mirrors, files and operations of the role (ordering.py).
        self._rules = InitiatorRules() if role is Role.INITIATOR else AcceptorRules()
        # receiving half
        self._buf = bytearray()
        self._in_payload = 0
        # sending half
        self._out_payload = 0

    @property
    def peer(self) -> str | None:
        """The peer's name, once its Hello passed (not proved before Established)."""
        return self._handshake.peer

    @property
    def version(self) -> int | None:
        """The protocol version agreed on, once the peer's Hello passed."""
        return self._handshake.version

    # -- handshake ---------------------------------------------------------

    def start(self) -> None:
        """Initiator: queue our Hello (fetch it with data_to_send())."""
        if self.role is not Role.INITIATOR:
            raise LocalProtocolError("only the initiator starts the handshake")
        self._queue_hello()

    def _queue_hello(self) -> None:
        self._out += self._handshake.hello()

    def data_to_send(self) -> bytes:
        """Frames the connection produced by itself (handshake replies)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _on_hello(self, ev: F.Event) -> F.Event | Established | _Sentinel:
        if not isinstance(ev, F.Hello):
            raise RemoteProtocolError(
                F.ErrorCode.UNEXPECTED, f"expected Hello, got {type(ev).__name__}"
            )
        self._out += self._handshake.on_hello(ev)
        self.state = State.AWAIT_AUTH
        return self.next_event()

    def _on_auth(self, ev: F.Event) -> Established:
        if not isinstance(ev, F.Auth):
            raise RemoteProtocolError(
                F.ErrorCode.UNEXPECTED, f"expected Auth, got {type(ev).__name__}"
            )
        established, reply = self._handshake.on_auth(ev)
        self._out += reply
        # Every frame from here on is tagged, in both directions (the Auth
        # just queued is the acceptor's last untagged one).
        tx, rx = self._handshake.tag_keys()
        # bench/auth_cost.py --untagged finds this statement verbatim: keep it.
        self._tx_tag, self._rx_tag = _tag_state(tx), _tag_state(rx)
        self.state = State.ESTABLISHED
        return established

    # -- receiving half ----------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def buffered(self) -> int:
        """Bytes received and not yet parsed."""
        return len(self._buf)

    def rewind(self) -> int:
        """Forget unparsed bytes and return how many: the caller will read
        them again from the socket (it had only peeked at them)."""
        n = len(self._buf)
        self._buf.clear()
        return n

    @property
    def payload_remaining(self) -> int:
        """Payload bytes of the current incoming Chunk not yet moved."""
        return self._in_payload

    def payload_from_buffer(self, limit: int) -> bytes:
        """Take up to ``limit`` payload bytes that are already buffered."""
        n = min(limit, self._in_payload, len(self._buf))
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._in_payload -= n
        return data

    def payload_consumed(self, n: int) -> None:
        """The caller moved ``n`` payload bytes straight from the socket."""
        if self._buf:
            raise LocalProtocolError("buffered bytes precede the payload: rewind() first")
        if n > self._in_payload:
            raise LocalProtocolError(f"consumed {n} payload bytes, only {self._in_payload} due")
        self._in_payload -= n

    def next_event(self) -> F.Event | Established | _Sentinel:
        """The next event, NEED_DATA, or PAYLOAD while payload bytes are due."""
        if self._in_payload:
            return PAYLOAD
        if self.state is State.CLOSED:
            raise RemoteProtocolError(F.ErrorCode.UNEXPECTED, "connection is closed")
        if len(self._buf) < F.HEADER_SIZE:
            return NEED_DATA
        try:
            kind, length = F.decode_header(self._buf[: F.HEADER_SIZE])
        except F.FrameError as e:
            raise RemoteProtocolError(e.code, str(e)) from None
        end = F.HEADER_SIZE + length
        rx_tag = self._rx_tag
        full = end if rx_tag is None else end + F.TAG_SIZE
        if len(self._buf) < full:
            return NEED_DATA
        # Release the views on exit: a view left alive in the traceback of a
        # FrameError would pin _buf (BufferError on the next resize).
        with memoryview(self._buf) as view:
            if rx_tag is not None:
                # Check before decoding: no field of an unauthenticated body
                # is ever looked at.
                with view[:end] as frame, view[end:full] as got:
                    if not hmac.compare_digest(tag(rx_tag, self._rx_seq, frame), got):
                        raise self._integrity_error(kind, length)
                self._rx_seq += 1
            with view[F.HEADER_SIZE : end] as body:
                try:
                    ev = F.decode_body(kind, body)
                except F.FrameError as e:
                    raise RemoteProtocolError(e.code, str(e)) from None
        del self._buf[:full]
        return self._receive(ev)

    def _integrity_error(self, kind: int, length: int) -> RemoteProtocolError:
        return RemoteProtocolError(
            F.ErrorCode.INTEGRITY,
            f"frame #{self._rx_seq} from {self.peer!r} ({F.EVENTS[kind].__name__}, "
            f"{length}-byte body) failed its integrity check: it was altered, replayed, "
            "reordered, dropped or injected between the nodes; check the network path "
            "(anything that rewrites TCP payload, or an attacker)",
        )

    def _receive(self, ev: F.Event) -> F.Event | Established | _Sentinel:
        if self.state is State.ESTABLISHED:
            self._in_payload = self._rules.received(ev)
        elif isinstance(ev, F.Error):
            pass  # the peer refuses the handshake (or warns): no rule of ours applies
        elif self.state is State.AWAIT_HELLO:
            return self._on_hello(ev)
        else:
            return self._on_auth(ev)
        if isinstance(ev, F.Error) and ev.fatal:
            self.state = State.CLOSED
        return ev

    # -- sending half ------------------------------------------------------

    @property
    def payload_owed(self) -> int:
        """Payload bytes of our last Chunk still to be sent."""
        return self._out_payload

    def payload_sent(self, n: int) -> None:
        if n > self._out_payload:
            raise LocalProtocolError(f"sent {n} payload bytes, only {self._out_payload} owed")
        self._out_payload -= n

    def unacked(self) -> int:
        """Operations sent (initiator) / received (acceptor) and not yet answered."""
        return len(self._rules.unacked)

    def open_files(self) -> int:
        """Files we began sending and did not end (always 0 on the acceptor)."""
        return len(self._rules.files) if self.role is Role.INITIATOR else 0

    def send(self, ev: F.Event) -> bytes:
        """Bytes of ``ev``; raises LocalProtocolError if it may not be sent now."""
        if self.state is State.CLOSED or (
            self.state is not State.ESTABLISHED and type(ev) is not F.Error
        ):
            raise LocalProtocolError(f"cannot send {type(ev).__name__} in state {self.state.name}")
        if self._out_payload:
            raise LocalProtocolError(f"{self._out_payload} payload bytes still owed")
        # Encode first: a frame that cannot be encoded must not change our state.
        data = F.encode(ev)
        self._out_payload = self._rules.sending(ev)
        if isinstance(ev, F.Error) and ev.fatal:
            self.state = State.CLOSED
        return self._seal(data)

    def _seal(self, frame: bytes) -> bytes:
        """``frame`` with its tag, as the next frame we send (once established)."""
        state = self._tx_tag
        if state is None:
            return frame
        sealed = frame + tag(state, self._tx_seq, frame)
        self._tx_seq += 1
        return sealed
