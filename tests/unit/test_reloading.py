"""Reloads without a daemon: who gets served by which reload, what a refused
one answers, which sessions a config change closes."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from replicator import config
from replicator.config import Config
from replicator.errors import ConfigError
from replicator.reloading import Reloads, load_config, stale_sessions
from replicator.session import Session

BASE = """
[node]
name = "b"
listen = "127.0.0.1:7302"

[peers.a]
address = "127.0.0.1:7301"
key_file = "/k/a-b.key"

[peers.c]
address = "127.0.0.3:7301"
key_file = "/k/b-c.key"

[mirrors.m1]
path = "/srv/m1"
accept_from = ["a", "c"]

[mirrors.m2]
path = "/srv/m2"
accept_from = ["a"]
"""
KEYS = {"a": b"ka" * 16, "c": b"kc" * 16}


def cfg(text: str = BASE) -> Config:
    return config.parse(text)


class Main:
    """The main thread's side: counts reloads, answers as told."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.wakeups = threading.Semaphore(0)
        self.reloads = Reloads(self.wakeups.release, self.stopping)
        self.ran = 0
        self.fail: BaseException | None = None

    def reload(self) -> str:
        self.ran += 1
        if self.fail is not None:
            raise self.fail
        return f"reload {self.ran}"

    def handle(self) -> bool:
        return self.reloads.handle(self.reload, "/etc/r.toml", lambda: "summary")


def test_nothing_asked_nothing_done() -> None:
    m = Main()
    assert not m.handle() and m.ran == 0


def test_a_sighup_is_served_once() -> None:
    m = Main()
    m.reloads.hups += 1
    assert m.handle() and m.ran == 1
    assert not m.handle() and m.ran == 1
    m.reloads.hups += 2  # two before the main thread looks: one reload
    assert m.handle() and m.ran == 2


def _ask(m: Main, n: int) -> list[dict[str, Any]]:
    """``n`` control threads request a reload; the main thread serves them
    once all are waiting."""
    replies: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda: replies.append(m.reloads.request(30))) for _ in range(n)
    ]
    for t in threads:
        t.start()
    for _ in range(n):
        assert m.wakeups.acquire(timeout=10)
    m.handle()
    for t in threads:
        t.join(10)
    return replies


def test_requests_waiting_together_share_one_reload() -> None:
    m = Main()
    replies = _ask(m, 3)
    assert m.ran == 1 and replies == [{"ok": True, "message": "reload 1"}] * 3


def test_a_refused_config_is_answered_and_keeps_running() -> None:
    m = Main()
    m.fail = ConfigError("bad key")
    (reply,) = _ask(m, 1)
    assert not reply["ok"] and "running config stays" in reply["error"]


def test_a_failed_reload_is_answered_then_raised() -> None:
    m = Main()
    m.fail = RuntimeError("half applied")
    replies: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: replies.append(m.reloads.request(30)))
    t.start()
    assert m.wakeups.acquire(timeout=10)
    with pytest.raises(RuntimeError):
        m.handle()
    t.join(10)
    assert not replies[0]["ok"] and "reload failed" in replies[0]["error"]


def test_stopping_answers_waiting_and_later_requests() -> None:
    m = Main()
    replies: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: replies.append(m.reloads.request(30)))
    t.start()
    assert m.wakeups.acquire(timeout=10)
    m.stopping.set()
    m.reloads.refuse_waiting()
    t.join(10)
    assert replies == [{"ok": False, "error": "the daemon is stopping: not reloaded"}]
    assert not m.reloads.request(30)["ok"] and m.ran == 0


def test_a_request_that_is_not_served_in_time_says_so() -> None:
    m = Main()
    reply = m.reloads.request(0.01)
    assert not reply["ok"] and "did not finish" in reply["error"]


def test_load_config_refuses_a_restart_only_node_change(tmp_path: Path) -> None:
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
    for key in ("a-b.key", "b-c.key"):
        (tmp_path / key).write_text("a" * 44 + "\n")
        (tmp_path / key).chmod(0o600)
    text = BASE.replace("/srv/", f"{tmp_path}/").replace("/k/", f"{tmp_path}/")
    path = tmp_path / "r.toml"
    path.write_text(text)
    new, keys = load_config(str(path), cfg(text))
    assert new == cfg(text) and set(keys) == {"a", "c"}
    path.write_text(text.replace('name = "b"', 'name = "b2"'))
    with pytest.raises(ConfigError, match=r"node\.name changed.*systemctl restart replicatord"):
        load_config(str(path), cfg(text))
    # What a reload applies live passes the checks.
    live = text.replace('listen = "127.0.0.1:7302"', 'listen = "127.0.0.1:7309"\ndead_after = 3.0')
    path.write_text(live)
    new, _ = load_config(str(path), cfg(text))
    assert (new.node.listen, new.node.dead_after) == ("127.0.0.1:7309", 3.0)
    with pytest.raises(ConfigError, match="no config file"):
        load_config(None, cfg())


def _session(peer: str, *mirrors: str) -> Session:
    return cast(Session, SimpleNamespace(peer=peer, stats=SimpleNamespace(mirrors=list(mirrors))))


def test_stale_sessions_are_those_whose_part_changed() -> None:
    a1, a2, c1, anon = _session("a", "m1"), _session("a", "m2"), _session("c", "m1"), _session("")
    sessions = [a1, a2, c1, anon]
    old = cfg()
    assert stale_sessions(sessions, old, KEYS, cfg(), KEYS) == []
    # c's key changed: only c's session goes
    assert stale_sessions(sessions, old, KEYS, cfg(), {**KEYS, "c": b"new" * 11}) == [c1]
    # m2 moved: the session that has it open goes
    moved = cfg(BASE.replace('path = "/srv/m2"', 'path = "/srv/m2b"'))
    assert stale_sessions(sessions, old, KEYS, moved, KEYS) == [a2]
    # m1 no longer accepts c
    narrowed = cfg(BASE.replace('accept_from = ["a", "c"]', 'accept_from = ["a"]'))
    assert stale_sessions(sessions, old, KEYS, narrowed, KEYS) == [c1]
