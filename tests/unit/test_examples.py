"""Every example config in examples/ passes schema validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicator import config

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").rglob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(p.parents[1])) for p in EXAMPLES])
def test_example_config_is_valid(path: Path) -> None:
    cfg = config.parse(path.read_text(), str(path))
    assert cfg.mirrors, "an example without mirrors explains nothing"


def test_topology_examples_agree_across_nodes() -> None:
    """Within one topology folder, what a node pushes the peer accepts."""
    for folder in {p.parent for p in EXAMPLES if p.parent.name != "examples"}:
        nodes = {p.stem: config.parse(p.read_text(), str(p)) for p in folder.glob("*.toml")}
        for name, cfg in nodes.items():
            for mname, m in cfg.mirrors.items():
                for peer in m.push_to:
                    assert name in nodes[peer].mirrors[mname].accept_from, (folder, name, peer)
                    assert cfg.peers[peer].key_file == nodes[peer].peers[name].key_file
