"""nbdswap as the swap device of its own host: server, client and swap in one guest.

The guest (deploy/vm, image "local", e2e.client=local) has no network. Its /dev/vda
is an ext4 image made here; the guest mounts it as the server's state dir (block map
and disk tier), starts `nbdswap serve` on a Unix socket (RAM tier of 8 MiB in the
guest's /dev/shm), connects /dev/nbd0 to that socket with `nbdswap attach`, swaps on
it and runs a hog of twice its RAM. Nothing but the kernel's own block I/O to
/dev/vda leaves the guest, so the server is the swap backend of the machine it runs
on and must not deadlock on its own memory.

The hog runs in a memory cgroup (memory.max HOG_CGROUP_MIB), as a host's workloads
would (MemoryMax= on their slice): to store what the kernel swaps out, the server
needs new pages (page cache of the disk tier, the RAM tier's tmpfs), and when the
whole machine is at its min watermark the only way to free them is to swap, which
waits for the server. Without the cgroup this guest deadlocks within a minute.

The guest's root file system is ramfs (rootfstype=ramfs): it stands for a host's
disk, whose program files are read back from disk and never go to swap; on tmpfs the
server's not yet used code could be paged out to the device it serves itself.

The server runs one encoder worker and offloads to it every loop turn that brings 4
pages or more while its ring has room (the guest has one vCPU, where the default is no
worker): the worker, too, must stay resident and keep encoding while the machine swaps
to its server.

Fails on a hog failure, any guest I/O error, oops or OOM kill, too little swap-out,
a server, encoder worker or client with swapped-out pages, without oom_score_adj
-1000 or with a thread not marked PR_SET_IO_FLUSHER, no block on the disk tier, no
page encoded on the worker or a worker given up, or an unclean exit.
Takes about 12 minutes under TCG; needs root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

try:
    import vmutil
except ImportError:  # tests/ became a package
    from tests import vmutil

pytestmark = pytest.mark.vm

GUEST_MEM_MIB = 256
HOG_MIB = 2 * GUEST_MEM_MIB
#: What the hog may keep in RAM. The rest of the guest's memory is the server's
#: headroom: the guest's fixed share (kernel, the ramfs root with two Pythons, the
#: locked server and client) is about 150 MiB of 256.
HOG_CGROUP_MIB = 32
DISK_MIB = 1024
RAM_MAX = "8M"
DISK_MAX = "768M"
VM_TIMEOUT_S = 45 * 60
#: Every loop turn of MIN_OFFLOAD pages or more goes to the worker, whatever its pages cost.
ENCODER_ARGS = "e2e.encoder_workers=1 e2e.encoder_offload_above=0"
#: PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE: what PR_SET_IO_FLUSHER sets on a thread.
IO_FLUSHER_FLAGS = 0x80000 | 0x100000
RAMFS_MAGIC = 0x858458F6


def _process(console: str, label: str, name: str) -> tuple[dict[str, int], dict[int, int]] | None:
    """The memory figures (kB, and oom_score_adj) and per-thread flags the guest reported."""
    line = re.search(rf"^VM-E2E: ---- {label}: {name} pid=\d+ (.*)$", console, re.M)
    if line is None:
        return None
    figures = {key: int(value) for key, value in re.findall(r"(\w+)[:=] *(-?\d+)", line[1])}
    threads = {int(tid): int(flags) for tid, flags in
               re.findall(rf"^VM-E2E: ---- {label}: {name} thread (\d+) flags=(\d+)$", console, re.M)}
    return figures, threads


def _check_resident(console: str, name: str, failures: list[str]) -> str:
    """That the process stayed resident through the hog; returns a summary."""
    found = _process(console, "after hog", name)
    if found is None:
        failures.append(f"no report on the {name} after the hog (did it exit?)")
        return f"{name}: -"
    figures, threads = found
    for key in ("VmSwap", "smaps_swap"):  # the latter with the RAM tier's shared memory
        if figures.get(key) != 0:
            failures.append(f"{name}: {key} {figures.get(key)} kB, it was swapped out")
    if not figures.get("VmLck"):
        failures.append(f"{name}: no locked memory (VmLck {figures.get('VmLck')} kB)")
    if figures.get("oom_score_adj") != -1000:
        failures.append(f"{name}: oom_score_adj is {figures.get('oom_score_adj')}, not -1000")
    unmarked = [tid for tid, flags in threads.items() if flags & IO_FLUSHER_FLAGS != IO_FLUSHER_FLAGS]
    if not threads or unmarked:
        failures.append(f"{name}: threads without PR_SET_IO_FLUSHER: {unmarked or 'no threads reported'}")
    return (f"{name}: VmRSS {figures.get('VmRSS')} kB, VmLck {figures.get('VmLck')} kB, "
            f"VmSwap {figures.get('VmSwap')} kB, smaps_swap {figures.get('smaps_swap')} kB, "
            f"oom_score_adj {figures.get('oom_score_adj')}, {len(threads)} threads")


def _server_status(console: str, failures: list[str]) -> dict:
    match = re.search(r"^VM-E2E: server status (\{.*\})$", console, re.M)
    try:
        return json.loads(match[1]) if match else {}
    except ValueError as error:
        failures.append(f"unreadable server status: {error}")
        return {}


def test_server_backs_swap_of_its_own_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: deploy/vm/build.sh")
    kernel, initrd = vmutil.ensure_images(variant="local")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as handle:
        handle.truncate(DISK_MIB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-L", "nbdswap", str(disk)], check=True)
    try:
        result = vmutil.boot_vm(
            None, tmp_path / "console.log", kernel=kernel, initrd=initrd, mem_mib=GUEST_MEM_MIB,
            hog_mib=HOG_MIB, timeout=VM_TIMEOUT_S, network=False, disks=[disk],
            extra_append=(f"e2e.client=local rootfstype=ramfs e2e.hog_cgroup={HOG_CGROUP_MIB} "
                          f"e2e.ram_max={RAM_MAX} e2e.disk_max={DISK_MAX} {ENCODER_ARGS}"))
    finally:
        disk.unlink()
    console = result.console

    failures = result.failures()
    magic = re.search(r"^VM-E2E: root file system magic=([0-9a-f]+)$", console, re.M)
    if magic is None or int(magic[1], 16) != RAMFS_MAGIC:
        failures.append(f"the guest's root is not ramfs (magic {magic and magic[1]})")
    events = re.search(r"^VM-E2E: hog cgroup events: .*\boom_kill (\d+)", console, re.M)
    if events is None:
        failures.append("no report on the hog's memory cgroup")
    elif int(events[1]):
        failures.append(f"OOM kills in the hog's cgroup: {events[0]}")
    swapped_mib = (result.pswpout or 0) * 4096 / 2**20
    if swapped_mib < HOG_MIB - GUEST_MEM_MIB:
        failures.append(f"only {swapped_mib:.0f} MiB swapped out: the hog cannot fit in RAM, at least "
                        f"{HOG_MIB - GUEST_MEM_MIB} MiB must have gone to nbdswap")
    server = _check_resident(console, "server", failures)
    worker = _check_resident(console, "encoder", failures)
    client = _check_resident(console, "attach", failures)
    status = _server_status(console, failures)
    encoder = status.get("encoder", {})
    if not encoder.get("pages_offloaded") or encoder.get("worker_failures") != 0:
        failures.append(f"the worker encoded no page, or was given up: {encoder}")
    tiers = status.get("tiers", {})
    if not tiers.get("disk", {}).get("blocks"):
        failures.append(f"no block on the disk tier: {tiers}")
    for name in ("server", "attach"):
        if not re.search(rf"^VM-E2E: {name} exit=0$", console, re.M):
            failures.append(f"{name} did not exit cleanly on SIGTERM")

    summary = (f"VM local [{GUEST_MEM_MIB} MiB guest, {HOG_MIB} MiB hog in {HOG_CGROUP_MIB} MiB]: "
               f"wall {result.wall_s:.1f}s, pswpout={result.pswpout} pswpin={result.pswpin}; "
               f"{server}; {worker}; {client}; encoder: {encoder}; tier blocks: "
               + ", ".join(f"{name}={tier.get('blocks')}" for name, tier in tiers.items()))
    with capsys.disabled():
        print(f"\n{summary}")
    if failures:
        pytest.fail("\n".join([summary, *failures, f"---- guest console tail ({result.console_path}):",
                               result.tail(100)]), pytrace=False)
