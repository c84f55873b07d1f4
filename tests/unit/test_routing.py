"""The Router without sockets: which link hears which message."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

from replicator.changes import AgreedWith, Dirty, Flag, PeerHas, Reconcile
from replicator.conflicts import Base
from replicator.linkset import LinkSet
from replicator.listener import Listener
from replicator.manifest import EntryState
from replicator.marker import Marker
from replicator.routing import Router


class FakeLink:
    def __init__(self, *mirrors: str) -> None:
        self.by_name = set(mirrors)
        self.got: list[object] = []

    def post(self, msg: object) -> None:
        self.got.append(msg)

    def peer_state(self, mirror: str, path: bytes) -> EntryState | None:
        return None


def _router(links: dict[str, FakeLink], markers: dict[str, Marker] | None = None) -> Router:
    table = cast(LinkSet, SimpleNamespace(snapshot=lambda: links))
    return Router(table, cast(Listener, None), markers or {})


def test_changes_go_to_the_links_pushing_their_mirror() -> None:
    b, c = FakeLink("m1", "m2"), FakeLink("m2")
    r = _router({"b": b, "c": c})
    d1 = Dirty("m1", b"f", Flag.DATA)
    d2 = Dirty("m2", b"g", Flag.DATA)
    r.route(d1)
    r.route(d2)
    r.route(Reconcile(None))
    assert b.got == [d1, d2, Reconcile(None)] and c.got == [d2, Reconcile(None)]


def test_peer_has_goes_to_that_peer_only() -> None:
    b, c = FakeLink("m1"), FakeLink("m1")
    r = _router({"b": b, "c": c})
    msg = PeerHas("c", "m1", b"f", None)
    r.notify(msg)  # as a session does
    r.route(PeerHas("nobody", "m1", b"f", None))  # no link to it: dropped
    agreed = AgreedWith("b", "m1", ((b"f", None, None),))
    r.notify(agreed)  # so does what was published from a peer
    assert b.got == [agreed] and c.got == [msg]


def test_a_mirror_without_marker_is_ok() -> None:
    gone = cast(Marker, SimpleNamespace(ok=lambda: False))
    r = _router({}, {"m1": gone})
    assert not r.marker_ok("m1") and r.marker_ok("m2")
    assert r.peer_state("b", "m1", b"f") == Base()  # no link to b: nothing known
