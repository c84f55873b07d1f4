"""Owners by name: user "alice" on one node is user "alice" on the other,
whatever her numbers (rsync's default when it runs as root).

The sender names each user and group id once per connection, before the
first operation that carries it (``NameBook``: an ``Owner`` frame; ids
without a name here are not named). The receiver (``OwnerMap``), for a
mirror whose ``owners = "names"`` (the default; ``"numeric"`` is rsync's
``--numeric-ids``), applies the local id of that name, and falls back to
the peer's number when no such name exists here — logged once per name,
so an operator can add the user or switch the mirror to numeric ids. The
manifest it lists goes the other way (local ids → the peer's numbers of
the same names), so a rescan finds nothing to change.

Owners are applied only when the receiving mirror preserves them
(``preserve = ["owners"]``, as root).
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import pwd
from collections.abc import Callable
from typing import TypeVar

from . import frames as F

log = logging.getLogger(__name__)

USER, GROUP = 1, 2
_KINDS = {USER: "user", GROUP: "group"}

#: What an operation that carries owners looks like.
Owned = F.File | F.Mkdir | F.Symlink | F.Meta


def _name_of_uid(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _name_of_gid(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


E = TypeVar("E", bound=F.Event)
Lookup = Callable[[int], str | None]
Reverse = Callable[[str], int | None]


class NameBook:
    """Sender: which ids this connection has named already."""

    def __init__(self, user: Lookup = _name_of_uid, group: Lookup = _name_of_gid) -> None:
        self._lookup = {USER: user, GROUP: group}
        self._named: set[tuple[int, int]] = set()

    def frames_for(self, ev: F.Event) -> list[F.Event]:
        """The Owner frames to send before ``ev`` (none if it carries no
        owner or its ids were named already)."""
        if not isinstance(ev, Owned):
            return []
        out: list[F.Event] = []
        for kind, num in ((USER, ev.uid), (GROUP, ev.gid)):
            if (kind, num) in self._named:
                continue
            self._named.add((kind, num))
            name = self._lookup[kind](num)
            if name is not None and len(name.encode()) <= 255:
                out.append(F.Owner(kind, num, name))
        return out


class OwnerMap:
    """Receiver: the peer's ids and names on one connection, mapped to ours."""

    def __init__(
        self,
        peer: str,
        user: Reverse = _uid_of,
        group: Reverse = _gid_of,
        user_name: Lookup = _name_of_uid,
        group_name: Lookup = _name_of_gid,
    ) -> None:
        self.peer = peer
        self._to_local_id = {USER: user, GROUP: group}
        self._local_name = {USER: user_name, GROUP: group_name}
        #: The peer's names of its ids, and its ids of each name.
        self._names: dict[tuple[int, int], str] = {}
        self._ids: dict[tuple[int, str], int] = {}
        self._cache: dict[tuple[int, int], int] = {}
        self._back: dict[tuple[int, int], int] = {}
        self._warned: set[tuple[int, str]] = set()

    def told(self, ev: F.Owner) -> None:
        if ev.kind not in _KINDS:
            return  # a newer peer's kind: nothing to map
        self._names[(ev.kind, ev.id)] = ev.name
        self._ids[(ev.kind, ev.name)] = ev.id
        self._cache.pop((ev.kind, ev.id), None)
        self._back.clear()

    def local(self, kind: int, peer_id: int) -> int:
        """Our id for the peer's ``peer_id`` (the same number if it named
        none, or the name does not exist here)."""
        key = (kind, peer_id)
        got = self._cache.get(key)
        if got is not None:
            return got
        name = self._names.get(key)
        local = None if name is None else self._to_local_id[kind](name)
        if local is None:
            local = peer_id
            if name is not None and (kind, name) not in self._warned:
                self._warned.add((kind, name))
                log.warning(
                    "%s %r (id %d on %s) does not exist here: files of it get id %d; add the "
                    '%s, or set owners = "numeric" for the mirror',
                    _KINDS[kind],
                    name,
                    peer_id,
                    self.peer,
                    peer_id,
                    _KINDS[kind],
                    extra={"PEER": self.peer},
                )
        self._cache[key] = local
        return local

    def peers(self, kind: int, local_id: int) -> int:
        """The peer's id for our ``local_id`` (by name; else the same number)."""
        key = (kind, local_id)
        got = self._back.get(key)
        if got is not None:
            return got
        name = self._local_name[kind](local_id)
        theirs = None if name is None else self._ids.get((kind, name))
        result = local_id if theirs is None else theirs
        self._back[key] = result
        return result

    def map_in(self, ev: E) -> E:
        """``ev`` with our ids for the peer's owners."""
        if not isinstance(ev, Owned) or not self._names:
            return ev
        uid, gid = self.local(USER, ev.uid), self.local(GROUP, ev.gid)
        if (uid, gid) == (ev.uid, ev.gid):
            return ev
        return dataclasses.replace(ev, uid=uid, gid=gid)

    def map_out(self, ev: E) -> E:
        """A manifest entry with the peer's ids for our owners."""
        if not isinstance(ev, F.Entry) or not self._ids:
            return ev
        uid, gid = self.peers(USER, ev.uid), self.peers(GROUP, ev.gid)
        if (uid, gid) == (ev.uid, ev.gid):
            return ev
        return dataclasses.replace(ev, uid=uid, gid=gid)
