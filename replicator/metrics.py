"""Optional Prometheus endpoint (``node.metrics_listen``): the status figures
as counters and gauges, read from ``Daemon.status()`` at scrape time.

Uses the standard client library (the ``metrics`` extra); without it the
daemon logs that metrics are unavailable and runs on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from .net import parse_address

log = logging.getLogger(__name__)

Status = Callable[[], dict[str, Any]]

#: (metric suffix, status key, help, type) for each outbound link figure.
_LINK = [
    ("bytes_sent_total", "bytes_sent", "Bytes sent on the link (frames and payload)", "counter"),
    ("payload_bytes_sent_total", "payload_bytes_sent", "File data bytes sent", "counter"),
    ("files_sent_total", "files_sent", "Files sent whole", "counter"),
    ("operations_sent_total", "ops_sent", "Operations sent", "counter"),
    ("operations_acked_total", "ops_acked", "Operations acknowledged durable", "counter"),
    ("files_aborted_total", "files_aborted", "Files aborted because the source changed", "counter"),
    ("renames_total", "renames", "Renames sent as renames", "counter"),
    (
        "hardlinks_sent_total",
        "hardlinks_sent",
        "Hard-link names sent as links",
        "counter",
    ),
    ("resumed_files_total", "resumed_files", "Transfers resumed at an offset", "counter"),
    ("delta_files_total", "delta_files", "Files sent as deltas of the peer's version", "counter"),
    (
        "delta_bytes_copied_total",
        "delta_bytes_copied",
        "Bytes the peer copied from its own version instead of receiving them",
        "counter",
    ),
    (
        "mend_requests_total",
        "mend_requests",
        "Want frames: files the peer found damaged",
        "counter",
    ),
    (
        "mend_bytes_total",
        "mend_bytes",
        "Bytes sent again because the peer found them bad",
        "counter",
    ),
    ("connects_total", "connects", "Successful connections", "counter"),
    ("queue_files", "queue_files", "Paths waiting to be looked at", "gauge"),
    ("queue_bytes", "queue_bytes", "Bytes waiting (known sizes)", "gauge"),
    ("in_flight", "in_flight", "Operations sent and not yet acknowledged", "gauge"),
    ("in_flight_bulk", "in_flight_bulk", "Bulk operations among those in flight", "gauge"),
    ("lag_seconds", "lag_seconds", "Age of the oldest unacknowledged change", "gauge"),
    ("rate_bytes_per_second", "rate_bps", "Payload rate over the last seconds", "gauge"),
    ("bwlimit_bytes_per_second", "bwlimit", "The peer's bwlimit (0: none)", "gauge"),
    (
        "bwlimit_applied_bytes_per_second",
        "bwlimit_applied",
        "The cap the connected socket reports (SO_MAX_PACING_RATE; 0: none)",
        "gauge",
    ),
]
_SESSION = [
    ("bytes_received_total", "bytes_received", "Bytes received", "counter"),
    (
        "payload_bytes_received_total",
        "payload_bytes_received",
        "File data bytes received",
        "counter",
    ),
    ("files_received_total", "files_received", "Files received", "counter"),
    ("operations_applied_total", "ops_applied", "Namespace operations applied", "counter"),
    ("commits_total", "commits", "Group commits (sync rounds)", "counter"),
    ("conflicts_total", "conflicts", "Two-way conflicts resolved", "counter"),
    ("delta_files_total", "delta_files", "Files received as deltas", "counter"),
    (
        "delta_bytes_copied_total",
        "delta_bytes_copied",
        "Bytes of deltas copied from the published version",
        "counter",
    ),
    (
        "verify_bytes_requested_total",
        "verify_bytes_requested",
        "Bytes asked for again because they did not match the block map",
        "counter",
    ),
    (
        "verify_mismatches_total",
        "verify_mismatches",
        "Received files that did not match their block map (bad ranges asked for again)",
        "counter",
    ),
    (
        "verify_failed_total",
        "verify_failed",
        "Received files discarded after repeated block map mismatches",
        "counter",
    ),
    (
        "base_changed_total",
        "base_changed",
        "Deltas refused because the replica changed since it was published",
        "counter",
    ),
]


class StatusCollector:
    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.status()
        node = st["node"]

        def family(name: str, doc: str, kind: str, labels: list[str]) -> Any:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            full = name[: -len("_total")] if kind == "counter" else name
            return cls(full, doc, labels=labels)

        up = GaugeMetricFamily(
            "replicator_link_up", "1 if the link is connected", labels=["node", "peer"]
        )
        for peer, ln in st["links"].items():
            up.add_metric([node, peer], 1.0 if ln["state"] == "connected" else 0.0)
        yield up
        for suffix, key, doc, kind in _LINK:
            fam = family(f"replicator_link_{suffix}", doc, kind, ["node", "peer"])
            for peer, ln in st["links"].items():
                v = ln.get(key)
                if v is not None:
                    fam.add_metric([node, peer], float(v))
            yield fam
        rtt = GaugeMetricFamily(
            "replicator_link_rtt_seconds", "Heartbeat round trip", labels=["node", "peer"]
        )
        for peer, ln in st["links"].items():
            if ln.get("rtt_ms") is not None:
                rtt.add_metric([node, peer], ln["rtt_ms"] / 1000)
        yield rtt
        lanes = [
            ("files", "files", "Paths waiting in the lane"),
            ("bytes", "bytes", "Bytes waiting in the lane (known sizes)"),
            ("oldest_seconds", "oldest_age_seconds", "Age of the lane's oldest change"),
        ]
        for suffix, key, doc in lanes:
            fam = GaugeMetricFamily(
                f"replicator_link_lane_{suffix}",
                f"{doc} (live: seen by the watcher; bulk: sync, rescans, retries)",
                labels=["node", "peer", "lane"],
            )
            for peer, ln in st["links"].items():
                for lane, v in (ln.get("lanes") or {}).items():
                    if v.get(key) is not None:
                        fam.add_metric([node, peer, lane], float(v[key]))
            yield fam
        for suffix, key, doc, kind in _SESSION:
            fam = family(f"replicator_session_{suffix}", doc, kind, ["node", "peer"])
            totals: dict[str, float] = {}
            for s in st["sessions"]:
                totals[s["peer"] or "?"] = totals.get(s["peer"] or "?", 0.0) + float(s[key])
            for peer, v in totals.items():
                fam.add_metric([node, peer], v)
            yield fam
        marker = GaugeMetricFamily(
            "replicator_mirror_marker_ok",
            "1 if the mirror marker is in place",
            labels=["node", "mirror"],
        )
        unwatched = GaugeMetricFamily(
            "replicator_mirror_unwatched_dirs",
            "Directories without an inotify watch (polled)",
            labels=["node", "mirror"],
        )
        conflicts = GaugeMetricFamily(
            "replicator_mirror_conflicts_unresolved",
            "Two-way conflicts decided on this node whose conflict copy still exists",
            labels=["node", "mirror"],
        )
        for name, m in st["mirrors"].items():
            marker.add_metric([node, name], 1.0 if m.get("marker_ok") else 0.0)
            unwatched.add_metric([node, name], float(m.get("unwatched_dirs") or 0))
            if m.get("conflicts_unresolved") is not None:
                conflicts.add_metric([node, name], float(m["conflicts_unresolved"]))
        yield marker
        yield unwatched
        yield conflicts
        w = st.get("watcher") or {}
        ov = CounterMetricFamily(
            "replicator_inotify_overflows", "inotify queue overflows", labels=["node"]
        )
        ov.add_metric([node], float(w.get("overflows") or 0))
        yield ov


def serve(address: str, status: Status) -> object | None:
    """Start the endpoint; returns the server (None if the library is
    missing); OSError if ``address`` cannot be bound."""
    try:
        from prometheus_client import start_http_server
        from prometheus_client.core import CollectorRegistry
    except ImportError:
        log.error(
            "node.metrics_listen is set but prometheus_client is not installed "
            "(pip install 'replicator[metrics]'); running without metrics"
        )
        return None
    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    server, _thread = start_http_server(port, host, registry=registry)
    log.info("metrics on http://%s/metrics", address)
    return server


def stop(server: object | None) -> None:
    """Stop a server ``serve`` returned and close its socket (the address
    refuses connections from then on)."""
    if server is not None:
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]
