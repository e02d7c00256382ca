"""nbdswap as real NBD clients see it: libnbd's nbdinfo/nbdsh/nbdcopy, qemu-io, fio."""

import hashlib
import json
import signal
import socket
import struct
import subprocess

import pytest

from nbdutil import mixed_data, nbdsh, nbdswap_command, run_client

MiB = 1 << 20


def test_nbdinfo_shows_the_advertised_export(server):
    info = json.loads(run_client(["nbdinfo", "--json", server.uri]).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == 256 * MiB
    assert export["export-name"] == "swap"
    assert export["block_size_minimum"] == 512
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MiB
    assert export["is_read_only"] is False
    for capability in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                       "can_multi_conn", "can_cache"):
        assert export[capability] is True, capability
    assert info["protocol"] == "newstyle-fixed"
    assert "base:allocation" in export.get("contexts", [])


def test_nbdinfo_lists_the_export_and_the_default_name_selects_it(server):
    listing = run_client(["nbdinfo", "--list", "--json", server.uri]).stdout
    assert [e["export-name"] for e in json.loads(listing)["exports"]] == ["swap"]
    default = f"nbd+unix:///?socket={server.socket}"
    assert json.loads(run_client(["nbdinfo", "--json", default]).stdout)["exports"][0]["export-size"] == 256 * MiB


def test_read_after_write_fua_flush_zero_trim(server):
    nbdsh(server.uri, """
        import os
        data = os.urandom(64 * 1024)
        h.pwrite(data, 1 << 20)
        assert h.pread(len(data), 1 << 20) == data
        h.pwrite(b"F" * 4096, 0, nbd.CMD_FLAG_FUA)
        assert h.pread(4096, 0) == b"F" * 4096
        h.flush()
        h.zero(8192, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(8192, 1 << 20) == bytes(8192)
        assert h.pread(4096, (1 << 20) + 8192) == data[8192:12288]
        h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(4096, 0) == bytes(4096)
        h.trim(32768, (1 << 20) + 16384)
        assert h.pread(32768, (1 << 20) + 16384) == bytes(32768)
        h.pwrite(b"x" * 512, 4096 * 3 + 512)
        assert h.pread(4096, 4096 * 3) == bytes(512) + b"x" * 512 + bytes(3072)
        h.cache(1 << 20, 0)
    """)


def test_out_of_range_and_misaligned_errors_keep_the_connection_usable(server):
    nbdsh(server.uri, """
        import errno
        size = h.get_size()
        def fails(call, expected):
            try:
                call()
            except nbd.Error as error:
                assert error.errnum == expected, (error, expected)
            else:
                raise AssertionError("expected an error")
            assert h.pread(512, 0) is not None  # still usable
        fails(lambda: h.pread(4096, size - 2048), errno.EINVAL)
        fails(lambda: h.pwrite(bytes(4096), size), errno.ENOSPC)
        fails(lambda: h.zero(4096, size - 512), errno.ENOSPC)
        fails(lambda: h.trim(4096, size), errno.EINVAL)
        fails(lambda: h.pread(512, 100), errno.EINVAL)
        fails(lambda: h.pwrite(b"x" * 100, 0), errno.EINVAL)
        fails(lambda: h.pread((32 << 20) + 4096, 0), errno.EINVAL)
        h.pwrite(b"ok" * 2048, 4096)
        assert h.pread(4096, 4096) == b"ok" * 2048
    """)


def test_simple_replies_without_structured_negotiation(server):
    script = f"""
        h = nbd.NBD()
        h.set_strict_mode(0)  # let the server, not libnbd, judge the bad request
        h.set_request_structured_replies(False)
        h.connect_uri({server.uri!r})
        assert not h.get_structured_replies_negotiated()
        h.pwrite(b"s" * 8192, 4096)
        assert h.pread(8192, 4096) == b"s" * 8192
        try:
            h.pread(4096, h.get_size())
        except nbd.Error as error:
            assert error.errnum == __import__("errno").EINVAL
        else:
            raise AssertionError("a read past the end succeeded")
        assert h.pread(4096, 4096) == b"s" * 4096
    """
    run_client(["nbdsh", "-c", __import__("textwrap").dedent(script)])


def test_128_pipelined_requests_are_all_verified(server):
    nbdsh(server.uri, """
        import os
        blocks = [os.urandom(2048) + bytes(2048) for _ in range(128)]
        cookies = [h.aio_pwrite(b, i * 4096) for i, b in enumerate(blocks)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for cookie in cookies:
            assert h.aio_command_completed(cookie)
        buffers = [nbd.Buffer(4096) for _ in blocks]
        cookies = [h.aio_pread(buf, i * 4096) for i, buf in enumerate(buffers)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for cookie in cookies:
            assert h.aio_command_completed(cookie)
        for expected, buf in zip(blocks, buffers):
            assert buf.to_bytearray() == expected
    """)


def test_block_status_reports_holes_zeroes_and_data(server):
    nbdsh(server.uri, """
        h.pwrite(b"d" * 8192, 1 << 20)
        h.zero(8192, (1 << 20) + 8192, nbd.CMD_FLAG_NO_HOLE)
        seen = []
        def record(context, offset, entries, err):
            seen.extend(zip(entries[0::2], entries[1::2]))
        h.block_status(1 << 20, 1 << 20, record)
        assert seen[0] == (8192, 0), seen
        assert seen[1][1] & nbd.STATE_ZERO, seen
        assert sum(length for length, _ in seen) >= 1 << 20
    """)
    mapping = json.loads(run_client(["nbdinfo", "--map", "--json", server.uri]).stdout)
    assert any(extent["type"] == 0 for extent in mapping)


def test_qemu_io_pattern_writes_and_reads(server):
    image = ["-f", "raw", server.uri]
    run_client(["qemu-io", *image,
                "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 1M 512", "-c", "write -z 2M 64k",
                "-c", "aio_write -P 0x5a 4M 256k", "-c", "aio_flush"])
    out = run_client(["qemu-io", *image,
                      "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 1M 512",
                      "-c", "read -P 0 1049088 523776", "-c", "read -P 0 2M 64k",
                      "-c", "read -P 0x5a 4M 256k"]).stdout.decode()
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 5


def test_nbdcopy_round_trip_of_64_mib_mixed_data(server_factory, tmp_path):
    server = server_factory("copy", size="64M")
    source = tmp_path / "source.img"
    source.write_bytes(mixed_data(64 * MiB))
    run_client(["nbdcopy", str(source), server.uri])
    back = tmp_path / "back.img"
    run_client(["nbdcopy", server.uri, str(back)])
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    tiers = server.status()["tiers"]
    assert tiers["ram"]["blocks"] > 0 and tiers["disk"]["blocks"] > 0, tiers


def test_fio_randwrite_verify_crc32c_at_qd32(server):
    result = run_client([
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randwrite",
        "--bs=4k", "--iodepth=32", "--size=64M", "--verify=crc32c", "--do_verify=1",
        "--verify_fatal=1", "--verify_state_save=0", "--buffer_compress_percentage=60", "--buffer_compress_chunk=4096",
        "--refill_buffers", "--output-format=json"])
    job = json.loads(result.stdout[result.stdout.index(b"{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 64 * MiB
    assert job["read"]["io_bytes"] == 64 * MiB  # the verify pass read everything back


def test_two_connections_see_one_coherent_device(server):
    nbdsh(server.uri, f"""
        other = nbd.NBD()
        other.connect_uri({server.uri!r})
        assert other.can_multi_conn()
        h.pwrite(b"A" * 4096, 8192)
        h.flush()
        assert other.pread(4096, 8192) == b"A" * 4096
        other.pwrite(b"B" * 4096, 8192, nbd.CMD_FLAG_FUA)
        assert h.pread(4096, 8192) == b"B" * 4096
        other.shutdown()
    """)


def test_restart_on_the_same_state_dir_keeps_data(server_factory, tmp_path):
    server = server_factory("restart", size="16M")
    data = mixed_data(16 * MiB, seed=7)
    source = tmp_path / "in.img"
    source.write_bytes(data)
    run_client(["nbdcopy", str(source), server.uri])
    assert server.stop(signal.SIGTERM) == 0
    server.start()
    back = tmp_path / "out.img"
    run_client(["nbdcopy", server.uri, str(back)])
    assert back.read_bytes() == data


def test_acknowledged_writes_survive_kill_9(server):
    nbdsh(server.uri, """
        import random
        rng = random.Random(3)
        blocks = {i: rng.randbytes(4096) for i in range(0, 4096, 3)}
        cookies = [h.aio_pwrite(data, i * 4096) for i, data in blocks.items()]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in cookies)
    """)
    server.stop(signal.SIGKILL)
    server.start()
    nbdsh(server.uri, """
        import random
        rng = random.Random(3)
        blocks = {i: rng.randbytes(4096) for i in range(0, 4096, 3)}
        for i, data in blocks.items():
            assert h.pread(4096, i * 4096) == data, i
    """)


def test_garbage_connection_does_not_disturb_others(server):
    with socket.socket(socket.AF_UNIX) as bad:
        bad.connect(str(server.socket))
        bad.recv(18)
        bad.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 10) + bytes(10))
        bad.sendall(b"\xde\xad\xbe\xef" * 64)
        nbdsh(server.uri, """
            h.pwrite(b"q" * 4096, 0)
            assert h.pread(4096, 0) == b"q" * 4096
        """)
    nbdsh(server.uri, "assert h.pread(4096, 0) == b'q' * 4096")


def test_status_reports_tiers_map_and_requests(server):
    nbdsh(server.uri, """
        h.pwrite(bytes(4096), 0)
        h.pwrite(b"\\x07" * 4096, 4096)
        h.pwrite((b"compressible text " * 228)[:4096], 8192)
        h.trim(4096, 0)
    """)
    status = server.status()
    assert status["requests"]["write"] == 3 and status["requests"]["trim"] == 1
    for tier in ("ram", "disk"):
        assert set(status["tiers"][tier]) >= {"blocks", "stored_bytes", "capacity_bytes"}
    assert status["tiers"]["ram"]["blocks"] == 1
    assert status["map"]["blocks"] == 2 and status["map"]["bytes"] > 0
    human = subprocess.run(nbdswap_command() + ["status", "--state-dir", str(server.state_dir)],
                           capture_output=True, check=True, timeout=30).stdout.decode()
    assert "ram" in human and "disk" in human and "trim" in human


@pytest.mark.parametrize("tier_options", [{"ram_max": "0", "disk_max": "64M"}])
def test_corrupted_disk_data_reads_as_eio_never_wrong_data(server_factory, tier_options):
    server = server_factory("corrupt", **tier_options)
    nbdsh(server.uri, """
        import random
        rng = random.Random(5)
        for i in range(64):
            h.pwrite(rng.randbytes(4096), i * 4096)
    """)
    server.stop()
    disk = server.state_dir / "disk.dat"
    raw = bytearray(disk.read_bytes())
    for position in range(100, len(raw), 4096):
        raw[position] ^= 0xFF
    disk.write_bytes(bytes(raw))
    server.start()
    out = nbdsh(server.uri, """
        import errno, random
        rng = random.Random(5)
        failed = 0
        for i in range(64):
            expected = rng.randbytes(4096)
            try:
                data = h.pread(4096, i * 4096)
            except nbd.Error as error:
                assert error.errnum == errno.EIO
                failed += 1
            else:
                assert data == expected, i
        print(failed)
        h.pwrite(bytes(4096), 0)
        assert h.pread(4096, 0) == bytes(4096)
    """)
    failed = int(out.split()[-1])
    assert failed > 0, "no corrupted block was detected"
    assert server.status()["corrupt_block_errors"] == failed
