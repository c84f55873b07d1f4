"""Control commands without a daemon: what each does, what each refuses."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from replicator import config
from replicator.changes import Reconcile
from replicator.commands import Commands, Node
from replicator.errors import ControlError
from replicator.link import Pause

CFG = config.parse(
    """
[node]
name = "a"
listen = "127.0.0.1:7301"

[peers.b]
address = "127.0.0.1:7302"
key_file = "/k/a-b.key"

[mirrors.m1]
path = "/srv/m1"
push_to = ["b"]
"""
)


class FakeLink:
    def __init__(self) -> None:
        self.got: list[object] = []

    def post(self, msg: object) -> None:
        self.got.append(msg)


def _commands() -> tuple[Commands, FakeLink, list[object], list[int]]:
    link, routed, reloads = FakeLink(), [], []
    node = SimpleNamespace(
        cfg=CFG,
        links=SimpleNamespace(snapshot=lambda: {"b": link}),
        router=SimpleNamespace(route=routed.append),
        reload_requests=SimpleNamespace(
            request=lambda: reloads.append(1) or {"ok": True, "message": "m"}
        ),
    )
    return Commands(cast(Node, node)), link, routed, reloads


def test_sync_rescans_one_mirror_or_all() -> None:
    c, _, routed, _ = _commands()
    assert c.handle({"cmd": "sync", "mirror": "m1"}) == {"ok": True}
    assert c.handle({"cmd": "sync"}) == {"ok": True}
    assert routed == [Reconcile("m1"), Reconcile(None)]


def test_pause_and_resume_reach_the_links() -> None:
    c, link, _, _ = _commands()
    c.handle({"cmd": "pause", "peer": "b", "mirror": "m1"})
    c.handle({"cmd": "resume"})
    assert link.got == [Pause(True, "m1"), Pause(False, None)]


def test_reload_is_posted() -> None:
    c, _, _, reloads = _commands()
    assert c.handle({"cmd": "reload"}) == {"ok": True, "message": "m"} and reloads == [1]


@pytest.mark.parametrize(
    ("req", "error"),
    [
        ({"cmd": "nope"}, "unknown command"),
        ({"cmd": "sync", "mirror": "m9"}, "no mirror 'm9'"),
        ({"cmd": "pause", "peer": "z"}, "does not push to a peer 'z'"),
        ({"cmd": "resume", "mirror": "m9"}, "no mirror 'm9'"),
    ],
)
def test_wrong_requests_are_refused(req: dict[str, Any], error: str) -> None:
    c, link, routed, _ = _commands()
    with pytest.raises(ControlError, match=error):
        c.handle(req)
    assert link.got == [] and routed == []
