"""Inbound (routing, opens, descriptor budget, commits), without a socket."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from replicator import frames as F
from replicator import verifying
from replicator.blockmap import MIN_BLOCK, XXH3_128, BlockMap, map_bytes
from replicator.errors import RemoteProtocolError
from replicator.inbound import MAX_REFUSED_OPENS, Inbound
from replicator.maps import DELTA_MIN
from replicator.receiving import Ack, Answer, Mend, Refuse
from replicator.stats import SessionStats
from replicator.verifying import MAX_MENDS

from .test_receiving import PEER, file_ev, make_config, map_of

DIGEST = b"d" * 16

# -- Inbound ----------------------------------------------------------------------------


def make_inbound(tmp_path: Path, budget: int = 4096, fixed: int = 3) -> Inbound:
    (tmp_path / "m").mkdir(exist_ok=True)
    return Inbound(
        make_config(tmp_path),
        PEER,
        SessionStats(PEER, "here"),
        lambda name: True,
        lambda name, path: None,
        lambda: fixed,
        budget,
    )


def test_open_then_a_file_is_routed_acked_on_commit_and_published(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    freed, opened, refused = inb.open(F.Open(1, "m"))
    assert freed == [] and refused is None
    assert (opened.mirror, opened.code) == (1, 0)
    ev = file_ev(7, b"f", b"hello")
    assert inb.begin(ev) == []
    inb.chunk(F.Chunk(7, 0, 5))
    assert inb.write_inline(b"hello") == []
    assert inb.end(7, map_of(b"hello").file_digest) == []
    assert inb.pending() == (1, 5, 0)
    assert inb.commit() == [Ack(7)]
    assert (tmp_path / "m" / "f").read_bytes() == b"hello"
    assert inb.pending() == (0, 0, 0)
    inb.close()


def test_payload_of_an_unknown_op_is_drained(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    inb.chunk(F.Chunk(99, 0, 4))
    assert inb.write_inline(b"lost") == []
    assert inb.end(99, DIGEST) == []
    inb.abort(99)
    assert inb.commit() == []
    inb.close()


def test_an_aborted_file_is_forgotten(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    inb.begin(file_ev(3, b"f", b"abc"))
    inb.abort(3)
    assert inb.ops == {}
    assert inb.commit() == []
    assert not (tmp_path / "m" / "f").exists()
    inb.close()


def test_a_failed_write_refuses_the_file_and_drains_the_rest(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    inb.begin(file_ev(3, b"f", b"abc"))
    inb.chunk(F.Chunk(3, 0, 3))
    p = inb.mirror(1).files[3]
    # the next write fails with EBADF: the partial's descriptor is read-only
    ro = os.open(os.devnull, os.O_RDONLY)
    os.dup2(ro, p.fd)
    os.close(ro)
    answers = inb.write_inline(b"abc")
    assert [type(a) for a in answers] == [Refuse]
    assert inb.write_inline(b"more") == []  # drained: the target is gone
    assert inb.end(3, map_of(b"abc").file_digest) == []  # refused already
    inb.close()


def test_a_mirror_is_opened_once_per_connection(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    with pytest.raises(RemoteProtocolError, match="already opened"):
        inb.open(F.Open(2, "m"))
    inb.close()


def test_refused_opens_are_answered_then_too_many_close_the_connection(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    for i in range(MAX_REFUSED_OPENS):
        _, opened, refused = inb.open(F.Open(i + 1, f"nope{i}"))
        assert refused is not None and opened.code == refused.code != 0
        assert "nope" in opened.message
    with pytest.raises(RemoteProtocolError) as e:
        inb.open(F.Open(999, "nope-last"))
    assert e.value.code is F.ErrorCode.LIMIT


def test_a_tight_budget_commits_before_an_operation_and_returns_its_acks(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path, budget=100)
    inb.open(F.Open(1, "m"))
    inb.begin(file_ev(1, b"a", b"x"))
    inb.chunk(F.Chunk(1, 0, 1))
    inb.write_inline(b"x")
    inb.end(1, map_of(b"x").file_digest)
    assert inb.pending()[0] == 1
    inb.fd_budget = inb.fds_held()  # no room left for the next operation
    answers = inb.begin(file_ev(2, b"b", b"y"))
    assert Ack(1) in answers
    assert (tmp_path / "m" / "a").read_bytes() == b"x"
    inb.close()


def test_an_open_that_needs_room_commits_first_and_returns_the_acks(tmp_path: Path) -> None:
    for d in ("m", "n"):
        (tmp_path / d).mkdir()
    extra = f'[mirrors.n]\npath = "{tmp_path}/n"\naccept_from = ["a"]'
    cfg = make_config(tmp_path, extra=extra)
    inb = Inbound(
        cfg, PEER, SessionStats(PEER, "here"), lambda n: True, lambda n, p: None, lambda: 3, 100
    )
    inb.open(F.Open(1, "m"))
    inb.begin(file_ev(1, b"a", b"x"))
    inb.chunk(F.Chunk(1, 0, 1))
    inb.write_inline(b"x")
    inb.end(1, map_of(b"x").file_digest)
    held = inb.fds_held()
    inb.fd_budget = held + 1  # an open needs more than one descriptor
    freed, _, refused = inb.open(F.Open(2, "n"))
    assert freed == [Ack(1)]  # committed to make room; the ack is not lost
    assert (tmp_path / "m" / "a").read_bytes() == b"x"
    # the partial folder's cached descriptors were dropped: "n" fits or is
    # refused for want of room, never silently
    assert refused is None or "file descriptors" in refused.message
    inb.close()


def test_descriptors_held_count_the_session_and_each_mirror(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path, fixed=3)
    assert inb.fds_held() == 3
    inb.open(F.Open(1, "m"))
    after_open = inb.fds_held()
    assert after_open > 3
    inb.begin(file_ev(1, b"a", b"x"))
    assert inb.fds_held() > after_open  # the partial file
    inb.close()


# -- block maps: verify, mend, deltas ------------------------------------------------------

BS = MIN_BLOCK


def noise(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def send(inb: Inbound, ev: F.File, data: bytes, runs: list[tuple[bool, int, int]]) -> list[Answer]:
    """What the sender does after ``ev``: Chunk (inline payload) or Copy
    runs, then its block digests and End (the map is that of ``data``)."""
    out: list[Answer] = []
    for copy, off, n in runs:
        if copy:
            out += inb.copy(F.Copy(ev.op, off, n))
        else:
            inb.chunk(F.Chunk(ev.op, off, n))
            out += inb.write_inline(data[off : off + n])
    bmap = map_bytes(data, XXH3_128, ev.block_size)
    if bmap.count > 1:
        inb.blocks(F.Blocks(ev.op, 0, bmap.digests))
    return out + inb.end(ev.op, bmap.file_digest)


def test_a_damaged_file_is_mended_then_published(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    good = noise(3 * BS + 10)
    bad = bytearray(good)
    bad[BS + 7] ^= 1  # damaged on the way: the tags do not cover payload
    ev = file_ev(7, b"f", good)
    inb.begin(ev)
    inb.chunk(F.Chunk(7, 0, len(bad)))
    assert inb.write_inline(bytes(bad)) == []
    bmap = map_bytes(good, XXH3_128, BS)
    inb.blocks(F.Blocks(7, 0, bmap.digests[:32]))
    inb.blocks(F.Blocks(7, 2, bmap.digests[32:]))
    assert inb.end(7, bmap.file_digest) == [Mend(7, [(BS, BS)])]
    assert 7 in inb.ops and inb.pending() == (0, 0, 0)  # still open: nothing to publish
    # the range again, in two chunks (the second one spliced)
    inb.chunk(F.Chunk(7, BS, 100))
    assert inb.write_inline(good[BS : BS + 100]) == []
    inb.chunk(F.Chunk(7, BS + 100, BS - 100))
    splicer = FakeSplicer(good[BS + 100 : 2 * BS])
    assert inb.splice(splicer, BS - 100) == []  # type: ignore[arg-type]
    assert inb.end(7, bmap.file_digest) == []
    assert 7 not in inb.ops
    assert inb.commit() == [Ack(7)]
    assert (tmp_path / "m" / "f").read_bytes() == good
    st = inb.stats
    assert (st.verify_mismatches, st.verify_bytes_requested, st.verify_failed) == (1, BS, 0)
    inb.close()


def test_much_left_to_hash_is_judged_a_slice_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file with much left to hash at End (resumed, or spliced in one go)
    is hashed between frames, so the session keeps answering its peer."""
    monkeypatch.setattr(verifying, "AT_ONCE", BS)
    monkeypatch.setattr(verifying, "SLICE", BS)
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    good = noise(3 * BS + 10)
    bad = bytearray(good)
    bad[2 * BS + 3] ^= 1
    ev = file_ev(8, b"g", good)
    inb.begin(ev)
    inb.chunk(F.Chunk(8, 0, len(bad)))
    assert inb.splice(FakeSplicer(bytes(bad)), len(bad)) == []  # type: ignore[arg-type]
    bmap = map_bytes(good, XXH3_128, BS)
    inb.blocks(F.Blocks(8, 0, bmap.digests))
    assert inb.end(8, bmap.file_digest) == []  # not judged yet
    steps, answers = 0, []
    while inb.verifying():
        answers += inb.verify_step()
        steps += 1
    assert steps == 4 and answers == [Mend(8, [(2 * BS, BS)])]
    inb.chunk(F.Chunk(8, 2 * BS, BS))
    assert inb.write_inline(good[2 * BS : 3 * BS]) == []
    assert inb.end(8, bmap.file_digest) == []  # all of it is hashed again, later
    while inb.verifying():
        assert inb.verify_step() == [] or not inb.verifying()
    assert 8 not in inb.ops
    assert inb.commit() == [Ack(8)]
    assert (tmp_path / "m" / "g").read_bytes() == good
    inb.close()


def test_a_file_that_stays_damaged_is_refused_after_max_mends(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    good = noise(5000, seed=2)
    ev = file_ev(7, b"f", good)
    inb.begin(ev)
    digest = map_bytes(good, XXH3_128, BS).file_digest
    inb.chunk(F.Chunk(7, 0, 5000))
    inb.write_inline(b"x" * 5000)
    for _ in range(MAX_MENDS):
        assert inb.end(7, digest) == [Mend(7, [(0, 5000)])]  # one block: all of it
        inb.chunk(F.Chunk(7, 0, 5000))
        inb.write_inline(b"y" * 5000)  # still wrong
    [r] = inb.end(7, digest)
    assert isinstance(r, Refuse) and r.code is F.ErrorCode.VERIFY_FAILED
    assert r.code in F.RETRYABLE and "did not match its block map" in r.message
    assert inb.ops == {} and inb.mirror(1).files == {} and inb.commit() == []
    assert os.listdir(tmp_path / "m" / ".replicator" / "partial" / PEER) == []
    assert not (tmp_path / "m" / "f").exists()
    assert (inb.stats.verify_mismatches, inb.stats.verify_failed) == (MAX_MENDS + 1, 1)
    inb.close()


def published(tmp_path: Path, inb: Inbound, data: bytes) -> BlockMap:
    """``data`` received as file ``f`` of mirror 1 and published; its map."""
    ev = file_ev(1, b"f", data)
    inb.begin(ev)
    assert send(inb, ev, data, [(False, 0, len(data))]) == []
    assert inb.commit() == [Ack(1)]
    return map_bytes(data, XXH3_128, ev.block_size)


def test_a_delta_copies_the_unchanged_ranges_from_the_published_file(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    old = noise(DELTA_MIN + 100, seed=3)  # large enough to be remembered
    base = published(tmp_path, inb, old)
    new = old[: 3 * BS + 5] + b"new bytes" + old[3 * BS + 14 :] + b"and more"
    bmap = map_bytes(new, XXH3_128, base.block_size)
    runs = bmap.plan(base)
    assert runs == [
        (True, 0, 3 * BS),
        (False, 3 * BS, BS),  # the changed block
        (True, 4 * BS, 4 * BS),
        (False, 8 * BS, len(new) - 8 * BS),  # the last one, longer
    ]
    ev = file_ev(2, b"f", new, base=base.file_digest)
    assert inb.begin(ev) == []
    assert send(inb, ev, new, runs) == []
    assert inb.commit() == [Ack(2)]
    assert (tmp_path / "m" / "f").read_bytes() == new
    assert inb.stats.delta_files == 1 and inb.stats.delta_bytes_copied == 7 * BS
    # and the new version is the base of the next delta
    ev = file_ev(3, b"f", new[:-1], base=bmap.file_digest)
    assert inb.begin(ev) == []
    assert send(inb, ev, new[:-1], map_bytes(new[:-1], XXH3_128, BS).plan(bmap)) == []
    assert inb.commit() == [Ack(3)]
    assert (tmp_path / "m" / "f").read_bytes() == new[:-1]
    inb.close()


def test_a_delta_of_a_base_we_do_not_hold_is_refused(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    old = noise(DELTA_MIN, seed=4)
    base = published(tmp_path, inb, old)
    # a base digest we never published
    [r] = inb.begin(file_ev(2, b"f", old, base=b"\1" * 16))
    assert isinstance(r, Refuse) and r.code is F.ErrorCode.BASE_CHANGED
    assert r.code in F.RETRYABLE
    inb.chunk(F.Chunk(2, 0, 10))
    assert inb.write_inline(old[:10]) == [] and inb.copy(F.Copy(2, 10, 5)) == []  # drained
    assert inb.end(2, base.file_digest) == []
    # the right digest, but the published file changed since (a local user)
    os.utime(tmp_path / "m" / "f", ns=(5, 5))
    [r] = inb.begin(file_ev(3, b"f", old, base=base.file_digest))
    assert isinstance(r, Refuse) and r.code is F.ErrorCode.BASE_CHANGED
    assert "changed since it was published" in r.message
    # or is gone
    os.unlink(tmp_path / "m" / "f")
    [r] = inb.begin(file_ev(4, b"g", old, base=base.file_digest))
    assert isinstance(r, Refuse) and r.code is F.ErrorCode.BASE_CHANGED
    assert inb.stats.base_changed == 3 and inb.stats.delta_files == 0
    inb.close()


class FakeSplicer:
    """transfer.Splicer's file side: the bytes "from the socket"."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def to_file(self, fd: int, offset: int, n: int) -> None:
        assert n == len(self.data)
        os.pwrite(fd, self.data, offset)

    def discard(self, n: int) -> None:
        raise AssertionError("nothing is drained here")
