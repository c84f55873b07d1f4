"""LinkSet: the outbound links of a node, one Link per peer it pushes to.

It owns the table peer -> Link and what each link was built from (its
spec). ``apply`` brings the table in line with a config: a link whose spec
did not change stays up, one whose spec changed is restarted, the others
are started or stopped; a change of the peer's ``bwlimit`` alone is posted
to the running link, which applies it to its live connection. The decision
is ``plan``, a pure function of the specs; ``apply`` only carries it out.

Only the main thread calls ``apply`` and ``stop``. Other threads read the
table through ``snapshot``: it is replaced whole, never changed in place, so
a reader that took it once iterates a dict that stays as it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .backlog import Store
from .config import Config
from .history import Archive
from .link import Link, SourceMirror
from .maps import SentMaps, database
from .marker import Marker
from .stats import LinkStats

#: Builds (does not start) the link to a peer, from the config, keys and markers.
LinkFactory = Callable[[Config, Mapping[str, bytes], Mapping[str, Marker], str], Link]


def pushed_peers(cfg: Config) -> list[str]:
    """Every peer some mirror pushes to, sorted."""
    return sorted({p for m in cfg.mirrors.values() for p in m.push_to})


@dataclass(frozen=True)
class Spec:
    """What a link is built from: a reload restarts the link if ``build``
    changes; a change of ``bwlimit`` alone is applied to the running link."""

    build: tuple[Any, ...]
    bwlimit: int


def link_spec(cfg: Config, keys: Mapping[str, bytes], peer: str) -> Spec:
    """Everything a link to ``peer`` is built from: its peer section, its key
    and the mirrors pushed to it."""
    mirrors = tuple(
        (name, m.model_dump_json()) for name, m in sorted(cfg.mirrors.items()) if peer in m.push_to
    )
    p = cfg.peers[peer]
    return Spec((p.model_dump_json(exclude={"bwlimit"}), keys.get(peer), mirrors), p.bwlimit)


@dataclass(frozen=True)
class LinkChanges:
    """What ``apply`` did (or ``plan`` decided), each list sorted; a peer is
    in one list at most. ``bwlimit_changed``: links that stay up and apply
    their new bwlimit to their connection."""

    started: list[str]
    stopped: list[str]
    restarted: list[str]
    bwlimit_changed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        live = self.bwlimit_changed
        return (
            f"links restarted: {', '.join(self.restarted) or 'none'}; "
            f"started: {', '.join(self.started) or 'none'}; "
            f"stopped: {', '.join(self.stopped) or 'none'}"
        ) + (f"; bwlimit changed (applied live): {', '.join(live)}" if live else "")


def plan(current: Mapping[str, Spec], cfg: Config, keys: Mapping[str, bytes]) -> LinkChanges:
    """Which links to start, stop and restart to go from links built from
    ``current`` (peer -> spec) to those ``cfg`` and ``keys`` ask for."""
    want = {p: link_spec(cfg, keys, p) for p in pushed_peers(cfg)}
    kept = [p for p in current if p in want and current[p].build == want[p].build]
    return LinkChanges(
        started=sorted(p for p in want if p not in current),
        stopped=sorted(p for p in current if p not in want),
        restarted=sorted(p for p in current if p in want and p not in kept),
        bwlimit_changed=sorted(p for p in kept if current[p].bwlimit != want[p].bwlimit),
    )


def build_link(
    cfg: Config, keys: Mapping[str, bytes], markers: Mapping[str, Marker], peer: str
) -> Link:
    """The real link to ``peer``: its mirrors, its backlog store, its stats."""
    mirrors = [
        SourceMirror.from_config(i + 1, name, m, peer, markers.get(name))
        for i, (name, m) in enumerate(sorted(cfg.mirrors.items()))
        if peer in m.push_to
    ]
    pcfg = cfg.peers[peer]
    store = Store(os.path.join(cfg.node.state_dir, "backlog.sqlite3"), peer)
    db = database(cfg.node.state_dir)
    maps = SentMaps(db, peer)
    archive = Archive(db, peer)
    stats = LinkStats(peer, pcfg.address)
    return Link(cfg.node, peer, pcfg, keys[peer], mirrors, stats, store, maps, archive)


class LinkSet:
    """The outbound links, their specs, and starting/stopping them."""

    def __init__(self, factory: LinkFactory = build_link) -> None:
        self._factory = factory
        self._links: dict[str, Link] = {}
        self._specs: dict[str, Spec] = {}

    def snapshot(self) -> dict[str, Link]:
        """The current table (peer -> link); never changed after it is returned."""
        return self._links

    def apply(
        self, cfg: Config, keys: Mapping[str, bytes], markers: Mapping[str, Marker]
    ) -> LinkChanges:
        """Start, stop and restart links so that they match ``cfg``; the
        others stay up (a new bwlimit is posted to them). Peers are handled
        in order, a restart stops the old link before it starts the new one."""
        changes = plan(self._specs, cfg, keys)
        stop = set(changes.stopped) | set(changes.restarted)
        start = set(changes.started) | set(changes.restarted)
        for peer in sorted(stop | start):
            if peer in stop:
                self._stop_one(peer)
            if peer in start:
                self._start_one(cfg, keys, markers, peer)
        for peer in changes.bwlimit_changed:
            self._specs[peer] = link_spec(cfg, keys, peer)
            self._links[peer].set_bwlimit(cfg.peers[peer].bwlimit)
        return changes

    def _start_one(
        self, cfg: Config, keys: Mapping[str, bytes], markers: Mapping[str, Marker], peer: str
    ) -> None:
        link = self._factory(cfg, keys, markers, peer)
        self._links = {**self._links, peer: link}  # replaced whole: readers hold the old one
        self._specs[peer] = link_spec(cfg, keys, peer)
        link.start()

    def _stop_one(self, peer: str) -> None:
        links = dict(self._links)
        link = links.pop(peer)
        self._links = links
        self._specs.pop(peer, None)
        link.stop()
        link.join(10)

    def dead(self) -> list[str]:
        """Links whose thread died, as workers: ``link to PEER``."""
        return [f"link to {p}" for p, link in self._links.items() if not link.is_alive()]

    def stop(self, drain: float) -> float:
        """Stop every link: each gets ``drain`` seconds to see what it has in
        flight acknowledged, and until the returned deadline (monotonic,
        ``drain`` + 2 s from now) to end; one still stuck in a send then has
        its connection cut. The table stays (status still shows the links)."""
        links = self._links
        for link in links.values():
            link.stop(drain)
        deadline = time.monotonic() + drain + 2
        for link in links.values():
            link.join(max(0.1, deadline - time.monotonic()))
            if link.is_alive():  # stuck in a send: cut the connection
                link.stop()
                link.join(5)
        return deadline
