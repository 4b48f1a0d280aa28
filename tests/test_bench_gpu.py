"""benchmarks/bench_gpu.py's smoke mode on the CPU: the script a GPU session
runs in one call works end to end (both runners, plain and PAD, the
anchor, the table, the bars, the JSON), and the slots runner chooses the
transformers runner's tokens (float32)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_cpu_smoke_run(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is a folder of scripts, not an installed package
    bench = importlib.import_module("benchmarks.bench_gpu")
    main, BARS = bench.main, bench.BARS
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    results = written["results"]
    assert {(r["runner"], r["mode"], r["concurrency"]) for r in results} == {
        (runner, mode, concurrency)
        for concurrency in (1, 2)
        for runner, mode in [("transformers", "plain"), ("transformers", "pad"), ("slots", "plain"), ("slots", "pad"),
                             ("generate(static)", "plain")]
    }
    assert all(r["tok_s"] > 0 and r["tokens"] == 6 * r["concurrency"] for r in results)
    assert all(r["same"] is True for r in results if r["runner"] == "slots")
    assert len(written["bars"]) == len(BARS) and written["bars"] == [None] * len(BARS)  # no 135m / 8b rows
    table = capsys.readouterr().out
    assert "| tiny | slots | pad | 2 |" in table and "not meaningful" in table and "device: CPU" in table


def test_results_are_written_as_they_come(tmp_path, monkeypatch):
    """A device call that runs out of time keeps what it measured: the JSON
    (table included) is rewritten after every result, and our runner runs
    first, so a run stopped in the anchor (next in line) holds our
    runner's rows, the bars' load (64 concurrent, PAD) leading."""
    monkeypatch.syspath_prepend(str(REPO))
    bench = importlib.import_module("benchmarks.bench_gpu")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # what `timeout --signal=INT` looks like to the script

    monkeypatch.setattr(bench, "run_anchor", stopped)
    out = tmp_path / "bench.json"
    try:
        bench.main(["--device", "cpu", "--quick", "--json", str(out)])
    except KeyboardInterrupt:
        pass
    written = json.loads(out.read_text())
    assert [(r["runner"], r["concurrency"], r["mode"]) for r in written["results"]] == [
        ("slots", 2, "pad"), ("slots", 2, "plain"), ("slots", 1, "pad"), ("slots", 1, "plain")]
    assert all(r["same"] is None for r in written["results"])  # the transformers runner had not run
    assert "| tiny | slots | plain | 1 |" in written["table"]
