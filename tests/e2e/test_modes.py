"""Modes and owners a peer declares (issue 8, finding 5): by default a
receiving mirror keeps its own ownership and drops setuid, setgid and sticky
bits; a mirror opts in with ``preserve = ["owners", "special_bits"]``. The
sender counts only what the receiver applies, so nothing is resent forever.
Devices, fifos and sockets are never replicated."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from replicator import frames as F
from replicator.blockmap import MIN_BLOCK, XXH3_128, map_bytes
from replicator.daemon import unsafe_sysctls
from replicator.inbox import Inbox
from replicator.localcluster import LocalCluster, LocalNode, wait_for, write_key
from replicator.manifest import Change, EntryState, Preserve, compare
from replicator.paths import Root
from replicator.protocol import Established
from replicator.publisher import Publisher

from ..helpers import make_pair
from .test_hostile import Client

K = F.EntryKind
UID, GID = 4321, 4322  # ids nobody on this machine uses


def state(mode: int, uid: int = 0, gid: int = 0, kind: F.EntryKind = K.FILE) -> EntryState:
    return EntryState(kind, mode, 1, 5, uid, gid)


# -- the policy and the comparison ----------------------------------------------------


def test_preserve_from_names_and_mode() -> None:
    assert Preserve.from_names([]) is Preserve.NONE
    both = Preserve.from_names(["owners", "special_bits"])
    assert both == Preserve.OWNERS | Preserve.SPECIAL_BITS
    assert Preserve.NONE.mode(0o7755) == 0o755
    assert Preserve.OWNERS.mode(0o4755) == 0o755
    assert Preserve.SPECIAL_BITS.mode(0o7755) == 0o7755


@pytest.mark.parametrize(
    ("src", "dst", "owners", "special", "want"),
    [
        (state(0o4755), state(0o755), True, True, Change.META),
        (state(0o4755), state(0o755), True, False, Change.NONE),
        (state(0o1777, kind=K.DIR), state(0o777, kind=K.DIR), False, False, Change.NONE),
        (state(0o4755), state(0o750), False, False, Change.META),  # rwx bits always count
        (state(0o644, UID, GID), state(0o644), True, False, Change.META),
        (state(0o644, UID, GID), state(0o644), False, True, Change.NONE),
    ],
)
def test_compare_counts_only_what_the_receiver_applies(
    src: EntryState, dst: EntryState, owners: bool, special: bool, want: Change
) -> None:
    assert compare(src, dst, owners, special) is want


def test_devices_fifos_and_sockets_have_no_entry_state(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    os.mknod(tmp_path / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    for name in ("fifo", "null"):
        assert EntryState.from_stat(os.lstat(tmp_path / name)) is None
    # and the wire has no kind for them
    assert {k.name for k in F.EntryKind} == {"FILE", "DIR", "SYMLINK"}


# -- the receiver's publisher ---------------------------------------------------------


def publish_all(tmp_path: Path, preserve: Preserve) -> Path:
    """A file, a directory, a symlink and a Meta on an existing file, all
    declared setuid/setgid/sticky and owned by UID:GID."""
    top = tmp_path / "m"
    top.mkdir()
    (top / "old").write_bytes(b"o")
    root = Root(str(top))
    inbox = Inbox(root, "peer", preserve)
    pub = Publisher(root, inbox)
    try:
        ev = F.File(1, 1, 0, 1, 0o6755, 10**18, UID, GID, 1, MIN_BLOCK, b"v", b"", b"suid")
        p = inbox.begin(ev, (b"suid",))
        os.write(p.fd, b"x")
        pub.add_file(p)
        pub.mkdir(F.Mkdir(2, 1, 0o3777, 10**18, UID, GID, b"shared"), (b"shared",))
        pub.symlink(F.Symlink(3, 1, 10**18, UID, GID, b"ln", b"suid"), (b"ln",))
        pub.meta(F.Meta(4, 1, 0o4711, 10**18, UID, GID, b"old"), (b"old",))
        assert sorted(pub.commit().acked) == [1, 2, 3, 4]
    finally:
        pub.close()
        inbox.close()
        root.close()
    return top


def test_default_keeps_our_owners_and_drops_special_bits(tmp_path: Path) -> None:
    top = publish_all(tmp_path, Preserve.NONE)
    me = (os.geteuid(), os.getegid())
    for name, mode in (("suid", 0o755), ("shared", 0o777), ("old", 0o711)):
        st = os.lstat(top / name)
        assert stat.S_IMODE(st.st_mode) == mode, name
        assert (st.st_uid, st.st_gid) == me, name
    st = os.lstat(top / "ln")
    assert (st.st_uid, st.st_gid) == me


@pytest.mark.skipif(os.geteuid() != 0, reason="owners are applied only by root")
def test_opted_in_mirror_applies_owners_and_special_bits(tmp_path: Path) -> None:
    top = publish_all(tmp_path, Preserve.OWNERS | Preserve.SPECIAL_BITS)
    for name, mode in (("suid", 0o6755), ("shared", 0o3777), ("old", 0o4711)):
        st = os.lstat(top / name)
        assert stat.S_IMODE(st.st_mode) == mode, name
        assert (st.st_uid, st.st_gid) == (UID, GID), name
    st = os.lstat(top / "ln")
    assert (st.st_uid, st.st_gid) == (UID, GID)


# -- real daemons ------------------------------------------------------------------------


def _plant(src: Path) -> None:
    (src / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chown(src / "tool", UID, GID)
    os.chmod(src / "tool", 0o6755)
    (src / "drop").mkdir()
    os.chown(src / "drop", UID, GID)
    os.chmod(src / "drop", 0o1777)
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def _ops_sent(a: LocalNode) -> int:
    return int(a.link("b")["ops_sent"])


def _resync(a: LocalNode, peer: str = "b") -> None:
    """A full reconciliation (List, compare, send what differs), to its end."""
    before = a.link(peer)["mirrors"]["m"].get("last_scan")
    a.control("sync", mirror="m")
    wait_for(
        lambda: (
            a.link(peer)["mirrors"]["m"].get("last_scan") != before
            and a.link(peer)["in_flight"] == 0
        ),
        30,
        "a reconciliation",
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod)")
def test_default_mirror_strips_and_does_not_resend(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    _plant(src)
    (src / "plain").write_text("plain\n")
    cluster.start()
    wait_for(lambda: (dst / "plain").exists() and (dst / "drop").exists(), 30, "replication")
    wait_for(lambda: (dst / "tool").exists(), 30, "the tool")
    st = os.lstat(dst / "tool")
    assert stat.S_IMODE(st.st_mode) == 0o755 and (st.st_uid, st.st_gid) == (0, 0)
    st = os.lstat(dst / "drop")
    assert stat.S_IMODE(st.st_mode) == 0o777 and (st.st_uid, st.st_gid) == (0, 0)
    assert not (dst / "fifo").exists() and not (dst / "null").exists()
    # A setuid change alone is nothing to send; a mode change is.
    os.chmod(src / "tool", 0o4755)
    (src / "marker1").write_text("1\n")
    wait_for(lambda: (dst / "marker1").exists(), 30, "marker1")
    # Reconciliations find nothing to send: no Meta loop on what b keeps its own.
    _resync(a)
    sent = _ops_sent(a)
    _resync(a)
    _resync(a)
    assert _ops_sent(a) == sent
    os.chmod(src / "tool", 0o4700)
    wait_for(lambda: stat.S_IMODE(os.lstat(dst / "tool").st_mode) == 0o700, 30, "chmod")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_opted_in_mirror_preserves_and_stays_quiet(cluster: LocalCluster) -> None:
    a, b = make_pair(cluster)
    b.mirrors["m"]["preserve"] = ["owners", "special_bits"]
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    _plant(src)
    cluster.start()
    wait_for(lambda: (dst / "tool").exists() and (dst / "drop").exists(), 30, "replication")
    for name, mode in (("tool", 0o6755), ("drop", 0o1777)):
        wait_for(
            lambda name=name, mode=mode: stat.S_IMODE(os.lstat(dst / name).st_mode) == mode,
            30,
            f"{name}'s mode",
        )
        st = os.lstat(dst / name)
        assert (st.st_uid, st.st_gid) == (UID, GID), name
    _resync(a)
    sent = _ops_sent(a)
    _resync(a)
    assert _ops_sent(a) == sent
    os.chmod(src / "tool", 0o4755)
    wait_for(lambda: stat.S_IMODE(os.lstat(dst / "tool").st_mode) == 0o4755, 30, "setuid only")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_two_way_does_not_push_stripped_bits_back(cluster: LocalCluster) -> None:
    """a preserves special bits and owners, b does not: what b keeps its own
    never flows back to a (a's setuid file stays setuid, owned by UID)."""
    a, b = cluster.node("a"), cluster.node("b")
    cluster.connect("a", "b")
    cluster.connect("b", "a")
    a.add_mirror(
        "m", push_to=["b"], accept_from=["b"], two_way=True, preserve=["owners", "special_bits"]
    )
    b.add_mirror("m", push_to=["a"], accept_from=["a"], two_way=True)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    _plant(src)
    cluster.start()
    wait_for(lambda: (dst / "tool").exists() and (dst / "drop").exists(), 30, "replication")
    (dst / "from-b").write_text("b\n")
    wait_for(lambda: (src / "from-b").exists(), 30, "b's file on a")
    _resync(a, "b")
    _resync(b, "a")
    st = os.lstat(src / "tool")
    assert stat.S_IMODE(st.st_mode) == 0o6755 and (st.st_uid, st.st_gid) == (UID, GID)
    st = os.lstat(dst / "tool")
    assert stat.S_IMODE(st.st_mode) == 0o755 and (st.st_uid, st.st_gid) == (0, 0)


def test_hostile_peer_cannot_plant_a_setuid_root_file(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    _, b = make_pair(cluster)
    key = os.urandom(16).hex().encode()
    key_file = write_key(tmp_path / "keys" / "mallory.key", key)
    b.peers["mallory"] = {"address": "127.0.0.1:9", "key_file": str(key_file)}
    b.mirrors["m"]["accept_from"].append("mallory")
    cluster.start()
    c = Client(b, "mallory", key)
    assert isinstance(c.handshake(), Established)
    c.send(F.Open(1, "m"))
    opened = c.expect(F.Opened)
    assert isinstance(opened, F.Opened) and opened.code == 0 and opened.preserve == 0
    c.op = 1
    data = b"\x7fELF pretend"
    c.send(F.File(2, 1, 0, len(data), 0o4755, time.time_ns(), 0, 0, 1, MIN_BLOCK, b"v", b"", b"su"))
    c.send(F.Chunk(2, 0, len(data)), payload=data)
    c.send(F.End(2, map_bytes(data, XXH3_128, MIN_BLOCK).file_digest))
    c.send(F.Mkdir(3, 1, 0o6777, time.time_ns(), 0, 0, b"sg"))
    c.send(F.Meta(4, 1, 0o6755, time.time_ns(), UID, GID, b"su"))
    acked = set()
    while len(acked) < 3:
        ev = c.expect(F.Ack)
        assert isinstance(ev, F.Ack)
        acked.add(ev.op)
    c.close()
    dst = b.mirror_path("m")
    assert stat.S_IMODE(os.lstat(dst / "su").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(dst / "sg").st_mode) == 0o777
    assert (os.lstat(dst / "su").st_uid, os.lstat(dst / "su").st_gid) == (
        os.geteuid(),
        os.getegid(),
    )


def test_unsafe_sysctls_are_named(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    fs.mkdir()
    assert unsafe_sysctls(str(tmp_path)) == []  # unknown: nothing to say
    (fs / "protected_hardlinks").write_text("0\n")
    (fs / "protected_symlinks").write_text("1\n")
    out = unsafe_sysctls(str(tmp_path))
    assert len(out) == 1 and "fs.protected_hardlinks = 0" in out[0]
    assert "sysctl -w fs.protected_hardlinks=1" in out[0]
    (fs / "protected_hardlinks").write_text("1\n")
    assert unsafe_sysctls(str(tmp_path)) == []
