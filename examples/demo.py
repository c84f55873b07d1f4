"""Live demo: two replicatord nodes on loopback; node a pushes mirror "media" to b.

Run it with ./examples/demo.sh (which sets everything up first).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from replicator.localcluster import LocalCluster, diff_trees, tree, wait_for

MiB = 1 << 20


def say(msg: str) -> None:
    print(f"\n\033[1m== {msg}\033[0m", flush=True)


def ctl(node: object, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "replicator.ctl", "--socket", node.control_socket, *args],
        check=False,
    )  # type: ignore[attr-defined]


def main() -> int:
    with (
        tempfile.TemporaryDirectory(prefix="replicator-demo-") as tmp,
        LocalCluster(Path(tmp)) as cluster,
    ):
        a, b = cluster.node("a"), cluster.node("b")
        cluster.connect("a", "b")
        src = a.add_mirror("media", push_to=["b"])
        dst = b.add_mirror("media", accept_from=["a"])
        say(f"source {src}  →  replica {dst}")
        (src / "albums" / "2026").mkdir(parents=True)
        for i in range(200):
            (src / "albums" / "2026" / f"track{i:03}.flac").write_bytes(os.urandom(16 * 1024))
        with (src / "video.mkv").open("wb") as f:
            block = os.urandom(MiB)
            for _ in range(512):
                f.write(block)
        (src / "latest").symlink_to("video.mkv")
        print("wrote 200 small files, a 512 MiB video and a symlink; node a's config:\n")
        print(a.render_config())

        say("starting node b (receiver) and node a (sender)")
        t0 = time.monotonic()
        cluster.start()
        wait_for(
            lambda: not diff_trees(tree(src, content=False), tree(dst, content=False)),
            120,
            "the replica to match",
        )
        dt = time.monotonic() - t0
        print(
            f"initial sync of {512 + 200 * 16 / 1024:.0f} MiB done in {dt:.2f} s "
            "(ACK = fsynced and renamed into place on b)"
        )
        ctl(a, "status")

        say("live changes: new file, rename, delete")
        t0 = time.monotonic()
        (src / "news.txt").write_text("breaking: replicated in milliseconds\n")
        wait_for(lambda: (dst / "news.txt").exists(), 30, "news.txt on b")
        print(f"news.txt on the replica after {(time.monotonic() - t0) * 1000:.0f} ms")
        (src / "albums" / "2026").rename(src / "albums" / "best-of-2026")
        (src / "latest").unlink()
        wait_for(lambda: not diff_trees(tree(src), tree(dst)), 30, "rename and delete on b")
        print("directory rename and symlink delete replicated")

        say("content check")
        diffs = diff_trees(tree(src), tree(dst))
        print(
            "replica identical to source (content, mode, mtime_ns)"
            if not diffs
            else "\n".join(diffs)
        )
        ctl(b, "status")
        return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
