"""Router: where the messages of watcher, scanner and sessions go, and the
SessionHost of every inbound session.

Changes flow through ``route``: the watcher and the scanner produce
Dirty/Moved/Reconcile messages for the links pushing that mirror; sessions
produce PeerHas messages for the link to the peer that sent the change (echo
suppression), and ask what that link knows the peer holds (``peer_state``,
two-way mirrors). A session's admission and its end before authentication
are the listener's (the registry of sessions); its mirrors' markers say
whether their disks are mounted.

Called from any thread: it reads the table of links once per call
(``LinkSet.snapshot``, never changed in place) and the markers, which the
main thread only adds to.
"""

from __future__ import annotations

from collections.abc import Mapping

from .changes import AgreedWith, PeerHas
from .conflicts import Base
from .linkset import LinkSet
from .listener import Listener
from .marker import Marker
from .session import Session


class Router:
    """Messages to links; the sessions' host (see the module docstring)."""

    def __init__(self, links: LinkSet, listener: Listener, markers: Mapping[str, Marker]) -> None:
        self.links = links
        self.listener = listener
        #: The daemon's markers, by mirror: the same dict, kept up to date by it.
        self.markers = markers

    def route(self, msg: object) -> None:
        """Hand a change to the links it concerns: PeerHas and AgreedWith to
        the link to that peer; Dirty/Moved/Reconcile to every link pushing its mirror."""
        links = self.links.snapshot()
        if isinstance(msg, PeerHas | AgreedWith):
            link = links.get(msg.peer)
            if link is not None:
                link.post(msg)
            return
        mirror = getattr(msg, "mirror", None)
        for link in list(links.values()):
            if mirror is None or mirror in link.by_name:
                link.post(msg)

    def receiving(self) -> set[tuple[str, str]]:
        """(mirror, peer) of every inbound session with the mirror open."""
        return {
            (m, s.peer) for s in self.listener.sessions() if s.peer for m in list(s.stats.mirrors)
        }

    # -- SessionHost (session.py) ------------------------------------------------

    def established(self, session: Session) -> None:
        self.listener.established(session)

    def preauth_ended(self, session: Session, reason: str, level: int, message: str) -> None:
        self.listener.preauth_ended(session, reason, level, message)

    def marker_ok(self, mirror: str) -> bool:
        marker = self.markers.get(mirror)
        return marker is None or marker.ok()

    def peer_state(self, peer: str, mirror: str, path: bytes) -> Base:
        link = self.links.snapshot().get(peer)
        return Base() if link is None else link.peer_state(mirror, path)

    def notify(self, msg: object) -> None:
        self.route(msg)
