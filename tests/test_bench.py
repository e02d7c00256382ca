"""Smoke tests of the benchmark tools in bench/ (no timing assertions)."""

from __future__ import annotations

import json
import os
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nbdswap.protocol.constants import SIMPLE_REPLY_MAGIC

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PAGE = 4096


def run(*args: str, timeout: float = 300) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def tiny_corpus(path: Path) -> dict[str, int]:
    """8 zero, 4 same-filled, 12 text-like, 4 random pages (one text page twice)."""
    rng = random.Random(5)
    pages = [bytes(PAGE)] * 8
    pages += [(0x0101010101010101 * (i + 1)).to_bytes(8, "little") * (PAGE // 8) for i in range(4)]
    words = [b"swap", b"page", b"kernel", b"memory", b"block", b"tier"]
    text = [(b" ".join(rng.choice(words) for _ in range(1000)))[:PAGE] for _ in range(11)]
    pages += text + [text[0]]
    pages += [rng.randbytes(PAGE) for _ in range(4)]
    rng.shuffle(pages)
    path.write_bytes(b"".join(pages))
    return {"pages": len(pages), "zero": 8, "same": 4, "random": 4, "duplicates": 1}


def test_corpus_report_is_consistent(tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.pages"
    expected = tiny_corpus(corpus)
    report = json.loads(run(str(BENCH / "corpus.py"), "report", str(corpus), "--json"))

    assert report["pages"] == expected["pages"]
    assert report["zero_pages"] == expected["zero"]
    assert report["same_filled_pages"] == expected["same"]
    assert report["zero_or_same_share"] == pytest.approx((expected["zero"] + expected["same"]) / expected["pages"])
    assert report["duplicate_data_pages"] == expected["duplicates"]
    # Random pages do not compress: the reference caps them at a page, nbdswap stores them raw.
    assert report["raw_pages"] == expected["random"]
    data_pages = expected["pages"] - expected["zero"] - expected["same"]
    assert expected["random"] * PAGE < report["zram_bytes"] <= data_pages * PAGE
    assert expected["random"] * PAGE < report["nbdswap_payload_bytes"] <= data_pages * PAGE
    # Slab size-class rounding only adds bytes, never more than a page per page.
    assert report["nbdswap_payload_bytes"] <= report["nbdswap_slot_bytes"] <= data_pages * PAGE
    assert report["payload_vs_zram"] == pytest.approx(report["nbdswap_payload_bytes"] / report["zram_bytes"])
    assert report["zram_bytes_per_page"] == pytest.approx(report["zram_bytes"] / expected["pages"])
    assert report["zram_ratio"] == pytest.approx(expected["pages"] * PAGE / report["zram_bytes"])

    store = report["store"]
    assert store["map_blocks"] == expected["pages"]
    assert store["ram_blocks"] + store["disk_blocks"] == data_pages
    assert store["store_zero_blocks"] == expected["zero"]
    assert store["store_same_filled_blocks"] == expected["same"]
    assert store["map_bytes"] > 0
    assert store["map_bytes_per_block"] == pytest.approx(store["map_bytes"] / store["map_blocks"])
    if store["disk_blocks"] == 0:
        # Everything in RAM: the tier stores exactly the codec's payloads.
        assert store["ram_stored_bytes"] == report["nbdswap_payload_bytes"]
        assert store["ram_used_bytes"] == report["nbdswap_slot_bytes"]
    assert store["ram_stored_bytes"] <= store["ram_used_bytes"] <= store["ram_slab_bytes"]
    assert store["ram_slab_over_stored"] == pytest.approx(store["ram_slab_bytes"] / store["ram_stored_bytes"])
    # Grouped in RAM once idle, then drained into the disk tier (every page read back and
    # compared by the report itself after each).
    for prefix, blocks in (("idle_ram", store["ram_blocks"]), ("drained_disk", data_pages)):
        assert store[f"{prefix}_blocks"] == blocks
        assert 0 < store[f"{prefix}_grouped_blocks"] <= blocks
        assert store[f"{prefix}_stored_bytes"] <= store[f"{prefix}_used_bytes"]
        assert store[f"{prefix}_read_block_order_us"] > 0 and store[f"{prefix}_read_random_order_us"] > 0
    assert store["idle_ram_stored_bytes"] < store["ram_stored_bytes"]
    assert store["idle_ram_used_bytes"] <= store["idle_ram_slab_bytes"]


def test_corpus_report_table_and_capture(tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.pages"
    tiny_corpus(corpus)
    text = run(str(BENCH / "corpus.py"), "report", str(corpus))
    assert "zram-like" in text and "per mapped block" in text

    # Capturing this test's own process works when /proc/PID/mem is readable to us.
    out = tmp_path / "self.pages"
    result = subprocess.run([sys.executable, str(BENCH / "corpus.py"), "capture", str(os.getpid()),
                             "--out", str(out), "--max-pages", "64"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    size = out.stat().st_size
    assert size % PAGE == 0 and size <= 64 * PAGE


def test_corpus_rejects_partial_pages(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pages"
    bad.write_bytes(bytes(PAGE + 1))
    result = subprocess.run([sys.executable, str(BENCH / "corpus.py"), "report", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def test_fio_compare_help() -> None:
    text = run(str(BENCH / "fio_compare.py"), "--help", timeout=60)
    for option in ("--runtime", "--quick", "--vm", "--random-prefill-iodepth"):
        assert option in text


def test_fio_compare_repeats_the_qd32_jobs_after_a_random_prefill() -> None:
    """The issue's nbdkit zstd reference was measured over random data: the default
    run repeats the QD32 jobs under that condition, after the compressible matrix."""
    sys.path.insert(0, str(BENCH))
    try:
        import fio_compare
    finally:
        sys.path.remove(str(BENCH))
    jobs = fio_compare.make_jobs(fio_compare.parse_args([]))
    labels = [job.label for job in jobs]
    assert labels[:8] == [f"{rw} QD{qd} x{c}" for rw in ("randwrite", "randread") for qd in (1, 32) for c in (1, 2)]
    assert labels[8:] == [f"{rw} QD32 x{c}, random prefill" for rw in ("randwrite", "randread") for c in (1, 2)]
    assert all(job.prefill == "compressible" for job in fio_compare.make_jobs(fio_compare.parse_args(["--random-prefill-iodepth="])))
    assert all(job.prefill == "random" for job in fio_compare.make_jobs(fio_compare.parse_args(["--prefill", "random"])))


def test_swap_locality_help() -> None:
    text = run(str(BENCH / "swap_locality.py"), "run", "--help", timeout=60)
    for option in ("--workload", "--store", "--lru-gen"):
        assert option in text


def test_store_costs_rebuild_scan_and_compact() -> None:
    rebuilt = run(str(BENCH / "store_costs.py"), "rebuild", "--blocks", "1000")
    assert "start-up with 1,000 mapped blocks" in rebuilt
    scanned = run(str(BENCH / "store_costs.py"), "scan", "--blocks", "300", "--ram-blocks", "30")
    # RAM's hand looks at RAM's 30 blocks only, not at the 270 on disk.
    assert "RAM holds 30 of 300 blocks" in scanned and re.search(r"\b30 map entries looked at", scanned)
    compacted = run(str(BENCH / "store_costs.py"), "compact", "--payloads", "8")
    assert "8 payloads 15/16 live offered to compaction: 0 pages moved" in compacted


def test_write_instructions_path_answers_every_write() -> None:
    """The path the tool counts serves what it is fed: every write answered OK (it
    exits non-zero otherwise), and nothing answered when it is not fed."""
    run(str(BENCH / "write_instructions.py"), "--child", "96", "--feed", "--check-replies")
    run(str(BENCH / "write_instructions.py"), "--child", "96", "--no-feed")
    # fio's shape: fewer writes to a chunk, over more blocks (a prefill not of whole 64s).
    run(str(BENCH / "write_instructions.py"), "--child", "96", "--feed", "--check-replies",
        "--per-chunk", "5", "--blocks", "20001")


def test_write_instructions_reads_answer_every_read_with_its_page() -> None:
    """With ``--reads`` every read is answered OK with the page the prefill wrote to
    its block (checked by the tool, which exits non-zero otherwise)."""
    run(str(BENCH / "write_instructions.py"), "--child", "96", "--feed", "--check-replies", "--reads")
    run(str(BENCH / "write_instructions.py"), "--child", "96", "--no-feed", "--reads")
    run(str(BENCH / "write_instructions.py"), "--child", "96", "--feed", "--check-replies", "--reads",
        "--per-chunk", "5", "--blocks", "20001")


def test_write_instructions_counts_a_read_only_with_the_page_of_its_block() -> None:
    """The tool's check of --reads: a reply with other data is not an answered read."""
    sys.path.insert(0, str(BENCH))
    try:
        import write_instructions as tool
    finally:
        sys.path.remove(str(BENCH))
    pages, blocks = tool._pages(), tool._blocks(3, 100)
    reply = struct.Struct(">IIQ")
    sent = [reply.pack(SIMPLE_REPLY_MAGIC, 0, 0) + tool._page_of(blocks[0], pages),
            reply.pack(SIMPLE_REPLY_MAGIC, 0, 1) + tool._page_of(blocks[1] + 1, pages),
            reply.pack(SIMPLE_REPLY_MAGIC, 0, 2) + tool._page_of(blocks[2], pages)]
    assert tool._replied_ok(sent, 3, 100, reads=True) == 2
    assert tool._replied_ok(sent[:1], 1, 100, reads=True) == 1


def test_write_instructions_counts_with_callgrind() -> None:
    text = run(str(BENCH / "write_instructions.py"), "--writes", "64", timeout=600)
    count = re.search(r"(-?[\d,]+) instructions per 4 KiB write \(64 writes", text)
    assert count, text
    # A write runs zstd, the slab allocator and the map's commit: far more than nothing,
    # and far less than a whole start-up (the runs' common part, if it did not cancel).
    assert 10_000 < int(count.group(1).replace(",", "")) < 1_000_000
    text = run(str(BENCH / "write_instructions.py"), "--requests", "64", "--reads", timeout=600)
    count = re.search(r"(-?[\d,]+) instructions per 4 KiB read \(64 reads", text)
    assert count, text
    # A RAM read decompresses a page and looks its entry up: less than a write.
    assert 10_000 < int(count.group(1).replace(",", "")) < 1_000_000


def test_corpus_writes_runs_every_server_and_counts_the_workers_cpu(tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.pages"
    tiny_corpus(corpus)
    text = run(str(BENCH / "corpus_writes.py"), str(corpus), "--seconds", "0.5", "--rounds", "1",
               "--span", str(1 << 20))
    for server in ("nbdswap", "nbdswap-inline", "nbdkit-zstd", "nbdkit-malloc"):
        assert re.search(rf"^round 1 {server} +\d+ pages/s +[\d.]+ µs CPU/page$", text, re.M), text
    assert re.search(r"^nbdswap / nbdkit-malloc +pages/s \d+\.\d\d$", text, re.M), text
