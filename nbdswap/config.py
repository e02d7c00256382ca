"""Configuration: a TOML file and command-line flags merged into one validated object."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .server import ListenAddress

DEFAULT_LISTEN = "tcp://127.0.0.1:10809"
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(ValueError):
    """A setting is missing, malformed or contradicts another."""


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
        if self.ram_max + self.disk_max == 0:
            raise ConfigError("at least one tier needs space (--ram-max or --disk-max)")
        if self.metrics is not None:
            parse_host_port(self.metrics)

    @property
    def listen_addresses(self) -> list[ListenAddress]:
        return [ListenAddress.parse(url) for url in self.listen]
