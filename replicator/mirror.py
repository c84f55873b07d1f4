"""A mirror as this node pushes it to one peer (``SourceMirror``): its root,
excludes, deletion policy and marker, and how its entries compare with what
that peer holds.

Plain state and one rule; the link and its parts share it. No I/O but the
marker's check (``deletes_allowed``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .blockmap import NAMES, XXH3_128
from .config import MirrorConfig
from .inbox import IS_ROOT
from .manifest import Change, EntryState, Excludes, Preserve, compare
from .marker import Marker


@dataclass
class SourceMirror:
    """A mirror as this node pushes it."""

    id: int
    name: str
    root: bytes
    excludes: Excludes
    delete: bool
    rescan_interval: float
    marker: Marker | None = None
    #: The peer also pushes this mirror to us (conflicts.py): rescans judge
    #: with the version last agreed with it (history.py).
    two_way: bool = False
    paused: bool = False
    #: What this node applies from peers that push this mirror here.
    preserve: Preserve = Preserve.NONE
    #: Digest algorithm of the block maps sent (blockmap.NAMES).
    algo: int = XXH3_128
    #: Seconds between periodic scrubs (0: only when asked).
    verify_interval: float = 0.0

    @classmethod
    def from_config(
        cls, mid: int, name: str, cfg: MirrorConfig, peer: str, marker: Marker | None = None
    ) -> SourceMirror:
        return cls(
            mid,
            name,
            os.fsencode(cfg.path),
            Excludes(cfg.exclude),
            cfg.delete,
            cfg.rescan_interval,
            marker,
            two_way=peer in cfg.accept_from,
            preserve=Preserve.from_names(cfg.preserve),
            algo=NAMES[cfg.digest],
            verify_interval=cfg.verify_interval,
        )

    def deletes_allowed(self) -> bool:
        return self.delete and (self.marker is None or self.marker.ok())

    def compare(self, src: EntryState, there: EntryState | None, applied: Preserve) -> Change:
        """What to send to turn ``there`` into ``src``, counting only what the
        peer applies as sent (``applied``: its ``Opened``). In a two-way
        mirror, only what both sides apply: what we keep our own (owners,
        special bits) must not flow back and overwrite the peer's."""
        if self.two_way:
            applied &= self.preserve
        owners = IS_ROOT and bool(applied & Preserve.OWNERS)
        return compare(src, there, owners, bool(applied & Preserve.SPECIAL_BITS))
