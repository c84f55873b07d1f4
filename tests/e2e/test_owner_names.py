"""Owners by name (rsync's default as root): the receiver runs with its own
/etc/passwd and /etc/group (a private mount namespace), where the sender's
users have other numbers. Files land owned by the same *names*; a name
unknown there keeps its number (logged); `owners = "numeric"` applies the
numbers; a rescan finds nothing to change."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from replicator.localcluster import LocalCluster, LocalNode, wait_for

from ..helpers import make_pair

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)

# Ids chosen to exist in neither file of a normal system.
ALICE_HERE, ALICE_THERE = 23001, 23501
STAFF_HERE, STAFF_THERE = 23100, 23600
ORPHAN = 23999  # a user with a name here only: unknown on the receiver


def passwd(tmp: Path, entries: dict[str, int], groups: dict[str, int]) -> tuple[Path, Path]:
    p, g = tmp / "passwd", tmp / "group"
    p.write_text(
        Path("/etc/passwd").read_text()
        + "".join(f"{n}:x:{i}:{i}::/nonexistent:/usr/sbin/nologin\n" for n, i in entries.items())
    )
    g.write_text(
        Path("/etc/group").read_text() + "".join(f"{n}:x:{i}:\n" for n, i in groups.items())
    )
    return p, g


def private_accounts(node: LocalNode, p: Path, g: Path) -> None:
    """Run ``node`` with ``p`` and ``g`` as its /etc/passwd and /etc/group."""
    script = 'mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/group && shift 2 && exec "$@"'
    node.wrap = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        str(p),
        str(g),
    ]


@pytest.mark.parametrize("mode", ["names", "numeric"])
def test_owners_follow_names(cluster: LocalCluster, tmp_path: Path, mode: str) -> None:
    a, b = make_pair(cluster)
    b.mirrors["m"]["preserve"] = ["owners"]
    b.mirrors["m"]["owners"] = mode
    ap, ag = passwd(
        tmp_path / "a", {"rpl-alice": ALICE_HERE, "rpl-orphan": ORPHAN}, {"rpl-staff": STAFF_HERE}
    )
    bp, bg = passwd(tmp_path / "b", {"rpl-alice": ALICE_THERE}, {"rpl-staff": STAFF_THERE})
    (tmp_path / "a").mkdir(exist_ok=True)
    private_accounts(a, ap, ag)
    private_accounts(b, bp, bg)
    src, dst = a.mirror_path("m"), b.mirror_path("m")
    (src / "alice.txt").write_text("hers")
    os.chown(src / "alice.txt", ALICE_HERE, STAFF_HERE)
    (src / "d").mkdir()
    os.chown(src / "d", ALICE_HERE, STAFF_HERE)
    (src / "orphan.txt").write_text("nobody knows")
    os.chown(src / "orphan.txt", ORPHAN, STAFF_HERE)
    cluster.start()
    wait_for(lambda: (dst / "orphan.txt").exists() and (dst / "d").exists(), 30, "files on b")
    wait_for(lambda: a.link("b")["in_flight"] == 0 and a.link("b")["queue_files"] == 0, 30)

    def owner(p: Path) -> tuple[int, int]:
        st = p.lstat()
        return st.st_uid, st.st_gid

    if mode == "names":
        assert owner(dst / "alice.txt") == (ALICE_THERE, STAFF_THERE)
        assert owner(dst / "d") == (ALICE_THERE, STAFF_THERE)
        assert owner(dst / "orphan.txt") == (ORPHAN, STAFF_THERE)  # unknown there: its number
        assert "user 'rpl-orphan' (id 23999 on a) does not exist here" in b.log_path.read_text()
    else:
        assert owner(dst / "alice.txt") == (ALICE_HERE, STAFF_HERE)
        assert owner(dst / "orphan.txt") == (ORPHAN, STAFF_HERE)
    # a rescan finds nothing to change: the manifest maps ids back by name
    sent = a.link("b")["ops_sent"]
    scanned = a.link("b")["mirrors"]["m"].get("last_scan")
    a.control("sync", mirror="m")
    wait_for(lambda: a.link("b")["mirrors"]["m"].get("last_scan") != scanned, 30, "a rescan")
    wait_for(lambda: a.link("b")["in_flight"] == 0 and a.link("b")["queue_files"] == 0, 30)
    assert a.link("b")["ops_sent"] == sent
