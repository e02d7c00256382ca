"""Real Redis servers for the tests: a standalone server and a 3-master Cluster on loopback.

Every server runs in the foreground as a child of the test, on a free port (never 6379),
with AOF on and RDB snapshots off, in a directory of the test's own; ``stop`` ends it.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"


#: Cluster nodes also listen on PORT + 10000, so ports stay below 55536.
PORT_RANGE = (20000, 55535)


def free_port() -> int:
    """A loopback port that is free, and whose cluster bus port (+10000) is free too."""
    while True:
        port = random.randrange(*PORT_RANGE)
        if _is_free(port) and _is_free(port + 10000):
            return port


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cli(port: int, *args: str, check: bool = True) -> str:
    """``redis-cli -p PORT ARGS...``; its output without the trailing newline."""
    result = subprocess.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
                            capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"redis-cli {' '.join(args)} failed: {result.stderr}")
    return result.stdout.rstrip("\n")


class RedisServer:
    """One ``redis-server`` process; restartable on the same port and data (AOF)."""

    def __init__(self, workdir: Path, extra: tuple[str, ...] = ()) -> None:
        if shutil.which(REDIS_SERVER) is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = extra
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                   # appendfsync always: with everysec, Redis may hold the AOF write
                   # back for up to 2 s while an fsync is slow, and a SIGKILL then loses
                   # writes it had acknowledged (seen under load in the outage tests).
                   "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir),
                   "--maxmemory-policy", "noeviction", "--daemonize", "no",
                   "--logfile", str(self.workdir / "redis.log"), *self.extra]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until_ready()
        return self

    def _wait_until_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log()}")
            if cli(self.port, "PING", check=False) == "PONG":
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server did not answer on port {self.port}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGKILL: a crash; AOF keeps what it acknowledged)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        self.process = None

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def cli(self, *args: str) -> str:
        return cli(self.port, *args)

    def keys(self, pattern: str = "*") -> list[str]:
        output = cli(self.port, "--scan", "--pattern", pattern)
        return output.split("\n") if output else []

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


class RedisClusterNodes:
    """Three masters, no replicas, slots spread by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path) -> None:
        cluster_options = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                           "--cluster-node-timeout", "2000")
        self.nodes = [RedisServer(workdir / f"node{index}", cluster_options) for index in range(3)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisClusterNodes:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run([REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                            "--cluster-yes"], check=True, capture_output=True, timeout=60)
            self._wait_until_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ok(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in node.cli("CLUSTER", "INFO") for node in self.nodes):
                return
            time.sleep(0.1)
        raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")

    def keys(self, pattern: str = "*") -> list[str]:
        return [key for node in self.nodes for key in node.keys(pattern)]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinelNode(RedisServer):
    """A Sentinel (``redis-server --sentinel``) watching one master as ``service``."""

    def __init__(self, workdir: Path, master: RedisServer, service: str = "swapmaster") -> None:
        super().__init__(workdir)
        self.master, self.service = master, service

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def start(self) -> RedisSentinelNode:
        config = self.workdir / "sentinel.conf"  # Sentinel rewrites its file: one of its own
        config.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                          f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n")
        self.process = subprocess.Popen([REDIS_SERVER, str(config), "--sentinel"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until_ready()
        return self
