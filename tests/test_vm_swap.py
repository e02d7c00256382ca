"""End to end: a real Linux kernel (QEMU, TCG) swaps to nbdswap over NBD.

The guest connects /dev/nbd0 with nbd-client, swaps on it with discard and runs
a hog that needs more memory than the guest has, verifying every byte it wrote
(deploy/vm/). Fails on any guest I/O error, oops or panic, on HOG FAIL or a
missing HOG PASS, and when the server saw no TRIM.

NBDSWAP_VM_SERVER=nbdkit runs the same test against nbdkit's memory plugin (the
reference server) to check the harness itself. Takes 1-3 minutes; needs root.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdutil import remove_ram_arena

try:
    import vmutil
except ImportError:  # tests/ became a package
    from tests import vmutil

pytestmark = pytest.mark.vm

SERVER = os.environ.get("NBDSWAP_VM_SERVER", "nbdswap")
GUEST_MEM_MIB = 160
HOG_MIB = 256  # > guest memory: the hog can only pass by swapping
VM_TIMEOUT_S = 15 * 60


@pytest.fixture(scope="module")
def images() -> tuple[Path, Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    return vmutil.ensure_images()


@pytest.fixture
def netns() -> Iterator[vmutil.NetNS]:
    with vmutil.NetNS() as ns:
        yield ns


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    path.mkdir()
    yield path
    remove_ram_arena(path)


@pytest.fixture
def swap_server(netns: vmutil.NetNS, tmp_path: Path, state_dir: Path) -> Iterator[vmutil.Server]:
    if SERVER == "nbdkit":
        argv = vmutil.nbdkit_argv(stats_file=tmp_path / "nbdkit-stats.txt")
    elif SERVER == "nbdswap":
        argv = vmutil.nbdswap_argv(state_dir, size="1G", ram_max="24M", disk_max="2G")
    else:
        raise ValueError(f"NBDSWAP_VM_SERVER={SERVER!r}: expected nbdswap or nbdkit")
    srv = vmutil.Server(netns, argv, tmp_path / "server.log")
    try:  # stopped before the namespace goes (fixture teardown order), even on failure
        srv.wait_ready(netns)
        yield srv
    finally:
        srv.stop()


def _trims(tmp_path: Path, state_dir: Path, failures: list[str]) -> int | None:
    """TRIM requests the server saw: from `nbdswap status` (server running) or
    nbdkit's stats file (written when it exits, so call after stop())."""
    try:
        if SERVER == "nbdkit":
            return vmutil.nbdkit_stats(tmp_path / "nbdkit-stats.txt").get("trim", 0)
        status = vmutil.nbdswap_status(state_dir)
        print("server status:", json.dumps(status, indent=2))
        return int(status["requests"]["trim"])
    except Exception as exc:  # report with everything else rather than stop here
        failures.append(f"cannot read the server's TRIM count: {exc!r}")
        return None


def test_kernel_swaps_to_server(
    images: tuple[Path, Path], netns: vmutil.NetNS, swap_server: vmutil.Server,
    tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    kernel, initrd = images
    result = vmutil.boot_vm(
        netns, tmp_path / "console.log", kernel=kernel, initrd=initrd,
        mem_mib=GUEST_MEM_MIB, hog_mib=HOG_MIB, timeout=VM_TIMEOUT_S,
    )
    failures = result.failures()

    trims = None if SERVER == "nbdkit" else _trims(tmp_path, state_dir, failures)
    server_rc = swap_server.stop()
    if SERVER == "nbdkit":
        trims = _trims(tmp_path, state_dir, failures)
    if trims == 0:
        failures.append("the server saw no TRIM (swapon --discard)")
    if server_rc != 0:
        failures.append(f"server did not exit cleanly on SIGTERM: exit code {server_rc}")

    summary = (
        f"VM e2e [{SERVER}]: wall {result.wall_s:.1f}s, guest pswpout={result.pswpout} "
        f"pswpin={result.pswpin} discards={result.guest_discards}, server trims={trims}"
    )
    with capsys.disabled():
        print(f"\n{summary}")
    if failures:
        pytest.fail(
            "\n".join([summary, *failures,
                       f"---- guest console tail ({result.console_path}):", result.tail(80),
                       f"---- server log tail ({swap_server.log_path}):",
                       "\n".join(swap_server.log.splitlines()[-40:])]),
            pytrace=False,
        )
