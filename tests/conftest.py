"""Shared fixtures: real replicatord processes on loopback (replicator.localcluster)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.localcluster import LocalCluster, LocalNode

from .helpers import make_pair
from .system import netns as _netns


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for n in c.nodes.values():
                print(f"\n----- log of node {n.name} -----\n{n.log_tail(80)}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def pair(cluster: LocalCluster) -> tuple[LocalNode, LocalNode]:
    a, b = make_pair(cluster)
    cluster.start()
    return a, b


@pytest.fixture
def netns() -> Iterator[_netns.Netns]:
    if not _netns.available():
        pytest.skip("needs root and ip netns")
    ns = _netns.Netns()
    try:
        yield ns
    finally:
        ns.close()
