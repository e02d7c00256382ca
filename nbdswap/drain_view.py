"""``nbdswap drain``'s progress bar: polls the server's status until the drain ends."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column

POLL_SECONDS = 0.5


def follow_drain(tier: str, report: dict, fetch_status: Callable[[], dict],
                 console: Console | None = None) -> dict:
    """Show a bar with an ETA until the drain of ``tier`` is ``drained`` or ``stopped``;
    return its last report."""
    # The count does not wrap, so that on a narrow console the bar gives way, not the count.
    columns = (TextColumn(f"draining [bold]{tier}[/bold]"), BarColumn(),
               MofNCompleteColumn(table_column=Column(no_wrap=True)), TextColumn("blocks"), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
        task = progress.add_task(tier, total=max(report["total_blocks"], 1))
        while report["state"] == "draining":
            progress.update(task, total=max(report["total_blocks"], 1), completed=report["moved_blocks"])
            time.sleep(POLL_SECONDS)
            report = fetch_status()["policy"]["drains"].get(tier) or {"state": "stopped", "error": "undrained"}
        progress.update(task, completed=report.get("moved_blocks", 0))
    return report
