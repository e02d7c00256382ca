"""Prometheus metrics, read from the live device, store and server on each scrape."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from . import __version__
from .config import parse_host_port

if TYPE_CHECKING:
    from .device import BlockDevice
    from .server import NBDServer
    from .store import Store


class NbdswapCollector:
    """Builds every metric from the objects' own counters at scrape time."""

    def __init__(self, device: BlockDevice, store: Store, server: NBDServer) -> None:
        self._device = device
        self._store = store
        self._server = server

    def collect(self):
        yield InfoMetricFamily("nbdswap_build", "nbdswap version and export",
                               value={"version": __version__, "export": self._device.export.name})
        yield GaugeMetricFamily("nbdswap_device_size_bytes", "Size of the exported device",
                                value=self._device.export.size)
        yield GaugeMetricFamily("nbdswap_connections", "Open client connections",
                                value=len(self._server.connections))
        yield from self._request_metrics()
        yield from self._store_metrics()

    def _request_metrics(self):
        requests = CounterMetricFamily("nbdswap_requests", "Requests executed", labels=["op"])
        payload = CounterMetricFamily("nbdswap_request_bytes", "Bytes addressed by requests",
                                      labels=["op"])
        errors = CounterMetricFamily("nbdswap_request_errors", "Requests answered with an error",
                                     labels=["op", "errno"])
        for op, count in dict(self._device.requests).items():
            requests.add_metric([op], count)
        for op, count in dict(self._device.request_bytes).items():
            payload.add_metric([op], count)
        for (op, errno), count in dict(self._device.errors).items():
            errors.add_metric([op, errno], count)
        yield from (requests, payload, errors)

    def _store_metrics(self):
        stats = self._store.stats()
        blocks = GaugeMetricFamily("nbdswap_tier_blocks", "Blocks whose data the tier holds",
                                   labels=["tier"])
        stored = GaugeMetricFamily("nbdswap_tier_stored_bytes", "Bytes the tier's blocks occupy",
                                   labels=["tier"])
        capacity = GaugeMetricFamily("nbdswap_tier_capacity_bytes", "Configured tier capacity",
                                     labels=["tier"])
        for tier, values in stats["tiers"].items():
            blocks.add_metric([tier], values["blocks"])
            stored.add_metric([tier], values["stored_bytes"])
            capacity.add_metric([tier], values["capacity_bytes"])
        yield from (blocks, stored, capacity)
        yield GaugeMetricFamily("nbdswap_map_blocks", "Blocks with an entry in the block map",
                                value=stats["map"]["blocks"])
        yield GaugeMetricFamily("nbdswap_map_bytes", "Size of the block map on disk",
                                value=stats["map"]["bytes"])


def serve_metrics(address: str, device: BlockDevice, store: Store, server: NBDServer) -> None:
    """Serve ``/metrics`` on ``HOST:PORT`` from a background thread."""
    host, port = parse_host_port(address)
    registry = CollectorRegistry()
    registry.register(NbdswapCollector(device, store, server))
    start_http_server(port, addr=host, registry=registry)
