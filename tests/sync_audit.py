"""A CPU stand-in for `torch.cuda.set_sync_debug_mode`: which operations of
an engine step would make the host wait for a GPU.

On the CPU every tensor is a host tensor, so the audit marks the ones that
live on the device in production: the runners' outputs (wrapped by
`device_outputs`), tensors built with an explicit `device=` and tensors
moved with `.to(device)`. Ops on marked tensors give marked tensors (a
tensor subclass propagates). It then records

- reads: a marked tensor's values read on the host (.tolist(), .item(),
  bool(), int(), float(), nonzero(), .numpy(), .cpu()): a device -> host
  copy, a sync;
- blocking copies: host data sent to the device with a copy that waits
  (torch.tensor(..., device=...), .to(device) / .copy_ without
  non_blocking=True from a host tensor).

tests/test_gpu.py checks the same on CUDA with the real sync debug mode.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu"}
FACTORIES = {"zeros", "ones", "full", "empty", "arange", "tensor", "as_tensor", "rand", "randn", "randint",
             "linspace"}


class DeviceTensor(torch.Tensor):
    """A tensor that is on the device in production."""


def _marked(values) -> bool:
    return any(isinstance(value, DeviceTensor) for value in tree_flatten(values)[0])


def _moves_to_device(args, kwargs) -> bool:
    """Does this .to(...) name a device (not only a dtype)?"""
    return kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args[1:])


def _in_the_model() -> bool:
    """Inside the model's own forward (transformers' code): its tensors are
    module buffers the audit cannot mark; the decode step it runs is
    checked whole by tests/test_cuda_graphs.py (one graph, no breaks)."""
    return any("/transformers/" in frame.filename for frame in traceback.extract_stack())


def _caller() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "/pad_core/" in f.filename]
    frame = frames[-1] if frames else traceback.extract_stack()[-3]
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.line}"


class SyncAudit(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.blocking_copies: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS | {"tensor", "as_tensor", "to", "copy_"} and _in_the_model():
            return func(*args, **kwargs)
        if name in READS and _marked(args):
            self.reads.append(f"{name} at {_caller()}")
        blocking = not kwargs.get("non_blocking", False)
        if name in ("tensor", "as_tensor") and kwargs.get("device") is not None and not _marked(args):
            self.blocking_copies.append(f"{name} at {_caller()}")
        elif name == "to" and _moves_to_device(args, kwargs) and blocking and not _marked(args[:1]):
            self.blocking_copies.append(f"to at {_caller()}")
        elif name == "copy_" and blocking and _marked(args[:1]) and not _marked(args[1:2]):
            self.blocking_copies.append(f"copy_ at {_caller()}")
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and not isinstance(result, DeviceTensor) and (
            (name in FACTORIES and kwargs.get("device") is not None) or (name == "to" and _moves_to_device(args, kwargs))
        ):
            result = result.as_subclass(DeviceTensor)
        return result


@contextmanager
def device_outputs(engine) -> Iterator[None]:
    """Marks what the engine's runners return (hidden states) as device tensors."""
    originals = {}
    for runner in engine.runners.values():
        for method in ("decode", "prefill"):
            original = getattr(runner, method)
            originals[(runner, method)] = original

            def marked(*args, _original=original, **kwargs):
                return _original(*args, **kwargs).as_subclass(DeviceTensor)

            setattr(runner, method, marked)
    try:
        yield
    finally:
        for runner, method in originals:
            delattr(runner, method)  # the class's method again


def audit_steps(engine, steps: int) -> SyncAudit:
    """Runs `steps` engine steps under the audit."""
    audit = SyncAudit()
    with device_outputs(engine), audit:
        for _ in range(steps):
            engine.step()
    return audit
