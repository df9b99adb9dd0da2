"""Every Prometheus metric eep exports, in one catalog (names start with ``eep_``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per controller process (tests run several side by side)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "eep_http_requests_total",
            "HTTP requests served",
            ["method", "route", "status"],
            registry=r,
        )
        self.is_leader = Gauge("eep_leader", "1 if this replica is the leader", registry=r)
        self.etcd_up = Gauge(
            "eep_etcd_up", "1 if etcd answered this controller's last call", registry=r
        )
        self.nodes = Gauge("eep_nodes", "Nodes by state", ["state"], registry=r)
        self.deployments = Gauge("eep_deployments", "Deployments known", registry=r)
        self.operations = Counter(
            "eep_operations_total", "Finished operations", ["kind", "result"], registry=r
        )
        self.phase_seconds = Histogram(
            "eep_operation_phase_seconds",
            "Seconds spent per operation phase",
            ["phase"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.bytes_moved = Counter(
            "eep_expert_bytes_moved_total", "Expert weight bytes moved by operations", registry=r
        )
        self.generation = Gauge(
            "eep_layout_generation", "Committed layout generation", ["deployment"], registry=r
        )
        self.balancedness = Gauge(
            "eep_balancedness",
            "Balancedness of the committed placement",
            ["deployment"],
            registry=r,
        )
