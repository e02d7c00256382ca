"""Run a real ``nbdswap serve`` process and real NBD clients against it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from nbdswap.admin import socket_path

#: The Debian clients are scripts of the system Python (python3-libnbd), not of
#: the test venv: put the system directories first when running them.
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


def nbdswap_command() -> list[str]:
    return [sys.executable, "-m", "nbdswap.cli"]


class ServerProcess:
    """An ``nbdswap serve`` on a Unix socket in ``workdir``; restartable on its state dir."""

    def __init__(self, workdir: Path, size: str = "256M", ram_max: str = "16M",
                 disk_max: str = "512M", extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.socket = workdir / "nbd.sock"
        self.size, self.ram_max, self.disk_max, self.extra = size, ram_max, disk_max, extra
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / "server.log"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///swap?socket={self.socket}"

    def start(self) -> ServerProcess:
        self.socket.unlink(missing_ok=True)
        command = nbdswap_command() + [
            "serve", "--listen", f"unix://{self.socket}", "--size", self.size,
            "--state-dir", str(self.state_dir), "--ram-max", self.ram_max,
            "--disk-max", self.disk_max, *self.extra]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        # The server binds its admin socket (status, drain) after every --listen address,
        # so this waits for all of them; after a SIGKILL the old file is still there and
        # refuses connections until the new server binds it.
        wait_for_unix_socket(socket_path(self.state_dir), self.process, self.log_path)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Stop the server (SIGTERM: graceful; SIGKILL: a crash) and return its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def cleanup(self) -> None:
        """Stop the server however it goes and remove its shared-memory arena."""
        try:
            self.stop(timeout=30)
        except subprocess.TimeoutExpired:
            self.stop(signal.SIGKILL)
        remove_ram_arena(self.state_dir)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def status(self) -> dict:
        out = subprocess.run(nbdswap_command() + ["status", "--state-dir", str(self.state_dir), "--json"],
                             check=True, capture_output=True, timeout=30)
        return json.loads(out.stdout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def tls_flags(pki: Path, mode: str, verify_peer: bool = False) -> tuple[str, ...]:
    """``serve`` flags for TLS ``mode`` with the certificates of the ``pki`` fixture."""
    flags = ("--tls", mode, "--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem"))
    if verify_peer:
        flags += ("--tls-ca", str(pki / "ca-cert.pem"), "--tls-verify-peer")
    return flags


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_unix_socket(path: Path, process: subprocess.Popen, log_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise TimeoutError(f"server did not listen on {path}:\n{log_path.read_text()}")


def run_client(args: list[str], timeout: float = 300, check: bool = True,
               input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a Debian NBD client (nbdinfo, nbdsh, nbdcopy, qemu-io, fio)."""
    env = {**os.environ, "PATH": f"{SYSTEM_PATH}:{os.environ.get('PATH', '')}"}
    result = subprocess.run(args, capture_output=True, timeout=timeout, env=env, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n"
                             f"{result.stdout.decode(errors='replace')}\n{result.stderr.decode(errors='replace')}")
    return result


def nbdsh(uri: str, script: str, timeout: float = 300) -> str:
    """Run ``script`` in nbdsh connected to ``uri`` as ``h`` (strict checks off so the
    server, not libnbd, judges bad requests); return its stdout."""
    prologue = "h.set_strict_mode(0)\n"
    body = prologue + textwrap.dedent(script)
    result = run_client(["nbdsh", "--base-allocation", "-u", uri, "-c", body], timeout=timeout)
    return result.stdout.decode()


def mixed_data(size: int, seed: int = 1) -> bytes:
    """Swap-like content: zero, same-filled, text-like and random 4 KiB pages."""
    import random
    rng = random.Random(seed)
    pages = []
    words = [b"swap", b"page", b"kernel", b"memory", b"block", b"nbd", b"tier", b"cold"]
    for index in range(size // 4096):
        kind = index % 5
        if kind == 0:
            pages.append(bytes(4096))
        elif kind == 1:
            pages.append(bytes([rng.randrange(256)]) * 4096)
        elif kind in (2, 3):
            text = b" ".join(rng.choice(words) for _ in range(900))
            pages.append((text + bytes(4096))[:4096])
        else:
            pages.append(rng.randbytes(4096))
    return b"".join(pages)


def remove_ram_arena(state_dir: Path) -> None:
    """Tests leave nothing behind in /dev/shm."""
    from nbdswap.tiers.ram import arena_path
    arena_path(state_dir).unlink(missing_ok=True)


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def wait_for_log(server: ServerProcess, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{server.log()[-3000:]}")


def wait_for_connections(server: ServerProcess, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while server.status()["connections"] > count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.status()["connections"] == count
