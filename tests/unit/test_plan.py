"""What to send, decided without I/O (replicator/plan.py)."""

from __future__ import annotations

import pytest

from replicator.changes import Flag
from replicator.frames import EntryKind as K
from replicator.history import Version
from replicator.manifest import EntryState, compare
from replicator.plan import SETTLE_MAX, SETTLE_NS, Action, plan_path, reconcile

NOW = 1_000_000.0
NOW_NS = int(NOW * 1e9)
OLD_NS = NOW_NS - 10 * SETTLE_NS


def st(kind: K = K.FILE, size: int = 10, mtime_ns: int = OLD_NS, mode: int = 0o644) -> EntryState:
    return EntryState(kind, mode, size, mtime_ns, 0, 0, b"t" if kind is K.SYMLINK else b"")


def cmp(a: EntryState, b: EntryState | None):  # type: ignore[no-untyped-def]
    return compare(a, b, owners=False, special=False)


def plan(src: EntryState | None, known: EntryState | None, flags: int = Flag.DATA | Flag.CLOSED,
         since: float = NOW, delete: bool = True, guessed: bool = False) -> Action:  # fmt: skip
    return plan_path(src, known, flags, since, cmp, delete, NOW, NOW_NS, guessed)


@pytest.mark.parametrize(
    ("src", "known", "delete", "want"),
    [
        (None, None, True, Action.NOTHING),  # gone on both sides
        (None, st(), True, Action.DELETE),
        (None, st(), False, Action.NOTHING),  # the mirror keeps deletions to itself
        (st(), st(), True, Action.NOTHING),  # the peer holds it
        (st(), None, True, Action.FILE),
        (st(size=11), st(), True, Action.FILE),
        (st(mode=0o600), st(), True, Action.META),
        (st(K.DIR, 0), None, True, Action.MKDIR),
        (st(K.DIR, 0, OLD_NS + 1), st(K.DIR, 0), True, Action.META),  # a dir's mtime
        (st(K.SYMLINK, 0), None, True, Action.SYMLINK),
        (st(K.FILE), st(K.DIR, 0), True, Action.FILE),  # a type change sends it whole
    ],
)
def test_plan_path(
    src: EntryState | None, known: EntryState | None, delete: bool, want: Action
) -> None:
    assert plan(src, known, delete=delete) is want


def test_attrib_only_on_a_file_of_the_same_size_is_metadata() -> None:
    touched = st(mtime_ns=OLD_NS + 5)
    assert plan(touched, st(), Flag.ATTRIB) is Action.META_GUESS
    # but not when data changed too, it was closed after writing, or the size differs
    assert plan(touched, st(), Flag.ATTRIB | Flag.DATA) is Action.FILE
    assert plan(touched, st(), Flag.ATTRIB | Flag.CLOSED) is Action.FILE
    assert plan(st(size=3), st(), Flag.ATTRIB) is Action.FILE
    assert plan(touched, None, Flag.ATTRIB) is Action.FILE


def test_a_file_still_being_written_settles_until_closed_or_too_long() -> None:
    fresh = st(mtime_ns=NOW_NS - SETTLE_NS // 2)
    assert plan(fresh, None, Flag.DATA) is Action.SETTLE
    assert plan(fresh, None, Flag.DATA | Flag.CLOSED) is Action.FILE
    assert plan(fresh, None, Flag.DATA, since=NOW - SETTLE_MAX - 1) is Action.FILE
    assert plan(st(), None, Flag.DATA) is Action.FILE  # not modified lately
    future = st(mtime_ns=NOW_NS + 10**9)  # a clock ahead: never waits for it
    assert plan(future, None, Flag.DATA) is Action.FILE


def walk(*entries: tuple[bytes, EntryState]) -> list[tuple[bytes, EntryState]]:
    return list(entries)


def test_reconcile_one_way_sends_differences_and_deletes_top_most() -> None:
    here = walk((b"a", st(K.DIR, 0)), (b"a/x", st()), (b"new", st()), (b"changed", st(size=1)))
    there = {
        b"a": st(K.DIR, 0),
        b"a/x": st(),
        b"changed": st(size=2),
        b"gone": st(K.DIR, 0),
        b"gone/sub": st(K.DIR, 0),
        b"gone/sub/f": st(),
        b"gone.txt": st(),  # sorts between "gone" and "gone/..."
        b"kept.tmp": st(),  # excluded: never deleted
    }
    out = reconcile(here, there, cmp, False, lambda p: p.endswith(b".tmp"), True)
    assert out.send == [(b"new", 10), (b"changed", 1)]
    assert out.gone == [b"gone", b"gone.txt"]
    assert (out.entries, out.dirs) == (4, 1)
    assert reconcile(here, there, cmp, False, lambda p: False, False).gone == []


def test_reconcile_two_way_leaves_newer_there_and_deletes_nothing() -> None:
    here = walk((b"older", st(mtime_ns=OLD_NS)), (b"newer", st(mtime_ns=OLD_NS + 9)))
    there = {
        b"older": st(size=5, mtime_ns=OLD_NS + 1),
        b"newer": st(size=5, mtime_ns=OLD_NS),
        b"only-there": st(),
    }
    out = reconcile(here, there, cmp, True, lambda p: False, True)
    assert out.send == [(b"newer", 10)] and out.gone == []


def test_touch_to_now_waits_for_its_close() -> None:
    """touch(1): IN_ATTRIB (mtime = now) then IN_CLOSE_WRITE. Seen before the
    close arrives, it settles; with the close, the data is sent."""
    now = st(mtime_ns=NOW_NS - SETTLE_NS // 4)
    assert plan(now, st(), Flag.ATTRIB) is Action.SETTLE
    assert plan(now, st(), Flag.ATTRIB | Flag.CLOSED) is Action.FILE
    # a utime to now with no close: metadata, once it settled or waited long enough
    assert plan(now, st(), Flag.ATTRIB, since=NOW - SETTLE_MAX - 1) is Action.META_GUESS


def test_a_close_after_a_guess_sends_the_data() -> None:
    """An mmap write does not raise IN_MODIFY: chmod while the file is open,
    then close. The guess sent metadata; the close must send the data even
    though size and mtime now match what the peer holds."""
    same = st()
    assert plan(same, same, Flag.CLOSED) is Action.NOTHING
    assert plan(same, same, Flag.CLOSED, guessed=True) is Action.FILE
    assert plan(same, same, Flag.ATTRIB, guessed=True) is Action.NOTHING
    assert plan(None, same, Flag.CLOSED, guessed=True) is Action.DELETE


# -- two-way with history (history.py) -------------------------------------------------

V1, V2, V3 = st(size=1), st(size=2, mtime_ns=OLD_NS + 2), st(size=3, mtime_ns=OLD_NS + 3)


def agreed(**paths: EntryState) -> dict[bytes, Version]:
    return {k.replace("_", "/").encode(): Version.of(v) for k, v in paths.items()}


@pytest.mark.parametrize(
    ("here", "there", "record", "send", "gone"),
    [
        (V1, None, V1, False, False),  # deleted there: its Delete comes
        (V1, None, None, True, False),  # new here
        (V2, None, V1, True, False),  # edited here, deleted there: the edit wins
        (V2, V1, V1, True, False),  # changed here only
        (V1, V3, V1, False, False),  # changed there only
        (V3, V1, V3, False, False),  # changed there to an older version: still theirs
        (V3, V2, V1, True, False),  # both changed, newer here: the conflict rule sends
        (V2, V3, V1, False, False),  # both changed, newer there: theirs comes
        (None, V1, V1, False, True),  # deleted here: Delete
        (None, V2, V1, False, False),  # deleted here, changed there: the edit wins
        (None, V1, None, False, False),  # new there
        (V1, V1, None, False, False),  # the same: recorded as agreed
    ],
)
def test_reconcile_two_way_table(
    here: EntryState | None,
    there: EntryState | None,
    record: EntryState | None,
    send: bool,
    gone: bool,
) -> None:
    out = reconcile(
        walk((b"f", here)) if here else [],
        {b"f": there} if there else {},
        cmp,
        True,
        lambda p: False,
        True,
        {b"f": Version.of(record)} if record else {},
    )
    assert out.send == ([(b"f", here.size)] if send and here else [])
    assert out.gone == ([b"f"] if gone else [])


def test_reconcile_two_way_records_what_is_equal_and_forgets_what_is_gone_on_both() -> None:
    here = walk((b"same", V1), (b"known", V2), (b"d", st(K.DIR, 0, OLD_NS + 7)))
    there = {b"same": V1, b"known": V2, b"d": st(K.DIR, 0, OLD_NS)}
    rec = agreed(known=V2, both_gone=V1)
    out = reconcile(here, there, cmp, True, lambda p: False, True, rec)
    # a directory agrees by its kind alone; a record already right is not rewritten
    assert out.agree == [(b"same", V1), (b"d", st(K.DIR, 0, OLD_NS + 7))]
    assert out.stale == [b"both/gone"]


def test_reconcile_two_way_deletes_a_directory_only_if_all_below_it_is_agreed() -> None:
    dir_ = st(K.DIR, 0)
    there = {
        b"all": dir_,
        b"all/x": V1,
        b"all/sub": dir_,
        b"all/sub/y": V1,
        b"mixed": dir_,
        b"mixed/old": V1,
        b"mixed/new": V2,  # made there while we were apart
        b"mixed/sub": dir_,
        b"mixed/sub/z": V1,
    }
    rec = agreed(
        all=dir_, all_x=V1, all_sub=dir_, all_sub_y=V1,
        mixed=dir_, mixed_old=V1, mixed_sub=dir_, mixed_sub_z=V1,
    )  # fmt: skip
    out = reconcile([], there, cmp, True, lambda p: False, True, rec)
    # "mixed" stays (with what is new there); what was agreed below it goes
    assert out.gone == [b"all", b"mixed/old", b"mixed/sub"]
    # without deletes, nothing; without history, nothing either
    assert reconcile([], there, cmp, True, lambda p: False, False, rec).gone == []
    assert reconcile([], there, cmp, True, lambda p: False, True).gone == []
