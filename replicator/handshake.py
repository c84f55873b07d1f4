"""The handshake of a connection: Hello both ways, then Auth both ways
(docs/protocol.md §6).

The Hellos agree on a protocol version and exchange names and nonces; each
side then proves it holds the key shared with the peer it claims to be
(``proof``: HMAC-SHA256 over both names and both nonces, labelled by who
proves), and the proved key yields the keys of the frame tags
(``frametag.frame_keys``). ``Handshake`` checks what the peer sends and
produces our replies; ``protocol.Connection`` decides when each frame may
arrive and arms the tags with ``tag_keys()``.

Peer violations raise ``RemoteProtocolError``. No sockets, no os, no clocks.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from . import frames as F
from .errors import RemoteProtocolError
from .frametag import frame_keys


class Role(enum.Enum):
    #: Opens the TCP connection and pushes mirrors (the sender).
    INITIATOR = "initiator"
    #: Accepts the TCP connection and writes into its mirrors (the receiver).
    ACCEPTOR = "acceptor"


@dataclass(frozen=True)
class Established:
    """The handshake is complete: ``peer`` proved it holds the shared key."""

    peer: str
    version: int


def proof(
    key: bytes,
    label: bytes,
    initiator: str,
    acceptor: str,
    initiator_nonce: bytes,
    acceptor_nonce: bytes,
) -> bytes:
    """HMAC-SHA256 over both names and both nonces; ``label`` tells who proves,
    so a proof can never be reflected back as the other side's."""
    msg = b"|".join(
        [
            b"replicator-auth-v1",
            label,
            initiator.encode(),
            acceptor.encode(),
            initiator_nonce,
            acceptor_nonce,
        ]
    )
    return hmac.new(key, msg, hashlib.sha256).digest()


class Handshake:
    """Our side of one handshake.

    The initiator sends its Hello first (``hello()``), answers the acceptor's
    Hello with its Auth and expects the acceptor's Auth last; the acceptor
    answers the initiator's Hello with its own Hello and its Auth with its
    own Auth. ``peer`` and ``version`` are known once the peer's Hello passed.
    """

    def __init__(
        self,
        role: Role,
        name: str,
        nonce: bytes,
        key_for: Callable[[str], bytes | None],
        expect_peer: str | None = None,
    ) -> None:
        if len(nonce) != F.NONCE_SIZE:
            raise ValueError("nonce must be 32 random bytes")
        self.role = role
        self.name = name
        self.peer: str | None = None
        self.version: int | None = None
        self._nonce = nonce
        self._peer_nonce = b""
        self._key: bytes | None = None
        self._key_for = key_for
        self._expect_peer = expect_peer

    def hello(self) -> bytes:
        """Our Hello frame (the versions are read now: tests pretend to be old)."""
        return F.encode(F.Hello(F.VERSION_MIN, F.VERSION_MAX, F.MAGIC, self.name, self._nonce))

    def on_hello(self, ev: F.Hello) -> bytes:
        """Check the peer's Hello; the frame to answer it with."""
        if ev.magic != F.MAGIC:
            raise RemoteProtocolError(F.ErrorCode.MALFORMED, "not a replicator peer (bad magic)")
        lo, hi = max(ev.version_min, F.VERSION_MIN), min(ev.version_max, F.VERSION_MAX)
        if lo > hi:
            ours, theirs = (
                f"{F.VERSION_MIN}..{F.VERSION_MAX}",
                f"{ev.version_min}..{ev.version_max}",
            )
            if ev.version_max < F.VERSION_MIN:
                why = (
                    f"peer {ev.name!r} speaks protocol {theirs}, we need {ours}: upgrade "
                    "replicator on the peer (protocol 1 does not authenticate frames "
                    "after the handshake; protocol 2 does not verify files against "
                    "block maps)"
                )
            else:
                why = f"peer {ev.name!r} speaks protocol {theirs}, we speak {ours}: upgrade us"
            raise RemoteProtocolError(F.ErrorCode.VERSION, f"no common protocol version: {why}")
        if len(ev.nonce) != F.NONCE_SIZE:
            raise RemoteProtocolError(F.ErrorCode.MALFORMED, "Hello nonce must be 32 bytes")
        if self._expect_peer is not None and ev.name != self._expect_peer:
            raise RemoteProtocolError(
                F.ErrorCode.AUTH, f"expected peer {self._expect_peer!r}, it says it is {ev.name!r}"
            )
        key = self._key_for(ev.name)
        if key is None:
            raise RemoteProtocolError(F.ErrorCode.AUTH, f"unknown peer {ev.name!r}")
        self.peer, self.version, self._peer_nonce, self._key = ev.name, hi, ev.nonce, key
        if self.role is Role.ACCEPTOR:
            return self.hello()
        return F.encode(F.Auth(self._my_proof()))

    def on_auth(self, ev: F.Auth) -> tuple[Established, bytes]:
        """Check the peer's proof: the handshake is complete; also the frame to
        answer it with (the acceptor's Auth; nothing for the initiator)."""
        if not hmac.compare_digest(ev.proof, self._their_proof()):
            raise RemoteProtocolError(
                F.ErrorCode.AUTH, f"peer {self.peer!r} failed authentication (wrong key?)"
            )
        reply = F.encode(F.Auth(self._my_proof())) if self.role is Role.ACCEPTOR else b""
        assert self.peer is not None and self.version is not None
        return Established(self.peer, self.version), reply

    def tag_keys(self) -> tuple[bytes, bytes]:
        """(send, receive) keys of our frame tags, once the peer's Hello passed."""
        assert self._key is not None and self.version is not None
        i2a, a2i = frame_keys(self._key, self.version, *self._names())
        return (i2a, a2i) if self.role is Role.INITIATOR else (a2i, i2a)

    def _names(self) -> tuple[str, str, bytes, bytes]:
        assert self.peer is not None
        if self.role is Role.INITIATOR:
            return self.name, self.peer, self._nonce, self._peer_nonce
        return self.peer, self.name, self._peer_nonce, self._nonce

    def _my_proof(self) -> bytes:
        assert self._key is not None
        label = b"initiator" if self.role is Role.INITIATOR else b"acceptor"
        return proof(self._key, label, *self._names())

    def _their_proof(self) -> bytes:
        assert self._key is not None
        label = b"acceptor" if self.role is Role.INITIATOR else b"initiator"
        return proof(self._key, label, *self._names())
