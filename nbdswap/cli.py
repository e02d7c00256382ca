"""The ``nbdswap`` command: ``serve`` the device, ``status`` of a running server."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from . import __version__, admin
from .config import ConfigError, ServeConfig

log = logging.getLogger("nbdswap")


def _add_serve(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve the swap device over NBD")
    serve.add_argument("--config", type=Path, help="TOML file; flags override it")
    serve.add_argument("--listen", action="append", metavar="URL",
                       help="tcp://HOST:PORT or unix:///PATH (repeatable; default tcp://127.0.0.1:10809)")
    serve.add_argument("--export", help="export name (default swap; the empty name selects it too)")
    serve.add_argument("--description", help="export description shown to clients")
    serve.add_argument("--size", help="device size, e.g. 4G")
    serve.add_argument("--state-dir", type=Path, help="block map, disk tier and admin socket (default ./var)")
    serve.add_argument("--ram-max", help="compressed RAM tier capacity, e.g. 1G (0 disables it)")
    serve.add_argument("--disk-max", help="disk tier capacity, e.g. 8G (0 disables it)")
    serve.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=_cmd_serve)


def _add_status(subparsers) -> None:
    status = subparsers.add_parser("status", help="show what a running server holds")
    status.add_argument("--state-dir", type=Path, default=Path("var"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=_cmd_status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbdswap", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nbdswap {__version__}")
    subparsers = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_serve(subparsers)
    _add_status(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, admin.AdminError) as error:
        print(f"nbdswap: {error}", file=sys.stderr)
        return 2


# --- serve ---------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    overrides = {key: getattr(args, key) for key in
                 ("listen", "export", "description", "size", "state_dir", "ram_max",
                  "disk_max", "metrics", "log_level")}
    config = ServeConfig.load(args.config, overrides)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config.state_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_state_dir(config.state_dir)
    try:
        _install_uvloop()
        asyncio.run(_serve(config))
    finally:
        lock.close()
    return 0


def _lock_state_dir(state_dir: Path):
    """One server per state dir: two would hand out the same tier slots."""
    handle = open(state_dir / "lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"another nbdswap server is using {state_dir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed; using the default event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: ServeConfig) -> None:
    from .device import BlockDevice
    from .errors import StateDirError
    from .server import NBDServer
    from .store import Store

    try:
        store = Store.open(config.state_dir, size=config.size,
                           ram_max=config.ram_max, disk_max=config.disk_max)
    except StateDirError as error:
        raise ConfigError(str(error)) from None
    device = BlockDevice(store, config.export, config.size, config.description)
    server = NBDServer(device)
    started = time.time()

    def status(_request: dict) -> dict:
        return {**store.stats(), **device.status(),
                "connections": len(server.connections),
                "uptime_seconds": round(time.time() - started, 3),
                "version": __version__}

    admin_server = admin.AdminServer(config.state_dir, {"status": status})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        for address in config.listen_addresses:
            await server.listen(address)
            print(f"nbdswap: serving export {config.export!r} ({config.size} bytes) on {address}",
                  flush=True)
        await admin_server.start()
        if config.metrics:
            from .metrics import serve_metrics
            serve_metrics(config.metrics, device, store, server)
            print(f"nbdswap: metrics on http://{config.metrics}/metrics", flush=True)
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
    finally:
        await server.shutdown()
        await admin_server.stop()
        await store.close()
    log.info("stopped")


# --- status --------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    status = admin.request(args.state_dir, "status")
    if args.json:
        json.dump(status, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        from .status_view import render_status
        render_status(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
