"""LinkSet's decisions, without sockets: which links a config change starts,
stops and restarts, and that the table is replaced whole."""

from __future__ import annotations

from collections.abc import Mapping

from replicator import config
from replicator.config import Config
from replicator.linkset import LinkChanges, LinkSet, link_spec, plan, pushed_peers

BASE = """
[node]
name = "a"
listen = "127.0.0.1:7301"

[peers.b]
address = "127.0.0.2:7301"
key_file = "/k/a-b.key"

[peers.c]
address = "127.0.0.3:7301"
key_file = "/k/a-c.key"

[mirrors.m1]
path = "/srv/m1"
push_to = ["b"]

[mirrors.m2]
path = "/srv/m2"
push_to = ["b", "c"]
"""
KEYS = {"b": b"kb" * 16, "c": b"kc" * 16}


def cfg(text: str = BASE) -> Config:
    return config.parse(text)


def specs(c: Config, keys: Mapping[str, bytes] = KEYS) -> dict[str, tuple[object, ...]]:
    return {p: link_spec(c, keys, p) for p in pushed_peers(c)}


def test_from_nothing_every_pushed_peer_starts() -> None:
    assert plan({}, cfg(), KEYS) == LinkChanges(started=["b", "c"], stopped=[], restarted=[])


def test_same_config_changes_nothing() -> None:
    c = cfg()
    assert plan(specs(c), cfg(), KEYS) == LinkChanges([], [], [])


def test_a_mirror_change_restarts_only_the_links_pushing_it() -> None:
    old = cfg()
    new = cfg(BASE.replace('path = "/srv/m1"', 'path = "/srv/m1b"'))
    assert plan(specs(old), new, KEYS) == LinkChanges([], [], ["b"])
    new = cfg(BASE.replace('path = "/srv/m2"', 'path = "/srv/m2"\nexclude = ["*.tmp"]'))
    assert plan(specs(old), new, KEYS) == LinkChanges([], [], ["b", "c"])


def test_a_peer_or_key_change_restarts_that_link() -> None:
    old = cfg()
    new = cfg(BASE.replace("127.0.0.3:7301", "127.0.0.4:7301"))
    assert plan(specs(old), new, KEYS) == LinkChanges([], [], ["c"])
    assert plan(specs(old), old, {**KEYS, "b": b"x" * 32}) == LinkChanges([], [], ["b"])


def test_a_peer_no_longer_pushed_to_stops_a_new_one_starts() -> None:
    old = cfg()
    new = cfg(BASE.replace('push_to = ["b", "c"]', 'push_to = ["b"]'))
    # m2 no longer goes to c; b's spec changes too (m2's push_to is part of it)
    assert plan(specs(old), new, KEYS) == LinkChanges([], ["c"], ["b"])
    assert plan(specs(new), old, KEYS) == LinkChanges(["c"], [], ["b"])


def test_a_bwlimit_change_alone_keeps_the_link() -> None:
    old = cfg()
    limited = BASE.replace('key_file = "/k/a-c.key"', 'key_file = "/k/a-c.key"\nbwlimit = "8MiB"')
    new = cfg(limited)
    assert plan(specs(old), new, KEYS) == LinkChanges([], [], [], bwlimit_changed=["c"])
    assert plan(specs(new), cfg(limited.replace("8MiB", "2MiB")), KEYS).bwlimit_changed == ["c"]
    assert plan(specs(new), old, KEYS) == LinkChanges([], [], [], bwlimit_changed=["c"])
    # the same limit written another way is no change
    assert plan(specs(new), cfg(limited.replace('"8MiB"', "8388608")), KEYS) == LinkChanges(
        [], [], []
    )
    # with anything else of the link changed it is rebuilt (with the new limit)
    both = cfg(limited.replace("127.0.0.3:7301", "127.0.0.4:7301"))
    assert plan(specs(old), both, KEYS) == LinkChanges([], [], ["c"])


def test_summary() -> None:
    assert LinkChanges(["c"], [], ["b"]).summary() == (
        "links restarted: b; started: c; stopped: none"
    )
    assert LinkChanges([], [], [], ["b", "c"]).summary() == (
        "links restarted: none; started: none; stopped: none; bwlimit changed (applied live): b, c"
    )


class FakeLink:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.events: list[str] = []
        self.alive = False

    def start(self) -> None:
        self.alive = True
        self.events.append("start")

    def set_bwlimit(self, rate: int) -> None:
        self.events.append(f"bwlimit {rate}")

    def stop(self, drain: float = 0.0) -> None:
        self.alive = False
        self.events.append(f"stop {drain}")

    def join(self, timeout: float | None = None) -> None:
        self.events.append("join")

    def is_alive(self) -> bool:
        return self.alive


def fake_set() -> tuple[LinkSet, list[FakeLink]]:
    made: list[FakeLink] = []

    def factory(c: Config, keys: object, markers: object, peer: str) -> FakeLink:
        made.append(FakeLink(peer))
        return made[-1]

    return LinkSet(factory), made  # type: ignore[arg-type]


def test_apply_starts_stops_restarts_and_replaces_the_table_whole() -> None:
    links, made = fake_set()
    assert links.apply(cfg(), KEYS, {}) == LinkChanges(["b", "c"], [], [])
    first = links.snapshot()
    assert sorted(first) == ["b", "c"] and all(f.events == ["start"] for f in made)
    assert links.apply(cfg(), KEYS, {}) == LinkChanges([], [], [])
    assert links.snapshot() is first and len(made) == 2

    new = cfg(BASE.replace('push_to = ["b", "c"]', 'push_to = ["b"]'))
    assert links.apply(new, KEYS, {}) == LinkChanges([], ["c"], ["b"])
    after = links.snapshot()
    assert sorted(first) == ["b", "c"]  # the old table is as it was
    assert after is not first and sorted(after) == ["b"]
    old_b, old_c, new_b = made
    assert old_b.events == ["start", "stop 0.0", "join"]
    assert old_c.events == ["start", "stop 0.0", "join"]
    assert after["b"] is new_b and new_b.events == ["start"]  # type: ignore[comparison-overlap]


def test_dead_and_stop() -> None:
    links, made = fake_set()
    links.apply(cfg(), KEYS, {})
    assert links.dead() == []
    made[1].alive = False
    assert links.dead() == ["link to c"]
    links.stop(0.25)
    assert made[0].events[:2] == ["start", "stop 0.25"]
    assert sorted(links.snapshot()) == ["b", "c"]  # status still shows them


def test_apply_posts_a_new_bwlimit_to_the_running_link() -> None:
    links, made = fake_set()
    links.apply(cfg(), KEYS, {})
    first = links.snapshot()
    limited = cfg(BASE.replace('/k/a-b.key"', '/k/a-b.key"\nbwlimit = 65536'))
    assert links.apply(limited, KEYS, {}) == LinkChanges([], [], [], bwlimit_changed=["b"])
    assert links.snapshot() is first and len(made) == 2  # no link replaced
    assert made[0].events == ["start", "bwlimit 65536"] and made[1].events == ["start"]
    assert links.apply(limited, KEYS, {}) == LinkChanges([], [], [])  # the spec was updated
    assert links.apply(cfg(), KEYS, {}).bwlimit_changed == ["b"]
    assert made[0].events[-1] == "bwlimit 0"
