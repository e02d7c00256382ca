"""`nbdswap attach` pieces that run without a kernel NBD device: the client
handshake against a real server, netlink message encoding, argument parsing.
(tests/test_vm_attach.py runs the whole thing in a guest kernel.)"""

import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from nbdswap import attach, netlink
from nbdswap.attach import device_index
from nbdswap.cli import build_parser
from nbdswap.nbdclient import HandshakeError, negotiate, open_connection
from nbdswap.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    HandshakeFlag,
    TransmissionFlag,
)
from nbdutil import nbdswap_command, wait_for_unix_socket

REPO = Path(__file__).resolve().parents[1]


class Retried(Exception):
    """Raised by the stubbed back-off: the dial loop chose to dial again."""


def stop_retrying() -> None:
    raise Retried


def stub_backoff(monkeypatch, on_retry) -> None:
    """Run ``on_retry()`` in place of the dial loop's back-off sleep: a test sees
    whether the loop retries, without waiting and without looping forever."""
    monkeypatch.setattr(attach, "time", SimpleNamespace(sleep=lambda _delay: on_retry()))


@pytest.fixture
def nbdkit_4k(tmp_path):
    """nbdkit advertising a minimum block size of 4096 (nbdswap's is 512)."""
    if shutil.which("nbdkit") is None:
        pytest.skip("needs nbdkit")
    path, log_path = tmp_path / "nbdkit.sock", tmp_path / "nbdkit.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(path),
             "--filter=blocksize-policy", "memory", "1M", "blocksize-minimum=4096"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_unix_socket(path, process, log_path)
        yield f"unix://{path}"
    finally:
        process.terminate()
        process.wait(30)


def test_handshake_against_a_live_server(server):
    with open_connection(f"unix://{server.socket}", timeout=10) as sock:
        export = negotiate(sock, "swap")
    assert export.size == 256 << 20
    assert export.transmission_flags & TransmissionFlag.SEND_TRIM
    assert export.transmission_flags & TransmissionFlag.SEND_FLUSH
    assert (export.minimum_block_size, export.preferred_block_size) == (512, 4096)


def test_handshake_for_an_unknown_export_says_so(server):
    with open_connection(f"unix://{server.socket}", timeout=10) as sock:
        with pytest.raises(HandshakeError, match="ERR_UNKNOWN"):
            negotiate(sock, "nope")


def test_handshake_with_something_that_is_not_nbd(tmp_path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "http.sock"))
    listener.listen()

    def answer():
        conn, _ = listener.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    with open_connection(f"unix://{tmp_path / 'http.sock'}", timeout=10) as sock:
        with pytest.raises(HandshakeError):
            negotiate(sock, "swap")
    listener.close()


def test_an_error_reply_this_client_does_not_know_is_still_a_refusal(tmp_path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "future.sock"))
    listener.listen()

    def refuse_with_a_newer_error() -> None:
        conn, _ = listener.accept()
        reader = conn.makefile("rb")
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE))
        _flags, _magic, option, length = struct.unpack(">IQII", reader.read(20))
        reader.read(length)
        conn.sendall(struct.pack(">QIII", OPTION_REPLY_MAGIC, option, (1 << 31) + 100, 0))
        reader.read(1)  # until the client hangs up
        conn.close()

    threading.Thread(target=refuse_with_a_newer_error, daemon=True).start()
    with open_connection(f"unix://{tmp_path / 'future.sock'}", timeout=10) as sock:
        with pytest.raises(HandshakeError, match="refused"):
            negotiate(sock, "swap")
    listener.close()


def test_first_dial_fails_at_once_on_an_unknown_export(server, monkeypatch):
    stub_backoff(monkeypatch, stop_retrying)
    options = attach.AttachOptions(server=f"unix://{server.socket}", index=0, export="nope")
    with pytest.raises(HandshakeError, match="ERR_UNKNOWN"):
        attach.dial_until_connected(options)


def test_first_dial_fails_at_once_on_a_block_size_the_server_does_not_take(nbdkit_4k, monkeypatch):
    stub_backoff(monkeypatch, stop_retrying)
    options = attach.AttachOptions(server=nbdkit_4k, index=0, block_size=512)
    with pytest.raises(HandshakeError, match="block size 512 .*minimum 4096"):
        attach.dial_until_connected(options)


def test_a_refused_first_dial_exits_with_the_status_the_unit_does_not_restart(server, monkeypatch, capsys):
    """run_attach turns a refusal into EXIT_REFUSED, the status the guest unit lists in
    RestartPreventExitStatus=, so that systemd does not retry a configuration error.
    (attach() itself needs the kernel's nbd netlink family: only its dial runs here.)"""
    stub_backoff(monkeypatch, stop_retrying)
    monkeypatch.setattr(attach, "use_reserved_heap", lambda: None)  # it re-executes the process
    monkeypatch.setattr(attach, "attach", attach.dial_until_connected)
    options = attach.AttachOptions(server=f"unix://{server.socket}", index=0, export="nope")
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert attach.run_attach(options) == attach.EXIT_REFUSED
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert "export 'nope' refused" in capsys.readouterr().err
    unit = (REPO / "deploy" / "guest" / "nbdswap-attach@.service").read_text()
    assert f"RestartPreventExitStatus={attach.EXIT_REFUSED}" in unit.splitlines()


def test_first_dial_waits_for_a_server_that_is_not_up_yet(server_factory, tmp_path, monkeypatch):
    started = []

    def start_the_server() -> None:
        if not started:
            started.append(server_factory("late"))

    stub_backoff(monkeypatch, start_the_server)
    options = attach.AttachOptions(server=f"unix://{tmp_path / 'late' / 'nbd.sock'}", index=0)
    sock, export = attach.dial_until_connected(options)
    sock.close()
    assert export.size == 256 << 20 and len(started) == 1


def test_redial_of_an_attached_device_retries_even_a_refusal(server, monkeypatch):
    stub_backoff(monkeypatch, stop_retrying)
    options = attach.AttachOptions(server=f"unix://{server.socket}", index=0, export="nope")
    with pytest.raises(Retried):
        attach.redial_until_connected(options)


def test_socket_list_encodes_nested_items():
    encoded = netlink._sockets([5, 9])
    ((kind, payload),) = netlink.iter_attributes(encoded)
    assert kind == netlink.NBD_ATTR_SOCKETS
    items = [netlink.parse_attributes(item) for _, item in netlink.iter_attributes(payload)]
    assert [struct.unpack("=I", item[netlink.NBD_SOCK_FD])[0] for item in items] == [5, 9]


def test_attributes_are_padded_to_four_bytes():
    encoded = netlink.string(netlink.NBD_ATTR_BACKEND_IDENTIFIER, "abcde") + netlink.u64(2, 7)
    assert len(encoded) % 4 == 0
    parsed = netlink.parse_attributes(encoded)
    assert parsed[netlink.NBD_ATTR_BACKEND_IDENTIFIER] == b"abcde\0"
    assert struct.unpack("=Q", parsed[2]) == (7,)


@pytest.mark.parametrize("device,index", [("/dev/nbd0", 0), ("nbd12", 12), ("3", 3)])
def test_device_names(device, index):
    assert device_index(device) == index


def test_bad_device_name_is_a_clear_error():
    result = subprocess.run(nbdswap_command() + ["attach", "127.0.0.1", "/dev/sda"],
                            capture_output=True, timeout=30)
    assert result.returncode == 2 and b"not an NBD device" in result.stderr


ATTACH = ["attach", "tcp://127.0.0.1", "/dev/nbd0"]
#: Seconds: 2**32 - 1 jiffies at HZ 1000.
LONGEST_TIMEOUT = 4294967


@pytest.mark.parametrize("option,value,message", [
    pytest.param("-C", "0", "argument -C/--connections: must be at least 1 (got 0)", id="-C 0"),
    pytest.param("-t", "0", f"argument -t/--timeout: must be from 1 to {LONGEST_TIMEOUT} seconds (got 0)",
                 id="-t 0"),
    pytest.param("-t", str(LONGEST_TIMEOUT + 1), f"(got {LONGEST_TIMEOUT + 1})", id="-t too long"),
    pytest.param("-b", "1000", "argument -b/--block-size: must be 512, 1024, 2048 or 4096 (got 1000)",
                 id="-b 1000"),
    pytest.param("-b", "256", "must be 512, 1024, 2048 or 4096 (got 256)", id="-b 256"),
    pytest.param("-b", "8192", "must be 512, 1024, 2048 or 4096 (got 8192)", id="-b 8192"),
    pytest.param("--dead-conn-timeout", "-1",
                 "argument --dead-conn-timeout: must be at least 0 seconds (got -1)", id="--dead-conn-timeout -1"),
])
def test_the_parser_refuses_attach_options_out_of_range(option, value, message, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*ATTACH, option, value])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_parser_takes_attach_options_at_their_limits():
    low = build_parser().parse_args([*ATTACH, "-C", "1", "-t", "1", "-b", "512", "--dead-conn-timeout", "0"])
    high = build_parser().parse_args([*ATTACH, "-t", str(LONGEST_TIMEOUT), "-b", "4096"])
    assert (low.connections, low.timeout, low.block_size, low.dead_conn_timeout) == (1, 1, 512, 0)
    assert (high.timeout, high.block_size) == (LONGEST_TIMEOUT, 4096)


@pytest.mark.skipif(os.path.exists("/sys/module/nbd"), reason="would attach a real device here")
def test_without_the_nbd_module_attach_fails_cleanly(server):
    result = subprocess.run(nbdswap_command() + ["attach", f"unix://{server.socket}", "/dev/nbd0"],
                            capture_output=True, timeout=30)
    assert result.returncode == 1
    assert b"no nbd netlink family" in result.stderr and b"Traceback" not in result.stderr
