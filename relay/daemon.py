"""The daemon: start everything in order, serve until told to stop, stop in order.

This module owns the process lifecycle (SPEC §7): it is the only one that
handles signals. `serve` enters the resources (journal, deliverer, listeners)
in one place, runs the maintenance timers (WAL checkpoint, retention), waits
for the shutdown trigger, and then runs `shutdown`, the one ordered and
bounded stop: not ready → stop accepting → let in-flight deliveries finish
within `shutdown_grace` → close the journal. The trigger is injectable, so
tests and embedders can stop the daemon without signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from relay import __version__, logs, signing
from relay.admin import AdminApi
from relay.config import ConfigError, config_changes, load, restart_needed
from relay.delivery import Deliverer, open_deliverer, report_dead
from relay.ingress import (
    Health,
    Inbound,
    InboundListener,
    Listener,
    Routing,
    admin_handler,
    listen,
    listen_inbound,
    make_ssl_context,
)
from relay.journal import Journal, open_journal
from relay.metrics import Metrics, TargetState
from relay.model import Config
from relay.netpolicy import NetworkPolicy
from relay.notify import Notifier
from relay.tail import Tail

log = logs.get_logger()

CHECKPOINT_EVERY_S = 10.0
PRUNE_EVERY_S = 60.0
PRUNE_BATCH = 500
FORCED_EXIT_CODE = 1
STOPPING_REFUSAL = "relay is stopping: the reload is not applied"
GC_THRESHOLDS = (7000, 20, 100)  # allocations between young collections; older gens' ratios


@dataclass
class Running:
    """What `serve` started, as `shutdown` needs it."""

    config: Config
    journal: Journal
    deliverer: Deliverer
    inbound: InboundListener
    admin: Listener
    health: Health
    metrics: Metrics


async def serve(config: Config, shutdown_trigger: asyncio.Event | None = None) -> int:
    """Run the daemon until `shutdown_trigger` is set (by default: SIGTERM/SIGINT). Exit code."""
    trigger = shutdown_trigger or asyncio.Event()
    reload_requests: asyncio.Queue[None] = asyncio.Queue()
    if shutdown_trigger is None:
        _install_signal_handlers(trigger, reload_requests)
    health = Health()
    server = config.server
    async with contextlib.AsyncExitStack() as stack:
        journal = await stack.enter_async_context(open_journal(server.journal, server.sync))
        health.journal = journal
        network = NetworkPolicy.from_server(server)
        tail = Tail()
        metrics = Metrics()
        journal.set_commit_observer(metrics.observe_commit)
        deliverer = await stack.enter_async_context(open_deliverer(journal, network, tail, metrics))
        api = AdminApi(journal, deliverer, tail, health, current_config=lambda: config)
        admin = await listen(
            admin_handler(health, api=api, metrics=_metrics_page(metrics, journal, deliverer)),
            server.admin,
            idle_timeout_s=server.idle_timeout_s,
            shutdown_timeout_s=1.0,
        )
        stack.push_async_callback(admin.runner.cleanup)
        inbound_handler = Inbound(
            Routing.of(config),
            journal,
            deliverer.accepted,
            tail,
            counters=api.counters,
            metrics=metrics,
        )
        ssl_context = (
            make_ssl_context(str(server.tls_cert), str(server.tls_key))
            if server.tls_cert and server.tls_key
            else None
        )
        inbound = await listen_inbound(
            inbound_handler,
            server.listen,
            idle_timeout_s=server.idle_timeout_s,
            shutdown_timeout_s=server.read_timeout_s,
            ssl_context=ssl_context,
        )
        stack.push_async_callback(inbound.close)
        deliverer.start(config)
        running = Running(config, journal, deliverer, inbound, admin, health, metrics)
        swept = await _sweep_removed(running)
        maintenance = asyncio.create_task(_maintain(running, sweep_again=not swept))
        if shutdown_trigger is None:  # a daemon process of its own, not an embedder's loop
            settle_gc()
        health.serving = True
        await _log_started(running)
        notifier = Notifier()
        notifier.send("READY=1", f"STATUS=serving on {inbound.address}")
        reloader = Reloader(running, inbound_handler, notifier)
        api.current_config = lambda: running.config
        api.reload = reloader.reload
        reloads = asyncio.create_task(_serve_reload_requests(reload_requests, reloader))
        watchdog = _start_watchdog(notifier)
        await trigger.wait()
        notifier.send("STOPPING=1", "STATUS=stopping")
        for task in (maintenance, watchdog, reloads):
            if task is not None:
                task.cancel()
        await shutdown(running)
        log.info("relay.stopped", pending=await _pending(journal), in_flight=0)
    return 0


def settle_gc() -> None:
    """Keep the collector off the hot path: what start-up built (modules, config, routes)
    is frozen out of every collection, and young collections run 10x less often.

    Every request and attempt allocates a few hundred short-lived objects; with the
    default thresholds the collector ran every ~700 of them and walked the whole heap
    every ~70,000. Measured on the bench's ingest scenario: +8%, its p99 28 -> 13 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def shutdown(running: Running) -> None:
    """The ordered, bounded stop: not ready and no new attempt; then, side by side, stop
    accepting (requests under way get `read_timeout`) and let attempts under way finish
    (within `shutdown_grace`); everything else stays pending in the journal."""
    running.health.stopping = True
    running.deliverer.stop_taking()
    log.info(
        "relay.stopping",
        pending=await _pending(running.journal),
        in_flight=running.deliverer.in_flight,
    )
    _, cut = await asyncio.gather(
        running.inbound.close(),  # no new webhooks; requests under way finish (read_timeout)
        running.deliverer.stop(running.config.server.shutdown_grace_s),  # attempts under way
    )
    if cut:
        log.warning("relay.grace_exceeded", cancelled=cut, note="left pending in the journal")


def _metrics_page(
    metrics: Metrics, journal: Journal, deliverer: Deliverer
) -> Callable[[], Awaitable[tuple[bytes, str]]]:
    """/metrics: the scrape-time gauges come from the journal and the lanes."""

    async def page() -> tuple[bytes, str]:
        depths = await journal.queue_depths()
        states = {
            name: TargetState(lane.in_flight, lane.pause.state != "open")
            for name, lane in deliverer.lanes.items()
        }
        return metrics.render(depths, states, journal.path)

    return page


class Reloader:
    """SIGHUP and `relay reload`: validate the file again, then swap it in atomically.

    An invalid file, or one that changes what only a restart can (listen, admin,
    journal, ...), is refused and the running config stays. A valid one replaces the
    routing table in one assignment (each request uses the config it started with)
    and reconciles the lanes; deliveries of removed targets end `dead`.
    """

    def __init__(self, running: Running, inbound: Inbound, notifier: Notifier) -> None:
        self._running = running
        self._inbound = inbound
        self._notifier = notifier
        self._lock = asyncio.Lock()
        self._sweeps: set[asyncio.Task[None]] = set()

    async def reload(self) -> tuple[bool, list[str]]:
        async with self._lock:
            if self._running.deliverer.stopping:  # asked for, or waiting, when the stop began
                return self._refused_while_stopping()
            monotonic_usec, stopping = time.monotonic_ns() // 1000, False
            self._notifier.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
            outcome: tuple[bool, list[str]] | None = None  # None: the reload raised
            try:
                outcome = await self._reload()
                return outcome
            except asyncio.CancelledError:  # the daemon stops (STOPPING=1 is sent): no READY
                stopping = True
                raise
            finally:
                if not stopping:
                    address = self._running.inbound.address
                    status = reload_status(outcome, str(address))
                    self._notifier.send("READY=1", "STATUS=" + status)

    def _refused_while_stopping(self) -> tuple[bool, list[str]]:
        log.error("config.reload_failed", errors=[STOPPING_REFUSAL])
        self._running.metrics.config_reloads.inc("failed")
        return False, [STOPPING_REFUSAL]

    async def _reload(self) -> tuple[bool, list[str]]:
        old = self._running.config
        try:
            new = load(old.path)
        except ConfigError as error:
            log.error("config.reload_failed", errors=error.errors)
            self._running.metrics.config_reloads.inc("failed")
            return False, error.errors
        problems = [f"{old.path}: {problem}" for problem in restart_needed(old, new)]
        if problems:
            log.error("config.reload_failed", errors=problems)
            self._running.metrics.config_reloads.inc("failed")
            return False, problems
        changes = config_changes(old, new)
        self._inbound.routing = Routing.of(new)  # atomic: the next request sees the new table
        removed = await self._running.deliverer.reconfigure(new, new.server.shutdown_grace_s)
        self._running.config = new
        signing.forget_keys()
        log.info("config.reloaded", **changes)
        self._running.metrics.config_reloads.inc("ok")
        kept = {route.name for route in new.routes}
        gone_routes = {r.name: r.targets for r in old.routes if r.name not in kept}
        await _sweep_removed(self._running, gone_routes)
        if removed or gone_routes:
            # Requests that were routed by the old table may still be committing.
            sweep = asyncio.create_task(self._sweep_later(new.server.read_timeout_s, gone_routes))
            self._sweeps.add(sweep)
            sweep.add_done_callback(self._sweeps.discard)
        return True, []

    async def _sweep_later(
        self, delay_s: float, gone_routes: Mapping[str, tuple[str, ...]]
    ) -> None:
        await asyncio.sleep(delay_s)
        # The config current *then*: a target re-added meanwhile must keep its deliveries;
        # and no reload in between (the lock), which could re-add one during the sweep.
        async with self._lock:
            await _sweep_removed(self._running, gone_routes)


def reload_status(outcome: tuple[bool, list[str]] | None, address: str) -> str:
    """systemd's STATUS= after a reload: serving, or why the previous config still runs
    (it stays shown by `systemctl status` until the next reload or stop)."""
    if outcome is None:
        return f"reload failed (internal error); serving on {address}"
    ok, errors = outcome
    if ok:
        return f"serving on {address}"
    count = f"{len(errors)} error" + ("" if len(errors) == 1 else "s")
    return f"reload failed ({count}); running the previous config, serving on {address}"


async def _serve_reload_requests(requests: asyncio.Queue[None], reloader: Reloader) -> None:
    while True:
        await requests.get()
        await reloader.reload()


async def _sweep_removed(
    running: Running, gone_routes: Mapping[str, tuple[str, ...]] | None = None
) -> bool:
    """Deliveries whose target is gone from the config, or whose route is (`gone_routes`:
    name -> its targets, from the config before a reload), end dead ("target removed",
    SPEC §4's wording for both), each reported here once. Those with an attempt under
    way too (a lane of a re-added target must not send them again): their lane adds the
    attempt and stays silent. A route removed while relay was stopped is not known here:
    its deliveries end dead when they next fall due (a sweep by route at start would read
    the whole pending backlog). False when it failed (logged)."""
    journal, reason = running.journal, "target removed"
    try:
        for target in sorted(await journal.pending_targets() - set(running.config.targets)):
            async for killed in journal.kill_pending(target=target, reason=reason):
                report_dead(running.metrics, killed, reason)
        for route, targets in sorted((gone_routes or {}).items()):
            for target in targets:
                if route in {r.name for r in running.config.routes}:  # re-added since
                    break
                async for killed in journal.kill_pending(target=target, route=route, reason=reason):
                    report_dead(running.metrics, killed, reason)
    except Exception as error:  # noqa: BLE001 - a sweep's failure must not stop a reload or the start
        log.error("journal.write_failed", error=str(error))
        return False
    return True


async def _log_started(running: Running) -> None:
    config = running.config
    log.info(
        "relay.started",
        version=__version__,
        listen=str(running.inbound.address),
        admin=str(running.admin.address),
        journal=str(config.server.journal),
        sync=config.server.sync,
        synchronous=running.journal.synchronous,
        sources=len(config.sources),
        routes=len(config.routes),
        targets=len(config.targets),
        pending=await _pending(running.journal),
        pid=os.getpid(),
    )


async def _pending(journal: Journal) -> int | None:
    try:
        return await journal.pending_count()
    except Exception:  # noqa: BLE001 - a count for a log line must never stop the daemon
        return None


class OpenFilesWatch:
    """Says when the process nears its open-file limit (RLIMIT_NOFILE), once per crossing.
    Past the limit new connections wait unaccepted and nothing else tells why: uvloop
    reports no accept error. Pure: `check` takes the counts and returns what to log."""

    NEAR = 0.9  # warn at 90% of the limit...
    CLEAR = 0.8  # ...and say it is over below 80%

    def __init__(self) -> None:
        self.near = False

    def check(self, open_files: int, limit: int) -> str | None:
        """ "relay.files_near_limit", "relay.files_ok", or None (nothing changed)."""
        if not self.near and open_files >= self.NEAR * limit:
            self.near = True
            return "relay.files_near_limit"
        if self.near and open_files < self.CLEAR * limit:
            self.near = False
            return "relay.files_ok"
        return None


def _watch_open_files(watch: OpenFilesWatch) -> None:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        open_files = len(os.listdir("/proc/self/fd"))
    except OSError as error:
        if error.errno != errno.EMFILE:  # not Linux: nothing to watch
            return
        open_files = limit  # not one more file could be opened to count them
    if limit == resource.RLIM_INFINITY or (event := watch.check(open_files, limit)) is None:
        return
    if event == "relay.files_near_limit":
        note = "new connections may wait unanswered: raise LimitNOFILE (ulimit -n)"
        log.warning(event, open_files=open_files, limit=limit, note=note)
    else:
        log.info(event, open_files=open_files, limit=limit)


async def _maintain(running: Running, *, sweep_again: bool = False) -> None:
    """From the start and then on a timer: checkpoint the WAL, delete events past `retention`
    (and, until it succeeds, the start's sweep of removed targets, if that failed), and
    watch the open files."""
    journal = running.journal
    next_prune = time.monotonic()
    files = OpenFilesWatch()
    while True:
        _watch_open_files(files)
        config = running.config  # the current one: retention may change on reload
        if sweep_again:
            sweep_again = not await _sweep_removed(running)
        try:
            busy, wal_pages, done = await journal.checkpoint()
            log.debug("journal.checkpointed", busy=busy, wal_pages=wal_pages, checkpointed=done)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_EVERY_S
                await _prune(journal, config.server.retention_s)
        except Exception as error:  # noqa: BLE001 - maintenance must outlive any one failure
            log.error("journal.maintenance_failed", error=str(error))
        await asyncio.sleep(CHECKPOINT_EVERY_S)


async def _prune(journal: Journal, retention_s: float) -> None:
    before_ms = int((time.time() - retention_s) * 1000)
    deleted = 0
    while True:
        batch = await journal.prune(before_ms, PRUNE_BATCH)
        deleted += batch
        if batch < PRUNE_BATCH:
            break
        await asyncio.sleep(0)  # let ingest batches in between
    forgotten = 0
    while True:
        batch = await journal.forget_keys(int(time.time() * 1000), PRUNE_BATCH)
        forgotten += batch
        if batch < PRUNE_BATCH:
            break
        await asyncio.sleep(0)
    if deleted or forgotten:
        log.info("journal.pruned", events=deleted, dedupe_keys=forgotten, retention_s=retention_s)


def _start_watchdog(notifier: Notifier) -> asyncio.Task[None] | None:
    """Ping systemd's watchdog from the event loop, so a stuck loop gets the process restarted."""
    interval_s = notifier.watchdog_interval_s
    if interval_s is None:
        return None

    async def ping() -> None:
        while True:
            notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    return asyncio.create_task(ping())


def _install_signal_handlers(trigger: asyncio.Event, reloads: asyncio.Queue[None]) -> None:
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        if trigger.is_set():  # the second SIGINT: stop at once (acknowledged events are on disk)
            try:
                logs.flush()
            finally:  # even when stdout is a broken pipe
                os._exit(FORCED_EXIT_CODE)
        trigger.set()

    loop.add_signal_handler(signal.SIGTERM, trigger.set)
    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    loop.add_signal_handler(signal.SIGHUP, reloads.put_nowait, None)
