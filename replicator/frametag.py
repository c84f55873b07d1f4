"""Frame authentication: the keys and the tag every frame carries once a
connection is established (docs/protocol.md §6.3).

Each direction has its own key (``frame_keys``), derived from the shared key
and everything the handshake exchanged, so it is fresh for every connection
and a frame tagged for one direction never verifies in the other. The tag of
a frame is keyed BLAKE2b-128 over its implicit sequence number in that
direction (u64, from 0) and the frame (header + body): a frame altered,
replayed, reordered, dropped or injected fails the check. Chunk payloads are
not covered; they never enter Python.

Pure functions over bytes: no state of a connection lives here (the sequence
numbers are ``protocol.Connection``'s), no sockets, no os.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from .frames import TAG_SIZE

#: BLAKE2b personalization of frame tags (exactly 16 bytes).
_TAG_PERSON = b"replicator-frame"
_SEQ = struct.Struct("!Q")


def frame_keys(
    key: bytes,
    version: int,
    initiator: str,
    acceptor: str,
    initiator_nonce: bytes,
    acceptor_nonce: bytes,
) -> tuple[bytes, bytes]:
    """(initiator→acceptor, acceptor→initiator) keys for frame tags.

    HMAC-SHA256 under the shared key over the connection's version, both names
    and both nonces (each length-prefixed), with a label per direction: fresh
    for every connection, and a frame tagged for one direction never verifies
    in the other (reflection)."""

    def derive(label: bytes) -> bytes:
        parts = (
            b"replicator-frames",
            version.to_bytes(2, "big"),
            label,
            initiator.encode(),
            acceptor.encode(),
            initiator_nonce,
            acceptor_nonce,
        )
        msg = b"".join(len(p).to_bytes(2, "big") + p for p in parts)
        return hmac.new(key, msg, hashlib.sha256).digest()

    return derive(b"i2a"), derive(b"a2i")


def tag_state(key: bytes) -> hashlib.blake2b:
    """BLAKE2b keyed with ``key``, to be copied for each frame (``tag``)."""
    # Keying costs a compression round: done once, then copied per frame
    # (measured: 0.46 us per frame instead of 0.73, HMAC-SHA256 1.3 us).
    return hashlib.blake2b(key=key, digest_size=TAG_SIZE, person=_TAG_PERSON)


def tag(state: hashlib.blake2b, seq: int, frame: bytes | bytearray | memoryview) -> bytes:
    """The tag of ``frame`` sent as number ``seq`` of its direction, under the
    key ``state`` was made with (``tag_state``); ``state`` is not changed."""
    h = state.copy()
    h.update(_SEQ.pack(seq))
    h.update(frame)
    return h.digest()


def frame_tag(key: bytes, seq: int, frame: bytes | bytearray | memoryview) -> bytes:
    """The tag of ``frame`` (header + body) sent as number ``seq`` (from 0) of
    its direction: keyed BLAKE2b-128 of ``seq`` (u64) then the frame."""
    h = tag_state(key)
    h.update(_SEQ.pack(seq))
    h.update(frame)
    return h.digest()
