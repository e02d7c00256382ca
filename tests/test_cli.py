"""The command line: listening addresses, config file, clear start-up errors, SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
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


def refused(tmp_path, *args) -> str:
    """``nbdswap serve`` that must refuse to start: its one-line error (exit 2), the last
    line of its output (start-up log lines may come before it)."""
    result = subprocess.run(nbdswap_command() + ["serve", "--size", "64M",
                            "--listen", f"unix://{tmp_path / 's.sock'}", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "serving" not in result.stdout, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("nbdswap: "), result.stderr
    return last


def test_foreign_state_dir_is_refused(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "thesis.tex").write_text("not ours")
    assert "not an nbdswap state directory" in refused(tmp_path, "--state-dir", str(tmp_path / "state"))


def test_a_state_dir_that_cannot_be_made_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("a file, not a directory")
    assert "File exists" in refused(tmp_path, "--state-dir", str(tmp_path / "file"))
    assert "Not a directory" in refused(tmp_path, "--state-dir", str(tmp_path / "file" / "state"))


def test_a_busy_metrics_port_is_a_start_up_error_before_any_listener(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = refused(tmp_path, "--state-dir", str(tmp_path / "state"), "--metrics", f"127.0.0.1:{port}")
    assert f"cannot serve metrics on 127.0.0.1:{port}" in line
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize("setting,key", [
    ("listen = 5", "listen"), ("size = 64.5", "size"), ('policy = "x"', "policy"),
    ("export = 5", "export"), ("max-connections = true", "max-connections"),
    ('allow = ["10.0.0.0/8", 7]', "allow"), ("tls-verify-peer = 1", "tls-verify-peer"),
])
def test_config_values_of_the_wrong_type_name_their_key(tmp_path, setting, key):
    config = tmp_path / "nbdswap.toml"
    config.write_text(setting + "\n")
    line = refused(tmp_path, "--state-dir", str(tmp_path / "state"), "--config", str(config))
    assert f"{config}: {key} must be" in line


def test_log_level_from_a_config_file_is_one_of_the_flag_choices(tmp_path):
    config = tmp_path / "nbdswap.toml"
    config.write_text('log-level = "verbose"\n')
    assert "log-level must be one of debug, info, warning, error" in refused(
        tmp_path, "--state-dir", str(tmp_path / "state"), "--config", str(config))


def test_every_setting_has_a_config_file_type():
    from dataclasses import fields

    from nbdswap.config import FILE_TYPES

    assert set(FILE_TYPES) == {field.name for field in fields(ServeConfig)}


def test_systemd_is_told_ready_once_the_sockets_accept_and_stopping_on_sigterm(tmp_path):
    sock = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(60)
        process = subprocess.Popen(
            nbdswap_command() + ["serve", "--state-dir", str(tmp_path / "state"), "--size", "64M",
                                 "--listen", f"unix://{sock}"],
            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert notify.recv(4096) == b"READY=1"
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(sock))
                assert client.recv(8) == b"NBDMAGIC"
            assert subprocess.run(nbdswap_command() + ["status", "--state-dir", str(tmp_path / "state"),
                                  "--json"], capture_output=True, timeout=30).returncode == 0
            process.send_signal(signal.SIGTERM)
            assert notify.recv(4096) == b"STOPPING=1"
        finally:
            assert stop(process) == 0


def test_a_refused_admin_command_is_one_log_line_not_a_traceback(tmp_path):
    process, _ = serve(tmp_path, "--size", "64M", "--ram-max", "8M", "--disk-max", "0",
                       "--listen", f"unix://{tmp_path / 's.sock'}")
    try:
        for command in (["policy", "set", "bogus", "1"], ["drain", "remote"]):
            result = subprocess.run(nbdswap_command() + [*command, "--state-dir", str(tmp_path / "state")],
                                    capture_output=True, text=True, timeout=30)
            assert result.returncode == 2 and result.stderr.startswith("nbdswap: "), result.stderr
    finally:
        assert stop(process) == 0
    log = process.stdout.read().decode()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert log.count("refused") == 2, log


def test_output_to_a_closed_pipe_is_no_traceback(tmp_path):
    """``nbdswap status | head``: the reader goes away before the output is written."""
    process, _ = serve(tmp_path, "--size", "64M", "--ram-max", "8M", "--disk-max", "0",
                       "--listen", f"unix://{tmp_path / 's.sock'}")
    try:
        for command in (["status", "--json"], ["status", "--interval", "0"], ["policy", "show"]):
            read_end, write_end = os.pipe()
            os.close(read_end)
            with os.fdopen(write_end, "wb") as closed_pipe:
                result = subprocess.run(nbdswap_command() + [*command, "--state-dir", str(tmp_path / "state")],
                                        stdout=closed_pipe, stderr=subprocess.PIPE, text=True, timeout=30)
            assert result.returncode == 1 and result.stderr == "", (command, result.stderr)
    finally:
        assert stop(process) == 0


def test_wipe_gives_a_stopped_devices_memory_and_files_back(tmp_path):
    from nbdswap.tiers.ram import arena_path

    state = tmp_path / "state"
    sock = tmp_path / "s.sock"
    args = ("--size", "64M", "--ram-max", "8M", "--disk-max", "64M", "--listen", f"unix://{sock}")
    wipe = nbdswap_command() + ["wipe", "--state-dir", str(state)]
    process, _ = serve(tmp_path, *args)
    try:
        nbdsh(f"nbd+unix:///swap?socket={sock}", "h.pwrite(b'w' * 8192, 0)")
        busy = subprocess.run(wipe, capture_output=True, text=True, timeout=30)
        assert busy.returncode == 2 and "another nbdswap server" in busy.stderr
    finally:
        assert stop(process) == 0
    assert arena_path(state).exists() and (state / "disk.dat").exists()
    (state / "notes.txt").write_text("the operator's")
    subprocess.run(wipe, check=True, capture_output=True, timeout=30)
    assert not arena_path(state).exists()
    assert [entry.name for entry in state.iterdir()] == ["notes.txt"]
    (state / "notes.txt").unlink()
    process, _ = serve(tmp_path, *args)
    try:
        nbdsh(f"nbd+unix:///swap?socket={sock}", "assert h.pread(8192, 0) == bytes(8192)")
    finally:
        assert stop(process) == 0
    subprocess.run(wipe, check=True, capture_output=True, timeout=30)
    assert not state.exists() and not arena_path(state).exists()


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


def test_a_server_without_a_remote_tier_does_not_load_redis(tmp_path):
    """redis-py costs a server about 6 MiB of memory; only a configured remote tier imports it."""
    check = ("import asyncio, sys, nbdswap.cli, nbdswap.server, nbdswap.device, nbdswap.policy, "
             "nbdswap.metrics, nbdswap.admin\n"
             "from nbdswap.store import Store\n"
             "store = Store.open(sys.argv[1], size=1 << 20, ram_max=0, disk_max=1 << 20)\n"
             "asyncio.run(store.close())\n"
             "assert 'redis' not in sys.modules, 'redis imported'")
    subprocess.run([sys.executable, "-c", check, str(tmp_path / "state")], check=True, timeout=60)
