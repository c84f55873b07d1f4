"""What a link knows its peer holds in one mirror (remote.py): the manifest
as it arrives, and how acknowledgements, deletes and renames change it."""

from __future__ import annotations

from replicator import frames as F
from replicator.frames import EntryKind as K
from replicator.manifest import EntryState, Preserve
from replicator.remote import RemoteMirror

FILE = EntryState(K.FILE, 0o644, 3, 100, 1, 2)
DIR = EntryState(K.DIR, 0o755, 0, 200, 1, 2)
LINK = EntryState(K.SYMLINK, 0o777, 0, 300, 1, 2, b"target")


def entry(path: bytes, st: EntryState, kind: int | None = None) -> F.Entry:
    k = st.kind if kind is None else kind
    return F.Entry(1, k, st.mode, st.size, st.mtime_ns, st.uid, st.gid, path, st.target)


def tree() -> RemoteMirror:
    """d/ with d/f, d/sub/ and d/sub/g; dx (a sibling whose name starts with d); top."""
    r = RemoteMirror()
    for path, st in [
        (b"d", DIR),
        (b"d/f", FILE),
        (b"d/sub", DIR),
        (b"d/sub/g", FILE),
        (b"dx", FILE),
        (b"top", LINK),
    ]:
        r.known[path] = st
    return r


# -- the manifest ---------------------------------------------------------------------


def test_a_fresh_mirror_knows_nothing() -> None:
    r = RemoteMirror()
    assert (r.opened, r.listed, r.listing, r.refused) == (False, False, None, None)
    assert (r.known, r.partials, r.guessed, r.preserve) == ({}, {}, set(), Preserve.NONE)


def test_entries_fill_the_listing() -> None:
    r = RemoteMirror()
    r.entry(entry(b"ignored", FILE))  # no List outstanding
    assert r.listing is None and r.known == {}
    r.listing = {}
    r.entry(entry(b"d", DIR))
    r.entry(entry(b"d/f", FILE))
    r.entry(entry(b"l", LINK))
    r.entry(entry(b"fifo", FILE, kind=9))  # a kind we do not know: skipped
    assert r.listing == {b"d": DIR, b"d/f": FILE, b"l": LINK}
    assert r.known == {}  # the link swaps the listing in at ListEnd


def test_reset_forgets_the_connection_not_what_is_known() -> None:
    r = tree()
    r.opened = r.listed = True
    r.listing = {b"x": FILE}
    r.partials[b"p"] = F.Partial(1, 10, b"v", b"p")
    r.guessed.add(b"d/f")
    r.next_scan = 123.0
    r.preserve = Preserve.OWNERS
    r.reset()
    assert (r.opened, r.listed, r.listing, r.partials, r.next_scan) == (
        False,
        False,
        None,
        {},
        0.0,
    )
    # what the peer held is still what it holds until it lists again
    assert r.known == tree().known and r.guessed == {b"d/f"}
    assert r.preserve is Preserve.OWNERS


# -- acknowledgements -----------------------------------------------------------------


def test_acked_records_the_state() -> None:
    r = tree()
    newer = EntryState(K.FILE, 0o600, 9, 999, 1, 2)
    r.acked(b"d/f", newer)
    r.acked(b"new", FILE)
    assert r.known[b"d/f"] == newer and r.known[b"new"] == FILE
    # a directory acked again (Meta) keeps what is in it
    r.acked(b"d", DIR)
    assert b"d/sub/g" in r.known


def test_a_directory_replaced_by_a_file_loses_its_subtree() -> None:
    r = tree()
    r.acked(b"d", FILE)
    assert r.known == {b"d": FILE, b"dx": FILE, b"top": LINK}
    r = tree()
    r.acked(b"d/sub", LINK)
    assert b"d/sub/g" not in r.known and r.known[b"d/sub"] == LINK and b"d/f" in r.known


def test_a_file_replaced_by_a_directory() -> None:
    r = tree()
    r.acked(b"dx", DIR)
    assert r.known[b"dx"] == DIR and len(r.known) == 6


def test_forget() -> None:
    r = tree()
    r.forget(b"d/f")
    assert b"d/f" not in r.known and len(r.known) == 5
    r.forget(b"d")  # a directory takes its subtree, not its namesakes (dx)
    assert r.known == {b"dx": FILE, b"top": LINK}
    r.forget(b"nothing")
    assert r.known == {b"dx": FILE, b"top": LINK}


def test_forget_a_file_keeps_paths_that_merely_start_with_it() -> None:
    r = tree()
    r.known[b"dx/odd"] = FILE  # cannot exist below a file; must survive anyway
    r.forget(b"dx")
    assert b"dx/odd" in r.known


# -- renames --------------------------------------------------------------------------


def test_move_a_file() -> None:
    r = tree()
    r.move(b"d/f", b"moved")
    assert b"d/f" not in r.known and r.known[b"moved"] == FILE


def test_move_a_directory_moves_its_subtree() -> None:
    r = tree()
    r.move(b"d", b"e/d2")
    assert r.known == {
        b"e/d2": DIR,
        b"e/d2/f": FILE,
        b"e/d2/sub": DIR,
        b"e/d2/sub/g": FILE,
        b"dx": FILE,  # only starts like d
        b"top": LINK,
    }


def test_move_over_a_directory_replaces_its_subtree() -> None:
    r = tree()
    r.known[b"other"] = DIR
    r.known[b"other/old"] = FILE
    r.move(b"d/sub", b"other")
    assert b"other/old" not in r.known
    assert r.known[b"other"] == DIR and r.known[b"other/g"] == FILE
    assert b"d/sub" not in r.known and b"d/sub/g" not in r.known


def test_move_of_what_is_not_known() -> None:
    """The source is not known there: the destination is gone all the same
    (the rename replaced it)."""
    r = tree()
    r.move(b"unknown", b"d")
    assert r.known == {b"dx": FILE, b"top": LINK}


def test_move_carries_a_guess() -> None:
    r = tree()
    r.guessed.add(b"d/f")
    r.move(b"d/f", b"g")
    assert r.guessed == {b"g"}
    r.move(b"top", b"top2")  # not guessed: no guess appears
    assert r.guessed == {b"g"}


def test_move_a_directory_carries_the_guesses_below_it() -> None:
    """A file sent as a metadata guess, then its directory renamed: the data
    must still be sent when the writer closes it at its new path."""
    r = tree()
    r.guessed |= {b"d/sub/g", b"dx"}
    r.move(b"d", b"e")
    assert r.guessed == {b"e/sub/g", b"dx"}


# -- directories' mtimes --------------------------------------------------------------


def test_stale_dir() -> None:
    r = tree()
    r.stale_dir(b"d")
    assert r.known[b"d"] == EntryState(K.DIR, 0o755, 0, -1, 1, 2)
    assert r.known[b"d/sub"] == DIR  # only that directory
    r.stale_dir(b"dx")  # not a directory: untouched
    r.stale_dir(b"missing")  # not known: nothing appears
    assert r.known[b"dx"] == FILE and b"missing" not in r.known
