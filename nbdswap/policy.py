"""The policy engine: a background task that moves blocks to the tier they belong in.

It acts only through :class:`~nbdswap.store.Store` (``move`` and ``drop_backing``, which
copy, compare-and-swap the map entry and free the old slot), in rate-limited batches:

* **Watermarks.**  When a tier's use passes its ``high`` fraction, the coldest blocks are
  demoted to the next tier down (RAM → disk → remote) until use is below ``low``.  Clean
  copies on the tier go first: dropping one frees space without any I/O.
* **Recency** is a generalised CLOCK over :attr:`Store.heat` (one byte per block): every
  access sets the byte to :data:`~nbdswap.store.HOT`; the hand, walking the block map in
  block order, takes one off each block it passes and demotes blocks already at zero.
* **Promotion on read**: a block read from disk or remote is moved into RAM ``always``,
  on the ``second`` read within ``promote_window`` seconds, or ``never``.  Whether the
  slower copy is kept as a clean backing or freed is each tier's *free-on-read* rule:
  ``never`` (always keep), ``always`` (always free) or ``above:PERCENT`` (free once the
  tier is more than that full).
* **Drain**: every block leaves a tier that takes no new blocks until undrained; the
  state is in the block map, so a drain resumes after a restart.
* **Incompressible pages** (stored size above ``incompressible_bytes``) skip RAM.
* **Grouped demotion**: blocks demoted or drained into a cold tier (disk or remote) go
  with the other blocks of their map group that are on the same tier (and, for a
  demotion, cold: heat zero) in one grouped payload (:meth:`Store.move_group`).  Those companions are moves
  beyond the ``batch`` budget (at most 15 per block).
* **Idle grouping in RAM** (``group_idle_ram``): while RAM is neither demoting nor
  draining, its CLOCK hand goes on; the pages it finds cold that are stored one by one
  are compressed in place with the other cold ones of their map group (the
  ``regroup`` moves), as zram recompresses idle pages.  About a fifth less memory for
  pages that sat unread for several passes; a read of one then decodes its group.  A
  group that would not save ``REGROUP_MIN_SAVING`` (pages written in random order) is
  left apart, and not offered again until one of its pages is read or written.
  The same hand moves payloads out of RAM's sparse slabs into fuller ones of their
  size class (``repack``, as zsmalloc compacts), so those slabs empty and their memory
  goes back to the system.
* **Compaction**: grouped payloads that lost references are offered to
  :meth:`Store.compact`, which re-stores their live pages once half of them are dead;
  up to :data:`COMPACTIONS_PER_BATCH` per batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, fields
from functools import partial

from .blockmap import COMPRESSED, GROUP_BITS, GROUP_SIZE, GROUPED, TIER_NAMES, TIER_RAM, Entry
from .errors import NoSpaceError, StoreError, TierUnavailableError
from .store import BLOCK_SIZE, GROUPED_TIERS, HOT, Store

log = logging.getLogger(__name__)

PROMOTE_RULES = ("always", "second", "never")
#: Map entries the CLOCK hand or a drain scan looks at per batch (bounds loop stalls).
SCAN_LIMIT = 256
#: What looking at one map entry costs the ``moves_per_second`` budget, in moves: a scan
#: that finds nothing to move goes on at once, at most 16 entries per move's worth of
#: budget (32k entries a second at the default rate).
SCAN_COST = 1 / 16
#: Reads remembered for the ``second`` promotion rule, and promotions queued.
RECENT_READS_LIMIT = 65536
PROMOTION_QUEUE_LIMIT = 4096
#: Grouped payloads looked at for compaction per batch.
COMPACTIONS_PER_BATCH = 4
#: Seconds of move history behind the recent move rates.
RATE_WINDOW = 10.0
#: Idle work (grouping idle RAM pages, repacking sparse slabs) waits while the device
#: serves more requests a second than this: it only gives memory back, and it took
#: 5-16 % of the write rate during a burst of swap-outs (bench/RESULTS.md).
IDLE_WORK_MAX_REQUEST_RATE = 2000
#: The shortest window over which that rate is measured.
LOAD_WINDOW = 0.05


class PolicyError(ValueError):
    """A policy setting or command is invalid."""


@dataclass
class PolicySettings:
    """Every setting of the engine; ``[policy]`` in the TOML file, ``nbdswap policy set``."""

    ram_high: float = 0.90
    ram_low: float = 0.75
    disk_high: float = 0.90
    disk_low: float = 0.80
    promote: str = "second"
    promote_window: float = 60.0
    free_on_read_disk: str = "above:75"
    free_on_read_remote: str = "above:50"
    incompressible_bytes: int = BLOCK_SIZE
    group_idle_ram: bool = True
    moves_per_second: int = 2000
    batch: int = 32
    interval: float = 0.2

    @classmethod
    def from_mapping(cls, values: dict) -> PolicySettings:
        """Settings from a TOML table (keys with ``-`` or ``_``); :class:`PolicyError`."""
        return cls().updated(values)

    def updated(self, values: dict) -> PolicySettings:
        """A validated copy with ``values`` (strings or TOML values) applied together."""
        kinds = {field.name: field.type for field in fields(self)}
        changes = {}
        for name, value in values.items():
            name = name.replace("-", "_")
            if name not in kinds:
                raise PolicyError(f"unknown policy setting {name!r}; known: {', '.join(kinds)}")
            changes[name] = _convert(name, kinds[name], value)
        candidate = dataclasses.replace(self, **changes)
        candidate.validate()
        return candidate

    def set(self, name: str, value) -> None:
        """Set one setting (validated against the others, which keep their values)."""
        changed = self.updated({name: value})
        for field in fields(self):
            setattr(self, field.name, getattr(changed, field.name))

    def validate(self) -> None:
        for tier in ("ram", "disk"):
            high, low = self.watermarks(tier)
            if not 0 < low < high <= 1:
                raise PolicyError(f"{tier}: watermarks need 0 < {tier}_low < {tier}_high <= 1")
        if self.promote not in PROMOTE_RULES:
            raise PolicyError(f"promote must be one of {', '.join(PROMOTE_RULES)}")
        for tier in ("disk", "remote"):
            free_on_read_threshold(getattr(self, f"free_on_read_{tier}"))
        if not 0 < self.incompressible_bytes <= BLOCK_SIZE:
            raise PolicyError(f"incompressible_bytes must be in 1..{BLOCK_SIZE} ({BLOCK_SIZE}: never skip RAM)")
        if self.moves_per_second < 1 or self.batch < 1:
            raise PolicyError("moves_per_second and batch must be positive")
        if self.promote_window <= 0 or self.interval <= 0:
            raise PolicyError("promote_window and interval must be positive")

    def watermarks(self, tier: str) -> tuple[float, float]:
        """``(high, low)`` of a tier that has one below it; remote has none."""
        return getattr(self, f"{tier}_high"), getattr(self, f"{tier}_low")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _convert(name: str, kind: str, value):
    try:
        if kind == "float":
            return float(value)
        if kind == "int":
            return int(value)
    except (TypeError, ValueError):
        raise PolicyError(f"{name}: {value!r} is not a number") from None
    if kind == "bool":
        return _switch(name, value)
    return str(value)


def _switch(name: str, value) -> bool:
    """A TOML boolean, or on/off (true/false, yes/no, 1/0) from the command line."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise PolicyError(f"{name}: {value!r} is not on or off")


def free_on_read_threshold(rule: str) -> float:
    """The fill fraction above which a promotion frees the slower copy: ``never`` → 2
    (never reached), ``always`` → 0, ``above:75`` → 0.75."""
    if rule == "never":
        return 2.0
    if rule == "always":
        return 0.0
    prefix, _, percent = rule.partition(":")
    try:
        value = float(percent)
    except ValueError:
        value = -1.0
    if prefix != "above" or not 0 <= value <= 100:
        raise PolicyError(f"free-on-read {rule!r}: expected never, always or above:PERCENT (0-100)")
    return value / 100


@dataclass
class Drain:
    """Progress of one tier's drain."""

    tier: str
    total_blocks: int
    state: str = "draining"  # draining | drained | stopped
    error: str | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    #: Tiers a move of this drain found full: the rest of the drain goes elsewhere (the
    #: room of each target is checked when a batch is chosen, but the batch's moves and
    #: their grouped companions then compete for it).
    full: set[str] = dataclasses.field(default_factory=set)

    def report(self, remaining: int) -> dict:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        done = max(self.total_blocks - remaining, 0)
        rate = done / elapsed
        eta = remaining / rate if rate > 0 and self.state == "draining" else None
        return {"state": self.state, "error": self.error, "total_blocks": self.total_blocks,
                "remaining_blocks": remaining, "moved_blocks": done,
                "blocks_per_second": round(rate, 1), "eta_seconds": None if eta is None else round(eta, 1)}


class Policy:
    """The engine of one store.  :meth:`start` it in the running loop, :meth:`stop` it.
    ``requests_served`` returns the requests the device has served so far; without it
    the device never counts as busy."""

    def __init__(self, store: Store, settings: PolicySettings | None = None,
                 requests_served: Callable[[], int] | None = None) -> None:
        self.store = store
        self.settings = settings or PolicySettings()
        self._requests_served = requests_served
        self._load = (time.monotonic(), requests_served() if requests_served else 0, False)
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._hands: dict[str, int] = {}
        self._demoting: set[str] = set()
        self._recent_reads: dict[int, float] = {}
        self._promotions: dict[int, None] = {}
        self._drains: dict[str, Drain] = {}
        self._history: deque[tuple[float, Counter]] = deque()
        self._stalled: Counter[str] = Counter()  # demotions that found no room below
        self._blocked: set[str] = set()  # tiers whose demotion found no room this step
        self._scanned = 0  # map entries looked at, for the budget
        #: One byte per map group: its idle RAM pages stayed apart when last offered.
        self._regroups_refused = bytearray((len(store.heat) >> GROUP_BITS) + 1)
        self._tokens = 0.0
        self._refilled = time.monotonic()
        store.on_slow_read = self._slow_read
        self.apply()
        for name in store.tier_names():
            if store.tier(name).tier_id in store.draining:
                self._drains[name] = Drain(name, store.tier_blocks(name))

    # --- control ---------------------------------------------------------------------

    def apply(self) -> None:
        """Push the settings the store itself uses (after a change)."""
        self.store.ram_payload_limit = self.settings.incompressible_bytes
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nbdswap-policy")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.store.on_slow_read = None

    def set(self, name: str, value) -> dict:
        self.settings.set(name, value)
        self.apply()
        return self.settings.as_dict()

    def drain(self, tier: str) -> dict:
        """Start draining ``tier``; :class:`PolicyError` if the others cannot take its blocks."""
        source = self._configured(tier)
        if tier in self._drains and self._drains[tier].state != "stopped":
            return self._drains[tier].report(self.store.tier_blocks(tier))
        if not self._targets(tier, down_only=False):
            raise PolicyError(f"cannot drain {tier}: no other tier would take new blocks; nothing was changed")
        needed, free = source.used_bytes, self._free_bytes_outside(tier)
        if needed > free:
            raise PolicyError(f"cannot drain {tier}: its blocks need {needed / 2**20:.1f} MiB, the other "
                              f"tiers have {free / 2**20:.1f} MiB free; nothing was changed")
        self.store.set_draining(tier, True)
        self._drains[tier] = Drain(tier, self.store.tier_blocks(tier))
        self._wake.set()
        return self._drains[tier].report(self._drains[tier].total_blocks)

    def undrain(self, tier: str) -> dict:
        self._configured(tier)
        self.store.set_draining(tier, False)
        self._drains.pop(tier, None)
        self._wake.set()
        return {"tier": tier, "state": "accepting"}

    def _configured(self, tier: str):
        if tier not in self.store.tier_names():
            raise PolicyError(f"no tier named {tier!r} is configured (configured: "
                              f"{', '.join(self.store.tier_names())})")
        return self.store.tier(tier)

    def _free_bytes_outside(self, tier: str) -> int:
        return sum(max(self.store.tier(name).capacity_bytes - self.store.tier(name).used_bytes, 0)
                   for name in self._targets(tier, down_only=False))

    # --- the background task -----------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                busy = await self.step()
            except (StoreError, OSError) as error:
                log.error("policy step failed: %s", error)
                busy = False
            except Exception:  # noqa: BLE001 - the engine must outlive a bug in one step
                log.exception("policy step failed unexpectedly")
                busy = False
            if not busy:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.settings.interval)
                except asyncio.TimeoutError:
                    pass

    async def step(self) -> bool:
        """One rate-limited batch of work; True if there may be more to do right away:
        something moved, or a drain or demotion has more of the map to scan.  (Waiting
        ``interval`` after each batch that only scanned made a drain's pass over a map
        of 100k blocks take 78 s, and demotion start 57 s late on 24,500 blocks.)"""
        scanned = self._scanned
        self._blocked.clear()
        work = self._next_work(self.settings.batch)
        sparse = list(itertools.islice(self.store.sparse_payloads(), COMPACTIONS_PER_BATCH))
        await self._pay(len(work) + len(sparse) + (self._scanned - scanned) * SCAN_COST)
        jobs = self._jobs(work) + self._compaction_jobs(sparse)
        if not jobs:
            return self._scanning()
        results = await asyncio.gather(*(job for _, job in jobs), return_exceptions=True)
        for (item, _), result in zip(jobs, results):
            if isinstance(result, NoSpaceError | TierUnavailableError) and item[2] in ("drain", "demote"):
                self._found_full(item, result)
            elif isinstance(result, Exception):
                log.warning("moving block %d (%s) failed: %s", item[0], item[2], result)
        self._record(item[2] for (item, _), result in zip(jobs, results)
                     if not isinstance(result, BaseException) and item[1] is not None
                     for _ in range(int(result)))
        return any(result for result in results if not isinstance(result, BaseException)) or self._scanning()

    def _jobs(self, work: list[tuple]) -> list[tuple[tuple, Awaitable]]:
        """``(item, coroutine)`` for the work: demotions and drains into a grouped tier
        become one :meth:`Store.move_group` per map group (with their companions); the
        coroutine returns whether (or how many blocks) it moved."""
        jobs, groups = [], {}
        for item in work:
            block, target, reason, tier = item
            if target is not None and reason in ("demote", "drain", "regroup") \
                    and self.store.tier(target).tier_id in GROUPED_TIERS:
                groups.setdefault((block >> GROUP_BITS, target, reason, tier), []).append(block)
            else:
                jobs.append((item, self._do(*item)))
        taken = {item[0] for item in work}
        for (group, target, reason, tier), blocks in groups.items():
            if reason != "regroup":
                blocks += self._companions(group, tier, taken, cold_only=reason == "demote")
                jobs.append(((min(blocks), target, reason, tier),
                             self.store.move_group(sorted(blocks), target, reason)))
                continue
            blocks += self._companions(group, tier, taken, cold_only=True, regroup=True)
            if len(blocks) >= 2 or self._in_sparse_slab(blocks[0]):  # else a lone page, left as it is
                jobs.append(((min(blocks), target, reason, tier), self._regroup(sorted(blocks), target)))
        return jobs

    async def _regroup(self, blocks: list[int], target: str) -> int:
        """Group idle RAM pages in place; those left alone (the group would not fit one
        payload, would not save ``REGROUP_MIN_SAVING`` of their bytes, or had one page)
        are repacked if they lie in a sparse slab.  A group of pages that stayed apart is
        not offered again until one of its pages is read or written: it would only be
        compressed and refused again on every pass of the hand."""
        moved = await self.store.move_group(blocks, target, "regroup")
        if not moved and len(blocks) >= 2:
            self._regroups_refused[blocks[0] >> GROUP_BITS] = 1
        for block in blocks:
            moved += await self.store.repack(block)  # 0 at once unless in a sparse slab
        return moved

    def _compaction_jobs(self, sparse: list[tuple[int, int]]) -> list[tuple[tuple, Awaitable]]:
        """Compactions of grouped payloads ``(tier id, address)`` that lost references
        (see :meth:`Store.compact`)."""
        jobs = []
        for tier_id, addr in sparse:
            name = TIER_NAMES[tier_id]
            jobs.append(((addr, name, "compact", name), self.store.compact(tier_id, addr)))
        return jobs

    def _in_sparse_slab(self, block: int) -> bool:
        """Whether the block's payload lies in a sparse slab of RAM."""
        entry = self.store.entry(block)
        return entry is not None and entry.is_stored and entry.tier == TIER_RAM \
            and self.store.tier("ram").in_sparse_slab(entry.addr, entry.length)

    def _companions(self, group: int, tier: str, taken: set[int], *, cold_only: bool,
                    regroup: bool = False) -> list[int]:
        """The other blocks of a map group stored on ``tier`` (only cold ones if asked;
        for a regroup only compressed pages stored on their own)."""
        tier_id, heat = self.store.tier(tier).tier_id, self.store.heat
        first = group << GROUP_BITS
        companions = []
        for block in range(first, min(first + GROUP_SIZE, len(heat))):
            if block in taken or (cold_only and heat[block]):
                continue
            entry = self.store.entry(block)
            if entry is not None and entry.is_stored and entry.tier == tier_id \
                    and not (regroup and not _groupable(entry)):
                companions.append(block)
        return companions

    async def _pay(self, cost: float) -> None:
        """Charge ``cost`` moves to the ``moves_per_second`` token bucket (which holds at
        most one batch), sleeping while it is overdrawn; yields to the loop either way."""
        rate = self.settings.moves_per_second
        now = time.monotonic()
        self._tokens = min(self._tokens + (now - self._refilled) * rate, self.settings.batch) - cost
        self._refilled = now
        await asyncio.sleep(max(-self._tokens / rate, 0))

    def _scanning(self) -> bool:
        """Whether a drain, or a demotion with room below, is part-way through the map."""
        return any(drain.state == "draining" for drain in self._drains.values()) \
            or bool(self._demoting - self._blocked)

    def _found_full(self, item: tuple, error: Exception) -> None:
        """A drain or demotion move found its target full (or down): the drain moves the
        rest elsewhere, the demotion counts as stalled; neither is an error."""
        block, target, reason, tier = item
        if reason == "demote":
            self._stalled[tier] += 1
            log.debug("demoting block %d to %s: %s", block, target, error)
            return
        drain = self._drains.get(tier)
        if drain is not None and target not in drain.full:
            drain.full.add(target)
            log.info("draining %s: %s has no room (%s); the rest goes to the other tiers", tier, target, error)

    async def _do(self, block: int, target: str | None, reason: str, tier: str) -> bool:
        if reason == "repack":
            return await self.store.repack(block)
        if target is None:
            return await self.store.drop_backing(block, self.store.tier(tier).tier_id)
        keep = reason == "promote" and not self._frees_on_read(tier)
        return await self.store.move(block, target, reason, keep_source=keep)

    def _record(self, reasons: Iterator[str]) -> None:
        """Remember the moves of one batch for the recent move rates."""
        now = time.monotonic()
        self._history.append((now, Counter(reasons)))
        while self._history and self._history[0][0] < now - RATE_WINDOW:
            self._history.popleft()

    # --- choosing work -------------------------------------------------------------------

    def _next_work(self, limit: int) -> list[tuple[int, str | None, str, str]]:
        """Up to ``limit`` ``(block, target tier or None to drop the clean copy, reason,
        tier)`` items: drains first, then promotions, then demotions, then idle grouping."""
        work: dict[int, tuple] = {}
        for tier in list(self._drains):
            self._add(work, self._drain_work(tier), limit)
        self._add(work, self._promotion_work(), limit)
        for tier in self.store.tier_names():
            if self._over_watermark(tier):
                self._add(work, self._demotion_work(tier), limit)
        if self._groups_idle_ram() and not self._device_busy():
            self._add(work, self._idle_ram_work(), limit)
        return list(work.values())

    def _device_busy(self) -> bool:
        """Whether the device served more than :data:`IDLE_WORK_MAX_REQUEST_RATE`
        requests a second since the last look (at least :data:`LOAD_WINDOW` ago)."""
        if self._requests_served is None:
            return False
        then, served_then, busy = self._load
        now = time.monotonic()
        if now - then >= LOAD_WINDOW:
            served = self._requests_served()
            busy = served - served_then > IDLE_WORK_MAX_REQUEST_RATE * (now - then)
            self._load = (now, served, busy)
        return busy

    @staticmethod
    def _add(work: dict[int, tuple], items: Iterator[tuple], limit: int) -> None:
        """Take items until ``limit`` (never one more: taking may have side effects)."""
        if len(work) >= limit:
            return
        for item in items:
            work.setdefault(item[0], item)
            if len(work) >= limit:
                return

    def _drain_work(self, tier: str) -> Iterator[tuple]:
        drain = self._drains[tier]
        if drain.state != "draining":
            return
        if self.store.tier_blocks(tier) == 0:
            drain.state = "drained"
            log.info("tier %s is drained", tier)
            return
        targets = [name for name in self._targets(tier, down_only=False) if name not in drain.full]
        for block, entry in self._scan(tier, "drain", clock=False):
            target = None if entry is None else self._with_room(targets, _moved_length(entry))
            if entry is not None and target is None:
                found = f" ({', '.join(sorted(drain.full))} found full or down)" if drain.full else ""
                self._stop_drain(tier, f"no other tier has room for the blocks of {tier}{found}")
                return
            yield block, target, "drain", tier

    def _stop_drain(self, tier: str, message: str) -> None:
        drain = self._drains.get(tier)
        if drain is None or drain.state != "draining":
            return
        log.error("%s; the drain stopped and %s takes new blocks again", message, tier)
        self.store.set_draining(tier, False)
        drain.state, drain.error = "stopped", message

    def _promotion_work(self) -> Iterator[tuple]:
        if "ram" not in self.store.tier_names() or self._over_watermark("ram", starting=True) \
                or TIER_RAM in self.store.draining:
            self._promotions.clear()
            return
        while self._promotions:
            block = next(iter(self._promotions))
            del self._promotions[block]
            entry = self.store.entry(block)
            if entry is not None and entry.is_stored and entry.tier > TIER_RAM:
                yield block, "ram", "promote", TIER_NAMES[entry.tier]

    def _demotion_work(self, tier: str) -> Iterator[tuple]:
        targets = self._targets(tier, down_only=True)
        for block, entry in self._scan(tier, "demote", clock=True):
            target = None if entry is None else self._with_room(targets, _moved_length(entry))
            if entry is not None and target is None:
                self._stalled[tier] += 1
                self._blocked.add(tier)
                return
            yield block, target, "demote", tier

    def _groups_idle_ram(self) -> bool:
        """Whether idle RAM pages are grouped now: not while RAM is demoted (that groups
        the cold pages on their way down anyway) or drained."""
        return self.settings.group_idle_ram and "ram" in self.store.tier_names() \
            and "ram" not in self._demoting and TIER_RAM not in self.store.draining

    def _idle_ram_work(self) -> Iterator[tuple]:
        """The CLOCK hand of RAM's demotions goes on: cold compressed pages stored on
        their own are grouped; other payloads in sparse slabs are repacked."""
        ram, heat, refused = self.store.tier("ram"), self.store.heat, self._regroups_refused
        for block, entry in self._walk("demote:ram", partial(self.store.entries_on, TIER_RAM)):
            group = block >> GROUP_BITS
            if heat[block]:
                if heat[block] == HOT:  # read or written since the hand last passed
                    refused[group] = 0
                heat[block] -= 1
            elif _groupable(entry) and not refused[group]:
                yield block, "ram", "regroup", "ram"
                continue
            if ram.in_sparse_slab(entry.addr, entry.length):
                yield block, "ram", "repack", "ram"

    def _with_room(self, names: list[str], length: int) -> str | None:
        return next((name for name in names if self.store.tier(name).has_room(length)), None)

    def _scan(self, tier: str, reason: str, *, clock: bool) -> Iterator[tuple[int, Entry | None]]:
        """``(block, None)`` for each clean copy on ``tier`` (dropping one frees room with
        no I/O), then ``(block, entry)`` for its blocks: with ``clock``, only those the
        CLOCK hand finds cold.  Each walk resumes where the last one stopped."""
        tier_id = self.store.tier(tier).tier_id
        for block, backing in self._walk(f"backing:{tier}", self.store.backings):
            if backing.tier == tier_id:
                yield block, None
        heat = self.store.heat
        for block, entry in self._walk(f"{reason}:{tier}", partial(self.store.entries_on, tier_id)):
            if clock and heat[block]:
                heat[block] -= 1
                continue
            yield block, entry

    def _walk(self, hand: str, entries) -> Iterator[tuple[int, Entry]]:
        """At most :data:`SCAN_LIMIT` entries from the hand's position on; wraps around."""
        scanned = 0
        for block, entry in _limited(entries(self._hands.get(hand, 0)), SCAN_LIMIT):
            scanned += 1
            self._scanned += 1
            self._hands[hand] = block + 1
            yield block, entry
        if scanned < SCAN_LIMIT:
            self._hands[hand] = 0

    def _over_watermark(self, tier: str, starting: bool = False) -> bool:
        """Hysteresis: demotion starts above ``high`` and goes on until below ``low``."""
        if tier == "remote":
            return False
        high, low = self.settings.watermarks(tier)
        usage = self._usage(tier)
        if usage > high:
            self._demoting.add(tier)
        elif usage < low:
            self._demoting.discard(tier)
        return usage > high if starting else tier in self._demoting

    def _usage(self, tier: str) -> float:
        source = self.store.tier(tier)
        return source.used_bytes / source.capacity_bytes if source.capacity_bytes else 1.0

    def _targets(self, tier: str, *, down_only: bool) -> list[str]:
        """Tiers that may take ``tier``'s blocks: those below it (nearest first), then,
        unless ``down_only``, those above it (nearest first); never a draining one."""
        tier_id = self.store.tier(tier).tier_id
        accepting = self.store.accepting_tiers()
        below = [other.name for other in accepting if other.tier_id > tier_id]
        above = [other.name for other in reversed(accepting) if other.tier_id < tier_id]
        return below if down_only else below + above

    def _frees_on_read(self, tier: str) -> bool:
        threshold = free_on_read_threshold(getattr(self.settings, f"free_on_read_{tier}"))
        return threshold == 0.0 or self._usage(tier) > threshold

    # --- the store's read hook (hot path of slow reads) ----------------------------------

    def _slow_read(self, block: int, tier_id: int) -> None:
        rule = self.settings.promote
        if rule == "never" or len(self._promotions) >= PROMOTION_QUEUE_LIMIT:
            return
        if rule == "second":
            now = time.monotonic()
            first = self._recent_reads.pop(block, None)
            if first is None or now - first > self.settings.promote_window:
                if len(self._recent_reads) >= RECENT_READS_LIMIT:
                    del self._recent_reads[next(iter(self._recent_reads))]
                self._recent_reads[block] = now
                return
        self._promotions[block] = None
        self._wake.set()

    # --- reporting -----------------------------------------------------------------------

    def stats(self) -> dict:
        """The ``policy`` part of ``nbdswap status`` (counters for metrics included)."""
        span = RATE_WINDOW
        if self._history:
            span = max(min(RATE_WINDOW, time.monotonic() - self._history[0][0]), self.settings.interval)
        recent: Counter[str] = Counter()
        for _, done in self._history:
            recent.update(done)
        return {
            "settings": self.settings.as_dict(),
            "watermarks": {tier: self._watermark_report(tier) for tier in self.store.tier_names()
                           if tier != "remote"},
            "drains": {tier: drain.report(self.store.tier_blocks(tier)) for tier, drain in self._drains.items()},
            "drains_in_progress": sum(drain.state == "draining" for drain in self._drains.values()),
            "move_rates": {reason: round(count / span, 1) for reason, count in recent.items()},
            "promotions_queued": len(self._promotions),
            "demotions_stalled": dict(self._stalled),
            "recency_bytes": len(self.store.heat),
        }

    def _watermark_report(self, tier: str) -> dict:
        high, low = self.settings.watermarks(tier)
        return {"high": high, "low": low, "usage": round(self._usage(tier), 4),
                "demoting": tier in self._demoting}

    def admin_handlers(self) -> dict:
        """Admin socket commands: ``drain``, ``undrain``, ``policy_show``, ``policy_set``."""
        return {
            "drain": lambda request: self.drain(request["tier"]),
            "undrain": lambda request: self.undrain(request["tier"]),
            "policy_show": lambda _request: {"settings": self.settings.as_dict()},
            "policy_set": lambda request: {"settings": self.set(request["key"], request["value"])},
        }


def _groupable(entry: Entry) -> bool:
    """Whether a RAM page may be grouped in place: compressed (an incompressible page
    gains nothing in a group) and stored on its own."""
    return entry.flags & (COMPRESSED | GROUPED) == COMPRESSED


def _moved_length(entry: Entry) -> int:
    """The payload length a move of the block needs: a grouped block leaves its payload
    as a page of its own, of at most a block."""
    return BLOCK_SIZE if entry.flags & GROUPED else entry.length


def _limited(items: Iterator, limit: int) -> Iterator:
    """The first ``limit`` items; closes ``items`` (an LMDB read transaction) after."""
    try:
        for count, item in enumerate(items):
            if count >= limit:
                return
            yield item
    finally:
        items.close()
