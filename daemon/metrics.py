"""The daemon's Prometheus metrics, on their own registry.

Read on every scrape (from the database and the pool, so they are never stale):
  flyio_jobs{state}                       jobs by state (jobs table)
  flyio_orphaned_devices                  uncleaned rows of orphaned_devices
  flyio_pool_exists                       1 when the pool is there
  flyio_pool_data_used_ratio / flyio_pool_metadata_used_ratio
  flyio_pool_data_used_bytes / flyio_pool_data_total_bytes
  flyio_daemon_requests{state}            the daemon's requests by spool state
  flyio_pool_warn_threshold_ratio / flyio_pool_high_watermark_ratio / flyio_pool_low_watermark_ratio
  flyio_pool_usage_above_threshold        1 when data or metadata is at or above the warning threshold
Updated by the daemon's housekeeping loop:
  flyio_transition_duration_seconds{from_state,to_state}   histogram, from new job_events rows
  flyio_health_check_failures_total{check}                 counter
  flyio_health_check_passed{check}                         1/0, the latest result
  flyio_health_checks_total                                health check rounds run
  flyio_images_evicted_total                               images evicted (watermark or admission)
  flyio_eviction_runs_total                                eviction runs
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from devices.base import PoolStatus
from devices.policy import UsagePolicy
from safeguards.health import HealthReport
from states.names import JOB_STATES
from support.log import get_logger
from support.reads import job_counts, last_transition_id, transitions_after, uncleaned_orphans

log = get_logger("daemon.metrics", component="metrics")

# Step durations range from milliseconds (pending) to minutes (a large download or unpack).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
KNOWN_JOB_STATES = JOB_STATES  # every state gets a gauge, zero or not


class StateCollector(Collector):
    """Gauges computed at scrape time from the database, the pool and the request spool."""

    def __init__(self, db_path: Path, pool_status: Callable[[], PoolStatus],
                 request_counts: Callable[[], dict[str, int]], policy: UsagePolicy | None = None) -> None:
        self.db_path = db_path
        self.pool_status = pool_status
        self.request_counts = request_counts
        self.policy = policy or UsagePolicy()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("flyio_jobs", "Jobs by state (jobs table).", labels=["state"])
        counts = job_counts(self.db_path)
        orphans = len(uncleaned_orphans(self.db_path))
        for state in sorted(set(KNOWN_JOB_STATES) | set(counts)):
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("flyio_orphaned_devices", "Orphaned devices not yet cleaned by gc.", value=orphans)

        status = self.pool_status()
        yield GaugeMetricFamily("flyio_pool_exists", "1 when the thin pool exists.", value=1 if status.exists else 0)
        yield GaugeMetricFamily("flyio_pool_data_used_ratio", "Pool data space used (0-1).", value=status.data_used_fraction)
        yield GaugeMetricFamily("flyio_pool_metadata_used_ratio", "Pool metadata used (0-1).",
                                value=status.metadata_used_fraction)
        yield GaugeMetricFamily("flyio_pool_data_used_bytes", "Pool data space used, bytes.",
                                value=status.used_data_blocks * status.data_block_bytes)
        yield GaugeMetricFamily("flyio_pool_data_total_bytes", "Pool data space, bytes.",
                                value=status.total_data_blocks * status.data_block_bytes)
        yield GaugeMetricFamily("flyio_pool_warn_threshold_ratio", "Usage (data or metadata) that is warned of.",
                                value=self.policy.warn)
        yield GaugeMetricFamily("flyio_pool_high_watermark_ratio", "Data usage from which images are evicted.",
                                value=self.policy.high)
        yield GaugeMetricFamily("flyio_pool_low_watermark_ratio", "Data usage eviction brings the pool below.",
                                value=self.policy.low)
        yield GaugeMetricFamily("flyio_pool_usage_above_threshold", "1 when data or metadata usage is at or above "
                                "the warning threshold.", value=1 if self.policy.above_warning(status) else 0)

        requests = GaugeMetricFamily("flyio_daemon_requests", "The daemon's requests by state.", labels=["state"])
        for state, count in sorted(self.request_counts().items()):
            requests.add_metric([state], count)
        yield requests


class DaemonMetrics:
    """The registry and the metrics the housekeeping loop updates."""

    def __init__(self, db_path: Path, pool_status: Callable[[], PoolStatus],
                 request_counts: Callable[[], dict[str, int]], policy: UsagePolicy | None = None) -> None:
        self.db_path = db_path
        self.registry = CollectorRegistry()
        self.registry.register(StateCollector(db_path, pool_status, request_counts, policy))
        self.images_evicted = Counter("flyio_images_evicted", "Images evicted (watermark or admission).",
                                      registry=self.registry)
        self.eviction_runs = Counter("flyio_eviction_runs", "Eviction runs.", registry=self.registry)
        self.transition_seconds = Histogram(
            "flyio_transition_duration_seconds", "Time spent in a state before each transition (job_events).",
            ["from_state", "to_state"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.health_failures = Counter("flyio_health_check_failures", "Failed health checks by check name.",
                                       ["check"], registry=self.registry)
        self.health_passed = Gauge("flyio_health_check_passed", "1 when the latest run of the check passed.",
                                   ["check"], registry=self.registry)
        self.health_rounds = Counter("flyio_health_checks", "Health check rounds run by the daemon.",
                                     registry=self.registry)
        # Only transitions from now on: a restart does not re-count history.
        self.last_event_id = last_transition_id(self.db_path)

    def observe_new_transitions(self) -> int:
        """Feed job_events rows newer than the last seen into the histogram; returns how many."""
        rows = transitions_after(self.db_path, self.last_event_id)
        for row in rows:
            self.transition_seconds.labels(row["from_state"] or "", row["to_state"]).observe(
                max(float(row["seconds"] or 0.0), 0.0))
            self.last_event_id = row["id"]
        return len(rows)

    def record_health(self, report: HealthReport) -> None:
        self.health_rounds.inc()
        for result in report.results:
            self.health_passed.labels(result.name).set(1 if result.passed else 0)
            failures = self.health_failures.labels(result.name)  # shown at 0 until a check fails
            if not result.passed:
                failures.inc()
