"""Configuration: a TOML file and command-line flags merged into one validated object."""

from __future__ import annotations

import grp
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .addresses import ListenAddress

DEFAULT_LISTEN = "tcp://127.0.0.1:10809"
TLS_MODES = ("off", "on", "require")
LOG_LEVELS = ("debug", "info", "warning", "error")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(ValueError):
    """A setting is missing, malformed or contradicts another."""


_TEXT, _SIZE_VALUE, _SECONDS, _COUNT = (str,), (int, str), (int, float), (int,)
_MICROSECONDS = _SECONDS
_TEXTS = (str, list)  # one string or a list of them
#: The TOML types each setting of a config file may have (flags are typed by argparse).
FILE_TYPES: dict[str, tuple[type, ...]] = {
    "listen": _TEXTS, "export": _TEXT, "description": _TEXT, "size": _SIZE_VALUE,
    "state_dir": _TEXT, "ram_max": _SIZE_VALUE, "disk_max": _SIZE_VALUE, "metrics": _TEXT,
    "log_level": _TEXT, "encoder_workers": _COUNT, "encoder_offload_above": _MICROSECONDS,
    "handshake_timeout": _SECONDS, "max_option_length": _SIZE_VALUE,
    "max_connections": _COUNT, "max_connections_per_peer": _COUNT, "max_in_flight": _SIZE_VALUE,
    "allow": _TEXTS, "socket_mode": (int, str), "socket_group": (str, int), "tls": _TEXT,
    "tls_cert": _TEXT, "tls_key": _TEXT, "tls_ca": _TEXT, "tls_verify_peer": (bool,),
    "remote": _TEXT, "remote_max": _SIZE_VALUE, "remote_pool": _COUNT, "remote_timeout": _SECONDS,
    "remote_command_timeout": _SECONDS, "remote_retry_interval": _SECONDS, "remote_prefix": _TEXT,
    "policy": (dict,), "policy_set": (list,),
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list of strings", dict: "a table"}


def check_file_types(values: dict, path: Path | None) -> None:
    """Refuse a config file value of the wrong TOML type with one line naming the key
    (``size = 64.5``, ``listen = 5``, ``export = 5`` would otherwise fail deep inside)."""
    for key, value in values.items():
        allowed = FILE_TYPES[key]
        wrong_type = not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
        if wrong_type or (isinstance(value, list) and not all(isinstance(item, str) for item in value)):
            expected = " or ".join(_TYPE_NAMES[kind] for kind in allowed)
            raise ConfigError(f"{path}: {key.replace('_', '-')} must be {expected}, not {value!r}")


def parse_size(value: str | int) -> int:
    """``4G`` → 4294967296.  Suffixes K/M/G/T are powers of 1024."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ConfigError(f"{value!r} is not a size (examples: 4096, 512M, 4G)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{value!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _group_id(group: str | int | None) -> int | None:
    """The gid of a group given by name or number."""
    if group is None:
        return None
    group = str(group)
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket-group: no group named {group!r}") from None


@dataclass(frozen=True)
class RemoteSettings:
    """How to reach and use the remote store (``--remote*`` options).

    Here rather than in :mod:`~nbdswap.tiers.remote` so that :class:`ServeConfig` takes
    its defaults from it without importing the Redis client."""

    url: str
    max_bytes: int = 16 << 30
    pool: int = 16
    timeout: float = 5.0
    command_timeout: float = 1.0
    retry_interval: float = 0.2
    prefix: str = "nbdswap:"


@dataclass
class ServeConfig:
    """Everything ``nbdswap serve`` needs; file keys equal the long flag names."""

    listen: list[str] = field(default_factory=list)
    export: str = "swap"
    description: str = "nbdswap tiered swap device"
    size: int = 0
    state_dir: Path = Path("var")
    ram_max: int = 256 << 20
    disk_max: int = 4 << 30
    metrics: str | None = None
    log_level: str = "info"
    encoder_workers: int | None = None  # None: encoder.default_workers()
    encoder_offload_above: float | None = None  # µs; None: encoder.OFFLOAD_ABOVE_US
    # limits, access control and TLS of the NBD listeners (see server.ServerPolicy)
    handshake_timeout: float = 10.0
    max_option_length: int = 64 << 10
    max_connections: int = 256
    max_connections_per_peer: int = 64
    max_in_flight: int = 64 << 20
    allow: list[str] = field(default_factory=list)
    socket_mode: int = 0o660
    socket_group: str | None = None
    tls: str = "off"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_verify_peer: bool = False
    # the remote tier (see RemoteSettings); off without ``remote``
    remote: str | None = None
    remote_max: int = RemoteSettings.max_bytes
    remote_pool: int = RemoteSettings.pool
    remote_timeout: float = RemoteSettings.timeout
    remote_command_timeout: float = RemoteSettings.command_timeout
    remote_retry_interval: float = RemoteSettings.retry_interval
    remote_prefix: str = RemoteSettings.prefix
    # the policy engine: a ``[policy]`` table, then ``--policy KEY=VALUE`` flags on top
    policy: dict = field(default_factory=dict)
    policy_set: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path | None, overrides: dict) -> ServeConfig:
        """Read ``path`` (if any), apply non-None ``overrides``, validate."""
        values: dict = {}
        if path is not None:
            try:
                with open(path, "rb") as handle:
                    values = tomllib.load(handle)
            except (OSError, tomllib.TOMLDecodeError) as error:
                raise ConfigError(f"cannot read config {path}: {error}") from None
        known = {f.name for f in fields(cls)}
        values = {key.replace("-", "_"): value for key, value in values.items()}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
        check_file_types(values, path)
        values.update({key: value for key, value in overrides.items() if value is not None})
        config = cls(**values)
        config._normalise()
        return config

    def _normalise(self) -> None:
        if isinstance(self.listen, str):
            self.listen = [self.listen]
        self.listen = list(self.listen) or [DEFAULT_LISTEN]
        for url in self.listen:
            try:
                ListenAddress.parse(url)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        self.size = parse_size(self.size)
        self.ram_max = parse_size(self.ram_max)
        self.disk_max = parse_size(self.disk_max)
        self.state_dir = Path(self.state_dir)
        if self.size <= 0 or self.size % 4096:
            raise ConfigError("size must be a positive multiple of 4096 (e.g. --size 4G)")
        if self.ram_max < 0 or self.disk_max < 0:
            raise ConfigError("tier sizes cannot be negative")
        if self.ram_max + self.disk_max == 0 and self.remote is None:
            raise ConfigError("at least one tier needs space (--ram-max, --disk-max or --remote)")
        if self.metrics is not None:
            parse_host_port(self.metrics)
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log-level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        from .encoder import OFFLOAD_ABOVE_US, default_workers

        if self.encoder_offload_above is None:
            self.encoder_offload_above = OFFLOAD_ABOVE_US
        if self.encoder_workers is None:
            self.encoder_workers = default_workers()
        elif not isinstance(self.encoder_workers, int) or not 0 <= self.encoder_workers <= 64:
            raise ConfigError("encoder-workers must be a whole number from 0 to 64")
        if not isinstance(self.encoder_offload_above, (int, float)) or self.encoder_offload_above < 0:
            raise ConfigError("encoder-offload-above must be a number of microseconds, 0 or more")
        self._normalise_limits()
        self._normalise_access()
        self._normalise_tls()
        self._normalise_remote()
        self._normalise_policy()

    def _normalise_limits(self) -> None:
        self.max_option_length = parse_size(self.max_option_length)
        self.max_in_flight = parse_size(self.max_in_flight)
        if not isinstance(self.handshake_timeout, (int, float)) or self.handshake_timeout <= 0:
            raise ConfigError("handshake-timeout must be a positive number of seconds")
        if not 512 <= self.max_option_length <= 16 << 20:
            raise ConfigError("max-option-length must be between 512 and 16M")
        if self.max_in_flight <= 0:
            raise ConfigError("max-in-flight must be positive")
        for name in ("max_connections", "max_connections_per_peer"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer")

    def _normalise_access(self) -> None:
        self.allow = [self.allow] if isinstance(self.allow, str) else list(self.allow)
        for cidr in self.allow:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"allow: {cidr!r} is not an address or CIDR network") from None
        if isinstance(self.socket_mode, str):
            try:
                self.socket_mode = int(self.socket_mode, 8)
            except ValueError:
                raise ConfigError(f"socket-mode {self.socket_mode!r} is not octal (e.g. 0660)") from None
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(f"socket-mode {self.socket_mode:o} is not a permission mode (e.g. 0660)")
        _group_id(self.socket_group)  # an unknown group is refused here, not at listen time

    def _normalise_tls(self) -> None:
        if self.tls not in TLS_MODES:
            raise ConfigError(f"tls must be one of {', '.join(TLS_MODES)}, not {self.tls!r}")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if self.tls != "off" and (self.tls_cert is None or self.tls_key is None):
            raise ConfigError(f"tls={self.tls} needs --tls-cert and --tls-key")
        if self.tls_verify_peer and self.tls_ca is None:
            raise ConfigError("tls-verify-peer needs --tls-ca, the CA that signs client certificates")
        if self.tls_ca is not None and not self.tls_verify_peer:
            raise ConfigError("tls-ca is only used to verify client certificates: add --tls-verify-peer")

    def _normalise_remote(self) -> None:
        self.remote_max = parse_size(self.remote_max)
        if self.remote is not None:
            from .tiers.remote import check_url

            try:
                check_url(self.remote)
            except ValueError as error:
                raise ConfigError(f"remote: {error}") from None
        if self.remote_max <= 0:
            raise ConfigError("remote-max must be positive")
        if not isinstance(self.remote_pool, int) or self.remote_pool < 1:
            raise ConfigError("remote-pool must be a positive integer")
        for name in ("remote_timeout", "remote_command_timeout", "remote_retry_interval"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive number of seconds")
        if not self.remote_prefix:
            raise ConfigError("remote-prefix must not be empty")

    def _normalise_policy(self) -> None:
        from .policy import PolicyError, PolicySettings

        try:
            values = dict(self.policy)
            for item in self.policy_set:
                name, sep, value = item.partition("=")
                if not sep:
                    raise PolicyError(f"--policy {item!r}: expected KEY=VALUE")
                values[name.strip().replace("-", "_")] = value.strip()
            settings = PolicySettings.from_mapping(values)
        except PolicyError as error:
            raise ConfigError(f"policy: {error}") from None
        self.policy = settings.as_dict()

    def policy_settings(self):
        """The :class:`~nbdswap.policy.PolicySettings` of these settings."""
        from .policy import PolicySettings

        return PolicySettings(**self.policy)

    def remote_settings(self):
        """The :class:`RemoteSettings`, or ``None`` without a remote tier."""
        if self.remote is None:
            return None
        return RemoteSettings(
            url=self.remote, max_bytes=self.remote_max, pool=self.remote_pool,
            timeout=float(self.remote_timeout), command_timeout=float(self.remote_command_timeout),
            retry_interval=float(self.remote_retry_interval), prefix=self.remote_prefix)

    def server_policy(self):
        """The :class:`~nbdswap.server.ServerPolicy` of these settings (loads the TLS
        certificate and key)."""
        from .protocol import TlsMode
        from .server import ServerPolicy, tls_server_context

        context = None
        if self.tls != "off":
            try:
                context = tls_server_context(self.tls_cert, self.tls_key, self.tls_ca, self.tls_verify_peer)
            except (OSError, ValueError) as error:
                raise ConfigError(f"cannot load the TLS certificate, key or CA: {error}") from None
        return ServerPolicy(
            handshake_timeout=float(self.handshake_timeout),
            max_option_length=self.max_option_length,
            max_connections=self.max_connections,
            max_connections_per_peer=self.max_connections_per_peer,
            max_in_flight=self.max_in_flight,
            allow=tuple(ipaddress.ip_network(cidr, strict=False) for cidr in self.allow),
            socket_mode=self.socket_mode,
            socket_gid=_group_id(self.socket_group),
            tls=TlsMode(self.tls),
            tls_context=context,
        )

    @property
    def listen_addresses(self) -> list[ListenAddress]:
        return [ListenAddress.parse(url) for url in self.listen]
