"""Hostile and broken input against a live server: garbage connections beside a verified
client, the limits and their log lines, access control, broken state directories, and
the hardened systemd units."""

from __future__ import annotations

import asyncio
import grp
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from nbdutil import (SYSTEM_PATH, ServerProcess, free_port, nbdsh, nbdswap_command, remove_ram_arena,
                     wait_for_connections, wait_for_log)

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
MiB = 1 << 20
DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "systemd"


def option(code: int, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data) if length is None else length) + data


def go(name: bytes = b"swap") -> bytes:
    return option(7, struct.pack(">I", len(name)) + name + b"\x00\x00")


def request(command: int, offset: int, length: int, cookie: int = 1) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, cookie, offset, length)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def closed_without_greeting(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(18) == b""
    except ConnectionResetError:
        return True


# --- hundreds of hostile connections beside a verified client -------------------------------


GOOD_CLIENT = """
import os, random
rng = random.Random(11)
written = {}
rounds = 0
while not os.path.exists(STOP) or rounds < 20:
    block = rng.randrange(0, 4096)
    data = rng.randbytes(16384) + bytes(16384) + (b"swap page " * 3277)[:32768]
    h.pwrite(data, block * 65536)
    written[block] = data
    assert h.pread(len(data), block * 65536) == data, block
    check = rng.choice(list(written))
    assert h.pread(65536, check * 65536) == written[check], check
    h.flush()
    rounds += 1
for block, data in written.items():
    assert h.pread(65536, block * 65536) == data, block
print(rounds)
"""


async def _hold(reader: asyncio.StreamReader, seconds: float) -> None:
    """Read (and drop) whatever the server says until it closes or time is up."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except (TimeoutError, OSError):
        pass


async def _handshake(reader, writer) -> None:
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 3) + go())
    await writer.drain()
    while True:  # option replies up to GO's ACK
        magic, code, kind, length = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(length)
        if kind == 1:
            return


async def attacker(path: str, kind: int, rng: random.Random) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        if kind == 0:  # garbage from the first byte
            writer.write(rng.randbytes(rng.randrange(1, 65536)))
        elif kind == 1:  # truncated frames, then gone
            writer.write(struct.pack(">I", 3) + option(3)[:rng.randrange(1, 16)])
        elif kind == 2:  # options declaring up to 4 GiB
            length = rng.choice([0xFFFFFFFF, 1 << 31, rng.randrange(65537, 0xFFFFFFFF)])
            writer.write(struct.pack(">I", 3) + option(rng.choice([3, 6, 7, 99]), length=length)
                         + rng.randbytes(rng.randrange(0, 262144)))
        elif kind == 3:  # writes declaring up to 2 GiB
            await _handshake(reader, writer)
            length = rng.choice([1 << 31, (1 << 31) - 512, rng.randrange(32 * MiB + 512, 1 << 31, 512)])
            writer.write(request(1, 0, length) + bytes(rng.randrange(0, 1 << 20)))
        elif kind == 4:  # half-open handshake: the deadline must close it
            await reader.readexactly(18)
            writer.write(struct.pack(">I", 3)[:rng.randrange(0, 5)])
        elif kind == 5:  # a 32 MiB write that never completes
            await _handshake(reader, writer)
            writer.write(request(1, 0, 32 * MiB) + bytes(rng.randrange(0, 2 * MiB)))
        elif kind == 6:  # reads it never collects
            await _handshake(reader, writer)
            writer.write(b"".join(request(0, i * MiB, MiB, i) for i in range(64)))
            await writer.drain()
            await asyncio.sleep(1)
        else:  # a bad request magic after the handshake
            await _handshake(reader, writer)
            writer.write(b"\xde\xad\xbe\xef" * 7)
        await writer.drain()
        await _hold(reader, 4)
    except (OSError, asyncio.IncompleteReadError):
        pass  # the server hung up on it, as it should
    finally:
        writer.close()


async def attack(path: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    await asyncio.gather(*(attacker(path, index % 8, random.Random(rng.random())) for index in range(count)))


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05) and Path(f"/proc/{self.pid}").exists():
            self.peak = max(self.peak, rss_bytes(self.pid))


def test_hundreds_of_hostile_connections_beside_a_verified_client(server_factory, tmp_path, monkeypatch):
    # glibc raises its mmap threshold after freeing large buffers and then keeps freed
    # memory in the heap; a fixed threshold makes RSS after an attack show live memory.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    server = server_factory("hostile", size="512M", ram_max="64M", disk_max="512M", extra=(
        "--handshake-timeout", "2", "--max-in-flight", "2M",
        "--max-connections", "2000", "--max-connections-per-peer", "2000"))
    stop = tmp_path / "stop"
    good = subprocess.Popen(
        ["nbdsh", "-u", server.uri, "-c", f"STOP = {str(stop)!r}\n" + GOOD_CLIENT],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": SYSTEM_PATH})
    sampler = RssSampler(server.process.pid)
    try:
        time.sleep(1)
        baseline = rss_bytes(server.process.pid)
        sampler.start()
        after = []
        for seed in range(3):
            asyncio.run(attack(str(server.socket), 400, seed=seed))
            wait_for_connections(server, 1)  # the good client's
            after.append(rss_bytes(server.process.pid))
        stop.touch()
        out, err = good.communicate(timeout=120)
    finally:
        sampler.done.set()
        if good.poll() is None:
            good.kill()
            good.wait()
    assert good.returncode == 0, err.decode()
    assert int(out) >= 20
    assert server.process.poll() is None, server.log()[-3000:]
    print(f"RSS baseline {baseline >> 20} MiB, peak {sampler.peak >> 20} MiB, after each round "
          f"{[rss >> 20 for rss in after]} MiB; the good client did {int(out)} verified rounds")
    # 50 connections of each kind at once: half-received 32 MiB writes hold up to 2 MiB
    # each, uncollected reads up to --max-in-flight + one read each; declared lengths
    # (4 GiB options, 2 GiB writes) cost nothing.  Twice that, for copies, is the bound.
    assert sampler.peak - baseline < 640 * MiB
    assert max(after) - baseline < 96 * MiB  # what the attacks held was given back
    log = server.log()
    assert "Traceback" not in log
    for line in ("handshake not finished within 2 s", "above --max-option-length", "bad request magic",
                 "exceeds the maximum payload"):
        assert line in log, line
    wait_for_connections(server, 0)


# --- limits -----------------------------------------------------------------------------


def test_handshake_timeout_closes_a_silent_client(server_factory):
    server = server_factory("timeout", extra=("--handshake-timeout", "0.5"))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(server.socket))
        started = time.monotonic()
        assert sock.recv(18).startswith(b"NBDMAGIC")
        sock.settimeout(10)
        assert sock.recv(1) == b""
        assert 0.4 < time.monotonic() - started < 5
    wait_for_log(server, "handshake not finished within 0.5 s (--handshake-timeout): closing")
    nbdsh(server.uri, "assert h.get_size() > 0")  # a finished handshake is not timed out


def test_option_length_limit(server_factory):
    server = server_factory("optlen", extra=("--max-option-length", "1K"))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(server.socket))
        sock.recv(18)
        sock.sendall(struct.pack(">I", 3) + option(3, bytes(2048)) + option(3))
        sock.settimeout(5)
        replies = b""
        while replies.count(struct.pack(">Q", 0x3E889045565A9)) < 3:
            replies += sock.recv(4096)
        assert struct.unpack_from(">I", replies, 12)[0] == 0x80000009  # ERR_TOO_BIG
    wait_for_log(server, "option 3 declares 2048 bytes, above --max-option-length 1024")


def test_connection_limits_total_and_per_peer(server_factory):
    port = free_port()
    server = server_factory("conns", extra=(
        "--listen", f"tcp://127.0.0.1:{port}", "--max-connections", "3", "--max-connections-per-peer", "2"))
    open_sockets = []
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", port))
            open_sockets.append(sock)
            assert sock.recv(18).startswith(b"NBDMAGIC")
        with socket.create_connection(("127.0.0.1", port)) as third:
            assert closed_without_greeting(third)
        wait_for_log(server, "refused connection from 127.0.0.1: 2 connections open from it "
                             "(--max-connections-per-peer)")
        other = socket.socket()
        other.bind(("127.0.0.2", 0))
        other.connect(("127.0.0.1", port))
        open_sockets.append(other)
        assert other.recv(18).startswith(b"NBDMAGIC")
        with socket.socket(socket.AF_UNIX) as fourth:
            fourth.connect(str(server.socket))
            assert closed_without_greeting(fourth)
        wait_for_log(server, "3 connections open (--max-connections)")
    finally:
        for sock in open_sockets:
            sock.close()
    time.sleep(0.3)
    nbdsh(server.uri, "assert h.get_size() > 0")  # closed connections free their slots


def test_in_flight_budget_pauses_reading_and_logs_it(server_factory):
    server = server_factory("inflight", extra=("--max-in-flight", "256K"))
    nbdsh(server.uri, """
        import os
        blocks = [os.urandom(65536) for _ in range(64)]
        cookies = [h.aio_pwrite(b, i * 65536) for i, b in enumerate(blocks)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in cookies)
        for i, b in enumerate(blocks):
            assert h.pread(65536, i * 65536) == b
    """)
    wait_for_log(server, "above --max-in-flight 262144: reading paused until requests finish")


@pytest.mark.parametrize("flags,message", [
    (("--max-connections", "0"), "max-connections must be a positive integer"),
    (("--max-option-length", "100"), "max-option-length must be between"),
    (("--handshake-timeout", "-1"), "handshake-timeout must be a positive"),
    (("--allow", "10.0.0.0/33"), "is not an address or CIDR"),
    (("--socket-mode", "rw"), "is not octal"),
    (("--socket-group", "no-such-group-here"), "no group named"),
    (("--tls", "on"), "needs --tls-cert and --tls-key"),
    (("--tls-verify-peer",), "needs --tls-ca"),
])
def test_bad_limit_and_access_settings_are_refused_with_a_reason(tmp_path, flags, message):
    result = subprocess.run(nbdswap_command() + ["serve", "--state-dir", str(tmp_path / "state"),
                            "--size", "64M", *flags], capture_output=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert b"Traceback" not in result.stderr


# --- access control ----------------------------------------------------------------------


def test_unix_socket_mode_and_group(server_factory):
    server = server_factory("modes")
    assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(server.state_dir / "admin.sock").st_mode) == 0o600
    group = grp.getgrall()[-1]
    other = server_factory("group", extra=("--socket-mode", "0640", "--socket-group", group.gr_name))
    info = os.stat(other.socket)
    assert stat.S_IMODE(info.st_mode) == 0o640 and info.st_gid == group.gr_gid
    nbdsh(other.uri, "assert h.get_size() > 0")


def test_tcp_allowlist(server_factory):
    port, port6 = free_port(), free_port()
    server = server_factory("allow", extra=(
        "--listen", f"tcp://127.0.0.1:{port}", "--listen", f"tcp://[::1]:{port6}",
        "--allow", "127.0.0.0/30"))
    nbdsh(f"nbd://127.0.0.1:{port}/swap", "assert h.get_size() > 0")
    outsider = socket.socket()
    outsider.bind(("127.0.0.9", 0))
    outsider.connect(("127.0.0.1", port))
    with outsider, socket.create_connection(("::1", port6)) as v6:
        assert closed_without_greeting(outsider)
        assert closed_without_greeting(v6)
    log = wait_for_log(server, "refused connection from ::1: not in the --allow list")
    assert "refused connection from 127.0.0.9: not in the --allow list" in log
    nbdsh(server.uri, "assert h.get_size() > 0")  # Unix sockets are not subject to it


def test_default_listen_is_loopback():
    from nbdswap.config import ServeConfig
    assert ServeConfig.load(None, {"size": "1G"}).listen == ["tcp://127.0.0.1:10809"]


def test_metrics_endpoint_is_read_only(server_factory):
    port = free_port()
    server = server_factory("metrics", extra=("--metrics", f"127.0.0.1:{port}"))
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 10
    while True:
        try:
            assert b"nbdswap_" in urllib.request.urlopen(url, timeout=5).read()
            break
        except urllib.error.URLError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    for method in ("POST", "PUT", "DELETE"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=b"x", method=method), timeout=5)
        assert refused.value.code in (405, 501), method
    assert server.process.poll() is None


# --- broken state ------------------------------------------------------------------------


def serve_once(state_dir: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(nbdswap_command() + ["serve", "--state-dir", str(state_dir), "--size", "64M",
                          "--listen", f"unix://{tmp_path / 'once.sock'}", *extra],
                          capture_output=True, timeout=60)


def test_damaged_block_map_is_a_clear_start_error(server_factory, tmp_path):
    server = server_factory("damaged", size="64M")
    nbdsh(server.uri, "h.pwrite(b'd' * 4096, 0)")
    server.stop()
    remove_ram_arena(server.state_dir)
    (server.state_dir / "map.lmdb").write_bytes(os.urandom(64 * 1024))
    try:
        result = serve_once(server.state_dir, tmp_path)
    finally:
        remove_ram_arena(server.state_dir)
    assert result.returncode == 2, result.stderr.decode()
    assert b"damaged" in result.stderr and b"Traceback" not in result.stderr


def test_disk_tier_without_its_block_map_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "disk.dat").write_bytes(bytes(8192))
    result = serve_once(state, tmp_path)
    assert result.returncode == 2 and b"no block map" in result.stderr
    assert b"Traceback" not in result.stderr


def test_lost_ram_arena_after_a_reboot_reads_as_eio_never_as_zeros(server_factory):
    server = server_factory("reboot", size="64M", ram_max="16M", disk_max="0")  # RAM only
    nbdsh(server.uri, """
        import random
        h.pwrite(random.Random(4).randbytes(65536), 0)  # random: held by the RAM tier
        h.pwrite(b"s" * 4096, 65536)  # same-filled: held by the map alone
        h.flush()
    """)
    server.stop()
    remove_ram_arena(server.state_dir)  # what a reboot does to /dev/shm
    server.start()
    nbdsh(server.uri, """
        import errno
        assert h.pread(4096, 65536) == b"s" * 4096
        for offset in range(0, 65536, 4096):
            try:
                h.pread(4096, offset)
            except nbd.Error as error:
                assert error.errnum == errno.EIO
            else:
                raise AssertionError(f"block at {offset} read without error after losing its data")
        assert h.pread(4096, 1 << 20) == bytes(4096)  # never written: zeros
        h.pwrite(b"n" * 4096, 0)
        assert h.pread(4096, 0) == b"n" * 4096
    """)
    assert "blocks lost their data" in server.log()
    assert "Traceback" not in server.log()


def test_full_disk_gives_enospc_or_eio_per_request_and_keeps_acknowledged_data(small_tmpfs, tmp_path):
    workdir = small_tmpfs
    server = ServerProcess(workdir, size="64M", ram_max="0", disk_max="64M")
    server.socket = tmp_path / "full.sock"
    server.log_path = tmp_path / "full.log"
    try:
        server.start()
        out = nbdsh(server.uri, """
            import errno, random
            rng = random.Random(3)
            acknowledged, failed = {}, 0
            for block in range(2048):
                data = rng.randbytes(4096)
                try:
                    h.pwrite(data, block * 4096)
                except nbd.Error as error:
                    assert error.errnum in (errno.ENOSPC, errno.EIO), error
                    failed += 1
                else:
                    acknowledged[block] = data
            assert failed, "the 3 MiB file system never filled up"
            for block, data in acknowledged.items():
                assert h.pread(4096, block * 4096) == data, block
            print(len(acknowledged), failed)
        """, timeout=600)
        acknowledged, failed = map(int, out.split())
        print(f"3 MiB state dir: {acknowledged} writes acknowledged, {failed} refused")
        assert acknowledged > 100 and failed > 0
        assert server.process.poll() is None
        assert server.log().count("Traceback") == 0
    finally:
        server.cleanup()


# --- deployment hardening ------------------------------------------------------------------


HARDENING = ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
             "LimitMEMLOCK=infinity", "OOMScoreAdjust=-1000", "StateDirectory=")


@pytest.mark.parametrize("unit", ["nbdswap.service", "nbdswap@.service"])
def test_systemd_units_are_hardened_and_verify(unit, tmp_path):
    text = (DEPLOY / unit).read_text()
    for setting in HARDENING:
        assert setting in text, setting
    analyze = shutil.which("systemd-analyze", path=SYSTEM_PATH)
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at an executable that does.
    copy = tmp_path / unit.replace("@.", "@vm1.")
    copy.write_text(text.replace("/usr/local/bin/nbdswap", shutil.which("true", path=SYSTEM_PATH)))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, timeout=120)
    messages = [line for line in result.stderr.decode().splitlines() if copy.name in line]
    assert result.returncode == 0 and not messages, result.stderr.decode()
