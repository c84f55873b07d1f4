"""Bandwidth limits as people write them (``bwlimit = "50MiB"``) and as
status shows them. Pure: no I/O.

A limit is an integer (bytes per second) or a string: a number, a unit and
an optional ``/s``. Units are case-sensitive so that a byte is never read as
a bit: ``B``; ``K``/``KiB``, ``M``/``MiB``, ``G``/``GiB`` (1024-based, as in
rsync's ``--bwlimit``); ``kB``/``KB``, ``MB``, ``GB`` (1000-based); ``kbit``,
``Mbit``, ``Gbit`` (1000-based bits, as network links are sold). 0 means no
limit.
"""

from __future__ import annotations

import re

UNITS: dict[str, int | float] = {
    "B": 1,
    "K": 1 << 10,
    "KiB": 1 << 10,
    "M": 1 << 20,
    "MiB": 1 << 20,
    "G": 1 << 30,
    "GiB": 1 << 30,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "kbit": 1000 / 8,
    "Mbit": 1000**2 / 8,
    "Gbit": 1000**3 / 8,
}
#: The lowest limit but 0: below it a link's own frames (the heartbeat, a
#: file's End) wait seconds behind file data, and the peer may be declared
#: dead (node.dead_after).
MIN_RATE = 16 << 10
#: The highest (1 TiB/s): anything above is a typo.
MAX_RATE = 1 << 40

_SYNTAX = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)?\s*(/\s*s)?\s*")
HELP = (
    'write bytes per second as an integer (52428800), or a number and a unit: "50MiB", '
    '"100Mbit", "1.5GB/s" (units: B, K or KiB, M or MiB, G or GiB, kB, MB, GB, kbit, Mbit, '
    'Gbit; "/s" optional); 0 means no limit'
)


def parse_rate(value: object) -> int:
    """Bytes per second from an integer or a string with a unit;
    ValueError saying what to write if it is not one, or out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        shown = str(value).lower() if isinstance(value, bool) else repr(value)
        raise ValueError(f"{shown} is not a rate: {HELP}")
    if isinstance(value, int):
        rate = value
    else:
        m = _SYNTAX.fullmatch(value)
        if m is None:
            raise ValueError(f"{value!r} is not a rate: {HELP}")
        number, unit = m.group(1), m.group(2)
        if unit is None and float(number) == 0:
            return 0
        if unit is None:
            raise ValueError(
                f'{value!r} has no unit: write "{number}B" for bytes per second, or '
                f'"{number}K" for KiB/s as rsync\'s --bwlimit means it (or an integer '
                "without quotes, in bytes per second)"
            )
        if unit not in UNITS:
            raise ValueError(f"{value!r}: unknown unit {unit!r}; {HELP}")
        rate = int(float(number) * UNITS[unit])
    if rate < 0:
        raise ValueError(f"{value!r} is negative; {HELP}")
    if 0 < rate < MIN_RATE:
        raise ValueError(
            f"{value!r} is below the lowest limit, 16 KiB/s (slower, a link's own frames wait "
            "seconds behind file data and the peer may be declared dead); 0 means no limit"
        )
    if rate > MAX_RATE:
        raise ValueError(f"{value!r} is above 1 TiB/s; 0 means no limit")
    return rate


def show_rate(rate: float | None) -> str:
    """``52428800`` → ``50.0 MiB/s``; 0 or None → ``unlimited``."""
    if not rate:
        return "unlimited"
    n, unit = float(rate), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{n:.0f} B/s" if unit == "B" else f"{n:.1f} {unit}/s"
