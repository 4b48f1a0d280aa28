"""Host -> device copies that do not make the host wait for the device.

A plain copy from ordinary (pageable) host memory to a CUDA tensor
synchronises: the host waits until the GPU has finished everything queued
before it, so it cannot prepare the next kernels while the GPU runs the
current ones (the decode step's graph, PAD's rule). A step's small inputs
(row indices, per-request weights, the next tokens) are instead built on the
host, pinned (torch's caching host allocator keeps the block until the copy
has run) and copied asynchronously: the copy is ordered on the stream before
the kernels that read it, and the host goes on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (numbers, or a host tensor) as a `dtype` tensor on `device`, without a sync."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda" and host.device.type == "cpu":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def select_rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tensor[rows], rows given on the host; a view when rows are 0..n-1 (in
    order: no gather, no copy to the device)."""
    if rows == list(range(len(rows))):
        return tensor[: len(rows)]
    return tensor[to_device(rows, torch.long, tensor.device)]


def copy_to(target: torch.Tensor, values: torch.Tensor) -> None:
    """target[...] = values (a host tensor of the same shape), without a sync."""
    if target.device.type == "cuda" and values.device.type == "cpu":
        values = values.pin_memory()
    target.copy_(values, non_blocking=True)
