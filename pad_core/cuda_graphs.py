"""Decode steps replayed from CUDA graphs.

Why: a decode step of a small model is hundreds of small kernels (the 135M
model has 30 layers of ~15 kernels each), and launching them one by one from
Python costs milliseconds while the GPU work takes a fraction of one. A CUDA
graph records the kernels of one step once and replays them in one launch.

What a graph needs from the step it records (the slot runner's decode
provides it): fixed shapes (one graph per key: batch bucket, read-length
bucket, installed adapters), inputs read from buffers that never move
(tokens, lengths, the KV pool), no host synchronisation inside (no .item(),
.tolist(), nonzero), and idempotence: the step is run for warm-up, recorded,
then replayed, so running it twice on the same inputs must leave the same
state (the decode writes each row's new K/V at the row's length, the same
column every time, and the lengths advance outside the step).

`GraphedSteps` records and replays on CUDA. `EagerSteps` is the same
interface without graphs (the CPU path, and CUDA when capture fails): the
step simply runs. Both return the step's output tensor; a graph's output is
a static buffer, valid until the next replay of that graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

logger = logging.getLogger(__name__)

Step = Callable[[], torch.Tensor]

SMALLEST_READ = 64  # columns; shorter rows read this many (masked)


def read_length_bucket(needed: int, slot_tokens: int, smallest: int = SMALLEST_READ) -> int:
    """Columns a decode step reads so that few graphs cover every length:
    the smallest power of two >= needed (and >= smallest), at most the
    slot's size. At most 2x the columns needed, log2(slot_tokens) graphs."""
    if needed > slot_tokens:
        raise ValueError(f"{needed} columns do not fit a {slot_tokens}-token slot")
    return next(size for size in read_length_buckets(slot_tokens, smallest) if size >= needed)


def read_length_buckets(slot_tokens: int, smallest: int = SMALLEST_READ) -> tuple[int, ...]:
    """Every read length `read_length_bucket` can give for this slot size:
    smallest, 2 x smallest, ... below slot_tokens, then slot_tokens."""
    sizes, size = [], smallest
    while size < slot_tokens:
        sizes.append(size)
        size *= 2
    return (*sizes, slot_tokens)


def graph_batch_buckets(slots: int) -> tuple[int, ...]:
    """Decode batch widths with a graph each (as nano-vllm): 1, 2, 4, 8,
    then every 16 up to the pool's slots. A batch pads up to the next one,
    so the waste is at most 15 dummy rows past 16, where the step is
    bandwidth-bound (reading the weights) and they cost almost nothing."""
    sizes = [size for size in (1, 2, 4, 8) if size < slots]
    sizes += range(16, slots, 16)
    return (*sizes, slots)


class EagerSteps:
    """Runs each step as it comes (no graphs)."""

    graphs = 0
    records = False  # nothing to record ahead

    def run(self, key: Hashable, step: Step) -> torch.Tensor:
        return step()

    def clear(self) -> None:
        pass


class GraphedSteps:
    """One CUDA graph per key, recorded the first time the key runs (the
    slot runner runs every key once when the engine is built,
    `SlotRunner.record_graphs`), replayed after that. Graphs share one
    memory pool (they never run concurrently: replays are sequential on one
    stream).

    A capture that fails (an operation CUDA graphs cannot record) is logged
    once and every step runs eagerly from then on: slower, never wrong."""

    records = True

    def __init__(self, device: torch.device):
        self.device = device
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._side: torch.cuda.Stream | None = None  # warm-up and capture stream, one for all keys
        self._failed = False

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, step: Step) -> torch.Tensor:
        recorded = self._graphs.get(key)
        if recorded is None:
            if self._failed:
                return step()
            recorded = self._record(key, step)
            if recorded is None:
                return step()
        graph, output = recorded
        graph.replay()
        return output

    def clear(self) -> None:
        """Drops every graph (the step's code changed: an adapter was added or removed),
        and their memory pool with them: a pool no graph holds any more
        cannot be captured into again."""
        self._graphs.clear()
        self._pool = None

    def _record(self, key: Hashable, step: Step) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        try:
            current = torch.cuda.current_stream(self.device)
            # One side stream for warm-up and capture (each new stream would
            # get cuBLAS workspaces of its own, never freed).
            if self._side is None:
                self._side = torch.cuda.Stream(self.device)
            self._side.wait_stream(current)
            with torch.cuda.stream(self._side):  # restores the current stream however it ends
                # Warm-up first, as torch.cuda.graphs asks: lazy initialisations
                # (cuBLAS workspaces, autotuning) must not be recorded.
                step()
                # capture_begin / capture_end rather than `with torch.cuda.graph`,
                # whose entry synchronises, collects garbage and empties the
                # allocator's cache for every one of the dozens of keys.
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    output = step()
                finally:
                    graph.capture_end()
            current.wait_stream(self._side)
        except Exception:
            logger.warning("CUDA graph capture failed for %s; decoding without graphs", key, exc_info=True)
            self._failed = True
            return None
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[key] = (graph, output)
        logger.debug("recorded the decode step for %s (%d graphs)", key, len(self._graphs))
        return graph, output


def decode_steps(device: torch.device, enabled: bool) -> EagerSteps | GraphedSteps:
    """Graphs on a CUDA device when enabled; eager otherwise."""
    return GraphedSteps(device) if enabled and device.type == "cuda" else EagerSteps()
