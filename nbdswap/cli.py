"""nbdswap: a tiered swap device over NBD.

serve runs the device; status, drain, undrain and policy talk to a running server;
wipe deletes a stopped server's device; attach and detach connect /dev/nbdN to a
server (inside the guest).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from . import __version__, admin
from .config import LOG_LEVELS, ConfigError, ServeConfig
from .resident import stay_resident

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
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    serve.add_argument("--encoder-workers", type=int, metavar="N",
                       help="processes that compress written pages beside the server "
                            "(default: one per further core, at most 4; 0: none)")
    serve.add_argument("--encoder-offload-above", type=float, metavar="MICROSECONDS",
                       help="use the encoder workers while a page takes longer than this "
                            "to compress (default 12; 0: always)")
    _add_security_flags(serve)
    _add_remote_flags(serve)
    serve.add_argument("--policy", dest="policy_set", action="append", metavar="KEY=VALUE",
                       help="a policy setting (repeatable; see `nbdswap policy show`), over [policy] in --config")
    serve.set_defaults(run=_cmd_serve)


#: ``serve`` settings of the remote tier (ServeConfig field names).
REMOTE_SETTINGS = ("remote", "remote_max", "remote_pool", "remote_timeout",
                   "remote_command_timeout", "remote_retry_interval", "remote_prefix")


def _add_remote_flags(serve) -> None:
    remote = serve.add_argument_group("remote tier (Redis/Valkey)")
    remote.add_argument("--remote", metavar="URL",
                        help="redis://HOST:PORT/DB, rediss://..., redis+cluster://HOST:PORT or "
                             "redis+sentinel://HOST:PORT[,...]/SERVICE[/DB]; blocks go there when "
                             "RAM and disk are full")
    remote.add_argument("--remote-max", metavar="SIZE",
                        help="bytes of keys and values the tier may keep in Redis (default 16G)")
    remote.add_argument("--remote-pool", type=int, metavar="N",
                        help="Redis commands in flight, and connections per node (default 16)")
    remote.add_argument("--remote-timeout", type=float, metavar="SECONDS",
                        help="how long a read of a remote block retries before failing with EIO (default 5)")
    remote.add_argument("--remote-command-timeout", type=float, metavar="SECONDS",
                        help="connect and reply timeout of one Redis command (default 1)")
    remote.add_argument("--remote-retry-interval", type=float, metavar="SECONDS",
                        help="pause between retries and health probes while Redis is down (default 0.2)")
    remote.add_argument("--remote-prefix", metavar="TEXT",
                        help="start of every key, before {INSTANCE:SEGMENT} (default nbdswap:)")


#: ``serve`` settings of limits, access control and TLS (ServeConfig field names).
SECURITY_SETTINGS = ("handshake_timeout", "max_option_length", "max_connections",
                     "max_connections_per_peer", "max_in_flight", "allow", "socket_mode",
                     "socket_group", "tls", "tls_cert", "tls_key", "tls_ca", "tls_verify_peer")


def _add_security_flags(serve) -> None:
    limits = serve.add_argument_group("limits (each logs a line when it triggers)")
    limits.add_argument("--handshake-timeout", type=float, metavar="SECONDS",
                        help="close connections not in transmission after this long (default 10)")
    limits.add_argument("--max-option-length", metavar="SIZE",
                        help="longer handshake options are skipped unread and refused (default 64K)")
    limits.add_argument("--max-connections", type=int, metavar="N", help="in total (default 256)")
    limits.add_argument("--max-connections-per-peer", type=int, metavar="N",
                        help="per TCP address or per local user on Unix sockets (default 64)")
    limits.add_argument("--max-in-flight", metavar="SIZE",
                        help="stop reading a connection while its requests hold this much data (default 64M)")
    access = serve.add_argument_group("access control and TLS")
    access.add_argument("--allow", action="append", metavar="CIDR",
                        help="TCP clients must come from this network (repeatable; default: any)")
    access.add_argument("--socket-mode", metavar="OCTAL", help="mode of Unix sockets (default 0660)")
    access.add_argument("--socket-group", metavar="GROUP", help="group of Unix sockets")
    access.add_argument("--tls", choices=["off", "on", "require"],
                        help="offer NBD_OPT_STARTTLS (on) or insist on it (require); default off")
    access.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate (chain)")
    access.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    access.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA that signs client certificates")
    access.add_argument("--tls-verify-peer", action="store_true", default=None,
                        help="require a client certificate signed by --tls-ca")


def _add_status(subparsers) -> None:
    status = subparsers.add_parser("status", help="show what a running server holds")
    _add_state_dir(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="sample twice this far apart to show recent rates (0: totals only)")
    status.set_defaults(run=_cmd_status)


def _add_attach(subparsers) -> None:
    from .attach import block_size, connection_count, dead_connection_timeout, request_timeout

    attach = subparsers.add_parser(
        "attach", help="connect /dev/nbdX to an export and keep it connected across server restarts")
    attach.add_argument("server", metavar="SERVER",
                        help="tcp://HOST:PORT, unix:///PATH or HOST[:PORT] (port 10809)")
    attach.add_argument("device", metavar="DEVICE", help="/dev/nbdN")
    attach.add_argument("-N", "--name", default="swap", help="export name (default swap)")
    attach.add_argument("-b", "--block-size", type=block_size, default=4096,
                        help="block size: 512, 1024, 2048 or 4096 (default 4096)")
    attach.add_argument("-C", "--connections", type=connection_count, default=1,
                        help="sockets per device (default 1)")
    attach.add_argument("-t", "--timeout", type=request_timeout, default=30,
                        help="seconds after which the kernel declares an unanswering connection "
                             "dead and re-sends its requests on a new one (default 30)")
    attach.add_argument("--dead-conn-timeout", type=dead_connection_timeout, default=3600,
                        help="seconds I/O waits for a reconnection before failing (default 3600)")
    attach.set_defaults(run=_cmd_attach)
    detach = subparsers.add_parser("detach", help="disconnect /dev/nbdX")
    detach.add_argument("device", metavar="DEVICE", help="/dev/nbdN")
    detach.set_defaults(run=_cmd_detach)


def _add_state_dir(parser) -> None:
    """The ``--state-dir`` of the commands that talk to a running server."""
    parser.add_argument("--state-dir", type=Path, default=Path("var"),
                        help="the server's state directory, which holds its admin socket (default ./var)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbdswap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nbdswap {__version__}")
    subparsers = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_serve(subparsers)
    _add_status(subparsers)
    _add_attach(subparsers)
    _add_policy_commands(subparsers)
    _add_wipe(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        if args.run in (_cmd_serve, _cmd_attach):
            raise
        return _reader_gone()
    except (ConfigError, admin.AdminError) as error:
        print(f"nbdswap: {error}", file=sys.stderr)
        return 2


def _reader_gone() -> int:
    """Whoever read a command's output stopped (``nbdswap status | head``): exit 1
    without a traceback, and without a second one when Python flushes stdout at exit.
    (Not for ``serve`` and ``attach``: a broken pipe there is an error to report.)"""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1


# --- serve ---------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    overrides = {key: getattr(args, key) for key in
                 ("listen", "export", "description", "size", "state_dir", "ram_max",
                  "disk_max", "metrics", "log_level", "encoder_workers", "encoder_offload_above",
                  "policy_set") + SECURITY_SETTINGS + REMOTE_SETTINGS}
    config = ServeConfig.load(args.config, overrides)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = _lock_state_dir(config.state_dir)
    try:
        # The server may back swap on its own host: it must not deadlock under memory
        # pressure. On fault: its LMDB map and RAM arena are large sparse mappings.
        stay_resident(on_fault=True)
        _install_uvloop()
        asyncio.run(_serve(config))
    finally:
        lock.close()
    return 0


def _lock_state_dir(state_dir: Path):
    """Create the state dir if needed and lock it: one server per state dir, since two
    would hand out the same tier slots."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(state_dir / "lock", "a+")
    except OSError as error:
        raise ConfigError(f"state dir {state_dir}: {error.strerror or error}") from None
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


def _io_executor():
    from concurrent.futures import ThreadPoolExecutor

    from .resident import mark_io_flusher

    return ThreadPoolExecutor(thread_name_prefix="nbdswap-io", initializer=mark_io_flusher)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed; using the default event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: ServeConfig) -> None:
    from .device import BlockDevice
    from .encoder import EncoderPool
    from .errors import StateDirError
    from .policy import Policy
    from .server import NBDServer
    from .store import Store

    asyncio.get_running_loop().set_default_executor(_io_executor())

    policy = config.server_policy()
    try:
        store = Store.open(config.state_dir, size=config.size, ram_max=config.ram_max,
                           disk_max=config.disk_max, remote=config.remote_settings())
    except StateDirError as error:
        raise ConfigError(str(error)) from None
    except OSError as error:
        where = error.filename or config.state_dir
        raise ConfigError(f"cannot open the store in {config.state_dir}: {where}: {error.strerror or error}") from None
    device = BlockDevice(store, config.export, config.size, config.description)
    encoder = EncoderPool(config.encoder_workers, config.encoder_offload_above)
    if encoder.workers:
        device.encoder = encoder
    server = NBDServer(device, policy)
    engine = Policy(store, config.policy_settings(), device.requests_served)
    started = time.time()

    def status(_request: dict) -> dict:
        return {**store.stats(), **device.status(),
                "connections": len(server.connections),
                "uptime_seconds": round(time.time() - started, 3),
                "version": __version__, "policy": engine.stats()}

    admin_server = admin.AdminServer(config.state_dir, {"status": status, **engine.admin_handlers()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    metrics = None
    try:
        engine.start()
        if config.metrics:
            metrics = _serve_metrics(config.metrics, device, store, server, engine)
        for address in config.listen_addresses:
            try:
                await server.listen(address)
            except OSError as error:
                raise ConfigError(f"cannot listen on {address}: {error.strerror or error}") from None
            print(f"nbdswap: serving export {config.export!r} ({config.size} bytes) on {address}",
                  flush=True)
        await admin_server.start()
        notify_systemd("READY=1")
        await stop.wait()
        notify_systemd("STOPPING=1")
        log.info("shutting down: finishing in-flight requests")
    finally:
        await server.shutdown()
        await encoder.close()
        await engine.stop()
        if metrics is not None:
            await asyncio.to_thread(metrics.close)
        await admin_server.stop()
        await store.close()
    log.info("stopped")


def _serve_metrics(address: str, device, store, server, engine):
    """Start ``/metrics`` before the NBD listeners: a busy port is then a start-up error
    rather than a failure after clients were told the device is served."""
    from .metrics import MetricsEndpoint

    try:
        metrics = MetricsEndpoint(address, device, store, server, engine)
    except OSError as error:
        raise ConfigError(f"cannot serve metrics on {address}: {error.strerror or error}") from None
    print(f"nbdswap: metrics on http://{address}/metrics", flush=True)
    return metrics


def notify_systemd(state: str) -> None:
    """Tell systemd (``Type=notify`` units) ``READY=1`` once every socket accepts, so that
    units ordered after this one start when the device can be reached; a no-op outside
    systemd.  The protocol is one datagram to ``$NOTIFY_SOCKET`` (sd_notify(3))."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
            notify.sendto(state.encode(), address)
    except OSError as error:
        log.warning("cannot notify systemd (%s): %s", state, error)


# --- wipe ----------------------------------------------------------------------


def _add_wipe(subparsers) -> None:
    wipe = subparsers.add_parser(
        "wipe", help="delete a stopped server's device: its block map, disk tier and RAM arena")
    _add_state_dir(wipe)
    wipe.set_defaults(run=_cmd_wipe)


def _cmd_wipe(args: argparse.Namespace) -> int:
    """The RAM arena outlives the server on purpose (a restart keeps RAM blocks), so
    retiring a device needs this to give its memory back.  Only nbdswap's own files are
    removed; the map goes first, so an interrupted wipe never leaves a map whose RAM
    blocks read as lost."""
    from .blockmap import MAP_FILE
    from .store import STATE_DIR_FILES
    from .tiers.disk import DISK_FILE
    from .tiers.ram import arena_path

    state_dir, arena = args.state_dir, arena_path(args.state_dir)
    if state_dir.is_dir():
        lock = _lock_state_dir(state_dir)
        try:
            for name in (MAP_FILE, DISK_FILE, *STATE_DIR_FILES):
                (state_dir / name).unlink(missing_ok=True)
        finally:
            lock.close()
    arena.unlink(missing_ok=True)
    try:
        state_dir.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        print(f"nbdswap: kept {state_dir}: it holds files that are not nbdswap's", file=sys.stderr)
    print(f"nbdswap: wiped the device of {state_dir} (block map, disk tier, RAM arena {arena})")
    return 0


# --- attach / detach -----------------------------------------------------------


def _cmd_attach(args: argparse.Namespace) -> int:
    from .attach import AttachOptions, device_index, run_attach

    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        index = device_index(args.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return run_attach(AttachOptions(
        server=args.server, index=index, export=args.name, block_size=args.block_size,
        connections=args.connections, timeout=args.timeout,
        dead_connection_timeout=args.dead_conn_timeout))


def _cmd_detach(args: argparse.Namespace) -> int:
    from .attach import detach, device_index

    try:
        detach(device_index(args.device))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    except OSError as error:
        print(f"nbdswap detach: {error}", file=sys.stderr)
        return 1
    return 0


# --- status --------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    status = admin.request(args.state_dir, "status")
    if args.json:
        json.dump(status, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        from .status_view import show_status
        show_status(status, lambda: admin.request(args.state_dir, "status"), args.interval)
    return 0


# --- drain / undrain / policy --------------------------------------------------


def _add_policy_commands(subparsers) -> None:
    drain = subparsers.add_parser("drain", help="move every block off a tier while I/O goes on")
    drain.add_argument("tier", choices=["ram", "disk", "remote"])
    _add_state_dir(drain)
    drain.add_argument("--no-wait", action="store_true", help="start the drain and return")
    drain.set_defaults(run=_cmd_drain)
    undrain = subparsers.add_parser("undrain", help="let a drained tier take new blocks again")
    undrain.add_argument("tier", choices=["ram", "disk", "remote"])
    _add_state_dir(undrain)
    undrain.set_defaults(run=lambda args: _print_json(admin.request(args.state_dir, "undrain", tier=args.tier)))
    policy = subparsers.add_parser("policy", help="show or change the running server's policy")
    actions = policy.add_subparsers(required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print every policy setting")
    _add_state_dir(show)
    show.set_defaults(run=lambda args: _print_json(admin.request(args.state_dir, "policy_show")["settings"]))
    change = actions.add_parser("set", help="change one setting until the server stops")
    change.add_argument("key")
    change.add_argument("value")
    _add_state_dir(change)
    change.set_defaults(run=lambda args: _print_json(
        admin.request(args.state_dir, "policy_set", key=args.key, value=args.value)["settings"]))


def _print_json(value: dict) -> int:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


def _cmd_drain(args: argparse.Namespace) -> int:
    report = admin.request(args.state_dir, "drain", tier=args.tier)
    if args.no_wait:
        return _print_json(report)
    from .drain_view import follow_drain

    final = follow_drain(args.tier, report, lambda: admin.request(args.state_dir, "status"))
    if final["state"] != "drained":
        print(f"nbdswap drain: {final.get('error') or 'the drain stopped'}", file=sys.stderr)
        return 1
    print(f"nbdswap: tier {args.tier} is drained; it takes no new blocks until `nbdswap undrain {args.tier}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
