"""Written pages compressed on encoder worker processes (nbdswap.encoder)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from nbdswap.codec import encode
from nbdswap import encoder
from nbdswap.encoder import OFFLOAD_ABOVE_US, EncoderPool
from nbdutil import mixed_data, nbdsh, wait_for_log, wait_until

ALWAYS_OFFLOAD = ("--encoder-workers", "1", "--encoder-offload-above", "0")


def pointer_pages(count: int, seed: int) -> list[bytes]:
    """Heap-like pages (8-byte pointers into one region): as dear to compress as real
    memory, unlike fio's buffers."""
    rng = random.Random(seed)
    return [b"".join((0x7F00_0000_0000 + rng.randrange(1 << 20) * 16).to_bytes(8, "little")
                     for _ in range(512)) for _ in range(count)]


def encoder_pids(server_pid: int) -> list[int]:
    """The encoder workers among the children of ``server_pid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == server_pid and b"nbdswap.encoder" in command:
            pids.append(int(entry.name))
    return pids


def ready_encoder_pids(server, workers: int = 1) -> list[int]:
    """:func:`encoder_pids` once ``workers`` said they are ready: the server sends a
    worker no page before that, so a test that stops one must wait for it."""
    wait_until(lambda: server.status()["encoder"]["workers"] == workers, f"{workers} ready encoder workers", 30)
    return encoder_pids(server.process.pid)


async def _until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def write_and_check_script(path: Path, rounds: int, write: bool = True) -> str:
    """nbdsh: ``rounds`` times, 32-deep random 4 KiB writes of the pages in ``path`` plus
    a 64 KiB write, each 4 KiB block written twice with both writes in flight; then every
    block read back against its second write.  Without ``write``, only the check."""
    return f"""
        import random
        data = open({str(path)!r}, "rb").read()
        pages = [data[i:i + 4096] for i in range(0, len(data), 4096)]
        rng = random.Random(7)
        expected = {{}}
        for round in range({rounds}):
            order = list(range(1024))
            rng.shuffle(order)
            for n, block in enumerate(order):
                first, second = pages[(n + round) % len(pages)], pages[(3 * n + round + 1) % len(pages)]
                if {write}:
                    h.aio_pwrite(first, block * 4096)
                    h.aio_pwrite(second, block * 4096)
                    while h.aio_in_flight() >= 32:
                        h.poll(-1)
                expected[block] = second
            big = b"".join(pages[round * 16:(round + 1) * 16])
            if {write}:
                h.aio_pwrite(big, (1024 + 16 * round) * 4096)
            for i in range(16):
                expected[1024 + 16 * round + i] = big[i * 4096:(i + 1) * 4096]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for block, page in expected.items():
            assert h.pread(4096, block * 4096) == page, block
        print(len(expected))
    """


def test_pages_compressed_on_a_worker_are_stored_in_the_order_written_and_survive_a_restart(
        server_factory, tmp_path):
    pages = pointer_pages(96, seed=1) + [mixed_data(96 * 4096, seed=2)[i:i + 4096]
                                         for i in range(0, 96 * 4096, 4096)]
    corpus = tmp_path / "pages"
    corpus.write_bytes(b"".join(pages))
    server = server_factory(extra=ALWAYS_OFFLOAD)
    ready_encoder_pids(server)
    assert nbdsh(server.uri, write_and_check_script(corpus, rounds=3)).strip() == str(1024 + 48)
    encoder = server.status()["encoder"]
    assert encoder["workers"] == 1 and encoder["worker_failures"] == 0
    assert encoder["pages_offloaded"] > 4 * 1024  # most of the 6k pages went to the worker
    workers = encoder_pids(server.process.pid)
    assert len(workers) == 1

    server.restart()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # stopped with the server
    assert nbdsh(server.uri, write_and_check_script(corpus, rounds=3, write=False)).strip() == str(1024 + 48)


def test_cheap_pages_are_compressed_in_the_server(server_factory):
    """Zero pages take well under a microsecond: offloading them would only cost."""
    server = server_factory(extra=("--encoder-workers", "1"))
    nbdsh(server.uri, """
        for block in range(2048):
            h.aio_pwrite(bytes(4096), block * 4096)
            while h.aio_in_flight() >= 32:
                h.poll(-1)
        while h.aio_in_flight() > 0:
            h.poll(-1)
    """)
    encoder = server.status()["encoder"]
    assert encoder["pages_inline"] == 2048 and encoder["pages_offloaded"] == 0
    assert not encoder["offloading"]


@pytest.mark.parametrize("fate", ["killed", "hung"])
def test_a_worker_that_fails_while_holding_pages_loses_no_write(server_factory, tmp_path, fate):
    """The worker is stopped and takes pages, then is killed, or stays stopped until the
    server gives up on it: the server encodes them itself, every write is acknowledged
    and reads back, it says what happened, and a new worker takes the place."""
    corpus = tmp_path / "pages"
    corpus.write_bytes(b"".join(pointer_pages(64, seed=3)))
    server = server_factory(extra=ALWAYS_OFFLOAD)
    (worker,) = ready_encoder_pids(server)
    os.kill(worker, signal.SIGSTOP)
    writer = subprocess.Popen(
        ["nbdsh", "-u", server.uri, "-c", textwrap.dedent(write_and_check_script(corpus, rounds=1))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PATH": f"/usr/bin:/bin:{os.environ.get('PATH', '')}"})
    try:
        deadline = time.monotonic() + 30
        while server.status()["encoder"]["pages_offloaded"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.status()["encoder"]["pages_offloaded"] > 0, writer.poll()
        if fate == "killed":
            with contextlib.suppress(ProcessLookupError):  # unless the server gave up first
                os.kill(worker, signal.SIGKILL)
        out, err = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0, err.decode()
    assert out.decode().strip() == str(1024 + 16)
    log = wait_for_log(server, "encoder worker 0")
    if fate == "hung":
        assert "has not answered for" in log
    assert "the server encodes its pages; replaced in 5 s" in log
    encoder = server.status()["encoder"]  # a replacement may be running by now
    assert encoder["worker_failures"] == 1 and encoder["pages_inline"] > 0
    assert not Path(f"/proc/{worker}").exists()
    (replacement,) = ready_encoder_pids(server)  # 5 s after the failure
    assert replacement != worker


def test_a_trim_sent_after_a_queued_write_of_its_block_lands_after_it(server_factory, tmp_path):
    """A TRIM does not go through the encoder: it must still not overtake the write of
    its block that the client sent before it.  One 8-page write goes to the stopped
    worker (a single request: one loop turn of 8 pages), then a TRIM of its fourth
    block is sent; the TRIM must not complete before the write, nor undo it after."""
    server = server_factory(extra=ALWAYS_OFFLOAD)
    (worker,) = ready_encoder_pids(server)
    pages = pointer_pages(8, seed=5)
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        pages = {pages!r}
        h.pwrite(b"".join(pages), 64 * 4096)  # offloading on, the worker warmed up
        print("ready", flush=True); sys.stdin.readline()
        write = h.aio_pwrite(b"".join(pages), 0)
        trim = h.aio_trim(4096, 3 * 4096)
        for _ in range(20):
            h.poll(50)
        print(h.aio_command_completed(write), h.aio_command_completed(trim), flush=True)
        sys.stdin.readline()
        while h.aio_in_flight() > 0:
            h.poll(-1)
        print([h.pread(4096, block * 4096) == page for block, page in enumerate(pages)], flush=True)
    """))
    client = subprocess.Popen(["nbdsh", "-u", server.uri, "-c", f"exec(open({str(script)!r}).read())"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PATH": f"/usr/bin:/bin:{os.environ.get('PATH', '')}"})
    try:
        assert client.stdout.readline().strip() == "ready"
        offloaded = server.status()["encoder"]["pages_offloaded"]
        os.kill(worker, signal.SIGSTOP)
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().split() == ["False", "False"]  # both wait for the worker
        assert server.status()["encoder"]["pages_offloaded"] == offloaded + 8
        os.kill(worker, signal.SIGCONT)
        client.stdin.write("go\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, err
    assert out.strip() == str([True, True, True, False, True, True, True, True])


@pytest.mark.parametrize("workers", [1, 2])
async def test_the_pool_hands_results_back_in_queue_order_equal_to_inline_encoding(workers):
    pool = EncoderPool(workers, OFFLOAD_ABOVE_US)
    try:
        await _until(lambda: pool.ready_workers == workers)
        pages = pointer_pages(40, seed=4) + [bytes(4096), b"\x07" * 4096, os.urandom(4096)]
        delivered: list[int] = []
        results: dict[int, list] = {}

        def done_for(number: int):
            def done(encoded: list) -> None:
                delivered.append(number)
                results[number] = encoded
            return done

        jobs = []
        for number in range(300):
            job = [pages[(number + i) % len(pages)] for i in range(1 + number % 3)]
            jobs.append(job)
            pool.encode(job, done_for(number))
            if number % 50 == 49:
                await asyncio.sleep(0)  # a new loop turn: another range for a worker
        deadline = time.monotonic() + 30
        while len(delivered) < len(jobs) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert delivered == list(range(len(jobs)))
        for number, job in enumerate(jobs):
            assert [tuple(encoded) for encoded in results[number]] == [tuple(encode(page)) for page in job]
        assert pool.pages_offloaded + pool.pages_inline == sum(map(len, jobs))
        assert pool.pages_offloaded > 0
    finally:
        await pool.close()
    assert pool.workers == 0


async def test_closing_the_pool_encodes_what_a_stopped_worker_holds():
    pool = EncoderPool(1, OFFLOAD_ABOVE_US)
    (worker,) = pool._workers
    await _until(lambda: pool.ready_workers)
    os.kill(worker.process.pid, signal.SIGSTOP)
    try:
        pages = pointer_pages(8, seed=6)
        results = []
        pool.encode(pages, results.append)
        await asyncio.sleep(0.05)  # dispatched to the stopped worker
        assert pool.pages_offloaded == 8 and not results
        await pool.close(timeout=0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.process.pid, signal.SIGCONT)
    assert [tuple(encoded) for encoded in results[0]] == [tuple(encode(page)) for page in pages]
    assert pool.worker_failures == 1 and pool.pages_offloaded == 0 and pool.pages_inline == 8


async def test_offloading_stops_only_once_the_queue_is_empty():
    """Cheap pages end offloading, but not while writes are queued: a write encoded
    inline meanwhile would be placed before them."""
    pool = EncoderPool(1, offload_above_us=0)
    (worker,) = pool._workers
    try:
        await _until(lambda: pool.ready_workers)
        for _ in range(64):  # one sampled write: any time above 0 µs means offload
            pool.observe(bytes(4096))
        assert pool.offloading
        pool._offload_above_ns = 1e9  # from now on every page is cheap
        os.kill(worker.process.pid, signal.SIGSTOP)
        results = []
        pool.encode([bytes(4096)] * 4, results.append)
        await asyncio.sleep(0.05)
        pool.encode([bytes(4096)], results.append)  # a 1-page turn: encoded here, then delivery tried
        await asyncio.sleep(0.05)
        assert pool.offloading and pool.busy and not results
        os.kill(worker.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not results and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        while len(results) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(results) == 2 and not pool.offloading and not pool.busy
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.process.pid, signal.SIGCONT)
        await pool.close()


async def test_an_encoding_error_or_a_failing_callback_stops_one_write_not_the_queue():
    pool = EncoderPool(1, OFFLOAD_ABOVE_US)
    try:
        await _until(lambda: pool.ready_workers)
        delivered = []

        def failing(_):
            delivered.append("failing")
            raise RuntimeError("a callback failed")

        good = pointer_pages(1, seed=7)
        pool.encode([b"not a page"], delivered.append)  # codec.encode raises ValueError
        pool.encode(good, failing)
        pool.encode(good, delivered.append)
        await asyncio.sleep(0.05)
        assert isinstance(delivered[0], ValueError)
        assert delivered[1] == "failing"
        assert [tuple(encoded) for encoded in delivered[2]] == [tuple(encode(good[0]))]
        assert not pool.busy
    finally:
        await pool.close()


async def test_a_request_that_waited_for_the_queue_holds_later_writes_until_it_resumes():
    """What a TRIM sent between two writes of a block sees: the first write placed,
    the second not yet."""
    pool = EncoderPool(1, OFFLOAD_ABOVE_US)
    try:
        await _until(lambda: pool.ready_workers)
        delivered = []
        page = pointer_pages(1, seed=8)
        pool.encode(page, lambda _: delivered.append("first"))
        queued = pool.queued()
        pool.encode(page, lambda _: delivered.append("second"))
        await asyncio.wait_for(queued, 10)
        await asyncio.sleep(0.05)
        assert delivered == ["first"] and pool.busy
        pool.resume()
        assert delivered == ["first", "second"] and not pool.busy
    finally:
        await pool.close()


async def test_a_worker_that_died_is_replaced_and_its_replacement_encodes(monkeypatch):
    monkeypatch.setattr(encoder, "RESTART_AFTER_S", 0.2)
    pool = EncoderPool(1, OFFLOAD_ABOVE_US)
    try:
        (first,) = pool._workers
        os.kill(first.process.pid, signal.SIGKILL)
        await _until(lambda: pool.worker_failures)
        assert pool.workers == 0
        await _until(lambda: pool.ready_workers)
        (second,) = pool._workers
        assert second.process.pid != first.process.pid
        pages = pointer_pages(8, seed=9)
        results = []
        pool.encode(pages, results.append)
        await _until(lambda: results)
        assert [tuple(encoded) for encoded in results[0]] == [tuple(encode(page)) for page in pages]
        assert pool.pages_offloaded == 8 and pool.worker_failures == 1
    finally:
        await pool.close()
    assert pool.workers == 0


async def test_each_place_backs_off_on_its_own_and_a_long_run_ends_the_row(monkeypatch):
    """Worker 0 keeps dying while worker 1 encodes: only worker 0's replacements come
    ever later; a failure after a run longer than RESTART_AFTER_MAX_S starts the row over."""
    monkeypatch.setattr(encoder, "RESTART_AFTER_S", 0.1)
    pool = EncoderPool(2, OFFLOAD_ABOVE_US)
    try:
        for failures in range(1, 5):
            await _until(lambda: pool.ready_workers == 2, timeout=20)
            results = []
            pool.encode(pointer_pages(8, seed=failures), results.append)
            await _until(lambda: results)
            os.kill(pool._workers[0].process.pid, signal.SIGKILL)
            await _until(lambda: pool.worker_failures == failures)
            assert pool._restart_after == [0.1 * 2 ** failures, 0.1]
        await _until(lambda: pool.ready_workers == 2, timeout=20)
        pool._workers[0].started -= encoder.RESTART_AFTER_MAX_S  # as if it ran for 5 minutes
        os.kill(pool._workers[0].process.pid, signal.SIGKILL)
        await _until(lambda: pool.worker_failures == 5)
        assert pool._restart_after == [0.2, 0.1]
    finally:
        await pool.close()


async def test_no_replacement_after_close_even_for_a_worker_given_up_by_it(monkeypatch, caplog):
    monkeypatch.setattr(encoder, "RESTART_AFTER_S", 0.1)
    pool = EncoderPool(2, OFFLOAD_ABOVE_US)
    await _until(lambda: pool.ready_workers == 2)
    os.kill(pool._workers[0].process.pid, signal.SIGKILL)
    await _until(lambda: pool.worker_failures == 1)
    (due,) = pool._restarts.values()  # worker 0's replacement
    stopped = pool._workers[1].process.pid
    os.kill(stopped, signal.SIGSTOP)
    try:
        pool.encode(pointer_pages(8, seed=10), lambda _: None)
        await asyncio.sleep(0.05)  # dispatched to the stopped worker
        await pool.close(timeout=0.2)  # gives it up
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
    assert pool.worker_failures == 2 and not pool._restarts and due.cancelled()
    await asyncio.sleep(0.4)
    assert pool.workers == 0
    assert not [record for record in caplog.records if record.name == "asyncio"]


async def test_a_worker_gets_pages_only_once_it_said_it_is_ready(monkeypatch):
    """Its start-up (slow under memory pressure) must not count as a hang."""
    monkeypatch.setattr(encoder, "_BOOTSTRAP", "import time; time.sleep(1); " + encoder._BOOTSTRAP)
    pool = EncoderPool(1, offload_above_us=0)
    try:
        for _ in range(64):  # one sampled write: offloading on
            pool.observe(bytes(4096))
        results = []
        pool.encode(pointer_pages(8, seed=11), results.append)
        await _until(lambda: results, timeout=0.5)
        assert results and pool.pages_offloaded == 0 and pool.workers == 1 and not pool.ready_workers
        await _until(lambda: pool.ready_workers)
        pool.encode(pointer_pages(8, seed=12), results.append)
        await _until(lambda: len(results) == 2)
        assert pool.pages_offloaded == 8 and pool.worker_failures == 0
    finally:
        await pool.close()


#: A worker that answers before it said it is ready, as one of another version might.
_EARLY_ANSWER = ("import socket, struct, sys, time; "
                 "socket.socket(fileno=int(sys.argv[3])).sendall(struct.pack('<II', 0, 1)); time.sleep(30)")


@pytest.mark.parametrize("other_code", ["checksum", "early answer"])
async def test_a_worker_running_other_code_is_given_up_and_not_replaced(monkeypatch, other_code):
    """As after an upgrade on disk: the worker imports the new files; its ring layout
    may differ from the server's."""
    monkeypatch.setattr(encoder, "RESTART_AFTER_S", 0.05)
    if other_code == "checksum":
        monkeypatch.setattr(encoder, "_CODE_ID", encoder._CODE_ID ^ 1)
    else:
        monkeypatch.setattr(encoder, "_BOOTSTRAP", _EARLY_ANSWER)
    pool = EncoderPool(1, OFFLOAD_ABOVE_US)
    try:
        await _until(lambda: pool.worker_failures)
        await asyncio.sleep(0.2)
        assert pool.worker_failures == 1 and pool.workers == 0 and not pool._restarts
    finally:
        await pool.close()


async def test_a_worker_that_does_not_get_ready_is_given_up_and_replaced(monkeypatch):
    monkeypatch.setattr(encoder, "READY_WITHIN_S", 0.5)
    monkeypatch.setattr(encoder, "HUNG_AFTER_S", 0.2)
    monkeypatch.setattr(encoder, "RESTART_AFTER_S", 0.05)
    monkeypatch.setattr(encoder, "_BOOTSTRAP", "import time; time.sleep(30)")
    pool = EncoderPool(1, OFFLOAD_ABOVE_US)
    try:
        await _until(lambda: pool.worker_failures)
        assert pool.workers == 0 and pool._restarts
    finally:
        await pool.close()
