"""Memory read bandwidth, measured STREAM-style with numpy.

Decoding one token reads every trunk weight once, so on a laptop the ceiling on
tokens/s is ``read bandwidth / bytes per token``. To know how close we get we measure
that bandwidth on the same machine: sum a buffer much larger than the last-level cache
(L3 on x86 is tens of MB, Apple's system-level cache up to ~100 MB; 1 GB is far past
both), so every pass streams from DRAM.

``numpy.sum`` runs on one thread, and one core cannot saturate the memory controller
(a core has only so many outstanding cache misses). Reductions release the GIL, so we
split the buffer into one contiguous slice per core and sum the slices from a thread
pool -- the same thing STREAM does with OpenMP. On a 2-core machine that is two
threads; on an M-series laptop, one per performance and efficiency core.

The buffer holds int64, not float64: numpy sums floats pairwise, which is bound by the
adds rather than by memory (on this project's 2-core EPYC, 33-35 GB/s for float64 against
47 GB/s for int64 over the same gigabyte), and a probe slower than the memory would
flatter every "fraction of bandwidth" figure computed against it.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

DEFAULT_BUFFER_BYTES = 1 << 30


@dataclass(frozen=True)
class Bandwidth:
    """Result of :func:`read_bandwidth`."""

    gb_per_s: float  # median over the timed passes, in 10**9 bytes per second
    bytes_read: int  # bytes read by one pass
    threads: int
    checksum: float  # sum of the buffer, so a test can check every element was read


def read_bandwidth(
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    repeats: int = 5,
    threads: int | None = None,
) -> Bandwidth:
    """Median read bandwidth over ``repeats`` passes after one warm-up pass.

    The buffer holds int64 ones: their sum equals the element count when every element
    was read. The warm-up pass pays for first-touch page faults.
    """
    threads = threads or os.cpu_count() or 1
    buffer = np.ones(max(buffer_bytes // 8, threads), dtype=np.int64)
    slices = np.array_split(buffer, threads)
    with ThreadPoolExecutor(max_workers=threads) as pool:

        def one_pass() -> float:
            return sum(pool.map(np.sum, slices))

        checksum = one_pass()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            one_pass()
            seconds.append(time.perf_counter() - start)
    return Bandwidth(
        gb_per_s=buffer.nbytes / statistics.median(seconds) / 1e9,
        bytes_read=buffer.nbytes,
        threads=threads,
        checksum=float(checksum),
    )
