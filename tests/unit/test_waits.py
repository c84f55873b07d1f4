"""``replicatorctl wait`` in the daemon without links (replicator/waits.py):
which paths it refuses and why, what it hands to the links, what a poll
says, and that an abandoned wait is dropped."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from replicator import config, waits
from replicator.barrier import Expect, Expected
from replicator.commands import Commands, Node
from replicator.errors import ControlError
from replicator.manifest import Excludes
from replicator.stats import LinkStats
from replicator.waits import Unwaitable, Waits, mirror_of


class FakeLink:
    def __init__(self, peer: str, mirrors: dict[str, Path]) -> None:
        self.stats = LinkStats(peer, "addr")
        self.by_name = {
            n: SimpleNamespace(root=os.fsencode(p), excludes=Excludes(["*.tmp"]))
            for n, p in mirrors.items()
        }
        self.got: list[object] = []
        self.alive = True

    def post(self, msg: object) -> None:
        self.got.append(msg)

    def is_alive(self) -> bool:
        return self.alive


def _config(tmp_path: Path) -> config.Config:
    for n in ("m1", "m1x", "solo"):
        (tmp_path / n).mkdir(exist_ok=True)
    return config.parse(
        f"""
[node]
name = "a"
listen = "127.0.0.1:7301"

[peers.b]
address = "127.0.0.1:7302"
key_file = "/k/a-b.key"

[peers.c]
address = "127.0.0.1:7303"
key_file = "/k/a-c.key"

[mirrors.m1]
path = "{tmp_path}/m1"
push_to = ["b", "c"]

[mirrors.m1x]
path = "{tmp_path}/m1x/"
push_to = ["c"]

[mirrors.solo]
path = "{tmp_path}/solo"
"""
    )


def _waits(tmp_path: Path) -> tuple[Waits, dict[str, FakeLink]]:
    cfg = _config(tmp_path)
    mirrors = {n: Path(m.path) for n, m in cfg.mirrors.items()}
    links = {
        "b": FakeLink("b", {"m1": mirrors["m1"]}),
        "c": FakeLink("c", {"m1": mirrors["m1"], "m1x": mirrors["m1x"]}),
    }
    return Waits(lambda: cfg, lambda: links), links


def test_paths_map_to_their_mirror(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert mirror_of(cfg, f"{tmp_path}/m1") == ("m1", "")
    assert mirror_of(cfg, f"{tmp_path}/m1/a/b") == ("m1", "a/b")
    assert mirror_of(cfg, f"{tmp_path}/m1/a/../c") == ("m1", "c")
    assert mirror_of(cfg, f"{tmp_path}/m1x/a") == ("m1x", "a")  # not m1's "a"
    assert mirror_of(cfg, f"{tmp_path}/m1/..") is None
    assert mirror_of(cfg, "/elsewhere") is None
    os.symlink(tmp_path / "m1", tmp_path / "via")  # reached through a symlinked folder
    assert mirror_of(cfg, f"{tmp_path}/via/a") == ("m1", "a")


@pytest.mark.parametrize(
    ("path", "peer", "message"),
    [
        ("relative", None, "'relative': not an absolute path"),
        ("{t}/nowhere", None, "not inside any mirror of this node (mirrors: m1 ("),
        ("{t}/m1/missing", None, "no such file or directory in mirror m1"),
        ("{t}/m1/x.tmp", None, "excluded from mirror m1 (exclude = ['*.tmp'])"),
        ("{t}/m1/.replicator", None, "the daemon's own .replicator folder"),
        ("{t}/solo", None, "mirror solo is pushed to no peer from this node"),
        ("{t}/m1x", "b", "mirror m1x does not push to 'b' (it pushes to c)"),
        ("{t}/m1/f", "z", "this node does not push to a peer 'z'"),
    ],
)
def test_what_cannot_be_waited_for(
    tmp_path: Path, path: str, peer: str | None, message: str
) -> None:
    w, _ = _waits(tmp_path)
    (tmp_path / "m1" / "x.tmp").write_text("x")
    (tmp_path / "m1" / "f").write_text("f")
    (tmp_path / "m1" / ".replicator").mkdir()
    req: dict[str, Any] = {"paths": [path.format(t=tmp_path)]}
    if peer is not None:
        req["peer"] = peer
    with pytest.raises(Unwaitable) as e:
        w.start(req)
    assert message in str(e.value)


def _until(cond: Any) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_entries_go_to_each_target_in_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(waits, "SLICE", 4)
    w, links = _waits(tmp_path)
    top = tmp_path / "m1" / "tree"
    (top / "sub").mkdir(parents=True)
    for i in range(5):
        (top / f"f{i}").write_text("x")
    (top / "skip.tmp").write_text("excluded")
    (tmp_path / "m1x" / "one").write_text("1")
    reply = w.start({"paths": [str(top), str(tmp_path / "m1x" / "one")]})
    assert reply["ok"] and reply["peers"] == ["b", "c"]
    _until(lambda: any(isinstance(m, Expected) for m in links["b"].got))
    _until(lambda: any(isinstance(m, Expected) for m in links["c"].got))
    for peer, want in (("b", 7), ("c", 8)):  # tree, sub, f0..f4; c also m1x:one
        got = links[peer].got
        assert isinstance(got[-1], Expected)
        expects = [m for m in got if isinstance(m, Expect)]
        assert all(len(m.entries) <= 4 for m in expects)
        names = [(m.mirror, rel) for m in expects for rel, _, _ in m.entries]
        assert len(names) == want and ("m1", b"tree/skip.tmp") not in names
        assert names[0] == ("m1", b"tree")
    assert ("m1x", b"one") in [
        (m.mirror, e[0]) for m in links["c"].got if isinstance(m, Expect) for e in m.entries
    ]


def test_a_poll_says_why_it_still_waits(tmp_path: Path) -> None:
    w, links = _waits(tmp_path)
    (tmp_path / "m1" / "f").write_text("f")
    wid = w.start({"paths": [str(tmp_path / "m1" / "f")], "peer": "b"})["id"]
    _until(lambda: links["b"].got)
    wait = links["b"].got[0].wait  # type: ignore[attr-defined]
    wait.report("b", 1, 1)
    links["b"].stats.set_state("backoff")
    links["b"].stats.error("[Errno 111] Connection refused")
    reply = w.poll({"id": wid})
    assert reply["state"] == "waiting" and reply["waited"] is False
    assert reply["reasons"] == [
        "b: 1 of 1 entries not yet durable there; "
        "link to b is down (backoff: [Errno 111] Connection refused)"
    ]
    links["b"].stats.set_state("connected")
    links["b"].stats.paused = True
    assert "sending to b is paused" in w.poll({"id": wid})["reasons"][0]
    wait.settle("b")
    reply = w.poll({"id": wid, "max": 1})
    assert reply["state"] == "done" and reply["peers"]["b"]["entries"] == 1
    with pytest.raises(ControlError, match="no wait 1 here"):
        w.poll({"id": wid})  # an ended wait is dropped once told


def test_a_link_rebuilt_by_a_reload_interrupts_the_wait(tmp_path: Path) -> None:
    w, links = _waits(tmp_path)
    (tmp_path / "m1" / "f").write_text("f")
    wid = w.start({"paths": [str(tmp_path / "m1" / "f")]})["id"]
    links["c"] = FakeLink("c", {})
    reply = w.poll({"id": wid})
    assert reply["state"] == "interrupted"
    assert reply["reasons"] == ["the link to c was rebuilt by a reload; run the wait again"]


def test_an_abandoned_wait_is_cancelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w, links = _waits(tmp_path)
    (tmp_path / "m1" / "f").write_text("f")
    first = w.start({"paths": [str(tmp_path / "m1" / "f")]})["id"]
    _until(lambda: links["b"].got)
    wait = links["b"].got[0].wait  # type: ignore[attr-defined]
    monkeypatch.setattr(waits, "EXPIRE", 0.0)
    w.start({"paths": [str(tmp_path / "m1" / "f")]})  # looks at the others
    assert wait.cancelled
    with pytest.raises(ControlError):
        w.poll({"id": first})
    monkeypatch.setattr(waits, "EXPIRE", 30.0)
    second = w.start({"paths": [str(tmp_path / "m1" / "f")]})["id"]
    assert w.cancel({"id": second}) == {"ok": True}


def test_the_control_command_marks_usage_errors(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    node = SimpleNamespace(cfg=cfg, links=SimpleNamespace(snapshot=lambda: {}))
    c = Commands(cast(Node, node))
    reply = c.handle({"cmd": "wait", "paths": ["/elsewhere"]})
    assert reply["ok"] is False and reply["usage"] is True
    assert "not inside any mirror" in reply["error"]
    with pytest.raises(ControlError, match="no wait"):
        c.handle({"cmd": "wait-poll", "id": 9})
