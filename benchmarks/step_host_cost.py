"""Per-step host cost of the engine on the tiny model (issue 15, part 1).

    OMP_NUM_THREADS=1 python -m benchmarks.step_host_cost [--requests 16] [--steps 200] [--rounds 3]

The tiny random model (hidden size 64, 2 layers) makes the forward pass
cheap, so a decode step is mostly the engine's own work: building the
step's inputs, the row bookkeeping, the output head, PAD's rule, sampling
and the per-request text. Prints, per decode step (medians over rounds):

  step        the whole `engine.step()`
  forward     the time inside the runners' `decode` (the model's forward)
  host        step - forward: everything the engine does around the forward
              (on this CPU mostly the vocabulary-sized work: output head,
              top-k, PAD's rule)

and, from one extra profiled round (cProfile), the interpreter time per step
spent in the engine's own Python by file (tottime: the time of the functions
themselves, not of the torch kernels they call by name). That is the row
bookkeeping the runner refactor is about.

Each of `--requests` PAD requests (one preference: a base row and a reward
row) decodes `--steps` tokens with `ignore_eos`, all running together, so
every measured step has the same rows. A script, not a timed test.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import statistics
import time

import torch

from pad_core.types import ChatRequest, Preference, SamplingParams

logger = logging.getLogger(__name__)

PROMPT = [{"role": "user", "content": "How do I sleep better?"}]
PREFERENCE = Preference("I like short answers with a bit of humour")


def timed_decode(runner, spent: list[float]):
    """Wraps a runner's decode so the time inside it is added to spent[0]."""
    decode = runner.decode

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return decode(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    return wrapper


def measure_round(requests: int, steps: int, backend: str | None, profile: cProfile.Profile | None = None
                  ) -> tuple[float, float]:
    """(median step seconds, median forward seconds) of one run; with
    `profile`, the measured steps run under it."""
    from pad_core.settings import EngineSettings
    from pad_core.testing import tiny_engine

    fields = {"max_running_requests": max(32, requests), "max_batch_rows": max(96, 2 * requests)}
    if backend is not None:
        fields["backend"] = backend
    engine = tiny_engine(EngineSettings(**fields))
    spent = [0.0]
    for runner in engine.runners.values():
        runner.decode = timed_decode(runner, spent)
    sampling = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    for index in range(requests):
        engine.add_chat(ChatRequest(f"r{index}", PROMPT, [PREFERENCE], sampling))
    engine.step()  # prefill of every request
    engine.step()  # first decode step (warm-up)
    step_times, forward_times = [], []
    for _ in range(steps):
        spent[0] = 0.0
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        engine.step()
        if profile is not None:
            profile.disable()
        step_times.append(time.perf_counter() - start)
        forward_times.append(spent[0])
    while engine.has_unfinished():
        engine.step()
    return statistics.median(step_times), statistics.median(forward_times)


ROW_BOOKKEEPING = ("_row_owner_tokens", "_decode_tokens", "row_index")  # before / after the runner refactor


def cumulative_time_of(profile: cProfile.Profile, names: tuple[str, ...], steps: int) -> dict[str, float]:
    """Seconds per step inside pad_core functions of these names (with what they call)."""
    totals: dict[str, float] = {}
    for (filename, _, function), (_, _, _, cumtime, _) in pstats.Stats(profile).stats.items():
        if "/pad_core/" in filename and function in names:
            totals[function] = totals.get(function, 0.0) + cumtime / steps
    return totals


def python_time_by_file(profile: cProfile.Profile, steps: int) -> dict[str, float]:
    """Seconds per step of interpreter time in each pad_core file."""
    totals: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in pstats.Stats(profile).stats.items():
        marker = "/pad_core/"
        if marker in filename:
            name = filename.split(marker, 1)[1]
            totals[name] = totals.get(name, 0.0) + tottime / steps
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default=None, help="runner backend setting (default: the engine's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    results = [measure_round(args.requests, args.steps, args.backend) for _ in range(args.rounds)]
    step = statistics.median(r[0] for r in results)
    forward = statistics.median(r[1] for r in results)
    print(f"{args.requests} PAD requests ({2 * args.requests} rows), tiny model, {args.steps} steps x {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}, backend {args.backend or 'default'}")
    print(f"  step     {step * 1e3:8.3f} ms")
    print(f"  forward  {forward * 1e3:8.3f} ms")
    print(f"  host     {(step - forward) * 1e3:8.3f} ms  (step - forward)")
    profile = cProfile.Profile()
    measure_round(args.requests, args.steps, args.backend, profile)
    by_file = python_time_by_file(profile, args.steps)
    print(f"  engine Python per step (profiled round): {sum(by_file.values()) * 1e3:.3f} ms")
    for name, seconds in list(by_file.items())[:8]:
        print(f"    {name:24s} {seconds * 1e6:8.1f} us")
    bookkeeping = cumulative_time_of(profile, ROW_BOOKKEEPING, args.steps)
    print(f"  row bookkeeping per step (decode inputs, row lookup): {sum(bookkeeping.values()) * 1e6:.1f} us "
          + ", ".join(f"{name} {seconds * 1e6:.1f}" for name, seconds in bookkeeping.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
