"""Gives the worker's freed heap memory back to the operating system (and
says how much memory the process may use).

Why: a step allocates and frees tensors of every size (a long prompt's
prefill activations are tens of MiB; the transformers runner's KV caches are
copied whenever rows join or leave). glibc's malloc keeps freed blocks for
reuse and, each time a big block is freed, raises its mmap threshold (up to
32 MiB), so later blocks of that size come from the heap too. The worker's
RSS then ratchets up to the largest peak it has seen and creeps with
fragmentation, though nothing leaks (Python's heap and the allocator's
in-use bytes level off): in a soak of the embedded model
(benchmarks/soak.py, 5 clients, 11 minutes) it went from 0.7 to 2.4 GiB
and stayed there idle. With the trims below it idled at 1.2 GiB after a
7-minute soak (the peak under load, left-padded KV caches of long PAD
prompts, is unchanged).

`HeapTrimmer` calls malloc_trim(0) when the worker goes idle after work,
and every `interval_s` under a load that never pauses. A trim walks the
free lists and returns whole free pages (9 ms with a 0.9 GiB heap); where
malloc_trim does not exist (not glibc: macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

TRIM_EVERY_S = 30.0  # under a load that never pauses
IDLE_TRIM_GAP_S = 1.0  # at most one idle trim a second, however often requests trickle in


def memory_limit_bytes(cgroup_root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> int:
    """The memory this process may use: the machine's, or the lowest memory
    limit of its cgroup and the cgroups above it where lower (docker
    --memory, a systemd unit's MemoryMax, a Kubernetes limit), cgroup v2
    or v1."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _cgroup_limit_files(cgroup_root, own):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means none; v1 writes a huge number for none
            limit = min(limit, int(text))
    return limit


def _cgroup_limit_files(root: Path, own: Path) -> list[Path]:
    """The memory-limit files of this process's cgroup and its ancestors,
    from /proc/self/cgroup ("0::/path" in v2, "N:memory:/path" in v1)."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        lines = []
    files = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = base / path.strip("/")
        while True:
            files.append(folder / name)
            if folder == base:
                break
            folder = folder.parent
    return files


def malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: function(0)


class HeapTrimmer:
    """Trims the heap after work: at once when the worker goes idle (at most
    every IDLE_TRIM_GAP_S), every `interval_s` while it stays busy.
    `trim` and `clock` are for tests."""

    def __init__(self, interval_s: float = TRIM_EVERY_S, trim: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.trim = trim if trim is not None else malloc_trim()
        self.interval_s = interval_s
        self.clock = clock
        self.last = clock()  # the last trim
        self.dirty_since: float | None = None  # the first step since the last trim

    def after_iteration(self, worked: bool, idle: bool) -> None:
        """Once per loop iteration: `worked` if it ran a step, `idle` if no
        request is left."""
        if self.trim is None:
            return
        now = self.clock()
        if worked and self.dirty_since is None:
            self.dirty_since = now
        if self.dirty_since is None:
            return
        if (idle and now - self.last >= IDLE_TRIM_GAP_S) or now - max(self.last, self.dirty_since) >= self.interval_s:
            self.run()

    def run(self) -> None:
        started = self.clock()
        self.trim()
        self.last, self.dirty_since = self.clock(), None
        logger.debug("heap trimmed in %.1f ms", (self.last - started) * 1000)
