"""ReceivingMirror and admit() on real directories, without a socket."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import config
from replicator import frames as F
from replicator.blockmap import XXH3_128, BlockMap, block_size_for, map_bytes
from replicator.changes import AgreedWith, Dirty, PeerHas
from replicator.config import Config
from replicator.errors import Refused
from replicator.manifest import EntryState
from replicator.receiving import Ack, ReceivingMirror, Refuse, Tell, admit
from replicator.stats import SessionStats

PEER = "a"


def make_config(tmp_path: Path, accept: str = PEER, push: str = "", extra: str = "") -> Config:
    return config.parse(
        f"""
[node]
name = "b"
listen = "127.0.0.1:7301"
state_dir = "{tmp_path}/state"

[peers.a]
address = "127.0.0.1:7302"
key_file = "{tmp_path}/a.key"

[mirrors.m]
path = "{tmp_path}/m"
accept_from = [{f'"{accept}"' if accept else ""}]
push_to = [{f'"{push}"' if push else ""}]
{"two_way = true" if push else ""}
{extra}
"""
    )


def open_mirror(
    tmp_path: Path,
    push: str = "",
    base: dict[bytes, EntryState] | None = None,
) -> ReceivingMirror:
    (tmp_path / "m").mkdir(exist_ok=True)
    known = base or {}
    return admit(
        make_config(tmp_path, push=push),
        "m",
        PEER,
        SessionStats(PEER, "here"),
        lambda name: True,
        lambda need: None,
        lambda name, path: known.get(path),
    )


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[ReceivingMirror]:
    m = open_mirror(tmp_path)
    yield m
    m.close()


def file_ev(op: int, path: bytes, data: bytes, mtime_ns: int = 10**18, base: bytes = b"") -> F.File:
    return F.File(
        op,
        1,
        0,
        len(data),
        0o644,
        mtime_ns,
        os.getuid(),
        os.getgid(),
        XXH3_128,
        block_size_for(len(data)),
        b"v1",
        base,
        path,
    )


def map_of(data: bytes) -> BlockMap:
    """The block map a sender makes of ``data``."""
    return map_bytes(data, XXH3_128, block_size_for(len(data)))


def receive(m: ReceivingMirror, op: int, path: bytes, data: bytes, **kw: int) -> list[object]:
    """begin, write, end: the answers of all three."""
    out: list[object] = list(m.begin(file_ev(op, path, data, **kw)))
    p = m.files[op]
    os.pwrite(p.fd, data, p.written)
    out += m.wrote(p, len(data))
    out += m.end(op, map_of(data).file_digest)
    return out


# -- admit ------------------------------------------------------------------------


def test_admit_refuses_an_unknown_mirror(tmp_path: Path) -> None:
    with pytest.raises(Refused) as r:
        admit(
            make_config(tmp_path),
            "nope",
            PEER,
            SessionStats(PEER, ""),
            lambda n: True,
            lambda n: None,
            lambda n, p: None,
        )
    assert r.value.code == F.ErrorCode.UNKNOWN_MIRROR
    assert "has no mirror 'nope'" in r.value.message
    assert "does not have" in r.value.logged


def test_admit_refuses_a_peer_not_in_accept_from(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, accept="")
    with pytest.raises(Refused) as r:
        admit(
            cfg,
            "m",
            PEER,
            SessionStats(PEER, ""),
            lambda n: True,
            lambda n: None,
            lambda n, p: None,
        )
    assert r.value.code == F.ErrorCode.FORBIDDEN
    assert "accept_from" in r.value.message and r.value.logged.startswith("refused: ")


def test_admit_refuses_a_mirror_whose_marker_is_missing(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(Refused) as r:
        admit(
            make_config(tmp_path),
            "m",
            PEER,
            SessionStats(PEER, ""),
            lambda n: False,
            lambda n: None,
            lambda n, p: None,
        )
    assert r.value.code == F.ErrorCode.IO_ERROR and r.value.level == logging.ERROR
    assert "marker is missing" in r.value.message
    assert not (tmp_path / "m" / ".replicator").exists()  # nothing written


def test_admit_refuses_when_the_session_has_no_room(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    asked: list[int] = []

    def no_room(need: int) -> str:
        asked.append(need)
        return "no room"

    with pytest.raises(Refused) as r:
        admit(
            make_config(tmp_path),
            "m",
            PEER,
            SessionStats(PEER, ""),
            lambda n: True,
            no_room,
            lambda n, p: None,
        )
    assert r.value.code == F.ErrorCode.LIMIT and r.value.message.endswith(": no room")
    assert asked and asked[0] > F.MAX_OPEN_FILES


def test_admit_refuses_a_missing_root(tmp_path: Path) -> None:
    with pytest.raises(Refused) as r:
        admit(
            make_config(tmp_path),
            "m",
            PEER,
            SessionStats(PEER, ""),
            lambda n: True,
            lambda n: None,
            lambda n, p: None,
        )
    assert r.value.code == F.ErrorCode.IO_ERROR and "cannot open" in r.value.message


def test_admit_opens_a_mirror_two_way_when_it_also_pushes_to_the_peer(tmp_path: Path) -> None:
    one = open_mirror(tmp_path)
    assert not one.two_way and one.name == "m" and one.peer == PEER
    assert (tmp_path / "m" / ".replicator" / "partial" / PEER).is_dir()
    one.close()
    two = open_mirror(tmp_path, push=PEER)
    assert two.two_way
    two.close()


# -- files ------------------------------------------------------------------------


def test_a_file_is_acked_only_when_committed(mirror: ReceivingMirror, tmp_path: Path) -> None:
    assert receive(mirror, 7, b"d/f", b"hello") == []
    assert not (tmp_path / "m" / "d" / "f").exists()
    assert mirror.stats.files_received == 1
    assert mirror.commit() == [Ack(7)]
    assert (tmp_path / "m" / "d" / "f").read_bytes() == b"hello"
    assert mirror.commit() == [] and mirror.stats.commits == 1


def test_a_bad_path_is_refused_and_its_end_ignored(mirror: ReceivingMirror) -> None:
    [r] = mirror.begin(file_ev(3, b"../x", b"x"))
    assert isinstance(r, Refuse) and r.op == 3 and r.code == F.ErrorCode.BAD_PATH
    assert 3 in mirror.refused and 3 not in mirror.files
    assert mirror.end(3, b"d" * 16) == [] and 3 not in mirror.refused
    assert mirror.commit() == []


def test_an_aborted_file_leaves_nothing(mirror: ReceivingMirror, tmp_path: Path) -> None:
    assert mirror.begin(file_ev(4, b"f", b"data")) == []
    mirror.abort(4)
    assert mirror.files == {} and mirror.commit() == []
    assert os.listdir(tmp_path / "m" / ".replicator" / "partial" / PEER) == []
    assert not (tmp_path / "m" / "f").exists()


def test_a_failed_write_refuses_the_file_and_drains_it(mirror: ReceivingMirror) -> None:
    mirror.begin(file_ev(5, b"f", b"data"))
    p = mirror.files[5]
    [r] = mirror.fail(p, OSError(28, "No space left on device"))
    assert isinstance(r, Refuse) and r.code == F.ErrorCode.NO_SPACE and r.path == b"f"
    assert "discarded" in r.message
    assert 5 in mirror.refused and mirror.end(5, b"d" * 16) == [] and mirror.refused == set()


# -- namespace operations -----------------------------------------------------------


def test_namespace_ops_are_acked_with_the_next_commit(
    mirror: ReceivingMirror, tmp_path: Path
) -> None:
    assert mirror.namespace(F.Mkdir(1, 1, 0o755, 10**18, 0, 0, b"d")) == []
    assert mirror.namespace(F.Symlink(2, 1, 10**18, 0, 0, b"d/l", b"target")) == []
    assert mirror.stats.ops_applied == 2
    # Nothing pending depends on it: applied at once, acked with the round.
    assert mirror.namespace(F.Rename(3, 1, b"d/l", b"d/l2")) == []
    assert mirror.commit() == [Ack(1), Ack(2), Ack(3)]
    assert os.readlink(tmp_path / "m" / "d" / "l2") == "target"


def test_bad_namespace_ops_are_refused(mirror: ReceivingMirror) -> None:
    [r] = mirror.namespace(F.Symlink(1, 1, 0, 0, 0, b"l", b""))
    assert isinstance(r, Refuse) and r.code == F.ErrorCode.BAD_PATH
    [r] = mirror.namespace(F.Meta(2, 1, 0o644, 0, 0, 0, b"missing"))
    assert isinstance(r, Refuse) and r.code == F.ErrorCode.CONFLICT
    assert mirror.stats.ops_applied == 0


def test_one_way_mirrors_tell_nothing(mirror: ReceivingMirror) -> None:
    assert receive(mirror, 1, b"f", b"x") == []
    assert mirror.namespace(F.Mkdir(2, 1, 0o755, 0, 0, 0, b"d")) == []


# -- two-way: echo suppression and conflicts ----------------------------------------


def test_two_way_tells_what_the_peer_now_holds(tmp_path: Path) -> None:
    m = open_mirror(tmp_path, push=PEER)
    try:
        [t] = m.begin(file_ev(1, b"f", b"x"))
        assert isinstance(t, Tell) and isinstance(t.message, PeerHas)
        assert t.message.path == b"f" and t.message.state == m.files[1].state
        [t] = m.namespace(F.Mkdir(2, 1, 0o755, 5, 0, 0, b"d"))
        assert isinstance(t, Tell) and isinstance(t.message, PeerHas)
        assert t.message.state is not None and t.message.state.kind == F.EntryKind.DIR
        dstate = t.message.state
        [t] = m.namespace(F.Rename(3, 1, b"d", b"e"))  # no pending file: no commit first
        assert isinstance(t, Tell) and isinstance(t.message, PeerHas)
        assert (t.message.path, t.message.src, t.message.state) == (b"e", b"d", None)
        # one round: the mkdir published, then moved; told before the Acks (history.py)
        agreed = AgreedWith(PEER, "m", ((b"d", dstate, None), (b"e", None, b"d")))
        assert m.commit() == [Tell(agreed), Ack(2), Ack(3)]
    finally:
        m.close()


def test_two_way_keeps_a_locally_changed_file_the_peer_deleted(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "f").write_bytes(b"mine")
    m = open_mirror(tmp_path, push=PEER)  # the peer never had f: no base
    try:
        out = m.namespace(F.Delete(1, 1, b"f"))
        assert [type(a) for a in out] == [Tell, Tell]
        assert isinstance(out[0], Tell) and isinstance(out[0].message, PeerHas)
        assert out[0].message.state is None
        assert isinstance(out[1], Tell) and out[1].message == Dirty("m", b"f", out[1].message.flags)
        assert m.stats.conflicts == 1 and m.stats.ops_applied == 0
        assert m.commit() == [Ack(1)]
        assert (tmp_path / "m" / "f").read_bytes() == b"mine"
    finally:
        m.close()


def test_two_way_conflict_keeps_both_versions(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "f").write_bytes(b"mine")
    os.utime(tmp_path / "m" / "f", ns=(1, 1))
    m = open_mirror(tmp_path, push=PEER)
    try:
        out = receive(m, 1, b"f", b"theirs", mtime_ns=2)  # newer: theirs wins
        assert [type(a) for a in out] == [Tell, Tell]
        assert isinstance(out[1], Tell) and isinstance(out[1].message, Dirty)
        assert m.stats.conflicts == 1
        theirs = out[0].message.state  # type: ignore[union-attr]
        assert m.commit() == [Tell(AgreedWith(PEER, "m", ((b"f", theirs, None),))), Ack(1)]
        names = sorted(os.listdir(tmp_path / "m"))
        assert (tmp_path / "m" / "f").read_bytes() == b"theirs"
        copies = [n for n in names if n not in ("f", ".replicator")]
        assert len(copies) == 1 and (tmp_path / "m" / copies[0]).read_bytes() == b"mine"
    finally:
        m.close()


def test_two_way_same_file_is_acked_without_a_write(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "f").write_bytes(b"same")
    os.utime(tmp_path / "m" / "f", ns=(7, 7))
    os.chmod(tmp_path / "m" / "f", 0o644)
    m = open_mirror(tmp_path, push=PEER)
    try:
        out = receive(m, 1, b"f", b"same", mtime_ns=7)
        assert [type(a) for a in out] == [Tell]  # only PeerHas
        assert m.stats.files_received == 0
        [agreed, ack] = m.commit()
        assert isinstance(agreed, Tell) and isinstance(agreed.message, AgreedWith)
        assert ack == Ack(1)
    finally:
        m.close()


def test_two_way_conflict_lost_by_the_peer_records_no_agreement(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "f").write_bytes(b"mine, newer")
    os.utime(tmp_path / "m" / "f", ns=(9, 9))
    m = open_mirror(tmp_path, push=PEER)
    try:
        receive(m, 1, b"f", b"theirs", mtime_ns=2)  # older: kept as a copy
        assert m.commit() == [Ack(1)]  # ours goes back; nothing agreed yet
        # neither does a delete refused because the file changed here
        assert [type(a) for a in m.namespace(F.Delete(2, 1, b"f"))] == [Tell, Tell]
        assert m.commit() == [Ack(2)]
    finally:
        m.close()


def test_two_way_deletes_a_directory_only_if_nothing_below_changed_here(
    tmp_path: Path,
) -> None:
    root = tmp_path / "m"
    (root / "d" / "s").mkdir(parents=True)
    (root / "d" / "s" / "x").write_bytes(b"x")
    (root / "e").mkdir()
    (root / "e" / "y").write_bytes(b"y")

    def state(rel: str) -> EntryState:
        st = EntryState.from_stat(os.lstat(root / rel))
        assert st is not None
        return st

    # what both sides agreed on: all of d; e/y before it changed here
    base = {p.encode(): state(p) for p in ("d", "d/s", "d/s/x", "e")}
    base[b"e/y"] = EntryState(F.EntryKind.FILE, 0o644, 9, 1, 0, 0)
    m = open_mirror(tmp_path, push=PEER, base=base)
    try:
        m.namespace(F.Delete(1, 1, b"d"))
        out = m.namespace(F.Delete(2, 1, b"e"))
        assert [type(a) for a in out] == [Tell, Tell]  # no pending file: d not committed first
        assert m.stats.conflicts == 1
        m.commit()
        assert not (root / "d").exists()
        assert (root / "e" / "y").read_bytes() == b"y"
    finally:
        m.close()


# -- listing ----------------------------------------------------------------------


def test_listing_ends_with_the_count(mirror: ReceivingMirror) -> None:
    receive(mirror, 1, b"a", b"1")
    receive(mirror, 2, b"b", b"22")
    mirror.commit()
    frames = list(mirror.listing(9, 4))
    entries = [f for f in frames if isinstance(f, F.Entry)]
    assert sorted(e.path for e in entries) == [b"a", b"b"]
    assert all(e.mirror == 9 for e in entries)
    assert frames[-1] == F.ListEnd(9, 4, 2)
