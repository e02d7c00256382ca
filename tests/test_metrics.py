"""Metrics, dashboards and alerts, checked against a real Prometheus scraping a live
nbdswap under load: every dashboard query must parse and return data."""

from __future__ import annotations

import ast
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nbdswap import metrics
from nbdswap.device import BlockDevice
from nbdswap.errors import CorruptBlockError
from nbdswap.metrics import LATENCY_BUCKETS_SECONDS, NbdswapCollector, RequestStats
from nbdswap.policy import Policy, PolicySettings
from nbdswap.protocol import Command, Request
from nbdswap.status_view import render_status
from nbdswap.store import BLOCK_SIZE, Store
from nbdswap.tiers.slab import SLAB_SIZE
from nbdutil import (SYSTEM_PATH, free_port, mixed_data, nbdsh, nbdswap_command, run_client,
                     ServerProcess, wait_until)
from redisutil import RedisServer

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = ROOT / "grafana" / "provisioning"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
#: What Grafana puts in place of its built-in variables when the test runs a query.
GRAFANA_BUILTINS = {"$__rate_interval": "30s", "$__range": "2m"}
#: Label names the exporter may use; a block number must never become a label.
ALLOWED_LABELS = {"op", "errno", "tier", "version", "python", "export", "le", "from", "to", "reason", "level",
                  "where"}
MiB = 1 << 20
#: RAM watermarks of the live server: low enough that its 2 MiB RAM tier demotes under
#: load; a short policy interval lets the CLOCK hand find cold blocks within seconds.
LIVE_POLICY = ("ram_high=0.5", "ram_low=0.3", "interval=0.02")


# --- a live server, a real Prometheus, load --------------------------------------


def http_get(url: str, params: dict | None = None) -> bytes:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


class PrometheusProcess:
    """Debian's ``prometheus`` on a free loopback port, with its own storage,
    scraping one target every second and evaluating the deploy/ alert rules."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS_DIR / "nbdswap-rules.yml")],
            "scrape_configs": [{"job_name": "nbdswap", "static_configs": [{"targets": [target]}]}],
        }))
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PATH": SYSTEM_PATH})
        wait_until(self._ready, "Prometheus to be ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()}")
        try:
            return http_get(self.url + "/-/ready") is not None
        except OSError:
            return False

    def api(self, path: str, **params) -> dict | list:
        answer = json.loads(http_get(f"{self.url}/api/v1/{path}", params))
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        data = self.api("query", query=expr, time=f"{at:.3f}")
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Live:
    """What the module's tests share: server, Prometheus and what was seen under load."""

    server: ServerProcess
    prometheus: PrometheusProcess
    target: str
    metrics_under_load: str
    status_under_load: str
    evaluated_at: float

    def metrics(self) -> str:
        return http_get(f"http://{self.target}/metrics").decode()

    def status(self, interval: float) -> str:
        """``nbdswap status`` as a 160-column terminal shows it."""
        return subprocess.run(
            nbdswap_command() + ["status", "--state-dir", str(self.server.state_dir), "--interval", str(interval)],
            capture_output=True, check=True, timeout=30, env={**os.environ, "COLUMNS": "160"},
        ).stdout.decode()


FILL_SCRIPT = """
import errno, random
rng = random.Random(7)
offset = 128 << 20
while True:
    try:
        h.pwrite(rng.randbytes(1 << 20), offset)
    except nbd.Error as error:
        assert error.errnum == errno.ENOSPC, error
        break
    offset += 1 << 20
"""

OPERATIONS_SCRIPT = """
import errno
h.pwrite(bytes(4096) + b"\\x5a" * 4096, 0)
h.pread(8192, 0)
h.trim(4096, 0)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
h.flush()
h.cache(4096, 0)
h.block_status(1 << 20, 0, lambda *args: 0)
try:
    h.pread(4096, 100)
except nbd.Error as error:
    assert error.errnum == errno.EINVAL
"""


def run_fio_while(live: Live) -> None:
    """Random reads and writes for a few seconds; sample /metrics and the status
    view while they run."""
    fio = subprocess.Popen(
        ["fio", "--name=load", "--ioengine=nbd", f"--uri={live.server.uri}", "--rw=randrw",
         "--bs=4k", "--iodepth=16", "--size=32M", "--time_based", "--runtime=5",
         "--buffer_compress_percentage=60", "--refill_buffers", "--output-format=terse"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PATH": SYSTEM_PATH})
    try:
        time.sleep(2)
        live.metrics_under_load = live.metrics()
        live.status_under_load = live.status(interval=1)
    finally:
        assert fio.wait(60) == 0, fio.stderr.read().decode()


def scraped_value(live: Live, expr: str) -> float | None:
    result = live.prometheus.query(expr, time.time())
    return float(result[0]["value"][1]) if result else None


def generate_load(live: Live) -> None:
    wait_until(lambda: scraped_value(live, 'nbdswap_request_errors_total{errno="ENOSPC", op="write"}') == 0,
               "a first scrape of the idle server")
    run_fio_while(live)
    # Under uniform random load few blocks stay cold; once it ends, RAM (above its high
    # watermark) demotes to the disk, which still has room.
    wait_until(lambda: (scraped_value(live, 'max(count_over_time(nbdswap_moves_total{reason="demote"}[30s]))')
                        or 0) >= 2, "Prometheus to scrape demotions twice")
    nbdsh(live.server.uri, OPERATIONS_SCRIPT)
    nbdsh(live.server.uri, FILL_SCRIPT)
    requests = float(re.search(r'^nbdswap_requests_total\{op="write"\} (\S+)$', live.metrics(), re.M)[1])
    wait_until(lambda: scraped_value(live, 'nbdswap_requests_total{op="write"}') == requests,
               "Prometheus to scrape the final counters")
    live.evaluated_at = time.time()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("metrics")
    state = Live()
    state.target = f"127.0.0.1:{free_port()}"
    policy_flags = tuple(flag for setting in LIVE_POLICY for flag in ("--policy", setting))
    # One encoder worker whatever the machine's cores: the dashboards show its metrics.
    state.server = ServerProcess(workdir, size="512M", ram_max="2M", disk_max="64M",
                                 extra=("--metrics", state.target, "--encoder-workers", "1", *policy_flags))
    try:
        state.server.start()
        state.prometheus = PrometheusProcess(workdir, state.target)
        try:
            generate_load(state)
            yield state
        finally:
            state.prometheus.stop()
    finally:
        state.server.cleanup()


# --- the exporter ------------------------------------------------------------------


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, timeout=60,
                          cwd=PROMETHEUS_DIR, env={**os.environ, "PATH": SYSTEM_PATH})


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, labels): value}`` of an exposition text."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(values: dict, name: str, **labels) -> float:
    return values[name, frozenset(labels.items())]


def test_metrics_under_load_pass_promtool(live):
    result = promtool("check", "metrics", stdin=live.metrics_under_load)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


def test_exported_families_follow_the_conventions(live):
    families = {family.name: family for family in text_string_to_metric_families(live.metrics())}
    for family in families.values():
        assert family.name.startswith(("nbdswap_", "process_")), family.name
        assert family.documentation, family.name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
    assert families["nbdswap_request_duration_seconds"].type == "histogram"
    assert families["nbdswap_requests"].type == "counter"
    (build,) = families["nbdswap_build_info"].samples
    assert build.value == 1 and set(build.labels) == {"version", "python"}
    tiers = {s.labels["tier"] for s in families["nbdswap_tier_capacity_bytes"].samples}
    assert tiers >= {"ram", "disk"}


def test_histograms_are_cumulative_and_count_every_request(live):
    text = live.metrics()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests = {s.labels["op"]: s.value for s in families["nbdswap_requests"].samples
                if s.name == "nbdswap_requests_total"}
    histogram = families["nbdswap_request_duration_seconds"].samples
    for op, total in requests.items():
        buckets = [s for s in histogram if s.name.endswith("_bucket") and s.labels["op"] == op]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and len(buckets) == len(LATENCY_BUCKETS_SECONDS) + 1
        assert buckets[-1].labels["le"] == "+Inf" and counts[-1] == total, op
    assert requests["read"] > 1000 and requests["write"] > 1000
    for op in ("trim", "write_zeroes", "flush", "cache", "block_status"):
        assert requests[op] >= 1, op


def test_errors_are_counted_by_operation_and_errno(live):
    text = live.metrics()
    assert re.search(r'^nbdswap_request_errors_total\{errno="ENOSPC",op="write"\} [1-9]', text, re.M)
    assert re.search(r'^nbdswap_request_errors_total\{errno="EINVAL",op="read"\} 1\.0$', text, re.M)
    assert re.search(r'^nbdswap_request_errors_total\{errno="EIO",op="read"\} 0\.0$', text, re.M)


def test_policy_metrics_under_load(live):
    during, after = samples(live.metrics_under_load), samples(live.metrics())
    for values in (during, after):
        assert sample(values, "nbdswap_tier_watermark_ratio", tier="ram", level="high") == 0.5
        assert sample(values, "nbdswap_tier_watermark_ratio", tier="ram", level="low") == 0.3
        assert sample(values, "nbdswap_tier_watermark_ratio", tier="disk", level="high") == 0.9
        for tier in ("ram", "disk", "remote"):
            assert sample(values, "nbdswap_drain_in_progress", tier=tier) == 0
            assert sample(values, "nbdswap_drain_remaining_blocks", tier=tier) == 0
            assert ("nbdswap_clean_copies", frozenset({"tier": tier}.items())) in values
        assert ("nbdswap_policy_promotions_queued", frozenset()) in values
    assert sample(during, "nbdswap_tier_usage_ratio", tier="ram") > 0.3
    assert sample(after, "nbdswap_moves_total", **{"from": "ram", "to": "disk", "reason": "demote"}) > 0
    # Filled until ENOSPC: every slab of the disk is handed out, but for those of the
    # failed last 1 MiB write, whose pages are freed again.  Slots stay free in the 1 MiB
    # spans of grouped payloads, which single pages cannot use, so the usage ratio ends
    # a little lower, depending on how many groups were demoted before the fill.
    capacity = sample(after, "nbdswap_tier_capacity_bytes", tier="disk")
    assert sample(after, "nbdswap_tier_slab_bytes", tier="disk") >= capacity - (2 << 20)
    assert sample(after, "nbdswap_tier_usage_ratio", tier="disk") > 0.8

    def stalled() -> float:  # the full disk has no tier below it
        return sample(samples(live.metrics()), "nbdswap_policy_demotions_stalled_total", tier="disk")
    wait_until(lambda: stalled() > 0, "the disk's demotions to stall", timeout=30)


def test_latency_histogram_buckets_are_inclusive_upper_bounds():
    stats = RequestStats()
    for nanoseconds in (1, 5_000, 5_001, 10**12):
        stats.record(4096, nanoseconds)
    assert (stats.requests, stats.bytes) == (4, 4 * 4096)
    buckets, seconds = stats.cumulative()
    assert buckets[0] == ("5e-06", 2) and buckets[1] == ("1e-05", 3)
    assert buckets[-1] == ("+Inf", 4) and buckets[-2][1] == 3
    assert seconds == pytest.approx(1000 + 10_002e-9)


class FakeStore:
    """Serves ``stats`` given to it; reads fail as corrupt."""

    def __init__(self, stats: dict) -> None:
        self._stats = stats

    def stats(self) -> dict:
        return self._stats

    async def read(self, offset: int, length: int) -> bytes:
        raise CorruptBlockError("block 3 failed its checksum")


class FakeConnection:
    def __init__(self) -> None:
        self.errors = []

    def reply_error(self, request, errno, message) -> None:
        self.errors.append(errno.name)


class FakeServer:
    connections = frozenset()


REMOTE_STATS = {
    "tiers": {
        "ram": {"blocks": 2, "stored_bytes": 900, "used_bytes": 1024, "capacity_bytes": 4096},
        "remote": {"blocks": 5, "stored_bytes": 7000, "used_bytes": 7000, "capacity_bytes": 1 << 30,
                   "up": True, "errors_total": 3, "endpoint": "redis://10.0.0.1:6379/0"},
    },
    "map": {"blocks": 9, "bytes": 8192},
    "zero_blocks": 1, "same_filled_blocks": 1, "lost_blocks": 0,
    "moves": {}, "move_races_lost": 0, "clean_copy_hits": 0, "clean_copies_dropped": 0,
    "clean_copies": {"ram": 0, "remote": 0}, "draining": [],
}


class FakePolicy:
    """A policy engine that is idle: no watermarks, drains or queued promotions."""

    @staticmethod
    def stats() -> dict:
        return {"watermarks": {}, "drains": {}, "demotions_stalled": {}, "promotions_queued": 0}


async def scrape(device: BlockDevice, policy) -> str:
    """The exposition text, scraped from a thread as the metrics endpoint does."""
    registry = CollectorRegistry()
    registry.register(NbdswapCollector(device, device.store, FakeServer(), policy, asyncio.get_running_loop()))
    return (await asyncio.to_thread(generate_latest, registry)).decode()


async def test_a_new_tier_and_its_health_fields_are_exported_without_changes():
    device = BlockDevice(FakeStore(REMOTE_STATS), "swap", 64 * MiB)
    connection = FakeConnection()
    await device.execute(Request(cookie=1, command=Command.READ, flags=0, offset=12288, length=4096),
                         connection)
    assert connection.errors == ["EIO"] and device.corrupt_block_errors == 1
    text = await scrape(device, FakePolicy())
    assert 'nbdswap_tier_up{tier="remote"} 1.0' in text
    assert "# TYPE nbdswap_tier_errors_total counter" in text
    assert 'nbdswap_tier_errors_total{tier="remote"} 3.0' in text
    assert 'nbdswap_tier_logical_bytes{tier="remote"} 20480.0' in text
    assert "endpoint" not in text
    assert "nbdswap_corrupt_block_errors_total 1.0" in text
    assert 'nbdswap_request_duration_seconds_count{op="read"} 1.0' in text
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0 and not result.stdout.strip(), result


async def test_moves_clean_copies_watermarks_and_drains_are_exported(state_dir):
    store = Store.open(state_dir, size=4 * MiB, ram_max=4 * SLAB_SIZE, disk_max=64 * SLAB_SIZE)
    try:
        policy = Policy(store, PolicySettings(ram_high=0.8, ram_low=0.6))
        for block in range(10):
            await store.write(block * BLOCK_SIZE, bytes([block + 1]) * 3072 + bytes(range(256)) * 4)
        assert await store.move(0, "disk") and await store.move(0, "ram", keep_source=True)
        policy.drain("ram")
        text = await scrape(BlockDevice(store, "swap", 4 * MiB), policy)
    finally:
        await store.close()
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0 and not result.stdout.strip(), result
    values = samples(text)
    assert sample(values, "nbdswap_moves_total", **{"from": "ram", "to": "disk", "reason": "manual"}) == 1
    assert sample(values, "nbdswap_moves_total", **{"from": "disk", "to": "ram", "reason": "manual"}) == 1
    assert sample(values, "nbdswap_clean_copies", tier="disk") == 1
    assert sample(values, "nbdswap_clean_copy_hits_total") == sample(values, "nbdswap_move_races_lost_total") == 0
    assert sample(values, "nbdswap_tier_watermark_ratio", tier="ram", level="high") == 0.8
    assert sample(values, "nbdswap_tier_watermark_ratio", tier="disk", level="low") == 0.8
    assert 0 < sample(values, "nbdswap_tier_usage_ratio", tier="ram") < 0.8
    assert sample(values, "nbdswap_policy_demotions_stalled_total", tier="ram") == 0
    assert sample(values, "nbdswap_policy_promotions_queued") == 0
    assert sample(values, "nbdswap_drain_in_progress", tier="ram") == 1
    assert sample(values, "nbdswap_drain_remaining_blocks", tier="ram") == 10
    for tier in ("disk", "remote"):
        assert sample(values, "nbdswap_drain_in_progress", tier=tier) == 0
        assert sample(values, "nbdswap_drain_remaining_blocks", tier=tier) == 0
    names = {name for name, _ in values}
    assert not names & {"nbdswap_move_races_lost", "nbdswap_clean_copy_hits", "nbdswap_clean_copies_ram"}


async def test_a_scrape_the_blocked_event_loop_does_not_answer_goes_without_policy_metrics(monkeypatch):
    monkeypatch.setattr(metrics, "POLICY_STATS_TIMEOUT", 0.05)
    device = BlockDevice(FakeStore(REMOTE_STATS), "swap", 64 * MiB)
    registry = CollectorRegistry()
    registry.register(NbdswapCollector(device, device.store, FakeServer(), FakePolicy(), asyncio.get_running_loop()))
    scraping = asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
    time.sleep(0.5)  # the event loop is blocked
    text = (await scraping).decode()
    assert "nbdswap_requests_total" in text and "nbdswap_moves_total" in text
    assert "nbdswap_policy_promotions_queued" not in text
    assert "nbdswap_policy_promotions_queued 0.0" in await scrape(device, FakePolicy())


#: The HELP text of a store field that has none of its own (metrics._family).
GENERIC_HELP = "as Store.stats() reports it"


async def test_remote_series_exist_at_zero_without_a_remote_tier_and_every_family_has_its_own_help(state_dir):
    store = Store.open(state_dir, size=4 * MiB, ram_max=4 * SLAB_SIZE, disk_max=64 * SLAB_SIZE)
    try:
        text = await scrape(BlockDevice(store, "swap", 4 * MiB), Policy(store))
    finally:
        await store.close()
    values = samples(text)
    assert sample(values, "nbdswap_tier_configured", tier="remote") == 0
    assert sample(values, "nbdswap_tier_up", tier="remote") == 0
    for counter in ("errors", "orphans_removed", "corrupt_reads"):
        assert sample(values, f"nbdswap_tier_{counter}_total", tier="remote") == 0, counter
    assert "# TYPE nbdswap_tier_errors_total counter" in text
    assert ("nbdswap_tier_errors_total", frozenset({"tier": "disk"}.items())) not in values
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0 and not result.stdout.strip(), result
    with_remote = await scrape(BlockDevice(FakeStore(REMOTE_STATS), "swap", 64 * MiB), FakePolicy())
    for exposition in (text, with_remote):
        for family in text_string_to_metric_families(exposition):
            assert family.documentation and GENERIC_HELP not in family.documentation, family.name


def move_reasons_in_the_code() -> set[str]:
    """The ``reason`` strings store.py and policy.py pass on to ``nbdswap_moves_total``:
    in the policy engine's work items ``(block, target, reason, tier)`` (yielded, or the
    first element of a job), as arguments of the store's moving methods, and as the
    default of a ``reason`` parameter."""
    positions = {"move": 2, "move_group": 2, "_repoint": 3, "_commit_move": 3, "_stage_group": 3}
    reasons = set()
    for module in ("store.py", "policy.py"):
        tree = ast.parse((ROOT / "nbdswap" / module).read_text())
        items = [node.value for node in ast.walk(tree) if isinstance(node, ast.Yield)]
        items += [node.elts[0] for node in ast.walk(tree) if isinstance(node, ast.Tuple) and node.elts]
        found = [item.elts[2] for item in items if isinstance(item, ast.Tuple) and len(item.elts) == 4]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in positions:
                position = positions[node.func.attr]
                found += node.args[position:position + 1] + [kw.value for kw in node.keywords if kw.arg == "reason"]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                with_defaults = node.args.args[len(node.args.args) - len(node.args.defaults):]
                found += [default for arg, default in zip(with_defaults, node.args.defaults) if arg.arg == "reason"]
        reasons |= {node.value for node in found if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return reasons


async def test_the_moves_help_names_every_reason_the_code_moves_blocks_for():
    reasons = move_reasons_in_the_code()
    assert {"demote", "promote", "drain", "manual"} < reasons  # the scan finds them at all
    assert reasons == set(metrics.MOVE_REASONS)
    text = await scrape(BlockDevice(FakeStore(REMOTE_STATS), "swap", 64 * MiB), FakePolicy())
    (documentation,) = re.findall(r"^# HELP nbdswap_moves_total (.*)$", text, re.M)
    assert set(re.search(r"\(([a-z, ]+)\)$", documentation)[1].split(", ")) == reasons


# --- dashboards against the real Prometheus ----------------------------------------


def dashboard_queries() -> list[tuple[str, str, str]]:
    """``(dashboard file, panel title, expr)`` of every panel target."""
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                queries.append((path.name, panel["title"], target["expr"]))
    return queries


def grafana_substitute(expr: str, instance: str) -> str:
    for variable, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(variable, value)
    return expr.replace("$instance", instance)


def test_dashboards_exist_with_queries():
    assert {path.stem for path in DASHBOARDS} == {"nbdswap-overview", "nbdswap-tiers", "nbdswap-reliability"}
    assert len(dashboard_queries()) >= 30


@pytest.mark.parametrize("dashboard, panel, expr", dashboard_queries(),
                         ids=[f"{d}:{p}:{i}" for i, (d, p, _) in enumerate(dashboard_queries())])
def test_every_panel_query_returns_data(live, dashboard, panel, expr):
    result = live.prometheus.query(grafana_substitute(expr, live.target), live.evaluated_at)
    assert result, f"{dashboard} / {panel}: no data for {expr}"
    values = [float(sample["value"][1]) for sample in result]
    assert any(math.isfinite(value) for value in values), (panel, expr, values)


def test_every_metric_a_dashboard_queries_is_exported(live):
    exported = set(live.prometheus.api("label/__name__/values"))
    used = {name for _, _, expr in dashboard_queries()
            for name in re.findall(r"\b((?:nbdswap|process)_[a-z0-9_]+|up)\s*\{", expr)}
    assert used and used <= exported, used - exported


def test_instance_variable_lists_the_server(live):
    values = live.prometheus.api("label/instance/values", **{"match[]": "nbdswap_build_info"})
    assert values == [live.target]


def test_real_prometheus_loads_the_rules_and_fires_on_enospc(live):
    groups = live.prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 10 and all(rule["health"] == "ok" for rule in rules), rules

    def enospc_firing() -> bool:
        alerts = live.prometheus.api("alerts")["alerts"]
        return any(a["labels"]["alertname"] == "NbdswapEnospcReturned" and a["state"] == "firing"
                   for a in alerts)
    wait_until(enospc_firing, "the ENOSPC alert to fire", timeout=30)


# --- clean copies and a remote tier outage against the real Prometheus ------------------


def panel_exprs(dashboard: str, title: str) -> dict[str, str]:
    """``{legend: expr}`` of one panel's targets."""
    (panel,) = [panel for panel in json.loads((ROOT / "grafana" / "dashboards" / dashboard).read_text())["panels"]
                if panel["title"] == title]
    return {target["legendFormat"]: target["expr"] for target in panel["targets"]}


def test_dashboards_count_blocks_once_and_show_a_remote_tier_outage(tmp_path):
    """RAM over a remote tier only: blocks promoted from it keep a clean copy there, and
    the block classes still add up to the mapped blocks.  Then Redis dies: the remote
    panels show it down and NbdswapRemoteTierDown is on its way (pending or firing)."""
    redis = RedisServer(tmp_path / "redis").start()
    target = f"127.0.0.1:{free_port()}"
    server = ServerProcess(tmp_path, size="64M", ram_max="1M", disk_max="0", extra=(
        "--remote", redis.url, "--remote-retry-interval", "0.2", "--remote-timeout", "1", "--metrics", target,
        "--policy", "ram_high=0.5", "--policy", "ram_low=0.3", "--policy", "interval=0.02",
        "--policy", "promote=always", "--policy", "free_on_read_remote=never", "--policy", "group_idle_ram=off"))
    try:
        server.start()
        prometheus = PrometheusProcess(tmp_path, target)
        try:
            _check_clean_copies_and_outage(server, prometheus, redis, target)
        finally:
            prometheus.stop()
    finally:
        server.cleanup()
        redis.stop()


def _check_clean_copies_and_outage(server: ServerProcess, prometheus: PrometheusProcess, redis: RedisServer,
                                   target: str) -> None:
    def value(expr: str, at: float | None = None) -> float | None:
        result = prometheus.query(grafana_substitute(expr, target), time.time() if at is None else at)
        return float(result[0]["value"][1]) if result else None

    data = server.workdir / "data"
    data.write_bytes(mixed_data(4 * MiB))
    nbdsh(server.uri, f"data = open({str(data)!r}, 'rb').read()\n"
                      "for offset in range(0, len(data), 1 << 20):\n"
                      "    h.pwrite(data[offset:offset + (1 << 20)], offset)")

    def above(expr: str, threshold: float) -> bool:
        number = value(expr)
        return number is not None and number > threshold
    wait_until(lambda: not above('nbdswap_tier_usage_ratio{tier="ram"}', 0.5)
               and above('nbdswap_tier_blocks{tier="remote"}', 100), "RAM to demote to the remote tier")
    nbdsh(server.uri, "h.pread(64 * 4096, 0)")  # cold blocks, on the remote tier: promoted, copies kept
    # Once the promotions are over, every counter comes from the same idle state.
    wait_until(lambda: above('nbdswap_clean_copies{tier="remote"}', 0)
               and value(" + ".join(f"sum(changes({name}[3s]))" for name in
                                    ("nbdswap_tier_blocks", "nbdswap_clean_copies", "nbdswap_map_blocks"))) == 0,
               "clean copies on the remote tier, and no moves")
    at = time.time()
    mapped = value('sum(nbdswap_map_blocks{instance=~"$instance"})', at)
    copies = value('sum(nbdswap_clean_copies{instance=~"$instance"})', at)
    assert mapped and copies
    shares = panel_exprs("nbdswap-tiers.json", "Share of mapped blocks by class")
    assert sum(value(expr, at) for expr in shares.values()) == pytest.approx(1)
    counts = panel_exprs("nbdswap-tiers.json", "Mapped blocks by class")
    stored = value(counts["stored in a tier"], at)
    assert stored + sum(value(counts[name], at) for name in ("zero", "same-filled", "lost")) == mapped
    (per_tier,) = panel_exprs("nbdswap-tiers.json", "Blocks per tier").values()
    assert sum(float(sample["value"][1]) for sample in
               prometheus.query(grafana_substitute(per_tier, target), at)) == stored
    assert value('sum(nbdswap_tier_blocks{instance=~"$instance"})', at) == stored + copies
    logical = panel_exprs("nbdswap-tiers.json", "Logical vs stored bytes")["logical"]
    assert value(logical, at) == stored * BLOCK_SIZE

    (state,) = panel_exprs("nbdswap-reliability.json", "Remote tier state").values()
    (errors,) = panel_exprs("nbdswap-reliability.json", "Remote tier errors per second").values()
    assert value(state) == 2 and value(errors) == 0
    redis.stop(signal.SIGKILL)
    nbdsh(server.uri, "h.pwrite(bytes(range(256)) * 16 * 768, 1 << 20)")  # frees remote keys: DEL fails
    wait_until(lambda: value('nbdswap_tier_up{tier="remote"}') == 0, "Prometheus to see the remote tier down")
    wait_until(lambda: (value(errors) or 0) > 0, "remote errors in the dashboard")
    assert value(state) == 1

    def remote_down_alert() -> bool:
        alerts = prometheus.api("alerts")["alerts"]
        return any(alert["labels"]["alertname"] == "NbdswapRemoteTierDown" for alert in alerts)
    wait_until(remote_down_alert, "NbdswapRemoteTierDown to be pending", timeout=30)


# --- dashboard structure (Grafana's dashboard JSON model, schemaVersion >= 39) -------

PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "heatmap"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
DASHBOARD_FIELDS = {"uid": str, "title": str, "description": str, "schemaVersion": int, "version": int,
                    "editable": bool, "graphTooltip": int, "panels": list, "templating": dict,
                    "annotations": dict, "time": dict, "timepicker": dict, "timezone": str,
                    "refresh": str, "tags": list, "links": list}


def _check_top_level(dashboard: dict) -> None:
    for field, kind in DASHBOARD_FIELDS.items():
        assert isinstance(dashboard.get(field), kind), field
    assert dashboard["schemaVersion"] >= 39
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert "nbdswap" in dashboard["tags"]
    assert set(dashboard["time"]) == {"from", "to"}


def _check_variables(dashboard: dict) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["datasource"] == DATASOURCE
    assert instance["multi"] and instance["includeAll"] and instance["allValue"] == ".+"
    assert instance["query"]["query"] == instance["definition"] == "label_values(nbdswap_build_info, instance)"


def _check_layout(panels: list[dict]) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in grid.values())
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24 and grid["h"] >= 1
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def _check_panel(panel: dict) -> None:
    assert panel["type"] in PANEL_TYPES and panel["title"]
    if panel["type"] == "row":
        assert panel["gridPos"]["w"] == 24 and panel["panels"] == []
        return
    assert panel["description"] and panel["datasource"] == DATASOURCE
    assert isinstance(panel["fieldConfig"]["defaults"]["unit"], str)
    assert isinstance(panel["fieldConfig"]["overrides"], list) and isinstance(panel["options"], dict)
    ref_ids = [target["refId"] for target in panel["targets"]]
    assert ref_ids and len(set(ref_ids)) == len(ref_ids)
    for target in panel["targets"]:
        assert target["datasource"] == DATASOURCE and "legendFormat" in target
        _check_expr(target["expr"])


def _check_expr(expr: str) -> None:
    """Known variables only, and every selector limited to the chosen instances."""
    for variable in re.findall(r"\$[A-Za-z_]+", expr):
        assert variable in GRAFANA_BUILTINS or variable == "$instance", (variable, expr)
    for matchers in re.findall(r"[a-z_]+\{([^}]*)\}", expr):
        assert 'instance=~"$instance"' in matchers, expr


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_follows_grafanas_model(path):
    dashboard = json.loads(path.read_text())
    _check_top_level(dashboard)
    _check_variables(dashboard)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) and i > 0 for i in ids)
    _check_layout(dashboard["panels"])
    for panel in dashboard["panels"]:
        _check_panel(panel)


def test_dashboard_uids_and_titles_are_unique():
    dashboards = [json.loads(path.read_text()) for path in DASHBOARDS]
    assert len({d["uid"] for d in dashboards}) == len({d["title"] for d in dashboards}) == len(dashboards)


def load_yaml(path: Path):
    """YAML through Debian's python3-yaml (the test venv has no YAML parser)."""
    out = run_client(["python3", "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
                     input=path.read_bytes())
    return json.loads(out.stdout)


def test_grafana_provisioning_points_at_the_dashboards_and_a_prometheus():
    datasources = load_yaml(PROVISIONING / "datasources" / "nbdswap.yaml")
    (datasource,) = datasources["datasources"]
    assert datasources["apiVersion"] == 1 and datasource["type"] == "prometheus"
    assert datasource["url"] == "${NBDSWAP_PROMETHEUS_URL}"
    providers = load_yaml(PROVISIONING / "dashboards" / "nbdswap.yaml")
    (provider,) = providers["providers"]
    assert providers["apiVersion"] == 1 and provider["type"] == "file"
    assert provider["options"]["path"] == "${NBDSWAP_GRAFANA_DIR}/dashboards"
    assert DASHBOARDS and all(path.parent.name == "dashboards" for path in DASHBOARDS)


# --- alert rules -------------------------------------------------------------------


def test_promtool_checks_the_rules_and_the_scrape_config():
    for args in (("check", "rules", "nbdswap-rules.yml"), ("check", "config", "prometheus.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result


def test_alert_rules_pass_their_unit_tests():
    result = promtool("test", "rules", "nbdswap-rules.test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result


# --- nbdswap status ----------------------------------------------------------------


def test_status_view_shows_tiers_map_and_recent_rates(live):
    out = live.status_under_load
    for text in ("tiers", "ram", "disk", "block map", "requests (rates over the last", "req/s",
                 "30–50 %", "80–90 %", "demoting", "moves/s", "clean-copy hits"):
        assert text in out, (text, out)
    assert re.search(r"│ read .* \d[\d.]* (µs|ms) │", out), out
    after = live.status(interval=0)
    assert re.search(r"│ ram → disk +│ +[1-9][\d,]* │", after), after


def test_status_rates_come_from_the_servers_clock():
    from rich.console import Console

    before = {"uptime_seconds": 10.0, "requests": {"read": 100}, "request_bytes": {"read": 409600},
              "request_seconds": {"read": 0.001}}
    after = {"uptime_seconds": 12.0, "requests": {"read": 300}, "request_bytes": {"read": 1228800},
             "request_seconds": {"read": 0.005}, "tiers": {"ram": {"blocks": 4, "stored_bytes": 4096,
                                                                   "capacity_bytes": 8192}}}
    console = Console(record=True, width=160)
    render_status(after, before, console)
    out = console.export_text()
    assert "rates over the last 2.0 s" in out and "100.0" in out and "400.0 KiB/s" in out
    assert "20 µs" in out and "4.00x" in out and "50.0 %" in out
    console = Console(record=True, width=160)
    render_status(before | {"uptime_seconds": 1.0}, after, console)  # the server restarted
    assert "req/s" not in console.export_text()


POLICY_STATUS = {
    "uptime_seconds": 30.0,
    "tiers": {"ram": {"blocks": 100, "stored_bytes": 204800, "used_bytes": 245760, "capacity_bytes": 262144},
              "disk": {"blocks": 900, "stored_bytes": 3686400, "used_bytes": 3686400, "capacity_bytes": 4194304},
              "remote": {"blocks": 0, "stored_bytes": 0, "used_bytes": 0, "capacity_bytes": 0}},
    "moves": {"disk": {"ram": {"promote": 40}}, "ram": {"disk": {"demote": 1234, "drain": 50}}},
    "move_races_lost": 3, "clean_copy_hits": 17, "clean_copies_dropped": 5,
    "clean_copies": {"ram": 0, "disk": 12, "remote": 0}, "draining": ["ram"],
    "policy": {
        "watermarks": {"ram": {"high": 0.9, "low": 0.75, "usage": 0.9375, "demoting": True},
                       "disk": {"high": 0.85, "low": 0.8, "usage": 0.8789, "demoting": False}},
        "drains": {"ram": {"state": "draining", "error": None, "total_blocks": 150, "remaining_blocks": 100,
                           "moved_blocks": 50, "blocks_per_second": 25.0, "eta_seconds": 4.0},
                   "disk": {"state": "stopped", "error": "no other tier has room for the blocks of disk",
                            "total_blocks": 900, "remaining_blocks": 900, "moved_blocks": 0,
                            "blocks_per_second": 0.0, "eta_seconds": None}},
        "drains_in_progress": 1, "move_rates": {"demote": 12.5, "drain": 5.0}, "promotions_queued": 7,
        "demotions_stalled": {"disk": 4}, "recency_bytes": 4096,
    },
}


def test_status_view_shows_watermarks_clean_copies_moves_and_drains():
    from rich.console import Console

    console = Console(record=True, width=200)
    render_status(POLICY_STATUS, console=console)
    out = console.export_text()
    assert re.search(r"│ usage +│ +93\.8 % │ +87\.9 % │ +- │", out), out
    assert re.search(r"│ watermarks +│ +75–90 % │ +80–85 % │ +- │", out), out
    assert re.search(r"│ clean copies +│ +0 │ +12 │ +0 │", out), out
    assert re.search(r"│ policy +│ demoting, draining │ drain stopped │ +- │", out), out
    assert re.search(r"│ demote +│ ram → disk +│ +1,234 │ +12\.5 │", out), out
    assert re.search(r"│ promote +│ disk → ram +│ +40 │ +- │", out), out
    assert re.search(r"│ drain +│ ram → disk +│ +50 │ +5\.0 │", out), out
    for text in ("clean-copy hits 17", "clean copies dropped 5", "move races lost 3", "promotions queued 7",
                 "demotions stalled (no room below): disk 4",
                 "drain of ram: draining, 50 of 150 blocks moved, 100 left, 25.0 blocks/s, about 4 s to go",
                 "drain of disk: stopped, 0 of 900 blocks moved, 900 left, 0.0 blocks/s (no other tier has room"):
        assert text in out, (text, out)


#: `nbdswap status --json` of a real server (256M export, --ram-max 64M --disk-max 256M) after
#: writes, reads, trims and a drain of ram, then a sample one second earlier.
STATUS_FROM_A_SERVER = {
    "clean_copies": {"disk": 1569, "ram": 0, "remote": 0}, "clean_copies_dropped": 0, "clean_copy_hits": 3753,
    "connections": 1, "corrupt_block_errors": 0, "draining": [], "errors": {},
    "export": {"name": "swap", "size": 268435456}, "lost_blocks": 0,
    "map": {"blocks": 47220, "bytes": 1372160}, "move_races_lost": 0,
    "moves": {
        "disk": {"disk": {"compact": 1169}, "ram": {"promote": 6520}},
        "ram": {
            "disk": {"demote": 9365, "drain": 21347}, "ram": {"compact": 114, "regroup": 12001, "repack": 477},
        },
    },
    "policy": {
        "demotions_stalled": {}, "drains": {}, "drains_in_progress": 0,
        "move_rates": {"compact": 84.3, "promote": 181.0, "regroup": 26.1, "repack": 0.1},
        "promotions_queued": 0, "recency_bytes": 65536,
        "settings": {
            "batch": 32, "disk_high": 0.9, "disk_low": 0.8, "free_on_read_disk": "above:75",
            "free_on_read_remote": "above:50", "group_idle_ram": True, "incompressible_bytes": 4096,
            "interval": 0.2, "moves_per_second": 2000, "promote": "second", "promote_window": 60.0,
            "ram_high": 0.9, "ram_low": 0.75,
        },
        "watermarks": {
            "disk": {"demoting": False, "high": 0.9, "low": 0.8, "usage": 0.2366},
            "ram": {"demoting": False, "high": 0.9, "low": 0.75, "usage": 0.8386},
        },
    },
    "request_bytes": {
        "block_status": 100139008, "cache": 0, "flush": 0, "read": 599621632, "trim": 13107200,
        "write": 389693440, "write_zeroes": 21123072,
    },
    "request_seconds": {
        "block_status": 0.046970695, "cache": 0.0, "flush": 0.0, "read": 0.931403162, "trim": 0.023985841,
        "write": 8.901631867, "write_zeroes": 0.092771745,
    },
    "requests": {
        "block_status": 382, "cache": 0, "flush": 0, "read": 25057, "trim": 200, "write": 54373,
        "write_zeroes": 4624,
    },
    "same_filled_blocks": 0,
    "tiers": {
        "disk": {
            "blocks": 22336, "capacity_bytes": 268435456, "corrupt_reads_total": 0, "grouped_blocks": 8604,
            "grouped_payloads": 1348, "grouped_stored_bytes": 28949465, "slab_bytes": 111083520,
            "stored_bytes": 62751891, "used_bytes": 63512576,
        },
        "ram": {
            "blocks": 26453, "capacity_bytes": 67108864, "corrupt_reads_total": 0, "grouped_blocks": 270,
            "grouped_payloads": 100, "grouped_stored_bytes": 563520, "slab_bytes": 56688640,
            "stored_bytes": 55010947, "used_bytes": 56279872,
        },
        "remote": {
            "blocks": 0, "capacity_bytes": 0, "configured": False, "stored_bytes": 0, "up": False,
            "used_bytes": 0,
        },
    },
    "uptime_seconds": 284.846, "version": "0.1.0", "zero_blocks": 0,
}
STATUS_A_SECOND_EARLIER = {
    "uptime_seconds": 283.592,
    "requests": {
        "block_status": 382, "cache": 0, "flush": 0, "read": 18233, "trim": 200, "write": 47548,
        "write_zeroes": 4624,
    },
    "request_bytes": {
        "block_status": 100139008, "cache": 0, "flush": 0, "read": 571670528, "trim": 13107200,
        "write": 361738240, "write_zeroes": 21123072,
    },
    "request_seconds": {
        "block_status": 0.046970695, "cache": 0.0, "flush": 0.0, "read": 0.827422187, "trim": 0.023985841,
        "write": 8.542705197, "write_zeroes": 0.092771745,
    },
}


def _shown_counts(status: dict) -> list[str]:
    """Every count of the status as the view writes it: blocks, clean copies, moves,
    requests and the further tier fields such as grouped blocks."""
    tier_counts = [value for tier in status["tiers"].values() for field, value in tier.items()
                   if type(value) is int and not field.endswith("_bytes")]
    move_counts = [count for targets in status["moves"].values() for reasons in targets.values()
                   for count in reasons.values()]
    counts = tier_counts + move_counts + list(status["clean_copies"].values()) + list(status["requests"].values())
    return [f"{count:,}" for count in counts]


def _moved_reasons(status: dict) -> set[str]:
    moves = status["moves"]
    counted = {reason for targets in moves.values() for reasons in targets.values() for reason in reasons}
    return counted | status["policy"]["move_rates"].keys()


def test_status_view_at_80_columns_shows_every_number_and_every_move_reason():
    """80 columns is what `nbdswap status` gets piped or in a default terminal; rich cuts
    the cells of a table too wide for the console with "…"."""
    from rich.console import Console

    console = Console(record=True, width=80)
    render_status(STATUS_FROM_A_SERVER, STATUS_A_SECOND_EARLIER, console)
    out = console.export_text()
    assert "…" not in out, out
    rates = [f"{rate:,.1f}" for rate in STATUS_FROM_A_SERVER["policy"]["move_rates"].values()]
    sizes = ["52.5 MiB", "53.7 MiB", "64.0 MiB", "54.1 MiB", "550.3 KiB",
             "59.8 MiB", "60.6 MiB", "256.0 MiB", "105.9 MiB", "27.6 MiB",
             "571.8 MiB", "371.6 MiB", "95.5 MiB", "21.3 MiB/s"]
    derived = ["83.9 %", "23.7 %", "75–90 %", "80–90 %", "1.97x", "1.46x", "5,441.8", "5,442.6"]
    for number in _shown_counts(STATUS_FROM_A_SERVER) + rates + sizes + derived:
        assert re.search(rf"(?<![\d.,]){re.escape(number)}(?![\d]|[.,]\d)", out), (number, out)
    for reason in _moved_reasons(STATUS_FROM_A_SERVER):
        assert re.search(rf"[│┃] +{reason} +[│┃]", out), (reason, out)


def test_status_view_puts_a_tiers_free_text_under_the_table():
    from rich.console import Console

    remote = {"blocks": 3, "stored_bytes": 4096, "used_bytes": 4096, "capacity_bytes": 1 << 30, "up": False,
              "errors_total": 12345, "orphans_removed_total": 0,
              "last_error": "Error 111 connecting to 127.0.0.1:6379. Connection refused. [errno 111]"}
    console = Console(record=True, width=80)
    render_status({"tiers": {"remote": remote}}, console=console)
    out = console.export_text()
    assert "…" not in out, out
    assert re.search(r"│ errors total +│ +12,345 │", out) and re.search(r"│ up +│ +no │", out), out
    assert "remote last error: Error 111 connecting to 127.0.0.1:6379. Connection refused. [errno 111]" \
        in " ".join(out.split()), out


def test_drain_view_keeps_the_block_count_whole_on_a_narrow_console(monkeypatch):
    from rich.console import Console

    from nbdswap import drain_view

    monkeypatch.setattr(drain_view, "POLL_SECONDS", 0)
    reports = iter([{"state": "drained", "total_blocks": 12345678, "moved_blocks": 12345678}])
    console = Console(record=True, width=60)
    drain_view.follow_drain("disk", {"state": "draining", "total_blocks": 12345678, "moved_blocks": 6000000},
                            lambda: {"policy": {"drains": {"disk": next(reports)}}}, console)
    assert "12345678/12345678 blocks" in console.export_text(), console.export_text()
