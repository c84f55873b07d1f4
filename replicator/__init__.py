"""replicator: zero-copy file replication for Linux storage nodes."""

__version__ = "0.1.0"
