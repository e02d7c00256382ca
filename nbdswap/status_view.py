"""Human-readable ``nbdswap status``: rich tables of tiers, block map, policy and requests.

Recent request rates come from two status samples taken ``interval`` seconds apart;
the server's own uptime is the clock between them.  Recent move rates are the policy
engine's own (over its last 10 s).

The view must stay readable at 80 columns (a default terminal, or a pipe): a rich table
too wide for the console cuts its cells with "…", numbers included.  So no table gains a
column for each field, reason or route the data holds: the tier table has one column per
tier and a row per field, the moves table a row per reason and from → to, and free text
goes on lines of its own.  Numeric columns do not wrap, so that in a table that must
still give way, the text columns give it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .metrics import BLOCK_BYTES, MOVE_REASONS

#: Tier fields the tier table shows in rows of their own; it shows any others below them.
TIER_FIELDS = ("blocks", "stored_bytes", "used_bytes", "capacity_bytes")
#: Types of the further tier fields that get a row in the tier table; texts, such as a
#: remote tier's last error, get a line under it instead.
CELL_TYPES = (bool, int, float)


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
    for line in _tier_text_lines(status.get("tiers", {})):
        console.print(line)
    console.print(_map_line(status))
    if "policy" in status:
        console.print(_moves_table(status))
        console.print(_policy_line(status))
        for line in _drain_lines(status["policy"].get("drains", {})):
            console.print(line)
    console.print(_request_table(status, _recent_rates(previous, status)))
    if "encoder" in status:
        console.print(_encoder_line(status["encoder"]))
    console.print(_error_line(status.get("errors", {}), status.get("corrupt_block_errors", 0)))


def _encoder_line(encoder: dict) -> str:
    where = "on the workers" if encoder["offloading"] else "in the server"
    return (f"encoder: {encoder['workers']} worker process(es), pages compressed {where} "
            f"({encoder['page_encode_us']:.1f} µs each); {encoder['pages_offloaded']:,} on workers, "
            f"{encoder['pages_inline']:,} in the server, {encoder['worker_failures']} worker failures")


def _header(status: dict) -> str:
    export = status.get("export", {})
    return (f"[bold]nbdswap {status.get('version', '')}[/bold]  export "
            f"[cyan]{export.get('name', '?')}[/cyan] {_size(export.get('size', 0))}  "
            f"connections {status.get('connections', 0)}  "
            f"up {status.get('uptime_seconds', 0):.0f} s")


def _tier_table(status: dict) -> Table:
    """A column per tier and a row per field; the fields some tiers add (a slab's
    size, a remote tier's health) follow the standard ones, after a rule."""
    tiers = status.get("tiers", {})
    columns = {name: _tier_cells(name, tier, status) for name, tier in tiers.items()}
    table = Table(title="tiers", title_justify="left")
    table.add_column("")
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True)
    for label in next(iter(columns.values()), {}):
        table.add_row(label, *(cells[label] for cells in columns.values()))
    extras = _extra_fields(tiers, CELL_TYPES)
    if extras:
        table.add_section()
    for field in extras:
        table.add_row(_field_label(field), *(_field_value(field, tier.get(field)) for tier in tiers.values()))
    return table


def _tier_cells(name: str, tier: dict, status: dict) -> dict[str, str]:
    """The tier table's column for tier ``name``: row label → value shown."""
    policy = status.get("policy", {})
    watermarks = policy.get("watermarks", {}).get(name)
    blocks, stored = tier.get("blocks", 0), tier.get("stored_bytes", 0)
    used, capacity = tier.get("used_bytes", stored), tier.get("capacity_bytes", 0)
    return {"blocks": f"{blocks:,}", "stored": _size(stored), "used": _size(used), "capacity": _size(capacity),
            "usage": f"{100 * used / capacity:.1f} %" if capacity else "-",
            "watermarks": _watermarks(watermarks),
            "compression": f"{blocks * BLOCK_BYTES / stored:.2f}x" if stored else "-",
            "clean copies": f"{status.get('clean_copies', {}).get(name, 0):,}",
            "policy": _tier_policy_state(watermarks, policy.get("drains", {}).get(name))}


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


def _extra_fields(tiers: dict[str, dict], kind: type | tuple[type, ...]) -> list[str]:
    """Fields beyond the standard ones (e.g. a remote tier's health) that some tier
    reports with a value of ``kind``, in the order the tiers report them."""
    return list(dict.fromkeys(field for tier in tiers.values() for field, value in tier.items()
                              if field not in TIER_FIELDS and isinstance(value, kind)))


def _field_label(field: str) -> str:
    return field.removesuffix("_bytes").replace("_", " ")


def _field_value(field: str, value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if field.endswith("_bytes"):
        return _size(value)
    return f"{value:,}" if isinstance(value, int) else str(value)


def _tier_text_lines(tiers: dict[str, dict]) -> list[str]:
    """Free-text tier fields, one line each under the tier table: too long for a cell."""
    return [f"{name} {_field_label(field)}: {escape(tier[field])}"
            for field in _extra_fields(tiers, str)
            for name, tier in tiers.items() if tier.get(field)]


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
    """``reasons`` in :data:`~nbdswap.metrics.MOVE_REASONS` order (the moves table's
    rows), any the list lacks last by name."""
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
    """Totals per operation, and rates over the sampling window if there was one.  The
    errors are on the line under the table, by errno: a column of them would make the
    table too wide for 80 columns."""
    title = f"requests (rates over the last {recent[0]:.1f} s)" if recent else "requests"
    table = Table(title=title, title_justify="left")
    table.add_column("op")
    # "mean latency" on two lines: the column does not wrap, and its values are narrow.
    columns = ["requests", "bytes"] + (["req/s", "bytes/s", "mean\nlatency"] if recent else [])
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for op, count in status.get("requests", {}).items():
        table.add_row(op, f"{count:,}", _size(status.get("request_bytes", {}).get(op, 0)),
                      *(recent[1][op] if recent else ()))
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
    return "[red]errors:[/red] " + ", ".join(parts) if parts else "errors: none"


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

