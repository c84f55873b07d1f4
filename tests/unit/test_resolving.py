"""The operator's side of conflicts (resolving.py, ctl's rendering) on real
directories, without a daemon: listing, copies gone, settling, refusals."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from replicator import config, ctl, ctlconflicts, maps
from replicator.conflictlog import Conflict, ConflictLog, Version
from replicator.errors import ControlError
from replicator.resolving import Conflicts, Node

COPY = "doc.conflict-a-20240305T060708.000000009Z.txt"


class Marker:
    def __init__(self) -> None:
        self.present = True

    def ok(self) -> bool:
        return self.present


def setup(tmp_path: Path) -> tuple[Conflicts, ConflictLog, Path, Marker]:
    root = tmp_path / "m"
    (root / "d").mkdir(parents=True)
    cfg = config.parse(
        f"""
[node]
name = "a"
listen = "127.0.0.1:7301"
state_dir = "{tmp_path}/state"

[peers.b]
address = "127.0.0.1:7302"
key_file = "{tmp_path}/b.key"

[mirrors.m]
path = "{root}"
push_to = ["b"]
accept_from = ["b"]
two_way = true
"""
    )
    marker = Marker()
    node = SimpleNamespace(cfg=cfg, markers={"m": marker})
    log = ConflictLog(maps.database(str(tmp_path / "state")))
    return Conflicts(cast(Node, node)), log, root, marker


def conflict(path: str = "d/doc.txt", copy: str = f"d/{COPY}", kept: str = "remote") -> Conflict:
    return Conflict(
        "m",
        path.encode(),
        copy.encode(),
        "b",
        "a",
        1_700_000_000.0,
        kept,
        Version(4, 10**18, "xxh3-128:aa"),
        Version(6, 2 * 10**18, "xxh3-128:bb"),
    )


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def made(root: Path, c: Conflict, here: bytes = b"theirs", copy: bytes = b"mine") -> None:
    (root / os.fsdecode(c.path)).write_bytes(here)
    (root / os.fsdecode(c.copy)).write_bytes(copy)


def test_listed_while_the_copy_exists(tmp_path: Path) -> None:
    cs, log, root, _ = setup(tmp_path)
    c = conflict()
    made(root, c)
    log.add([c])
    reply = cs.listing(None)
    assert reply["node"] == "a" and reply["unchecked"] == []
    assert [x["copy"] for x in reply["conflicts"]] == [f"d/{COPY}"]
    assert reply["conflicts"][0]["full_path"] == f"{root}/d/doc.txt"
    assert cs.count("m") == 1 and cs.listing("m") == reply
    with pytest.raises(ControlError, match="no mirror 'x'"):
        cs.listing("x")


def test_a_copy_gone_is_dropped_but_not_while_the_marker_is_missing(tmp_path: Path) -> None:
    cs, log, _, marker = setup(tmp_path)
    c = conflict()
    log.add([c])  # its copy was never made (or was deleted by hand)
    marker.present = False  # the disk is not mounted: nothing can be told
    assert cs.count("m") == 1 and cs.listing(None)["unchecked"] == ["m"]
    assert log.of("m") == [c]
    marker.present = True
    assert cs.count("m") == 0 and log.of("m") == []


def test_a_copy_replaced_by_a_directory_or_behind_a_symlink_is_gone(tmp_path: Path) -> None:
    cs, log, root, _ = setup(tmp_path)
    a, b = conflict(), conflict("e/f", "e/f.conflict-a-x")
    (root / os.fsdecode(a.copy)).mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f.conflict-a-x").write_text("not in the mirror")
    (root / "e").symlink_to(tmp_path / "outside")
    log.add([a, b])
    assert cs.count("m") == 0


def test_keep_local_deletes_the_copy(tmp_path: Path) -> None:
    cs, log, root, _ = setup(tmp_path)
    c = conflict()
    made(root, c)
    log.add([c])
    reply = cs.resolve(str(root / "d" / "doc.txt"), "local")
    assert f"deleted its copy {COPY}" in reply["message"]
    assert "a's version (this node), 4 bytes" in reply["message"]
    assert files(root) == {"d/doc.txt": b"theirs"} and log.of("m") == []


def test_keep_remote_renames_the_copy_over_the_file(tmp_path: Path) -> None:
    cs, log, root, _ = setup(tmp_path)
    c = conflict()
    made(root, c)
    inode = (root / os.fsdecode(c.copy)).stat().st_ino
    log.add([c])
    reply = cs.resolve(str(root / os.fsdecode(c.copy)), "remote")  # named by its copy
    assert reply["message"].startswith(f"replaced {root}/d/doc.txt with its copy {COPY}")
    assert files(root) == {"d/doc.txt": b"mine"} and log.of("m") == []
    assert (root / "d" / "doc.txt").stat().st_ino == inode  # renamed, not copied


def test_keep_remote_where_the_file_is_gone(tmp_path: Path) -> None:
    cs, log, root, _ = setup(tmp_path)
    c = conflict()
    made(root, c)
    (root / "d" / "doc.txt").unlink()
    log.add([c])
    cs.resolve(str(root / "d" / "doc.txt"), "remote")
    assert files(root) == {"d/doc.txt": b"mine"}


def test_keep_both_changes_nothing(tmp_path: Path) -> None:
    cs, log, root, _ = setup(tmp_path)
    c = conflict()
    made(root, c)
    log.add([c])
    reply = cs.resolve(str(root / "d" / "doc.txt"), "both")
    assert "kept both" in reply["message"] and "if b lists it too" in reply["message"]
    assert files(root) == {"d/doc.txt": b"theirs", f"d/{COPY}": b"mine"}
    assert log.of("m") == [] and cs.count("m") == 0


@pytest.mark.parametrize(
    ("path", "keep", "error"),
    [
        ("d/other", "local", "is not an unresolved conflict on node 'a'"),
        ("/elsewhere/doc.txt", "local", "is in no mirror of node 'a'"),
        ("d/doc.txt", "theirs", "--keep must be one of local, remote, both"),
        ("relative", "local", "needs an absolute path"),
        (".replicator/x", "local", "inside the daemon's own .replicator folder"),
    ],
)
def test_refusals(tmp_path: Path, path: str, keep: str, error: str) -> None:
    cs, log, root, _ = setup(tmp_path)
    c = conflict()
    made(root, c)
    log.add([c])
    full = path if path.startswith("/") or path == "relative" else str(root / path)
    with pytest.raises(ControlError, match=error):
        cs.resolve(full, keep)
    assert log.of("m") == [c]


def test_a_copy_deleted_meanwhile_is_said_so(tmp_path: Path) -> None:
    cs, log, root, _ = setup(tmp_path)
    c = conflict()
    log.add([c])
    (root / "d" / "doc.txt").write_text("x")
    with pytest.raises(ControlError, match=f"its conflict copy d/{COPY} is gone"):
        cs.resolve(str(root / "d" / "doc.txt"), "remote")
    assert log.of("m") == [] and files(root) == {"d/doc.txt": b"x"}


def test_two_copies_of_one_file_need_the_copy_named(tmp_path: Path) -> None:
    cs, log, root, _ = setup(tmp_path)
    one, two = conflict(), conflict(copy="d/doc.conflict-b-2.txt")
    made(root, one)
    made(root, two)
    log.add([one, two])
    with pytest.raises(ControlError, match="has 2 conflict copies"):
        cs.resolve(str(root / "d" / "doc.txt"), "local")
    cs.resolve(str(root / "d" / "doc.conflict-b-2.txt"), "local")
    assert [c.copy for c in log.of("m")] == [one.copy]


def test_a_directory_at_the_path_is_not_replaced(tmp_path: Path) -> None:
    cs, log, root, _ = setup(tmp_path)
    c = conflict()
    (root / os.fsdecode(c.copy)).write_text("mine")
    (root / "d" / "doc.txt").mkdir()
    log.add([c])
    with pytest.raises(ControlError, match="is a directory now"):
        cs.resolve(str(root / "d" / "doc.txt"), "remote")
    assert log.of("m") == [c]


def test_nothing_is_settled_while_the_marker_is_missing(tmp_path: Path) -> None:
    cs, log, root, marker = setup(tmp_path)
    c = conflict()
    made(root, c)
    log.add([c])
    marker.present = False
    with pytest.raises(ControlError, match="marker is missing"):
        cs.resolve(str(root / "d" / "doc.txt"), "local")
    assert log.of("m") == [c]


# -- replicatorctl's side ------------------------------------------------------------


def status(unresolved: int | None) -> dict[str, Any]:
    m = {"path": "/srv/m", "push_to": ["b"], "accept_from": ["b"], "marker_ok": True}
    m["conflicts_unresolved"] = unresolved
    return {
        "node": "a",
        "version": "0",
        "pid": 1,
        "uptime": 1.0,
        "listen": "x",
        "links": {},
        "sessions": [],
        "mirrors": {"m": m},
    }


def test_unresolved_conflicts_need_attention() -> None:
    assert ctl.health(status(0), None) == (ctl.OK, [])
    assert ctl.health(status(None), None) == (ctl.OK, [])
    code, reasons = ctl.health(status(2), None)
    assert code == ctl.ATTENTION
    assert reasons == ["mirror m: 2 unresolved conflicts (replicatorctl conflicts m)"]
    assert "1 unresolved conflict (replicatorctl conflicts m)" in ctl.render(status(1))


def test_the_listing_escapes_names() -> None:
    c = conflict(path="evil\x1b[31m\n.txt", copy="evil\x1b[31m\n.conflict-a-1.txt")
    reply = {"node": "a", "conflicts": [c.to_json("/srv/m")], "unchecked": ["n"]}
    text = ctlconflicts.render(reply, now=1_700_000_060.0)
    assert "\x1b" not in text and "evil\\x1b[31m\\n.txt" in text
    assert "node a: 1 unresolved conflict\n" in text and "decided 2023-11-14" in text
    assert "(60 s ago)" in text and "marker missing" in text
    assert "at the path: b's version, 6 bytes, modified 2033-05-18 03:33:20.000000000 UTC" in text
    assert "in the copy: a's version (this node), 4 bytes" in text and "xxh3-128:aa" in text
    assert "--keep local|remote|both" in text
