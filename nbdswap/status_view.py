"""Human-readable ``nbdswap status``: rich tables of tiers, map and requests."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_status(status: dict, console: Console | None = None) -> None:
    console = console or Console()
    export = status.get("export", {})
    console.print(f"[bold]nbdswap {status.get('version', '')}[/bold]  export "
                  f"[cyan]{export.get('name', '?')}[/cyan] {_size(export.get('size', 0))}  "
                  f"connections {status.get('connections', 0)}  "
                  f"up {status.get('uptime_seconds', 0):.0f} s")
    tiers = Table(title="tiers")
    for column in ("tier", "blocks", "stored", "capacity", "used"):
        tiers.add_column(column, justify="right" if column != "tier" else "left")
    for name, tier in status.get("tiers", {}).items():
        capacity = tier.get("capacity_bytes", 0)
        used = tier.get("used_bytes", tier.get("stored_bytes", 0))
        percent = f"{100 * used / capacity:.1f} %" if capacity else "-"
        tiers.add_row(name, f"{tier.get('blocks', 0):,}", _size(tier.get("stored_bytes", 0)),
                      _size(capacity), percent)
    console.print(tiers)
    block_map = status.get("map", {})
    console.print(f"map: {block_map.get('blocks', 0):,} blocks, {_size(block_map.get('bytes', 0))} on disk")
    requests = Table(title="requests")
    requests.add_column("op")
    requests.add_column("count", justify="right")
    requests.add_column("bytes", justify="right")
    requests.add_column("errors", justify="right")
    errors = status.get("errors", {})
    for op, count in status.get("requests", {}).items():
        failed = sum(errors.get(op, {}).values())
        requests.add_row(op, f"{count:,}", _size(status.get("request_bytes", {}).get(op, 0)),
                         f"{failed:,}")
    console.print(requests)
