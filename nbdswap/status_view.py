"""Human-readable ``nbdswap status``: rich tables of tiers, block map, policy and requests.

Recent request rates come from two status samples taken ``interval`` seconds apart;
the server's own uptime is the clock between them.  Recent move rates are the policy
engine's own (over its last 10 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: The logical size of every block a tier holds.
BLOCK_BYTES = 4096
#: Tier fields that have a column of their own; any others go to "details".
TIER_COLUMNS = ("blocks", "stored_bytes", "used_bytes", "capacity_bytes")
#: Every reason the store and the policy engine count moves under, in the order the
#: moves table lists them; a reason not listed here still shows, after these.
MOVE_REASONS = ("demote", "promote", "drain", "compact", "regroup", "repack", "manual")


def show_status(status: dict, fetch: Callable[[], dict], interval: float,
                console: Console | None = None) -> None:
    """Render ``status``; with ``interval`` > 0, sample again and add recent rates."""
    if interval > 0:
        time.sleep(interval)
        status, previous = fetch(), status
    else:
        previous = None
    render_status(status, previous, console)


def render_status(status: dict, previous: dict | None = None, console: Console | None = None) -> None:
    console = console or Console()
    console.print(_header(status))
    console.print(_tier_table(status))
    console.print(_map_line(status))
    if "policy" in status:
        console.print(_moves_table(status))
        console.print(_policy_line(status))
        for line in _drain_lines(status["policy"].get("drains", {})):
            console.print(line)
    console.print(_request_table(status, _recent_rates(previous, status)))
    errors = _error_line(status.get("errors", {}), status.get("corrupt_block_errors", 0))
    if errors:
        console.print(errors)


def _header(status: dict) -> str:
    export = status.get("export", {})
    return (f"[bold]nbdswap {status.get('version', '')}[/bold]  export "
            f"[cyan]{export.get('name', '?')}[/cyan] {_size(export.get('size', 0))}  "
            f"connections {status.get('connections', 0)}  "
            f"up {status.get('uptime_seconds', 0):.0f} s")


def _tier_table(status: dict) -> Table:
    policy = status.get("policy", {})
    watermarks, drains = policy.get("watermarks", {}), policy.get("drains", {})
    clean_copies = status.get("clean_copies", {})
    table = Table(title="tiers", title_justify="left")
    table.add_column("tier")
    for column in ("blocks", "stored", "used", "capacity", "usage", "watermarks", "compression",
                   "clean copies"):
        table.add_column(column, justify="right")
    table.add_column("policy")
    table.add_column("details")
    for name, tier in status.get("tiers", {}).items():
        blocks, stored = tier.get("blocks", 0), tier.get("stored_bytes", 0)
        used, capacity = tier.get("used_bytes", stored), tier.get("capacity_bytes", 0)
        table.add_row(name, f"{blocks:,}", _size(stored), _size(used), _size(capacity),
                      f"{100 * used / capacity:.1f} %" if capacity else "-",
                      _watermarks(watermarks.get(name)),
                      f"{blocks * BLOCK_BYTES / stored:.2f}x" if stored else "-",
                      f"{clean_copies.get(name, 0):,}",
                      _tier_policy_state(watermarks.get(name), drains.get(name)),
                      _details(tier))
    return table


def _watermarks(report: dict | None) -> str:
    """``low–high %`` of a tier that has watermarks."""
    if report is None:
        return "-"
    return f"{100 * report['low']:g}–{100 * report['high']:g} %"


def _tier_policy_state(watermarks: dict | None, drain: dict | None) -> str:
    """What the policy engine is doing to the tier: demoting and/or its drain's state."""
    states = []
    if watermarks is not None and watermarks["demoting"]:
        states.append("[yellow]demoting[/yellow]")
    if drain is not None:
        states.append({"draining": "[yellow]draining[/yellow]", "drained": "drained",
                       "stopped": "[red]drain stopped[/red]"}[drain["state"]])
    return ", ".join(states) or "-"


def _details(tier: dict) -> str:
    """Fields beyond the standard columns, e.g. a remote tier's health."""
    parts = []
    for field, value in tier.items():
        if field in TIER_COLUMNS or value is None or isinstance(value, (dict, list)):
            continue
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif field.endswith("_bytes") and isinstance(value, (int, float)):
            value = _size(value)
        parts.append(f"{field.removesuffix('_bytes')} {value}")
    return ", ".join(parts)


def _map_line(status: dict) -> str:
    block_map = status.get("map", {})
    return (f"block map: {block_map.get('blocks', 0):,} blocks "
            f"({status.get('zero_blocks', 0):,} zero, "
            f"{status.get('same_filled_blocks', 0):,} same-filled, "
            f"{status.get('lost_blocks', 0):,} lost), {_size(block_map.get('bytes', 0))} on disk")


def _moves_table(status: dict) -> Table | str:
    """Blocks moved so far, one row per reason and from → to, with the policy engine's
    recent rate of each reason on the reason's first row (a reason with a rate but no
    count gets a row of its own); a line instead if nothing moved yet."""
    counts = _moves_by_reason(status.get("moves", {}))
    rates = status["policy"].get("move_rates", {})
    reasons = _in_reason_order(counts.keys() | rates.keys())
    if not reasons:
        return "policy: no blocks moved yet"
    table = Table(title="policy: blocks moved (moves/s: last 10 s)", title_justify="left")
    table.add_column("reason")
    table.add_column("from → to")
    table.add_column("blocks", justify="right", no_wrap=True)
    table.add_column("moves/s", justify="right", no_wrap=True)
    for reason in reasons:
        rate = f"{rates[reason]:,.1f}" if reason in rates else "-"
        for index, (path, count) in enumerate(counts.get(reason, {"-": "-"}).items()):
            first = index == 0
            table.add_row(reason if first else "", path, count, rate if first else "")
    return table


def _moves_by_reason(moves: dict[str, dict[str, dict[str, int]]]) -> dict[str, dict[str, str]]:
    """``{reason: {"from → to": count}}`` from the store's ``{from: {to: {reason: count}}}``."""
    by_reason: dict[str, dict[str, str]] = {}
    for source, targets in moves.items():
        for target, reasons in targets.items():
            for reason, count in reasons.items():
                by_reason.setdefault(reason, {})[f"{source} → {target}"] = f"{count:,}"
    return by_reason


def _in_reason_order(reasons: set[str]) -> list[str]:
    """``reasons`` in :data:`MOVE_REASONS` order, any the list lacks last by name."""
    known = [reason for reason in MOVE_REASONS if reason in reasons]
    return known + sorted(reasons - set(MOVE_REASONS))


def _policy_line(status: dict) -> str:
    policy = status["policy"]
    parts = [f"clean-copy hits {status.get('clean_copy_hits', 0):,} (demotions saved)",
             f"clean copies dropped {status.get('clean_copies_dropped', 0):,}",
             f"move races lost {status.get('move_races_lost', 0):,}",
             f"promotions queued {policy.get('promotions_queued', 0):,}"]
    stalled = ", ".join(f"{tier} {count:,}" for tier, count in policy.get("demotions_stalled", {}).items())
    if stalled:
        parts.append(f"[yellow]demotions stalled (no room below): {stalled}[/yellow]")
    return "policy: " + ", ".join(parts)


def _drain_lines(drains: dict[str, dict]) -> list[str]:
    lines = []
    for tier, drain in drains.items():
        line = (f"drain of {tier}: {drain['state']}, {drain['moved_blocks']:,} of {drain['total_blocks']:,} "
                f"blocks moved, {drain['remaining_blocks']:,} left, {drain['blocks_per_second']:,.1f} blocks/s")
        if drain["eta_seconds"] is not None:
            line += f", about {drain['eta_seconds']:,.0f} s to go"
        if drain["error"]:
            line += f" [red]({escape(drain['error'])})[/red]"
        lines.append(line)
    return lines


def _request_table(status: dict, recent: tuple[float, dict[str, list[str]]] | None) -> Table:
    title = f"requests (rates over the last {recent[0]:.1f} s)" if recent else "requests"
    table = Table(title=title, title_justify="left")
    table.add_column("op")
    columns = ["requests", "bytes", "errors"] + (["req/s", "bytes/s", "mean latency"] if recent else [])
    for column in columns:
        table.add_column(column, justify="right")
    errors = status.get("errors", {})
    for op, count in status.get("requests", {}).items():
        row = [op, f"{count:,}", _size(status.get("request_bytes", {}).get(op, 0)),
               f"{sum(errors.get(op, {}).values()):,}"]
        table.add_row(*row, *(recent[1][op] if recent else ()))
    return table


def _recent_rates(previous: dict | None, status: dict) -> tuple[float, dict[str, list[str]]] | None:
    """``(seconds, {op: [req/s, bytes/s, mean latency]})`` between two samples of one
    server run; None without a previous sample or across a restart."""
    if previous is None:
        return None
    elapsed = status.get("uptime_seconds", 0) - previous.get("uptime_seconds", 0)
    sections = ("requests", "request_bytes", "request_seconds")
    if elapsed <= 0 or not all(section in previous and section in status for section in sections):
        return None
    rates = {}
    for op in status["requests"]:
        requests, nbytes, seconds = (status[section].get(op, 0) - previous[section].get(op, 0)
                                     for section in sections)
        if requests < 0:
            return None
        rates[op] = [f"{requests / elapsed:,.1f}", f"{_size(nbytes / elapsed)}/s",
                     _duration(seconds / requests) if requests else "-"]
    return elapsed, rates


def _error_line(errors: dict[str, dict[str, int]], corrupt: int) -> str:
    parts = [f"{op} {errno} {count:,}" for op, by_errno in errors.items() for errno, count in by_errno.items()]
    if corrupt:
        parts.append(f"checksum failures or lost blocks {corrupt:,}")
    return "[red]errors:[/red] " + ", ".join(parts) if parts else ""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.2f} ms"

