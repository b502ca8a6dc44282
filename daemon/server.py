"""The daemon: holds the manager lock, runs image jobs from a unix socket on a thread
pool, exports Prometheus metrics, and stops gracefully on SIGTERM or {"op": "shutdown"}.

Threads: the socket server (one short-lived thread per connection; it only validates and
queues, never touches the network), `workers` job threads (downloads run concurrently;
device-mapper-heavy steps are serialized by the OperationGuard of the ONE set of
services shared by every worker), one housekeeping thread (lock refresh, metrics, health
checks) and the metrics HTTP server. The main thread waits for the stop signal.
"""

from __future__ import annotations

import os
import signal
import socketserver
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from daemon.metrics import DaemonMetrics
from devices.policy import UsagePolicy, warn_if_above
from daemon.protocol import decode, encode, socket_path
from daemon.requests import (DONE, FAILED, QUEUED, RUNNING, UNFINISHED, WAITING, ImageRequestRecord, RequestSpool,
                             request_size)
from fsm.definition import FINAL_STATES
from fsm.runner import JobAborted, Runner
from fsm.store import JobBusy, JobNotFound, JobStore
from safeguards.health import SystemHealthChecker
from safeguards.manager_lock import LockLost, ManagerLock
from states.registry import open_environment
from states.services import ImageServices
from states.submit import ImageRequest, process_request, resolve_request
from states.vm_snapshot import SNAPSHOT_WORKFLOW, SnapshotRequest, process_snapshot_request, resolve_snapshot
from states.workflow import WORKFLOW_NAME
from support.errors import ManagerError
from support.log import get_logger
from support.paths import database_path, lock_path
from support.reads import job_counts

log = get_logger("daemon", component="daemon")

LOCK_REFRESH_SECONDS = 60.0        # the lock is stale after 300 s
WAITING_RETRY_SECONDS = 60.0       # a job a guard left waiting is tried again this often
TRANSITIONS_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path
    backend: str = "auto"
    workers: int = 2
    device_size_bytes: int = 4 * 1024**3
    metrics_address: str = "127.0.0.1"
    metrics_port: int | None = 9464          # None: no metrics endpoint
    health_interval: float = 30.0
    policy: UsagePolicy = field(default_factory=UsagePolicy)  # warning threshold and eviction watermarks


class Daemon:
    """Build with a config and an opened store, then `serve()` until stopped."""

    def __init__(self, config: DaemonConfig, store: JobStore) -> None:
        self.config = config
        self.store = store
        self.stop_event = threading.Event()
        self.started_at = time.monotonic()
        self.spool = RequestSpool(config.state_dir / "fsm" / "requests")
        self.lock = ManagerLock(lock_path(config.state_dir), "daemon")
        self.services: ImageServices | None = None
        self._runner: Runner | None = None
        self._job_locks: dict[int, threading.Lock] = {}
        self._running: set[int] = set()
        self._state_lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="job")
        self.metrics: DaemonMetrics | None = None
        self.exit_code = 0
        self.stop_reason = ""

    # -- lifecycle ----------------------------------------------------------------------

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT or a shutdown request; 0 after a clean stop, 1 when the
        manager lock was lost (removed or taken over) while running."""
        self.lock.acquire()
        server: socketserver.UnixStreamServer | None = None
        metrics_server = None
        housekeeping: threading.Thread | None = None
        try:
            self._install_signal_handlers()
            environment = open_environment(self.config.state_dir, self.store, backend=self.config.backend,
                                           stop_event=self.stop_event)
            self.services, self._runner = environment.services, environment.runner
            # Admission evicts before it makes a job wait for room (states/admission.py); the
            # daemon then waits, since others can talk to it and free space meanwhile.
            self.services.policy, self.services.evict = self.config.policy, self.evict_images
            self.services.wait_for_room = True
            self.metrics = DaemonMetrics(database_path(self.config.state_dir), self.services.pool.get_pool_status, self.request_counts,
                                         self.config.policy)
            if self.config.metrics_port is not None:
                try:
                    metrics_server, _thread = start_http_server(self.config.metrics_port, addr=self.config.metrics_address,
                                                                registry=self.metrics.registry)
                except OSError as exc:
                    raise ManagerError(f"cannot serve metrics on {self.config.metrics_address}:"
                                       f"{self.config.metrics_port}: {exc.strerror}") from None
            server = self._listen()
            threading.Thread(target=server.serve_forever, name="socket", daemon=True).start()
            housekeeping = threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
            housekeeping.start()
            resumed = self._resume_unfinished()
            log.info("daemon started", pid=os.getpid(), socket=str(socket_path(self.config.state_dir)),
                     workers=self.config.workers, resumed=resumed,
                     metrics=f"{self.config.metrics_address}:{self.config.metrics_port}" if metrics_server else "off")
            while not self.stop_event.wait(1.0):
                pass
            log.info("daemon stopping: jobs stop at their next safe point and resume on the next start",
                     reason=self.stop_reason)
        finally:
            self.stop_event.set()
            if server is not None:
                server.shutdown()
                server.server_close()
                socket_path(self.config.state_dir).unlink(missing_ok=True)
            self.executor.shutdown(wait=True, cancel_futures=True)
            if self.services is not None:
                self.services.prefetch.shutdown()  # background downloads stop at their next chunk
            if housekeeping is not None:
                housekeeping.join(timeout=10)
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            self.lock.release()
        log.info("daemon stopped", unfinished=sum(1 for r in self.spool.load_all() if r.state in UNFINISHED))
        return self.exit_code

    def stop(self, why: str) -> None:
        """Ask every job to stop at its next safe point (also called from a signal handler,
        so it only records and sets: no logging, no locks)."""
        if not self.stop_event.is_set():
            self.stop_reason = why
        self.stop_event.set()

    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda num, _frame: self.stop(signal.Signals(num).name))

    def _listen(self) -> socketserver.UnixStreamServer:
        path = socket_path(self.config.state_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # we hold the manager lock: any socket there is a dead daemon's
        daemon = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    if not line.strip():
                        continue
                    self.wfile.write(encode(daemon.handle_line(line)))
                    self.wfile.flush()

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        old_umask = os.umask(0o177)  # the socket is created 0600: no window where others may connect
        try:
            server = Server(str(path), Handler)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        return server

    # -- requests -----------------------------------------------------------------------

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """One request -> one reply; never raises (a bad request is an error reply)."""
        try:
            message = decode(line)
            op = message["op"]
            if op in ("process-image", "snapshot"):
                return self._submit(message)
            if op == "delete-snapshot":
                return self.delete_snapshot(message)
            if op == "status":
                return self.status()
            if op == "job":
                return self.job_status(message)
            self.stop("shutdown request")
            return {"ok": True, "stopping": True, "pid": os.getpid()}
        except (ValueError, ManagerError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not kill the daemon's socket thread silently
            log.error("request failed", error=f"{type(exc).__name__}: {exc}")
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def _submit(self, message: dict[str, Any]) -> dict[str, Any]:
        """Queue the request; with `"wait": true` answer only once its job is final (or left
        unfinished by a shutdown or a wait), on the same connection: no polling."""
        if self.stop_event.is_set():
            raise ManagerError("the daemon is shutting down; submit again after it restarts")
        if message["op"] == "snapshot":
            return self._submit_snapshot(message)
        self._device_size(message.get("device_size"), "device_size")
        record = self.spool.allocate(message)  # validated and durable before we answer
        log.info("request queued", request_id=record.id, source=record.describe())
        future = self.executor.submit(self._work, record)
        if not message.get("wait"):
            return {"ok": True, "id": record.id, "job_id": None, "state": QUEUED}
        future.result()
        return self.job_status({"id": record.id})

    def _submit_snapshot(self, message: dict[str, Any]) -> dict[str, Any]:
        """A VM's snapshot: resolved against the catalog and its job created here, at once
        (nothing to fetch, so no spool file: the job row is the durable request, and an
        unfinished one is resumed at the next start), then run by a worker."""
        resolved = self._resolve_snapshot(message.get("image"), message.get("vm"), message.get("size"))
        job, created = self.store.create_or_get(SNAPSHOT_WORKFLOW, resolved.idempotency_key,
                                                self.runner.workflow(SNAPSHOT_WORKFLOW).initial, resolved.job_context())
        if created:
            log.info("job created", job_id=job.id, workflow=SNAPSHOT_WORKFLOW, key=resolved.idempotency_key)
        # A job just made here needs no second lookup (process_snapshot_request's: is it
        # complete, its snapshot since deleted?): it is run as it stands.
        future = self.executor.submit(self._run_snapshot, job.id, None if created else resolved)
        if not message.get("wait"):
            return {"ok": True, "id": None, "job_id": job.id, "state": QUEUED}
        return snapshot_reply(future.result())

    def _run_snapshot(self, job_id: int, resolved: SnapshotRequest | None) -> Any:
        """Run a VM's snapshot job in a worker; the job as it ended (a failure is its own)."""
        try:
            job = self._run_job(self.runner, job_id, resolved)
            log.info("request finished" if job.state in FINAL_STATES else "request left unfinished", job_id=job_id,
                     state=job.state)
            return job
        except Exception as exc:  # one request's failure is its own; the daemon goes on
            log.error("request failed", job_id=job_id, error=str(exc) or type(exc).__name__)
            return self.store.get(job_id)

    def delete_snapshot(self, message: dict[str, Any]) -> dict[str, Any]:
        """`delete-snapshot` on the daemon's behalf (it holds the manager lock the command
        would need): by "snapshot_id" or "vm", through the same catalog call, answered once done."""
        from catalog.queries import delete_snapshot

        snapshot_id, vm_id = message.get("snapshot_id"), message.get("vm")
        if (snapshot_id is None) == (vm_id is None):
            raise ValueError('a delete-snapshot request needs "snapshot_id" or "vm", not both')
        if snapshot_id is not None and (isinstance(snapshot_id, bool) or not isinstance(snapshot_id, int)):
            raise ValueError(f"snapshot_id must be an integer, got {snapshot_id!r}")
        assert self.services is not None
        names = delete_snapshot(self.store.engine, self.services.pool, snapshot_id,
                                vm_id=str(vm_id) if vm_id is not None else None)
        return {"ok": True, "deleted": names}

    def status(self) -> dict[str, Any]:
        jobs = job_counts(database_path(self.config.state_dir))
        with self._state_lock:
            running = sorted(self._running)
        return {"ok": True, "pid": os.getpid(), "workers": self.config.workers, "stopping": self.stop_event.is_set(),
                "uptime_s": round(time.monotonic() - self.started_at, 1), "requests": self.request_counts(),
                "jobs": jobs, "running_jobs": running}

    def job_status(self, message: dict[str, Any]) -> dict[str, Any]:
        """{"id": request id} or {"job_id": fsm job id}: where it stands."""
        record: ImageRequestRecord | None = None
        if message.get("id") is not None:
            record = self.spool.get(int(message["id"]))
            if record is None:
                raise ManagerError(f"request {message['id']} not found")
            job_id = record.job_id
        elif message.get("job_id") is not None:
            job_id = int(message["job_id"])
        else:
            raise ValueError('give "id" (a request id) or "job_id"')
        reply: dict[str, Any] = {"ok": True, "id": record.id if record else None, "job_id": job_id,
                                 "state": record.state if record else None, "error": record.error if record else None}
        if job_id is not None:
            try:
                job = self.store.get(job_id)
            except JobNotFound:
                raise ManagerError(f"job {job_id} not found") from None
            reply.update(job_state=job.state, state=job.state if record is None or record.state != FAILED else FAILED,
                         error=job.error or reply["error"], context=job.context, final=job.state in FINAL_STATES)
        else:
            reply["final"] = reply["state"] == FAILED
        return reply

    def request_counts(self) -> dict[str, int]:
        return dict(Tally(r.state for r in self.spool.load_all()))

    # -- jobs ---------------------------------------------------------------------------

    @property
    def runner(self) -> Runner:
        """The one runner of every workflow (built in `serve`); a request's device size
        travels in its job's context, not in the runner."""
        assert self._runner is not None
        return self._runner

    def _resolve_snapshot(self, image: Any, vm_id: Any, size: Any) -> SnapshotRequest:
        if not image or not vm_id:
            raise ValueError('a snapshot request needs "image" (name or id) and "vm"')
        size_bytes = self._device_size(size, "size")
        return resolve_snapshot(self.store.engine, str(image), str(vm_id), size_bytes)

    def _device_size(self, value: Any, name: str) -> int | None:
        """A request's size field in bytes (None: absent), within what the pool's backend
        can make (devices/limits.py): a bad one is the request's error, before any job."""
        from devices.limits import check_device_size

        size = request_size(value, name)
        assert self.services is not None
        return check_device_size(name, size, self.services.pool) if size is not None else None

    @contextmanager
    def _job_slot(self, job_id: int) -> Iterator[None]:
        """One thread per job: a second request for the same image waits for the first."""
        with self._state_lock:
            lock = self._job_locks.setdefault(job_id, threading.Lock())
        with lock:
            with self._state_lock:
                self._running.add(job_id)
            try:
                yield
            finally:
                with self._state_lock:
                    self._running.discard(job_id)

    def _work(self, record: ImageRequestRecord) -> None:
        """Resolve the request (S3 listing/HEAD happens here, in the worker), then run its job."""
        if self.stop_event.is_set():
            return  # stays queued on disk; the next start picks it up
        try:
            record.state, record.error = RUNNING, None
            self.spool.save(record)
            runner = self.runner
            resolved: ImageRequest | SnapshotRequest | None = None
            if record.job_id is None:
                if record.op == "snapshot":
                    resolved = self._resolve_snapshot(record.source["image"], record.vm_id, record.device_size_bytes)
                    workflow = SNAPSHOT_WORKFLOW
                else:
                    resolved = resolve_request(bucket=record.bucket, endpoint_url=record.endpoint_url,
                                               device_size_bytes=record.device_size_bytes or self.config.device_size_bytes,
                                               registry=record.registry, state_dir=self.config.state_dir,
                                               **record.source)
                    workflow = WORKFLOW_NAME
                job, created = self.store.create_or_get(workflow, resolved.idempotency_key,
                                                        runner.workflow(workflow).initial, resolved.job_context())
                if created:
                    log.info("job created", job_id=job.id, workflow=workflow, key=resolved.idempotency_key)
                record.job_id = job.id
                self.spool.save(record)
            job = self._run_job(runner, record.job_id, resolved)
            if job.state in FINAL_STATES:
                record.state = DONE
                record.error = job.error
            else:
                record.state = QUEUED if self.stop_event.is_set() else WAITING
            self.spool.save(record)
            log.info("request finished" if record.state == DONE else "request left unfinished",
                     request_id=record.id, job_id=job.id, state=job.state)
        except Exception as exc:  # one request's failure is its own; the daemon goes on
            record.state, record.error = FAILED, str(exc) or type(exc).__name__
            self.spool.save(record)
            log.error("request failed", request_id=record.id, error=record.error)

    def _run_job(self, runner: Runner, job_id: int, resolved: ImageRequest | SnapshotRequest | None = None) -> Any:
        """Run the job unless final; a fresh request goes through process_request (or
        process_snapshot_request), as the CLI does (a complete job whose snapshot is gone
        is reopened)."""
        with self._job_slot(job_id):
            if self.stop_event.is_set():
                return self.store.get(job_id)
            if resolved is not None:
                try:
                    if isinstance(resolved, SnapshotRequest):
                        return process_snapshot_request(runner, resolved, self.services)
                    return process_request(runner, resolved, self.services)
                except JobAborted:
                    return self.store.get(job_id)  # final; its error says how to retry
            job = self.store.get(job_id)
            return job if job.state in FINAL_STATES else runner.run(job_id)

    def _resume_job(self, job_id: int) -> None:
        try:
            job = self._run_job(self.runner, job_id)
            log.info("resumed job finished" if job.state in FINAL_STATES else "resumed job left unfinished",
                     job_id=job_id, state=job.state)
        except JobBusy as exc:
            log.info("job taken by another process", job_id=job_id, detail=str(exc))
        except Exception as exc:
            log.error("resuming job failed", job_id=job_id, error=str(exc))

    def _resume_unfinished(self) -> int:
        """Queue every unfinished request, then every other unfinished job nobody runs."""
        records = [r for r in self.spool.load_all() if r.state in UNFINISHED]
        claimed = {r.job_id for r in records if r.job_id is not None}
        for record in records:
            self.executor.submit(self._work, record)
        orphan_jobs = [job.id for job in self.runner.resumable_jobs() if job.id not in claimed]
        for job_id in orphan_jobs:
            self.executor.submit(self._resume_job, job_id)
        return len(records) + len(orphan_jobs)

    def _requeue_waiting(self) -> None:
        """Jobs a failing guard left waiting get another run (`fsm resume` cannot: the
        daemon holds the lock)."""
        for record in self.spool.load_all():
            if record.state == WAITING and not self.stop_event.is_set():
                record.state = QUEUED
                self.spool.save(record)
                self.executor.submit(self._work, record)

    # -- capacity -----------------------------------------------------------------------

    def evict_images(self, room_for: int = 0) -> Any:
        """Evict least recently used images until data usage is below the low watermark (or
        lower, when admission needs `room_for` bytes below the high one), inside the cleanup
        Operation Guard (never during another job's device step). One eviction at a time; a
        second caller waits for the first and finds the pool freed."""
        from catalog.eviction import evict_images
        from safeguards.setup import build_cleanup_guard
        from states.data import job_uses

        assert self.services is not None
        with self._evict_lock:
            policy = self.config.policy.making_room(self.services.pool.get_pool_status(), room_for)
            report = evict_images(self.store.engine, self.services.pool, policy, uses_of=job_uses, dry_run=False,
                                  operation=build_cleanup_guard(self.config.state_dir))
        if self.metrics is not None:
            self.metrics.eviction_runs.inc()
            self.metrics.images_evicted.inc(len(report.evicted))
        return report

    def _watch_usage(self) -> None:
        """Say when usage is above the warning threshold; evict above the high watermark."""
        assert self.services is not None
        status = self.services.pool.get_pool_status()
        warn_if_above(status, self.config.policy)
        if self.config.policy.above_high(status):
            log.warning("pool data usage above the high watermark; evicting images",
                        data_used=f"{status.data_used_fraction:.1%}", high_watermark=f"{self.config.policy.high:.0%}")
            self.evict_images()

    # -- housekeeping -------------------------------------------------------------------

    def _housekeeping(self) -> None:
        """Lock refresh, transition metrics and periodic health checks, until stopped."""
        assert self.services is not None and self.metrics is not None
        # Its own checker without a state dir: the kernel-log cursor of the job guard is
        # not advanced by the periodic check (each keeps its own position).
        checker = SystemHealthChecker(pool_status=self.services.pool.get_pool_status)
        next_refresh = next_health = time.monotonic()
        next_waiting = next_refresh + WAITING_RETRY_SECONDS
        while True:
            now = time.monotonic()
            try:
                if now >= next_refresh:
                    self.lock.refresh()
                    next_refresh = now + LOCK_REFRESH_SECONDS
                if now >= next_waiting:
                    self._requeue_waiting()
                    next_waiting = now + WAITING_RETRY_SECONDS
                self.metrics.observe_new_transitions()
                if now >= next_health:
                    self.metrics.record_health(checker.check_all())
                    self._watch_usage()
                    next_health = now + self.config.health_interval
            except LockLost as exc:  # another manager runs now: stop, at safe points, with an error
                log.error("manager lock lost; stopping", error=str(exc))
                self.exit_code = 1
                self.stop("manager lock lost")
                return
            except Exception as exc:  # a busy database or a slow /proc must not stop housekeeping
                log.warning("housekeeping failed", error=f"{type(exc).__name__}: {exc}")
            if self.stop_event.wait(TRANSITIONS_POLL_SECONDS):
                return


def snapshot_reply(job: Any) -> dict[str, Any]:
    """What a waiting snapshot request is answered: the job's final state and, once it is
    complete, the ready device's path (what the VM is given)."""
    from states.data import JobData

    data = JobData.of(job.context)
    return {"ok": True, "id": None, "job_id": job.id, "state": job.state, "job_state": job.state,
            "final": job.state in FINAL_STATES, "error": job.error, "vm": data.vm_id, "snapshot": data.snapshot_name,
            "snapshot_device": data.snapshot_device, "context": job.context}
