"""The command line: listening addresses, config file, clear start-up errors, SIGTERM."""

import json
import signal
import socket
import subprocess
import time

import pytest

from nbdswap import admin
from nbdswap.config import ConfigError, ServeConfig, parse_size
from nbdutil import free_port, nbdsh, nbdswap_command, remove_ram_arena, tls_flags


def serve(tmp_path, *args, wait_for: str | None = "serving"):
    """Start ``nbdswap serve`` and wait until it prints ``wait_for``."""
    process = subprocess.Popen(nbdswap_command() + ["serve", "--state-dir", str(tmp_path / "state"), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    if wait_for:
        for line in process.stdout:
            lines.append(line.decode())
            if wait_for in lines[-1]:
                break
    return process, lines


def stop(process) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(30)


@pytest.fixture(autouse=True)
def no_arena_left_behind(tmp_path):
    yield
    remove_ram_arena(tmp_path / "state")


@pytest.mark.parametrize("value,expected", [("4096", 4096), ("512M", 512 << 20), ("4G", 4 << 30),
                                            ("1t", 1 << 40), ("64KiB", 64 << 10)])
def test_sizes(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("overrides", [{"size": "1000"}, {"size": "4G", "ram_max": "lots"},
                                       {"size": "4G", "listen": ["http://x"]},
                                       {"size": "4G", "ram_max": "0", "disk_max": "0"}])
def test_bad_settings_are_refused_with_a_reason(overrides):
    with pytest.raises(ConfigError):
        ServeConfig.load(None, overrides)


def test_config_file_with_flag_overrides(tmp_path):
    path = tmp_path / "nbdswap.toml"
    path.write_text('size = "1G"\nram-max = "64M"\nlisten = "unix:///tmp/x.sock"\nexport = "vm1"\n')
    config = ServeConfig.load(path, {"export": "vm2", "disk_max": None})
    assert (config.size, config.ram_max, config.export) == (1 << 30, 64 << 20, "vm2")
    assert config.listen == ["unix:///tmp/x.sock"]
    path.write_text('sise = "1G"\n')
    with pytest.raises(ConfigError, match="sise"):
        ServeConfig.load(path, {})


def test_tcp_ipv4_and_ipv6_and_unix_at_once(tmp_path):
    port4, port6 = free_port(), free_port()
    sock = tmp_path / "s.sock"
    process, lines = serve(tmp_path, "--size", "64M", "--ram-max", "8M", "--disk-max", "64M",
                           "--listen", f"tcp://127.0.0.1:{port4}", "--listen", f"tcp://[::1]:{port6}",
                           "--listen", f"unix://{sock}", wait_for=f"unix://{sock}")
    try:
        assert any(f"tcp://127.0.0.1:{port4}" in line for line in lines)
        nbdsh(f"nbd://127.0.0.1:{port4}/swap", "h.pwrite(b'4' * 4096, 0)")
        nbdsh(f"nbd://[::1]:{port6}/swap", "assert h.pread(4096, 0) == b'4' * 4096")
        nbdsh(f"nbd+unix:///swap?socket={sock}", "assert h.pread(4096, 0) == b'4' * 4096")
    finally:
        assert stop(process) == 0
    assert not sock.exists()


def test_second_server_on_the_same_state_dir_is_refused(tmp_path):
    sock = tmp_path / "a.sock"
    first, _ = serve(tmp_path, "--size", "64M", "--listen", f"unix://{sock}")
    try:
        second = subprocess.run(nbdswap_command() + ["serve", "--state-dir", str(tmp_path / "state"),
                                "--size", "64M", "--listen", f"unix://{tmp_path / 'b.sock'}"],
                                capture_output=True, timeout=30)
        assert second.returncode == 2
        assert b"another nbdswap server" in second.stderr
    finally:
        assert stop(first) == 0


def test_foreign_state_dir_is_refused(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "thesis.tex").write_text("not ours")
    result = subprocess.run(nbdswap_command() + ["serve", "--state-dir", str(tmp_path / "state"),
                            "--size", "64M", "--listen", f"unix://{tmp_path / 's.sock'}"],
                            capture_output=True, timeout=30)
    assert result.returncode == 2
    assert b"not an nbdswap state directory" in result.stderr
    assert b"Traceback" not in result.stderr


def test_status_without_a_server_says_so(tmp_path):
    result = subprocess.run(nbdswap_command() + ["status", "--state-dir", str(tmp_path)],
                            capture_output=True, timeout=30)
    assert result.returncode == 2 and b"no nbdswap server answers" in result.stderr


def wait_for_writes(state_dir, timeout: float = 30) -> int:
    """Wait until the server has done a write; return how many it has done."""
    deadline = time.monotonic() + timeout
    while not (done := admin.request(state_dir, "status")["requests"]["write"]):
        assert time.monotonic() < deadline, "the server did no write"
        time.sleep(0.01)
    return done


CHUNK_SCRIPT = "import random\ndef chunk(i): return random.Random(i).randbytes(SIZE // 2) * 2\n"

WRITER_SCRIPT = CHUNK_SCRIPT + """
import json
cookies = [h.aio_pwrite(chunk(i), i * SIZE) for i in range(512)]
print("queued", flush=True)
try:
    while h.aio_in_flight() > 0:
        h.poll(-1)
except nbd.Error:
    pass
answers = {}
for i, cookie in enumerate(cookies):
    try:
        if h.aio_command_completed(cookie):
            answers[i] = "ok"
    except nbd.Error as error:
        answers[i] = errno.errorcode.get(error.errno, str(error.errno))
print(json.dumps(answers))
"""


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
@pytest.mark.parametrize("size,budget", [(65536, "64M"), (4096, "4K")],
                         ids=["everything-in-flight", "requests-deferred"])
def test_sigterm_finishes_in_flight_writes_then_exits(request, tmp_path, size, budget, tls):
    """Every write the server read before SIGTERM is finished and acknowledged, those
    waiting for the in-flight budget too; one it refuses after is answered ESHUTDOWN and,
    like one it never read (the client reports ENOTCONN once the connection closes),
    leaves no trace.  After its last reply the server half-closes (plaintext) or sends
    TLS close_notify, and reads until the client closes, so the client reads every
    reply before it sees the end: a write done is never reported as ENOTCONN."""
    sock = tmp_path / "s.sock"
    uri = f"nbd+unix:///swap?socket={sock}"
    options = ("--size", "64M", "--ram-max", "8M", "--disk-max", "64M", "--max-in-flight", budget,
               "--listen", f"unix://{sock}")
    writer_uri, connect = uri, []
    if tls:
        pki = request.getfixturevalue("pki")
        options += tls_flags(pki, "on")
        writer_uri = f"nbds+unix:///swap?socket={sock}&tls-certificates={pki / 'anonymous'}"
        connect = ["-c", "h.set_uri_allow_local_file(True)"]
    process, _ = serve(tmp_path, *options)
    writer = subprocess.Popen(["nbdsh", *connect, "-u", writer_uri, "-c", f"import errno\nSIZE = {size}",
                               "-c", WRITER_SCRIPT],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
    assert writer.stdout.readline().strip() == b"queued"
    done = wait_for_writes(tmp_path / "state")  # over TLS, libnbd sends only once it polls
    assert stop(process) == 0
    went_over_budget = b"above --max-in-flight" in process.stdout.read()
    assert went_over_budget == (budget == "4K"), "the deferred case must defer, the other not"
    out, err = writer.communicate(timeout=60)
    answers = {int(i): answer for i, answer in json.loads(out).items()}
    acknowledged = sorted(i for i, answer in answers.items() if answer == "ok")
    assert len(acknowledged) >= done, (f"{done} writes done before SIGTERM, only {len(acknowledged)} "
                                       f"acknowledged: replies lost\n{err.decode()}")
    assert set(answers.values()) <= {"ok", "ESHUTDOWN", "ENOTCONN"}, answers
    assert all(i > acknowledged[-1] for i, answer in answers.items() if answer != "ok")
    process, _ = serve(tmp_path, *options)
    try:
        nbdsh(uri, f"SIZE = {size}\n" + CHUNK_SCRIPT + f"""
answers = {answers!r}
for i in range(512):
    got = h.pread(SIZE, i * SIZE)
    if answers.get(i) == "ok":
        damaged = [page for page in range(SIZE // 4096)
                   if got[page * 4096:(page + 1) * 4096] != chunk(i)[page * 4096:(page + 1) * 4096]]
        assert not damaged, f"acknowledged chunk {{i}}: pages {{damaged}} lost or damaged"
    else:
        assert got == bytes(SIZE), f"chunk {{i}} answered {{answers.get(i)}} was written"
""")
    finally:
        assert stop(process) == 0


def test_sigterm_ends_the_linger_of_a_client_that_never_closes(tmp_path):
    """After its last reply the server half-closes and waits for the client to close;
    one that never does is cut off after ``shutdown_linger``, and the server exits."""
    sock = tmp_path / "s.sock"
    process, _ = serve(tmp_path, "--size", "64M", "--listen", f"unix://{sock}")
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sock))
        assert client.recv(18).startswith(b"NBDMAGIC")
        assert stop(process) == 0
        client.settimeout(30)
        assert client.recv(1) == b""
