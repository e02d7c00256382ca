#!/usr/bin/env python3
"""Where a real Linux kernel puts swapped-out pages on the swap device, and what
grouped compression of neighbouring device blocks gains on that placement.

One command (root; QEMU/TCG; about 4-7 minutes per workload on 2 cores)::

    .venv/bin/python bench/swap_locality.py run --workload objects --workload text --workload mix

For each workload: a guest (deploy/vm kernel and base initramfs, plus an overlay
built here with Debian's python3 and the standard-library modules the workloads
need; root file system ramfs, so only anonymous memory goes to swap) swaps on
/dev/nbd0, served by nbdkit's memory plugin with the log filter (the log gives the
order of the writes) on the host, in a private network namespace.  In the guest,
this file runs as the hog (the overlay replaces /bin/hog, deploy/vm/init runs it):

* ``objects``: ASTs of standard-library sources, dataclass records, an in-memory
  sqlite database with an index, word counters;
* ``text``: lines, a word index, JSON documents, log lines, bytes buffers;
* ``mix``: both at once, half the size each, competing for memory;

each sized to --workload-mib (default 1.75 x the guest's 256 MiB).  The workloads call
gc.freeze() after each step: without it Python's full collections walk the whole heap
and the guest thrashes for far longer than this benchmark can wait.  When they are built
and swap-out has settled, the guest stops them (SIGSTOP), reads /proc/PID/pagemap of
every process (a swapped page's entry holds its swap offset = device block) and
writes that map to a scratch virtio disk; the host then copies the device with
nbdcopy, tells the guest to finish, and computes, on exactly the pages the map
names (their bytes from the dump):

* zram-like: per-page zstd-1, same-filled pages free, incompressible capped at 4096;
* nbdswap per page (nbdswap.codec.encode payloads);
* grouped, as the disk tier does (nbdswap.codec.encode_group, at its GROUP_LEVEL, at most 32 KiB,
  else per page), in four orders: aligned 16-block groups of the device
  (what nbdswap does), 16 consecutive pages in the order they were last written
  (nbdkit's log), 16 consecutive pages in virtual-address order (pid, address),
  16 consecutive pages in a random order;
* locality: for consecutive device blocks that both hold a mapped page, how often the
  second is the next (or previous) virtual page of the same process, run lengths, and
  distinct address runs per aligned 16-block group.

``--store`` also runs ``bench/corpus.py report`` on the dump (the real Store:
RAM tier, then drained into the grouped disk tier in device-block order).

``--lru-gen y`` switches the guest to the multi-generational LRU (off by default in
Debian's 6.1); ``--tag`` suffixes the result directory.

Results go to build/swap-locality/<workload><tag>/ (console.log, map.bin, dump, results.json)
and a table is printed.  ``analyse DIR`` recomputes the numbers of a finished run.
Every process started here (nbdkit, QEMU, nbdcopy) is stopped on exit, also on errors.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

PAGE = 4096
HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
GUEST_DIR = "/opt/swaploc"  # where this file lives in the guest
GUEST_PYTHON = "/usr/bin/python3.11"  # Debian's: the host's, copied into the overlay
MAP_MAGIC = b"SWAPLOC1"
MAP_OFFSET = PAGE  # block 0 of the scratch disk is the host's "go" flag
RECORD = struct.Struct("<QQQ")  # swap offset, pid, virtual address
PM_SWAPPED = 1 << 62
PM_PRESENT = 1 << 63

# =========================================================================== guest side
# Only the standard library (the guest's python runs with -S).


def _status_kib(pid: int | str, key: str) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _vmstat() -> dict[str, int]:
    out = {}
    for line in open("/proc/vmstat"):
        key, value = line.split()
        if key in ("pswpin", "pswpout"):
            out[key] = int(value)
    return out


def _footprint_mib() -> float:
    return (_status_kib("self", "VmRSS") + _status_kib("self", "VmSwap")) / 1024


def _sources() -> list[str]:
    root = os.environ.get("SWAPLOC_DATA", f"{GUEST_DIR}/data")
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return sorted(out)


def _source_steps(target_mib: float, name: str):
    """``(step, round, path, text)`` of the data sources, round after round, until the
    process holds ``target_mib``.  After each step the objects built so far leave the
    collector's generations (gc.freeze: no full-heap scans); progress every 32 MiB."""
    files = _sources()
    step, report = 0, 32.0
    while _footprint_mib() < target_mib:
        path = files[step % len(files)]
        try:
            source = open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError):
            step += 1
            continue
        yield step, step // len(files), path, source
        step += 1
        gc.freeze()
        if _footprint_mib() >= report:
            print(f"SWAPLOC: {name} {_footprint_mib():.0f} MiB", flush=True)
            report += 32


def workload_objects(target_mib: float, name: str) -> list:
    """Program objects: ASTs, dataclasses, sqlite, counters, dicts of tuples."""
    import ast
    import collections
    import dataclasses
    import datetime
    import decimal
    import sqlite3

    @dataclasses.dataclass
    class Order:
        id: int
        customer: str
        created: datetime.datetime
        total: decimal.Decimal
        items: list
        status: str
        note: str

    rng = random.Random(7)
    keep: list = []
    db = sqlite3.connect(":memory:")
    db.execute("create table line(file text, no int, text text, words int)")
    db.execute("create index li on line(text)")
    keep.append(db)
    counts: collections.Counter = collections.Counter()
    keep.append(counts)
    for step, round_, path, source in _source_steps(target_mib, name):
        if round_:  # later rounds: renamed identifiers, so no identical copies
            source = re.sub(r"\bself\b", f"self{round_}", source)
        try:
            keep.append(ast.parse(source, path))
        except SyntaxError:
            pass
        if step % 3 == 0:
            base = step * 1000
            keep.append([Order(base + i, f"cust-{rng.randrange(20000):05d}",
                               datetime.datetime(2024, 1, 1) + datetime.timedelta(seconds=(base + i) * 37),
                               decimal.Decimal(rng.randrange(100, 100000)) / 100,
                               [rng.randrange(5000) for _ in range(rng.randrange(1, 6))],
                               rng.choice(["new", "paid", "shipped", "returned"]),
                               f"order {base + i} for {rng.randrange(10**6)}")
                         for i in range(2000)])
        if step % 2 == 0:
            lines = source.splitlines()
            db.executemany("insert into line values (?,?,?,?)",
                           [(path, i, line, len(line.split())) for i, line in enumerate(lines)])
            db.commit()
        if step % 4 == 1:
            counts.update(re.findall(r"\w+", source))
            keep.append({(path, i): (len(line), hash(line), line.strip()[:20])
                         for i, line in enumerate(source.splitlines())})
    return keep


def workload_text(target_mib: float, name: str) -> list:
    """Strings: lines, a word index, JSON documents, log lines, byte buffers."""
    import json as _json

    rng = random.Random(11)
    keep: list = []
    index: dict[str, list] = {}
    keep.append(index)
    users = [f"user{rng.randrange(10**6):06d}@example.{rng.choice(['com', 'org', 'net'])}" for _ in range(5000)]
    paths = ["/api/v1/orders", "/api/v1/users", "/static/app.js", "/login", "/search", "/api/v2/items"]
    t0 = 1700000000
    for step, _, path, source in _source_steps(target_mib, name):
        lines = [f"{step}:{i}: {line}" for i, line in enumerate(source.splitlines())]
        keep.append(lines)
        if step % 2 == 0:
            for i, line in enumerate(lines[:400]):
                for word in set(re.findall(r"[A-Za-z_]\w+", line)):
                    index.setdefault(word, []).append((step, i))
        if step % 3 == 0:
            keep.append([_json.dumps({"id": step * 1000 + i, "user": rng.choice(users),
                                      "ts": t0 + step * 1000 + i, "path": rng.choice(paths),
                                      "status": rng.choice([200, 200, 200, 404, 500]),
                                      "tags": rng.sample(["a", "b", "c", "d", "e", "f"], 3),
                                      "latency_ms": round(rng.expovariate(0.02), 2)})
                         for i in range(800)])
        if step % 3 == 1:
            keep.append([f"2024-05-{1 + step % 28:02d}T{i % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}Z "
                         f"{rng.choice(['INFO', 'INFO', 'WARN', 'DEBUG'])} {rng.choice(users)} "
                         f"GET {rng.choice(paths)}?q={rng.randrange(10**5)} {rng.randrange(100, 900)}ms"
                         for i in range(1500)])
        if step % 5 == 2:
            keep.append(bytearray(source.encode()) + f"\n# copy {step}\n".encode())
    return keep


WORKLOADS = {"objects": workload_objects, "text": workload_text}


def guest_workload(kind: str, target_mib: float, ready: str) -> None:
    started = time.monotonic()
    keep = WORKLOADS[kind](target_mib, kind)
    print(f"SWAPLOC: {kind} built {_footprint_mib():.0f} MiB in {time.monotonic() - started:.0f}s", flush=True)
    open(ready, "w").close()
    rng = random.Random(3)
    while True:  # a small working set stays in use, the rest goes cold
        time.sleep(0.5)
        for _ in range(20):
            item = keep[rng.randrange(len(keep))]
            if isinstance(item, list) and item:
                _ = item[rng.randrange(len(item))]


def _cmdline() -> dict[str, str]:
    args = {}
    for word in open("/proc/cmdline").read().split():
        if word.startswith("swaploc.") and "=" in word:
            key, value = word[len("swaploc."):].split("=", 1)
            args[key] = value
    return args


def _read_text(path: str) -> str:
    try:
        return open(path).read().strip()
    except OSError as error:
        return f"({error.strerror})"


def _swap_map() -> tuple[list[tuple[int, int, int]], dict]:
    """(swap offset, pid, address) of every swapped-out page of every process."""
    records = []
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            maps = open(f"/proc/{pid}/maps").read().splitlines()
            pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except OSError:
            continue
        swapped = present = 0
        bad_type = 0
        try:
            for line in maps:
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if len(fields) > 5 and fields[5] == "[vsyscall]":
                    continue
                for chunk in range(start, end, PAGE << 14):
                    count = min(end - chunk, PAGE << 14) // PAGE
                    try:
                        raw = os.pread(pagemap, 8 * count, 8 * (chunk // PAGE))
                    except OSError:
                        break
                    values = struct.unpack(f"<{len(raw) // 8}Q", raw)
                    for i, value in enumerate(values):
                        if value & PM_SWAPPED:
                            if value & 0x1F:
                                bad_type += 1
                            records.append(((value >> 5) & ((1 << 50) - 1), pid, chunk + i * PAGE))
                            swapped += 1
                        elif value & PM_PRESENT:
                            present += 1
        finally:
            os.close(pagemap)
        procs[pid] = {"comm": _read_text(f"/proc/{pid}/comm"), "swapped": swapped, "present": present,
                      "other_swap_type": bad_type}
    return records, procs


def guest_main() -> int:
    """The guest's /bin/hog: workloads, the swap map, then wait for the host."""
    import mmap

    args = _cmdline()
    workload = args.get("workload", "objects")
    total_mib = float(args.get("mib", "448"))
    say = lambda text: print(f"SWAPLOC: {text}", flush=True)  # noqa: E731
    lru = "/sys/kernel/mm/lru_gen/enabled"
    if "lru_gen" in args and os.path.exists(lru):
        try:
            open(lru, "w").write(args["lru_gen"])
        except OSError as error:
            say(f"cannot set lru_gen: {error}")
    info = {
        "uname": " ".join(os.uname()), "kernel": os.uname().release,
        "rotational": _read_text("/sys/block/nbd0/queue/rotational"),
        "lru_gen": _read_text(lru), "swappiness": _read_text("/proc/sys/vm/swappiness"),
        "page_cluster": _read_text("/proc/sys/vm/page-cluster"),
        "mem_total_kib": _status_kib_meminfo("MemTotal"), "workload": workload, "workload_mib": total_mib,
    }
    say(f"info {json.dumps(info)}")
    kinds = ["objects", "text"] if workload == "mix" else [workload]
    share = total_mib / len(kinds)
    children = {}
    started = time.monotonic()
    for kind in kinds:
        ready = f"/run/swaploc.{kind}.ready"
        proc = subprocess.Popen([sys.executable, "-S", __file__, "guest-workload", kind, str(share), ready])
        children[kind] = (proc, ready)
    while not all(os.path.exists(ready) for _, ready in children.values()):
        for kind, (proc, _) in children.items():
            if proc.poll() is not None:
                say(f"FAIL workload {kind} exited with {proc.returncode}")
                return 1
        time.sleep(1)
    info["build_s"] = round(time.monotonic() - started)
    # Let reclaim settle: pswpout unchanged for 10 s (at most 3 minutes).
    last, still, deadline = _vmstat(), 0, time.monotonic() + 180
    while still < 10 and time.monotonic() < deadline:
        time.sleep(1)
        now = _vmstat()
        still = still + 1 if now["pswpout"] == last["pswpout"] else 0
        last = now
    for proc, _ in children.values():
        os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(2)
    before = _vmstat()
    records, procs = _swap_map()
    after = _vmstat()
    info.update(vmstat_before_map=before, vmstat_after_map=after, procs=procs,
                workload_pids={kind: proc.pid for kind, (proc, _) in children.items()},
                swaps=_read_text("/proc/swaps"))
    meta = json.dumps(info).encode()
    blob = MAP_MAGIC + struct.pack("<QQ", len(meta), len(records)) + meta + b"".join(
        RECORD.pack(*r) for r in records)
    fd = os.open("/dev/vda", os.O_WRONLY)
    try:
        os.pwrite(fd, blob, MAP_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)
    say(f"READY records={len(records)} pswpout={after['pswpout']} pswpin={after['pswpin']}")
    # Wait for the host's "go" (block 0 of /dev/vda), read past the page cache.
    fd = os.open("/dev/vda", os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, PAGE)
    try:
        while True:
            os.preadv(fd, [buf], 0)
            if buf[:2] == b"GO":
                break
            time.sleep(1)
    finally:
        os.close(fd)
    say(f"GO pswpout={_vmstat()['pswpout']} pswpin={_vmstat()['pswpin']}")
    for proc, _ in children.values():
        proc.kill()
        proc.wait()
    return 0


def _status_kib_meminfo(key: str) -> int:
    for line in open("/proc/meminfo"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def guest_closure() -> None:
    """Run by the host's Debian python with -S: the files the guest side needs."""
    import ast  # noqa: F401
    import collections  # noqa: F401
    import dataclasses  # noqa: F401
    import datetime  # noqa: F401
    import decimal  # noqa: F401
    import json  # noqa: F401
    import mmap  # noqa: F401
    import sqlite3  # noqa: F401
    import subprocess  # noqa: F401

    files = {os.path.join(sys.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "os.py")}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.exists(path):
            files.add(os.path.abspath(path))
            cached = getattr(module, "__cached__", None)
            if cached and os.path.exists(cached):
                files.add(os.path.abspath(cached))
    for path in sorted(files):
        print(path)


# =========================================================================== host side


def _overlay(workdir: Path, base_initrd: Path, data_mib: float) -> Path:
    """base initramfs + a cpio with python, the stdlib closure, data sources, this file
    and /bin/hog running it."""
    import shutil

    root = workdir / "overlay"
    shutil.rmtree(root, ignore_errors=True)
    listing = subprocess.run([GUEST_PYTHON, "-S", str(HERE), "closure"], capture_output=True, text=True,
                             check=True).stdout.split()
    stdlib = Path(subprocess.run([GUEST_PYTHON, "-S", "-c", "import os; print(os.path.dirname(os.__file__))"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    elfs = [GUEST_PYTHON]
    for path in [GUEST_PYTHON, *listing]:
        dest = root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        if path.endswith(".so"):
            elfs.append(path)
    (root / str(stdlib / "lib-dynload").lstrip("/")).mkdir(parents=True, exist_ok=True)
    libs = set()
    for elf in elfs:
        out = subprocess.run(["ldd", elf], capture_output=True, text=True).stdout
        libs.update(re.findall(r"=> (/\S+)", out))
        libs.update(re.findall(r"^\s*(/\S+) \(", out, re.M))
    for lib in libs:
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(lib), dest)
    # Workload data: standard-library sources, in path order, up to data_mib.
    data = root / GUEST_DIR.lstrip("/") / "data"
    total = 0
    candidates = sorted(p for p in stdlib.rglob("*.py")
                        if not any(part in ("test", "tests", "idlelib", "tkinter", "lib2to3", "site-packages",
                                            "dist-packages") for part in p.relative_to(stdlib).parts))
    for src in candidates:
        if total >= data_mib * 2**20:
            break
        dest = data / src.relative_to(stdlib)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        total += src.stat().st_size
    shutil.copy2(HERE, root / GUEST_DIR.lstrip("/") / HERE.name)
    hog = root / "bin" / "hog"
    hog.parent.mkdir(parents=True, exist_ok=True)
    hog.write_text(f"#!/bin/sh\nexec {GUEST_PYTHON} -S {GUEST_DIR}/{HERE.name} guest \"$@\"\n")
    hog.chmod(0o755)
    cpio = subprocess.run(f"cd {root} && find . | LC_ALL=C sort | cpio --create --format=newc --owner=0:0 --quiet"
                          " | gzip -1n", shell=True, capture_output=True, check=True).stdout
    out = workdir / "initramfs-swaploc.cpio.gz"
    out.write_bytes(base_initrd.read_bytes() + cpio)
    shutil.rmtree(root, ignore_errors=True)
    return out


def _netns_pids(ns_name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns_name], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def run_one(workload: str, workdir: Path, *, mem_mib: int, workload_mib: int, data_mib: float,
            lru_gen: str | None, timeout: float, size: str = "1G") -> dict:
    import threading

    sys.path.insert(0, str(REPO / "tests"))
    import vmutil

    workdir.mkdir(parents=True, exist_ok=True)
    kernel, base = vmutil.ensure_images()
    initrd = _overlay(workdir, base, data_mib)
    disk = workdir / "scratch.img"
    with open(disk, "wb") as handle:
        handle.truncate(64 << 20)
    for stale in ("dump.raw", "nbdkit.log", "map.bin"):
        (workdir / stale).unlink(missing_ok=True)
    port = vmutil.PORT
    log = workdir / "nbdkit.log"
    server_argv = ["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
                   "-e", vmutil.EXPORT, "--filter=log", "memory", size, f"logfile={log}"]
    append = f"rootfstype=ramfs swaploc.workload={workload} swaploc.mib={workload_mib}"
    if lru_gen is not None:
        append += f" swaploc.lru_gen={lru_gen}"
    console = workdir / "console.log"
    t0 = time.monotonic()
    result: dict = {}
    with vmutil.NetNS(f"{vmutil.NETNS_PREFIX}{os.getpid()}") as ns:
        server = vmutil.Server(ns, server_argv, workdir / "server.log")
        box: dict = {}
        try:
            server.wait_ready(ns, port)
            vm = threading.Thread(target=lambda: box.update(vm=vmutil.boot_vm(
                ns, console, kernel=kernel, initrd=initrd, mem_mib=mem_mib, hog_mib=0, port=port,
                timeout=timeout, extra_append=append, disks=[disk])), daemon=True)
            vm.start()
            ready = None
            while ready is None:
                time.sleep(2)
                text = console.read_bytes().decode(errors="replace") if console.exists() else ""
                ready = re.search(r"^SWAPLOC: READY .*$", text, re.M)
                bad = re.search(r"^SWAPLOC: FAIL.*$|" + vmutil.ERROR_RE.pattern, text, re.M)
                if bad:
                    raise RuntimeError(f"guest: {bad[0]} (see {console})")
                if not vm.is_alive():
                    raise RuntimeError(f"guest ended without READY (see {console})")
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"no READY after {timeout}s (see {console})")
            t_ready = time.monotonic()
            print(f"[{workload}] guest ready after {t_ready - t0:.0f}s: {ready[0]}", flush=True)
            raw = disk.read_bytes()[MAP_OFFSET:]
            if not raw.startswith(MAP_MAGIC):
                raise RuntimeError("no swap map on the scratch disk")
            meta_len, count = struct.unpack_from("<QQ", raw, len(MAP_MAGIC))
            end = len(MAP_MAGIC) + 16 + meta_len + count * RECORD.size
            (workdir / "map.bin").write_bytes(raw[:end])
            subprocess.run(ns.argv(["nbdcopy", f"nbd://127.0.0.1:{port}/{vmutil.EXPORT}",
                                    str(workdir / "dump.raw")]), check=True, timeout=600)
            with open(disk, "r+b") as handle:
                handle.write(b"GO")
                handle.flush()
                os.fsync(handle.fileno())
            vm.join(300)
        finally:
            for pid in _netns_pids(ns.name):  # QEMU, if still running (ours: in our namespace)
                if pid != server.proc.pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            server.stop()
            disk.unlink(missing_ok=True)
        text = console.read_bytes().decode(errors="replace")
        result["go"] = re.findall(r"^SWAPLOC: GO .*$", text, re.M)
        result["guest_done"] = bool(re.search(r"^VM-E2E: done status=0", text, re.M))
        result["wall_s"] = round(time.monotonic() - t0)
        result["guest_ready_s"] = round(t_ready - t0)
    (workdir / "run.json").write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------- analysis


def read_map(path: Path) -> tuple[dict, list[tuple[int, int, int]]]:
    raw = path.read_bytes()
    meta_len, count = struct.unpack_from("<QQ", raw, len(MAP_MAGIC))
    start = len(MAP_MAGIC) + 16
    meta = json.loads(raw[start:start + meta_len])
    records = [RECORD.unpack_from(raw, start + meta_len + i * RECORD.size) for i in range(count)]
    return meta, records


def write_order(log: Path) -> dict[int, int]:
    """Device block -> sequence number of its last write (trims remove the block), up to
    the first request of a later connection (the dump: what the guest did after it, such
    as discarding the slots of the killed workloads, does not count)."""
    last: dict[int, int] = {}
    seq = 0
    guest = None
    pattern = re.compile(r"connection=(\d+) (Write|Trim|Zero) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)")
    later = re.compile(r"connection=(\d+) ")
    with open(log, errors="replace") as handle:
        for line in handle:
            c = later.search(line)
            if guest is not None and c and int(c[1]) > guest:
                break
            m = pattern.search(line)
            if not m or "return=" in line:
                continue
            if guest is None and m[2] == "Write":
                guest = int(m[1])
            offset, count = int(m[3], 16), int(m[4], 16)
            first, stop = offset // PAGE, (offset + count + PAGE - 1) // PAGE
            for block in range(first, stop):
                if m[2] == "Write":
                    last[block] = seq
                    seq += 1
                else:
                    last.pop(block, None)
    return last


def _grouped_cost(pages: list[bytes], codec) -> int:
    """Bytes the disk tier stores for one group (encode_group, else per page)."""
    if not pages:
        return 0
    if len(pages) == 1:
        return len(codec.encode(pages[0]).payload)
    payload = codec.encode_group(dict(enumerate(pages)))
    if payload is None:
        return sum(len(codec.encode(p).payload) for p in pages)
    return len(payload)


def _consecutive_groups(pages: list[bytes], codec, n: int = 16) -> int:
    return sum(_grouped_cost(pages[i:i + n], codec) for i in range(0, len(pages), n))


def analyse(workdir: Path, seed: int = 1) -> dict:
    sys.path.insert(0, str(REPO))
    import zstandard

    from nbdswap import codec

    meta, records = read_map(workdir / "map.bin")
    dump = open(workdir / "dump.raw", "rb")

    def block(b: int) -> bytes:
        dump.seek(b * PAGE)
        return dump.read(PAGE)

    def free(page: bytes) -> bool:
        return page[:8] * (PAGE // 8) == page

    by_block = {}
    duplicate_slots = 0
    for offset, pid, vaddr in records:
        if offset in by_block:
            duplicate_slots += 1  # shared (e.g. fork) pages: one slot, several mappings
            continue
        by_block[offset] = (pid, vaddr)
    pages = {b: block(b) for b in sorted(by_block)}
    data_blocks = [b for b in sorted(pages) if not free(pages[b])]
    # Blocks with data in the dump that no process maps (stale or swap cache); block 0
    # is the swap header.
    unmapped_data = 0
    with open(workdir / "dump.raw", "rb") as handle:
        handle.seek(PAGE)
        b = 1
        while page := handle.read(PAGE):
            if b not in pages and not free(page):
                unmapped_data += 1
            b += 1
    zram = zstandard.ZstdCompressor(level=1)
    zram_bytes = sum(min(len(zram.compress(pages[b])), PAGE) for b in data_blocks)
    per_page = sum(len(codec.encode(pages[b]).payload) for b in data_blocks)
    # nbdswap: aligned 16-block groups of the device.
    groups: dict[int, list[bytes]] = {}
    for b in data_blocks:
        groups.setdefault(b // codec.GROUP_PAGES, []).append(pages[b])
    device_aligned = sum(_grouped_cost(g, codec) for g in groups.values())
    device_compact = _consecutive_groups([pages[b] for b in data_blocks], codec)
    wo = write_order(workdir / "nbdkit.log") if (workdir / "nbdkit.log").exists() else {}
    written = [b for b in data_blocks if b in wo]
    write_ordered = _consecutive_groups([pages[b] for b in sorted(written, key=wo.__getitem__)], codec)
    va_sorted = sorted(data_blocks, key=lambda b: by_block[b])
    va_ordered = _consecutive_groups([pages[b] for b in va_sorted], codec)
    shuffled = list(data_blocks)
    random.Random(seed).shuffle(shuffled)
    random_ordered = _consecutive_groups([pages[b] for b in shuffled], codec)
    write_zram = sum(min(len(zram.compress(pages[b])), PAGE) for b in written)

    # Locality, over all mapped blocks (same-filled ones included: they have addresses too).
    mapped = sorted(by_block)
    pairs = next_page = prev_page = same_pid = near = 0
    run_lengths = []
    run = 1
    for a, b in zip(mapped, mapped[1:]):
        if b != a + 1:
            run_lengths.append(run)
            run = 1
            continue
        pairs += 1
        (pa, va), (pb, vb) = by_block[a], by_block[b]
        if pa == pb:
            same_pid += 1
            delta = vb - va
            if delta == PAGE:
                next_page += 1
            elif delta == -PAGE:
                prev_page += 1
            if abs(delta) <= 16 * PAGE:
                near += 1
        if pa == pb and vb - va == PAGE:
            run += 1
        else:
            run_lengths.append(run)
            run = 1
    run_lengths.append(run)
    # Per aligned group: distinct runs of consecutive addresses among its mapped blocks.
    runs_per_group = []
    members: dict[int, list[int]] = {}
    for b in mapped:
        members.setdefault(b // 16, []).append(b)
    for group in members.values():
        addrs = sorted(by_block[b] for b in group)
        runs_per_group.append(1 + sum(1 for x, y in zip(addrs, addrs[1:]) if not (x[0] == y[0] and y[1] - x[1] == PAGE)))
    # Write order vs device order: consecutive writes that land on consecutive blocks.
    seq_blocks = sorted(wo, key=wo.__getitem__)
    adjacent_writes = sum(1 for x, y in zip(seq_blocks, seq_blocks[1:]) if y == x + 1)
    w_pairs = w_next = 0
    seq_mapped = [b for b in seq_blocks if b in by_block]
    for x, y in zip(seq_mapped, seq_mapped[1:]):
        w_pairs += 1
        if by_block[x][0] == by_block[y][0] and by_block[y][1] - by_block[x][1] == PAGE:
            w_next += 1
    # Who owns the swapped pages.
    owners: dict[str, int] = {}
    for b, (pid, _) in by_block.items():
        comm = meta["procs"].get(str(pid), {}).get("comm", "?")
        owners[f"{comm}[{pid}]"] = owners.get(f"{comm}[{pid}]", 0) + 1
    n = len(data_blocks) or 1
    weighted = sorted(run_lengths)
    out = {
        "kernel": meta.get("kernel"), "rotational": meta.get("rotational"), "lru_gen": meta.get("lru_gen"),
        "workload": meta.get("workload"), "workload_mib": meta.get("workload_mib"),
        "guest_mem_kib": meta.get("mem_total_kib"), "build_s": meta.get("build_s"),
        "vmstat_before_map": meta.get("vmstat_before_map"), "vmstat_after_map": meta.get("vmstat_after_map"),
        "owners": dict(sorted(owners.items(), key=lambda kv: -kv[1])[:8]),
        "mapped_blocks": len(by_block), "shared_slot_mappings": duplicate_slots,
        "mapped_data_blocks": len(data_blocks), "mapped_same_filled_blocks": len(by_block) - len(data_blocks),
        "unmapped_data_blocks_in_dump": unmapped_data,
        "max_mapped_block": max(by_block) if by_block else 0,
        "zram_bytes_per_page": zram_bytes / n,
        "ratio": {
            "per_page_nbdswap_codec": per_page / zram_bytes,
            "grouped_device_aligned16": device_aligned / zram_bytes,
            "grouped_device_order_compacted16": device_compact / zram_bytes,
            "grouped_write_order16": write_ordered / write_zram if write_zram else None,
            "grouped_va_order16": va_ordered / zram_bytes,
            "grouped_random_order16": random_ordered / zram_bytes,
        },
        "write_ordered_blocks": len(written),
        "occupied_aligned_groups": len(groups), "data_blocks_per_occupied_group": len(data_blocks) / max(len(groups), 1),
        "locality": {
            "adjacent_mapped_pairs": pairs,
            "same_process": same_pid / pairs if pairs else None,
            "next_virtual_page": next_page / pairs if pairs else None,
            "previous_virtual_page": prev_page / pairs if pairs else None,
            "within_16_pages": near / pairs if pairs else None,
            "mean_run_pages": sum(run_lengths) / len(run_lengths),
            "page_weighted_median_run": _weighted_median(weighted),
            "mean_address_runs_per_aligned_group": sum(runs_per_group) / len(runs_per_group),
            "aligned_groups_one_run": sum(1 for r in runs_per_group if r == 1) / len(runs_per_group),
            "write_log_writes": len(seq_blocks),
            "consecutive_writes_to_next_block": adjacent_writes / max(len(seq_blocks) - 1, 1),
            "consecutive_writes_next_virtual_page": w_next / w_pairs if w_pairs else None,
        },
    }
    (workdir / "results.json").write_text(json.dumps(out, indent=1))
    return out


def _weighted_median(runs: list[int]) -> int:
    """The run length that the median page sits in."""
    total, acc = sum(runs), 0
    for r in runs:
        acc += r
        if acc * 2 >= total:
            return r
    return 0


def store_report(workdir: Path) -> dict:
    """bench/corpus.py report on the dump up to the last mapped block (the real Store)."""
    meta, records = read_map(workdir / "map.bin")
    last = max(r[0] for r in records) + 1
    corpus = workdir / "dump-trimmed.pages"
    with open(workdir / "dump.raw", "rb") as src, open(corpus, "wb") as dst:
        dst.write(bytes(PAGE))  # block 0: the swap header, not swapped memory
        src.seek(PAGE)
        dst.write(src.read((last - 1) * PAGE))
    out = subprocess.run([sys.executable, str(REPO / "bench" / "corpus.py"), "report", str(corpus), "--json"],
                         capture_output=True, text=True, check=True).stdout
    corpus.unlink()
    data = json.loads(out)
    store = data.get("store", {})
    result = {
        "corpus_pages": data["pages"], "corpus_zram_bytes": data["zram_bytes"],
        "disk_stored_vs_zram": store.get("drained_disk_stored_bytes", 0) / (data["zram_bytes"] or 1),
        "disk_used_vs_zram": store.get("drained_disk_used_bytes", 0) / (data["zram_bytes"] or 1),
        "disk_grouped_blocks": store.get("drained_disk_grouped_blocks"),
        "disk_grouped_payloads": store.get("drained_disk_grouped_payloads"),
        "payload_vs_zram": data["payload_vs_zram"],
    }
    (workdir / "store.json").write_text(json.dumps(result, indent=1))
    return result


def format_table(results: dict[str, dict]) -> str:
    names = list(results)
    rows = [("kernel", lambda r: r["kernel"]), ("lru_gen", lambda r: r["lru_gen"]),
            ("rotational", lambda r: r["rotational"]),
            ("mapped swapped pages (data)", lambda r: f"{r['mapped_blocks']} ({r['mapped_data_blocks']})"),
            ("unmapped data blocks in dump", lambda r: r["unmapped_data_blocks_in_dump"]),
            ("zram-like B/page", lambda r: f"{r['zram_bytes_per_page']:.0f}")]
    for key in ("per_page_nbdswap_codec", "grouped_device_aligned16", "grouped_device_order_compacted16",
                "grouped_write_order16", "grouped_va_order16", "grouped_random_order16"):
        rows.append((key + " / zram", lambda r, k=key: "-" if r["ratio"][k] is None else f"{r['ratio'][k]:.3f}"))
    rows.append(("store: disk stored / zram", lambda r: f"{r['store']['disk_stored_vs_zram']:.3f}"
                 if "store" in r else "-"))
    for key in ("same_process", "next_virtual_page", "previous_virtual_page", "within_16_pages",
                "mean_run_pages", "page_weighted_median_run", "mean_address_runs_per_aligned_group",
                "aligned_groups_one_run", "consecutive_writes_to_next_block", "consecutive_writes_next_virtual_page"):
        rows.append(("loc: " + key, lambda r, k=key: "-" if r["locality"][k] is None else
                     (f"{r['locality'][k]:.3f}" if isinstance(r["locality"][k], float) else str(r["locality"][k]))))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>14}" for n in names)]
    for label, get in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{str(get(results[n])):>14}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot the guest(s), dump, analyse")
    run.add_argument("--workload", action="append", choices=["objects", "text", "mix"])
    run.add_argument("--mem-mib", type=int, default=256, help="guest memory (default 256)")
    run.add_argument("--workload-mib", type=int, help="workload size (default 1.75 x guest memory)")
    run.add_argument("--data-mib", type=float, default=6.0, help="stdlib sources in the image (default 6)")
    run.add_argument("--lru-gen", choices=["y", "n"], help="set /sys/kernel/mm/lru_gen/enabled in the guest")
    run.add_argument("--out", type=Path, default=REPO / "build" / "swap-locality")
    run.add_argument("--tag", default="", help="suffix of the result directories")
    run.add_argument("--store", action="store_true", help="also bench/corpus.py report (the real Store) on the dump")
    run.add_argument("--timeout", type=float, default=3600)
    an = sub.add_parser("analyse", help="recompute the numbers of finished runs")
    an.add_argument("dirs", type=Path, nargs="+")
    an.add_argument("--store", action="store_true")
    sub.add_parser("closure")
    sub.add_parser("guest")
    gw = sub.add_parser("guest-workload")
    gw.add_argument("kind")
    gw.add_argument("mib", type=float)
    gw.add_argument("ready")
    args, _ = p.parse_known_args(argv)

    if args.command == "guest":
        return guest_main()
    if args.command == "guest-workload":
        guest_workload(args.kind, args.mib, args.ready)
        return 0
    if args.command == "closure":
        guest_closure()
        return 0
    results = {}
    if args.command == "run":
        # SIGTERM as an exception: the finally clauses stop QEMU and nbdkit.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        if os.geteuid() != 0:
            raise SystemExit("needs root (network namespace, image build)")
        for workload in args.workload or ["mix"]:
            workdir = args.out / f"{workload}{args.tag}"
            t0 = time.monotonic()
            info = run_one(workload, workdir, mem_mib=args.mem_mib,
                           workload_mib=args.workload_mib or int(1.75 * args.mem_mib),
                           data_mib=args.data_mib, lru_gen=args.lru_gen, timeout=args.timeout)
            results[workload + args.tag] = r = analyse(workdir)
            if args.store:
                r["store"] = store_report(workdir)
            r["run"] = info
            r["wall_s"] = round(time.monotonic() - t0)
            (workdir / "results.json").write_text(json.dumps(r, indent=1))
            print(f"[{workload}] done in {r['wall_s']}s", flush=True)
    else:
        for workdir in args.dirs:
            results[workdir.name] = r = analyse(workdir)
            if args.store:
                r["store"] = store_report(workdir)
            elif (workdir / "store.json").exists():
                r["store"] = json.loads((workdir / "store.json").read_text())
            if (workdir / "run.json").exists():
                r["run"] = json.loads((workdir / "run.json").read_text())
            (workdir / "results.json").write_text(json.dumps(r, indent=1))
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
