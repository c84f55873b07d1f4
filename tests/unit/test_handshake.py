"""The handshake (handshake.py) and the frame tags (frametag.py) on their
own: two ``Handshake`` objects talk frames directly. tests/unit/test_protocol.py
checks the handshake through ``Connection``, byte by byte."""

from __future__ import annotations

import pytest

from replicator import frames as F
from replicator.errors import RemoteProtocolError
from replicator.frametag import frame_keys, frame_tag, tag, tag_state
from replicator.handshake import Established, Handshake, Role

KEY = b"shared secret of a and b, 32 by"
NONCE_A, NONCE_B = b"\1" * F.NONCE_SIZE, b"\2" * F.NONCE_SIZE


def pair(key_b: bytes = KEY) -> tuple[Handshake, Handshake]:
    ini = Handshake(Role.INITIATOR, "a", NONCE_A, {"b": KEY}.get, expect_peer="b")
    acc = Handshake(Role.ACCEPTOR, "b", NONCE_B, {"a": key_b}.get)
    return ini, acc


def frame(data: bytes) -> F.Event:
    kind, length = F.decode_header(data[: F.HEADER_SIZE])
    assert len(data) == F.HEADER_SIZE + length
    return F.decode_body(kind, data[F.HEADER_SIZE :])


def test_a_whole_handshake() -> None:
    ini, acc = pair()
    hello = frame(ini.hello())
    assert hello == F.Hello(F.VERSION_MIN, F.VERSION_MAX, F.MAGIC, "a", NONCE_A)
    assert isinstance(hello, F.Hello)
    their_hello = frame(acc.on_hello(hello))  # the acceptor answers with its Hello
    assert their_hello == F.Hello(F.VERSION_MIN, F.VERSION_MAX, F.MAGIC, "b", NONCE_B)
    assert (acc.peer, acc.version) == ("a", F.VERSION_MAX)
    assert isinstance(their_hello, F.Hello)
    auth = frame(ini.on_hello(their_hello))  # the initiator proves first
    assert isinstance(auth, F.Auth)
    done, reply = acc.on_auth(auth)
    assert done == Established("a", F.VERSION_MAX)
    last = frame(reply)
    assert isinstance(last, F.Auth) and last != auth  # a proof is bound to who proves
    assert ini.on_auth(last) == (Established("b", F.VERSION_MAX), b"")
    # each side sends with the key the other receives with
    assert ini.tag_keys() == acc.tag_keys()[::-1]
    i2a, a2i = frame_keys(KEY, F.VERSION_MAX, "a", "b", NONCE_A, NONCE_B)
    assert ini.tag_keys() == (i2a, a2i) and i2a != a2i


def test_wrong_key_fails_authentication() -> None:
    ini, acc = pair(key_b=b"not the shared secret of a and b")
    their_hello = frame(acc.on_hello(frame(ini.hello())))
    assert isinstance(their_hello, F.Hello)
    auth = frame(ini.on_hello(their_hello))
    assert isinstance(auth, F.Auth)
    with pytest.raises(RemoteProtocolError) as e:
        acc.on_auth(auth)
    assert e.value.code is F.ErrorCode.AUTH and "'a' failed authentication" in str(e.value)


def test_a_reflected_proof_fails() -> None:
    """The acceptor's proof sent back to it as the initiator's."""
    ini, acc = pair()
    their_hello = frame(acc.on_hello(frame(ini.hello())))
    assert isinstance(their_hello, F.Hello)
    ini.on_hello(their_hello)
    mine = F.Auth(acc._my_proof())
    with pytest.raises(RemoteProtocolError):
        acc.on_auth(mine)


@pytest.mark.parametrize(
    ("hello", "code", "says"),
    [
        (F.Hello(3, 3, b"XXXX", "a", NONCE_A), F.ErrorCode.MALFORMED, "bad magic"),
        (F.Hello(1, 1, F.MAGIC, "a", NONCE_A), F.ErrorCode.VERSION, "upgrade replicator on"),
        # version 2 had no block maps
        (F.Hello(2, 2, F.MAGIC, "a", NONCE_A), F.ErrorCode.VERSION, "upgrade replicator on"),
        (F.Hello(4, 9, F.MAGIC, "a", NONCE_A), F.ErrorCode.VERSION, "upgrade us"),
        (F.Hello(3, 3, F.MAGIC, "a", b"short"), F.ErrorCode.MALFORMED, "nonce"),
        (F.Hello(3, 3, F.MAGIC, "c", NONCE_A), F.ErrorCode.AUTH, "unknown peer 'c'"),
    ],
)
def test_bad_hellos(hello: F.Hello, code: F.ErrorCode, says: str) -> None:
    _, acc = pair()
    with pytest.raises(RemoteProtocolError) as e:
        acc.on_hello(hello)
    assert e.value.code is code and says in str(e.value)
    assert acc.peer is None and acc.version is None


def test_the_initiator_expects_its_peer() -> None:
    ini, _ = pair()
    with pytest.raises(RemoteProtocolError) as e:
        ini.on_hello(F.Hello(3, 3, F.MAGIC, "c", NONCE_B))
    assert e.value.code is F.ErrorCode.AUTH and "expected peer 'b'" in str(e.value)


def test_nonce_must_be_32_bytes() -> None:
    with pytest.raises(ValueError):
        Handshake(Role.INITIATOR, "a", b"\0" * 31, {}.get)


def test_tag_is_frame_tag_and_keeps_its_state() -> None:
    key = b"k" * 32
    state = tag_state(key)
    first = tag(state, 0, b"frame")
    assert first == tag(state, 0, b"frame") == frame_tag(key, 0, b"frame")
    assert len(first) == F.TAG_SIZE
    # the sequence number, the frame and the key each change the tag
    assert tag(state, 1, b"frame") != first
    assert tag(state, 0, b"framf") != first
    assert frame_tag(b"j" * 32, 0, b"frame") != first
