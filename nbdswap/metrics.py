"""Prometheus metrics, read from the live device, store, server and policy engine on each scrape.

``--metrics HOST:PORT`` serves ``/metrics`` from a thread of its own.  Nothing is
pushed into a metrics library on the request path except one latency observation
per request (:class:`RequestStats`: a bisect and four integer additions); every
other value is read from the objects' own counters when Prometheus scrapes.  The
scrape thread only copies plain dicts, lists and integers (each copy is atomic
under the GIL) and calls :meth:`Store.stats`, which reads counters and LMDB's
environment info (thread-safe in LMDB); ``stats()`` must stay that cheap.  The
policy engine's state is not safe to walk from another thread, so the scrape asks
the event loop for :meth:`Policy.stats` and waits up to :data:`POLICY_STATS_TIMEOUT`;
a scrape the loop does not answer in time goes without the policy metrics.

``Store.stats()`` is exported generically, so a tier or field added there (the
remote tier, its health) appears without changes here:

* ``stats["tiers"][TIER][FIELD]`` → ``nbdswap_tier_FIELD{tier="TIER"}``
* ``stats[SECTION][FIELD]`` (a dict of numbers, e.g. ``map``) → ``nbdswap_SECTION_FIELD``
* ``stats[FIELD]`` (a number) → ``nbdswap_FIELD``

Numbers and booleans (as 0/1) are exported; a field whose name ends in ``_total`` is
a counter, every other one a gauge; strings and deeper nesting are not exported.
Fields are named in base units (``_bytes``, ``_seconds``) and never per block.
A tier reported as not configured (the remote tier without ``--remote``) also has its
:data:`REMOTE_COUNTERS` at 0, so that every remote series exists on every server.

The store's move counters (:data:`MOVE_STATS`) and the policy engine's state have
families of their own (:func:`_move_families`, :func:`_policy_families`): moves by
``from``, ``to`` and ``reason``, clean copies, watermarks and usage per tier, drains
per tier (every tier, 0 when it is not draining), demotions stalled and promotions
queued.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from . import __version__
from .config import parse_host_port

if TYPE_CHECKING:
    from .device import BlockDevice
    from .policy import Policy
    from .server import NBDServer
    from .store import Store

log = logging.getLogger(__name__)

#: Upper bounds of the request latency buckets: a zero or same-filled page is
#: answered in microseconds, a compressed RAM page in tens of them, disk in
#: hundreds of microseconds to milliseconds.
LATENCY_BUCKETS_SECONDS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3,
                           5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)
_BUCKET_BOUNDS_NS = tuple(round(bound * 1e9) for bound in LATENCY_BUCKETS_SECONDS)
_BUCKET_LABELS = tuple(floatToGoString(bound) for bound in LATENCY_BUCKETS_SECONDS) + ("+Inf",)

#: The logical size of every block the store holds.
BLOCK_BYTES = 4096

#: Error series exported at zero before the first error, so that ``increase()`` in
#: alert rules sees the first ENOSPC or EIO too.
EXPECTED_ERRORS = tuple((op, "EIO") for op in ("read", "write", "flush", "trim", "write_zeroes")) + (
    ("write", "ENOSPC"), ("write_zeroes", "ENOSPC"))

_TIER_HELP = {
    "blocks": "Map entries whose data the tier holds: blocks, and clean copies of blocks "
              "stored on a faster tier (nbdswap_clean_copies; subtract them to count each block once)",
    "stored_bytes": "Bytes of the payloads the tier holds (after compression; clean copies included)",
    "used_bytes": "Bytes of the tier's slots holding payloads, rounding included (clean copies included)",
    "capacity_bytes": "Bytes of payload slots the tier may allocate (0: the tier is off)",
    "slab_bytes": "Bytes of the slabs the tier has in use (its memory or file footprint)",
    "logical_bytes": "Bytes the tier's blocks hold before compression (nbdswap_tier_blocks x 4096, "
                     "clean copies included)",
    "grouped_payloads": "Payloads holding several blocks of one map group, compressed together",
    "grouped_blocks": "Map entries (blocks and clean copies) pointing into grouped payloads",
    "grouped_stored_bytes": "Bytes of the grouped payloads (included in stored_bytes)",
    "corrupt_reads_total": "Reads of the tier's blocks whose data could not be trusted: a failed checksum "
                           "or undecodable payload, or a remote key missing or holding another value",
    "up": "1 while the remote tier is usable; 0 from a failed Redis command until a probe (PING every "
          "--remote-retry-interval) succeeds, and 0 without a remote tier (nbdswap_tier_configured). "
          "An idle tier sends no command, so an outage shows at its next command",
    "configured": "1 if the server runs with this tier (--remote), else 0 and the tier's other "
                  "series are 0",
    "errors_total": "Remote tier commands that failed (connection, timeout or Redis error), failed "
                    "probes included; each marks the tier down",
    "orphans_removed_total": "Remote keys of earlier runs that no map entry references, deleted by "
                             "the sweep at start-up",
}
#: Counters a configured remote tier reports; exported at 0 for a tier that is not
#: configured, so that rates and increases over them exist on every server.
REMOTE_COUNTERS = ("errors_total", "orphans_removed_total", "corrupt_reads_total")
_STORE_HELP = {
    "map_blocks": "Blocks with an entry in the block map",
    "map_bytes": "Size of the block map on disk",
    "zero_blocks": "Mapped blocks that are all zeros (no tier data)",
    "same_filled_blocks": "Mapped blocks filled with one repeated word (no tier data)",
    "lost_blocks": "Blocks whose tier data was lost (e.g. RAM after a reboot); they read as EIO",
}
#: ``Store.stats()`` keys exported by :func:`_move_families` instead of generically.
MOVE_STATS = frozenset({"moves", "move_races_lost", "clean_copy_hits", "clean_copies_dropped",
                        "clean_copies"})
#: Every ``reason`` of ``nbdswap_moves_total``: the policy engine's (policy.py) and the
#: store's default for a direct :meth:`Store.move` (``manual``).
MOVE_REASONS = ("demote", "promote", "drain", "compact", "regroup", "repack", "manual")
#: Seconds a scrape waits for the event loop to read the policy engine's state.
POLICY_STATS_TIMEOUT = 2.0


class RequestStats:
    """One operation's requests, bytes and durations (in fixed buckets), recorded with
    one call per request (two Counters and a histogram of its own cost two calls and
    four dict updates more: 4 % of a RAM read's instructions, measured).  The requests
    are the buckets' sum, read at a scrape or a policy tick, not counted apart."""

    __slots__ = ("bytes", "counts", "sum_ns")

    def __init__(self) -> None:
        self.bytes = 0
        self.counts = [0] * len(_BUCKET_LABELS)
        self.sum_ns = 0

    @property
    def requests(self) -> int:
        return sum(self.counts)

    def record(self, length: int, nanoseconds: int) -> None:
        self.bytes += length
        self.counts[bisect_left(_BUCKET_BOUNDS_NS, nanoseconds)] += 1
        self.sum_ns += nanoseconds

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """``([(le, count), ...], sum_seconds)`` as Prometheus exposes a histogram."""
        counts, sum_ns = self.counts.copy(), self.sum_ns
        buckets, total = [], 0
        for label, count in zip(_BUCKET_LABELS, counts):
            total += count
            buckets.append((label, total))
        return buckets, sum_ns / 1e9


class NbdswapCollector:
    """Builds every metric from the objects' own counters at scrape time.

    :meth:`collect` runs in the scrape thread, never in ``loop`` (the event loop that
    runs ``policy``): it waits for the loop to read the policy engine's state.
    """

    def __init__(self, device: BlockDevice, store: Store, server: NBDServer, policy: Policy,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._device = device
        self._store = store
        self._server = server
        self._policy = policy
        self._loop = loop

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily("nbdswap_build", "nbdswap and Python versions",
                               value={"version": __version__, "python": sys.version.split()[0]})
        yield InfoMetricFamily("nbdswap_export", "The exported device",
                               value={"export": self._device.export.name})
        yield GaugeMetricFamily("nbdswap_device_size_bytes", "Size of the exported device",
                                value=self._device.export.size)
        yield GaugeMetricFamily("nbdswap_connections", "Open client connections",
                                value=len(self._server.connections))
        yield from self._request_families()
        stats = self._store.stats()
        yield from _store_families(stats)
        policy = self._policy_stats()
        if policy is not None:
            yield from _policy_families(policy, list(stats["tiers"]))

    def _policy_stats(self) -> dict | None:
        """:meth:`Policy.stats`, read by the event loop; None if it does not get to it
        within :data:`POLICY_STATS_TIMEOUT` (the loop is blocked)."""
        async def read() -> dict:
            return self._policy.stats()

        future = asyncio.run_coroutine_threadsafe(read(), self._loop)
        try:
            return future.result(POLICY_STATS_TIMEOUT)
        except TimeoutError:
            future.cancel()
            log.warning("the event loop did not answer within %.0f s; this scrape has no policy metrics",
                        POLICY_STATS_TIMEOUT)
            return None

    def _request_families(self) -> Iterator[Metric]:
        device = self._device
        requests = CounterMetricFamily("nbdswap_requests", "Requests executed", labels=["op"])
        payload = CounterMetricFamily("nbdswap_request_bytes", "Bytes addressed by requests",
                                      labels=["op"])
        latency = HistogramMetricFamily(
            "nbdswap_request_duration_seconds",
            "Time from the start of a request's execution until its reply is queued",
            labels=["op"])
        for op, stats in device.stats.items():
            requests.add_metric([op], stats.requests)
            payload.add_metric([op], stats.bytes)
            buckets, seconds = stats.cumulative()
            latency.add_metric([op], buckets, seconds)
        yield from (requests, payload, latency, self._error_family())
        yield CounterMetricFamily(
            "nbdswap_corrupt_block_errors",
            "Requests answered EIO because a block failed its checksum or its data was lost",
            value=device.corrupt_block_errors)
        if device.encoder is not None:
            yield from _encoder_families(device.encoder.stats())

    def _error_family(self) -> Metric:
        errors = CounterMetricFamily("nbdswap_request_errors", "Requests answered with an error",
                                     labels=["op", "errno"])
        counts = dict.fromkeys(EXPECTED_ERRORS, 0)
        counts.update(dict(self._device.errors))
        for (op, errno), count in sorted(counts.items()):
            errors.add_metric([op, errno], count)
        return errors


def _encoder_families(stats: dict) -> Iterator[Metric]:
    """``EncoderPool.stats()``: where written pages were compressed, and why."""
    pages = CounterMetricFamily("nbdswap_encoded_pages", "Written pages compressed, by where",
                                labels=["where"])
    pages.add_metric(["worker"], stats["pages_offloaded"])
    pages.add_metric(["server"], stats["pages_inline"])
    yield pages
    yield GaugeMetricFamily("nbdswap_encoder_workers", "Encoder worker processes running and ready for pages",
                            value=stats["workers"])
    yield GaugeMetricFamily("nbdswap_encoder_offloading",
                            "1 while written pages are compressed on the encoder workers",
                            value=int(stats["offloading"]))
    yield GaugeMetricFamily("nbdswap_page_encode_seconds",
                            "Running estimate of the time one written page takes to compress",
                            value=stats["page_encode_us"] / 1e6)
    yield CounterMetricFamily("nbdswap_encoder_cpu_seconds",
                              "CPU time of the encoder worker processes (process_cpu_seconds_total "
                              "is the server's alone)", value=stats["cpu_seconds"])
    yield CounterMetricFamily("nbdswap_encoder_worker_failures",
                              "Encoder workers that died (their pages were compressed in the server)",
                              value=stats["worker_failures"])


def _store_families(stats: dict) -> Iterator[Metric]:
    """``Store.stats()`` as metric families (see the module docstring)."""
    yield from _tier_families(stats["tiers"])
    yield from _move_families(stats)
    for key, value in stats.items():
        if key == "tiers" or key in MOVE_STATS:
            continue
        if isinstance(value, dict):
            for field, number in _numbers(value):
                yield _family(f"nbdswap_{key}_{field}", _STORE_HELP.get(f"{key}_{field}"), number)
        elif _is_number(value):
            yield _family(f"nbdswap_{key}", _STORE_HELP.get(key), value)


def _tier_families(tiers: dict[str, dict]) -> Iterator[Metric]:
    families: dict[str, Metric] = {}
    for tier, values in tiers.items():
        fields = dict(_numbers(values))
        if values.get("configured") is False:
            fields = dict.fromkeys(REMOTE_COUNTERS, 0.0) | fields
        fields["logical_bytes"] = fields.get("blocks", 0) * BLOCK_BYTES
        for field, number in fields.items():
            name = f"nbdswap_tier_{field}"
            if name not in families:
                families[name] = _family(name, _TIER_HELP.get(field), labels=["tier"])
            families[name].add_metric([tier], number)
    return iter(families.values())


def _move_families(stats: dict) -> Iterator[Metric]:
    """The store's counters of moves and clean copies."""
    moves = CounterMetricFamily("nbdswap_moves", "Blocks moved between tiers or within one, by reason "
                                f"({', '.join(MOVE_REASONS)})", labels=["from", "to", "reason"])
    for source, targets in stats["moves"].items():
        for target, reasons in targets.items():
            for reason, count in reasons.items():
                moves.add_metric([source, target, reason], count)
    yield moves
    yield CounterMetricFamily("nbdswap_move_races_lost",
                              "Moves given up because a write changed the block meanwhile",
                              value=stats["move_races_lost"])
    yield CounterMetricFamily("nbdswap_clean_copy_hits",
                              "Moves that found the block's clean copy on the target tier and only "
                              "changed the map (demotions saved)", value=stats["clean_copy_hits"])
    yield CounterMetricFamily("nbdswap_clean_copies_dropped",
                              "Clean copies freed to make room on their tier (no I/O)",
                              value=stats["clean_copies_dropped"])
    clean = GaugeMetricFamily("nbdswap_clean_copies", "Clean copies the tier holds of blocks promoted "
                              "to a faster tier (counted in nbdswap_tier_blocks too)", labels=["tier"])
    for tier, count in stats["clean_copies"].items():
        clean.add_metric([tier], count)
    yield clean


def _policy_families(policy: dict, tiers: list[str]) -> Iterator[Metric]:
    """``Policy.stats()`` as metric families; drains are exported for each of ``tiers``."""
    watermarks = GaugeMetricFamily(
        "nbdswap_tier_watermark_ratio", "Share of the tier's capacity above which (high) demotion "
        "starts, and below which (low) it stops; every configured tier but remote has them, also one "
        "with no tier below to demote to", labels=["tier", "level"])
    usage = GaugeMetricFamily("nbdswap_tier_usage_ratio", "Share of the tier's capacity in use, "
                              "as the policy engine compares it with the watermarks", labels=["tier"])
    stalled = CounterMetricFamily("nbdswap_policy_demotions_stalled",
                                  "Demotion passes that found no room on any tier below", labels=["tier"])
    for tier, report in policy["watermarks"].items():
        watermarks.add_metric([tier, "high"], report["high"])
        watermarks.add_metric([tier, "low"], report["low"])
        usage.add_metric([tier], report["usage"])
        stalled.add_metric([tier], policy["demotions_stalled"].get(tier, 0))
    in_progress = GaugeMetricFamily("nbdswap_drain_in_progress", "1 while the tier is being drained",
                                    labels=["tier"])
    remaining = GaugeMetricFamily("nbdswap_drain_remaining_blocks", "Blocks the drain in progress "
                                  "still has to move off the tier (0 without one)", labels=["tier"])
    for tier in tiers:
        drain = policy["drains"].get(tier)
        draining = drain is not None and drain["state"] == "draining"
        in_progress.add_metric([tier], draining)
        remaining.add_metric([tier], drain["remaining_blocks"] if draining else 0)
    yield from (watermarks, usage, stalled, in_progress, remaining)
    yield GaugeMetricFamily("nbdswap_policy_promotions_queued", "Blocks waiting to be promoted to RAM",
                            value=policy["promotions_queued"])


def _family(name: str, help_text: str | None, value: float | None = None,
            labels: list[str] | None = None) -> Metric:
    """A counter if ``name`` ends in ``_total``, else a gauge."""
    documentation = help_text or f"{name.removeprefix('nbdswap_')} as Store.stats() reports it"
    if name.endswith("_total"):
        return CounterMetricFamily(name.removesuffix("_total"), documentation, value, labels)
    return GaugeMetricFamily(name, documentation, value, labels)


def _numbers(values: dict) -> Iterator[tuple[str, float]]:
    for field, value in values.items():
        if _is_number(value):
            yield field, float(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float))  # bool is an int: exported as 0/1


class MetricsEndpoint:
    """The ``/metrics`` HTTP server thread; :meth:`close` stops it.  Create it in the
    event loop that runs ``policy``."""

    def __init__(self, address: str, device: BlockDevice, store: Store, server: NBDServer,
                 policy: Policy) -> None:
        host, port = parse_host_port(address)
        registry = CollectorRegistry()
        registry.register(NbdswapCollector(device, store, server, policy, asyncio.get_running_loop()))
        ProcessCollector(registry=registry)
        self._http, self._thread = start_http_server(port, addr=host, registry=registry)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()
