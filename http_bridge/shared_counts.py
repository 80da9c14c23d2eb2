"""The bridge's counts, shared by its JOBWIRE_HTTP_WORKERS processes.

Each process counts into its own slab of one anonymous shared memory map, made before
the workers are forked; a scrape sums every slab (and takes the earliest `_created`),
so `/metrics` on the shared port gives the same totals whichever worker the scrape's
connection reaches. One writer per slab: no lock, no system call per count. A single
bridge process (the default) has one slab.
"""

from __future__ import annotations

import bisect
import mmap
import time
from collections.abc import Iterator

# The four contracts, in a fixed order: their counts have fixed places in a slab.
CONTRACTS = ("aws_batch", "video_worker", "aurora", "secretary")
CONTRACT_INDEX = {name: i for i, name in enumerate(CONTRACTS)}
STATUSES = range(100, 600)
_FIRST_STATUS, _END_STATUS = STATUSES.start, STATUSES.stop  # for the hot path
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# A slab: counts (summed over slabs), then creation times (earliest non-zero wins).
_PER_CONTRACT = len(STATUSES)
HISTOGRAM = len(CONTRACTS) * _PER_CONTRACT  # per contract: buckets and +Inf, then sum
_HISTOGRAM_STRIDE = len(BUCKETS) + 2
HISTOGRAM_SUM = len(BUCKETS) + 1  # after the buckets and +Inf
OPEN = HISTOGRAM + len(CONTRACTS) * _HISTOGRAM_STRIDE  # connections open now
REFUSED = OPEN + 1  # connections refused (JOBWIRE_MAX_CONNECTIONS)
HEAD_TIMEOUTS = OPEN + 2  # connections closed: request head too slow
COUNTS = OPEN + 3
# Creation times, one per count above (the histogram's in its contract's first place).
SLOTS = 2 * COUNTS


def callback_slot(contract: int, status: int) -> int:
    return contract * _PER_CONTRACT + status - STATUSES.start


def histogram_slot(contract: int) -> int:
    return HISTOGRAM + contract * _HISTOGRAM_STRIDE


class Slabs:
    """`workers` slabs of SLOTS doubles; this process writes `own`."""

    def __init__(self) -> None:
        self.started = time.time()
        self.resize(1)

    def resize(self, workers: int) -> None:
        """Before forking `workers` processes: one zeroed slab each, in memory they all
        map (MAP_SHARED: a fork shares it rather than copying it)."""
        self.workers = workers
        self._map = mmap.mmap(-1, workers * SLOTS * 8)
        self._all = memoryview(self._map).cast("d")
        self.own = self._all[:SLOTS]

    def become(self, index: int) -> None:
        """In worker `index` after the fork: count into its slab from now on."""
        self.own = self._all[index * SLOTS : (index + 1) * SLOTS]

    def add(self, slot: int, amount: float = 1.0) -> None:
        own = self.own
        if not own[COUNTS + slot]:
            own[COUNTS + slot] = time.time()
        own[slot] += amount

    def callback(self, contract: int, status: int, seconds: float | None) -> None:
        """An answered callback: counted by status, timed unless `seconds` is None.
        One call with its arithmetic inlined: it runs for every callback."""
        if not _FIRST_STATUS <= status < _END_STATUS:
            return
        own = self.own
        slot = contract * _PER_CONTRACT + status - _FIRST_STATUS
        if not own[COUNTS + slot]:
            own[COUNTS + slot] = time.time()
        own[slot] += 1
        if seconds is None:
            return
        base = HISTOGRAM + contract * _HISTOGRAM_STRIDE
        if not own[COUNTS + base]:
            own[COUNTS + base] = time.time()
        own[base + bisect.bisect_left(BUCKETS, seconds)] += 1  # the first bound >= seconds
        own[base + HISTOGRAM_SUM] += seconds

    def totals(self) -> tuple[list[float], list[float]]:
        """(counts summed over the slabs, the earliest creation time of each, 0 for
        none yet)."""
        counts = [0.0] * COUNTS
        created = [0.0] * COUNTS
        for w in range(self.workers):
            values = self._all[w * SLOTS : (w + 1) * SLOTS].tolist()
            for i in range(COUNTS):
                counts[i] += values[i]
                when = values[COUNTS + i]
                if when and (not created[i] or when < created[i]):
                    created[i] = when
        return counts, created


def statuses_seen(counts: list[float], contract: int) -> Iterator[int]:
    base = callback_slot(contract, STATUSES.start)
    for offset, count in enumerate(counts[base : base + _PER_CONTRACT]):
        if count:
            yield STATUSES.start + offset


SLABS = Slabs()
