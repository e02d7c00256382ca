"""NBD_OPT_STARTTLS with X.509 certificates, checked with libnbd (nbdinfo, nbdsh), QEMU
(qemu-img, qemu-io with tls-creds-x509) and a raw socket for the spec's corner cases."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import struct
import textwrap
from pathlib import Path

import pytest

from nbdutil import run_client, tls_flags, wait_for_connections, wait_for_log

IHAVEOPT = 0x49484156454F5054
ERR_INVALID = 0x80000003
ERR_TLS_REQD = 0x80000005

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def tls_uri(server, certificates: Path) -> str:
    return f"nbds+unix:///swap?socket={server.socket}&tls-certificates={certificates}"


def nbdsh(uri: str, script: str) -> None:
    """Run ``script`` in nbdsh connected to ``uri``, which names a certificates dir."""
    prologue = f"h.set_uri_allow_local_file(True)\nh.connect_uri({uri!r})\n"
    run_client(["nbdsh", "-c", prologue + textwrap.dedent(script)])


def test_tls_on_serves_both_tls_and_plaintext_clients(server_factory, pki):
    server = server_factory("on", extra=tls_flags(pki, "on"))
    secure = json.loads(run_client(["nbdinfo", "--json", tls_uri(server, pki / "anonymous")]).stdout)
    assert secure["TLS"] is True and secure["exports"][0]["export-size"] == 256 << 20
    plain = json.loads(run_client(["nbdinfo", "--json", server.uri]).stdout)
    assert plain["TLS"] is False
    assert "TLS established (TLSv1.3" in server.log()


def test_tls_require_refuses_plaintext_and_serves_verified_io(server_factory, pki):
    server = server_factory("require", extra=tls_flags(pki, "require"))
    refused = run_client(["nbdinfo", server.uri], check=False)
    assert refused.returncode != 0
    nbdsh(tls_uri(server, pki / "anonymous"), """
        import os
        assert h.get_tls_negotiated()
        data = os.urandom(256 * 1024)
        h.pwrite(data, 1 << 20, nbd.CMD_FLAG_FUA)
        h.flush()
        assert h.pread(len(data), 1 << 20) == data
        h.zero(4096, 1 << 20)
        assert h.pread(4096, 1 << 20) == bytes(4096)
    """)


def test_tls_over_tcp_with_host_name_check(server_factory, pki):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server_factory("tcp", extra=(*tls_flags(pki, "require"), "--listen", f"tcp://127.0.0.1:{port}"))
    nbdsh(f"nbds://localhost:{port}/swap?tls-certificates={pki / 'anonymous'}", """
        h.pwrite(b"t" * 4096, 0)
        assert h.pread(4096, 0) == b"t" * 4096
    """)


def test_client_certificates_when_the_server_verifies_peers(server_factory, pki):
    server = server_factory("verify", extra=tls_flags(pki, "require", verify_peer=True))
    nbdsh(tls_uri(server, pki / "client"), "assert h.get_tls_negotiated()")
    assert "client certificate: commonName=nbdswap-test-client" in server.log()
    refused = run_client(["nbdinfo", tls_uri(server, pki / "anonymous")], check=False)
    assert refused.returncode != 0
    wait_for_log(server, "TLS handshake failed")  # the server notices after the client is gone
    wait_for_connections(server, 0)


def qemu_tls_args(pki: Path, server) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={pki / 'client'}",
            "--image-opts", f"driver=nbd,path={server.socket},export=swap,tls-creds=tls0,tls-hostname=localhost"]


@pytest.mark.skipif(shutil.which("qemu-img", path="/usr/bin") is None, reason="needs qemu-utils")
def test_qemu_img_and_qemu_io_with_x509_credentials(server_factory, pki):
    server = server_factory("qemu", extra=tls_flags(pki, "require", verify_peer=True))
    info = json.loads(run_client(["qemu-img", "info", "--output=json", *qemu_tls_args(pki, server)]).stdout)
    assert info["virtual-size"] == 256 << 20
    run_client(["qemu-io", *qemu_tls_args(pki, server), "-c", "write -P 0x5c 1M 256k", "-c", "flush"])
    out = run_client(["qemu-io", *qemu_tls_args(pki, server), "-c", "read -P 0x5c 1M 256k"]).stdout.decode()
    assert "Pattern verification failed" not in out and "read 262144/262144" in out


# --- the spec's corner cases on a raw socket -----------------------------------------------


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go() -> bytes:
    return option(7, struct.pack(">I", 4) + b"swap" + b"\x00\x00")


def read_reply(sock) -> tuple[int, int, bytes]:
    header = _read_exactly(sock, 20)
    _magic, code, kind, length = struct.unpack(">QIII", header)
    return code, kind, _read_exactly(sock, length)


def _read_exactly(sock, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def read_final_reply(sock) -> tuple[int, int]:
    while True:
        code, kind, _ = read_reply(sock)
        if kind not in (2, 3, 4):
            return code, kind


def wait_until_closed(sock) -> None:
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


def plain_handshake(server) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(server.socket))
    assert _read_exactly(sock, 18)[:16] == b"NBDMAGICIHAVEOPT"
    sock.sendall(struct.pack(">I", 3))
    return sock


def test_forcedtls_answers_tls_reqd_and_export_name_is_a_hard_close(server_factory, pki):
    server = server_factory("forced", extra=tls_flags(pki, "require"))
    with plain_handshake(server) as sock:
        for code, data in ((3, b""), (8, b""), (7, go()[16:])):
            sock.sendall(option(code, data))
            assert read_final_reply(sock) == (code, ERR_TLS_REQD)
        sock.sendall(option(1, b"swap"))
        assert sock.recv(1) == b""
    assert "NBD_OPT_EXPORT_NAME before TLS" in server.log()


def test_after_starttls_options_start_over_and_a_second_starttls_is_invalid(server_factory, pki):
    server = server_factory("again", extra=tls_flags(pki, "on"))
    with plain_handshake(server) as raw:
        raw.sendall(option(8))  # structured replies, negotiated in plain text
        assert read_final_reply(raw) == (8, 1)
        raw.sendall(option(5))
        assert read_final_reply(raw) == (5, 1)
        context = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(option(5))
            assert read_final_reply(sock) == (5, ERR_INVALID)
            sock.sendall(go())
            replies = []
            while not replies or replies[-1][1] != 1:
                replies.append(read_reply(sock))
            export_info = next(data for _, kind, data in replies if kind == 3 and data[:2] == b"\x00\x00")
            flags = struct.unpack(">H", export_info[10:12])[0]
            assert not flags & 0x80, "structured replies (DF) survived STARTTLS"
            sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 9, 0, 4096))
            magic, error, cookie = struct.unpack(">IIQ", _read_exactly(sock, 16))
            assert (magic, error, cookie) == (0x67446698, 0, 9)  # a simple reply: state was reset
            assert _read_exactly(sock, 4096) == bytes(4096)


def test_garbage_instead_of_a_tls_handshake_leaves_nothing_behind(server_factory, pki):
    server = server_factory("garbage", extra=(*tls_flags(pki, "require"), "--handshake-timeout", "2"))
    # not TLS at all (fails at once), and a TLS record that never ends (the deadline ends it)
    for garbage in [b"GET / HTTP/1.0\r\n\r\n" * 10] * 20 + [b"\x16\x03\x01\x20\x00 truncated"]:
        with plain_handshake(server) as sock:
            sock.sendall(option(5))
            assert read_final_reply(sock) == (5, 1)
            sock.sendall(garbage)
            wait_until_closed(sock)  # perhaps after a TLS alert
    with plain_handshake(server) as sock:  # plain text right behind STARTTLS
        sock.sendall(option(5) + option(3))
        assert sock.recv(1) == b""
    assert "TLS handshake failed" in server.log()
    assert "without waiting for the reply" in server.log()
    assert server.status()["connections"] == 0
    nbdsh(tls_uri(server, pki / "anonymous"), "assert h.get_tls_negotiated()")


def write_request(cookie: int, offset: int, data: bytes) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, 1, cookie, offset, len(data)) + data


def test_sigterm_sends_close_notify_then_drops_what_the_client_still_sends(server_factory, pki):
    """TLS has no half-close: on SIGTERM the server sends close_notify after its last reply,
    then reads and drops what the client still sends until the client closes.  A server
    that closed instead would reset a client still sending, which could lose replies it
    had not read yet.  Nothing sent after the close_notify is run."""
    server = server_factory("sigterm", extra=tls_flags(pki, "require"))
    with plain_handshake(server) as raw:
        raw.sendall(option(5))
        assert read_final_reply(raw) == (5, 1)
        context = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
        with context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as sock:
            sock.sendall(go())
            while read_reply(sock)[1] != 1:
                pass
            sock.sendall(write_request(1, 0, b"x" * 4096))
            assert struct.unpack(">IIQ", _read_exactly(sock, 16)) == (0x67446698, 0, 1)
            server.process.send_signal(signal.SIGTERM)
            assert sock.recv(1) == b""  # close_notify (a bare end would raise SSLEOFError)
            late = write_request(2, 1 << 20, b"y" * 65536)
            for _ in range(128):  # 8 MiB, far more than the socket buffers hold
                sock.sendall(late)
    assert server.stop() == 0
    server.start()
    nbdsh(tls_uri(server, pki / "anonymous"), """
        assert h.pread(4096, 0) == b"x" * 4096
        assert h.pread(65536, 1 << 20) == bytes(65536)
    """)
