"""`pad eval`'s client side against a fake OpenAI-compatible endpoint
(httpx mock transport): request shapes per mode, scoring, summary, grid
rule, outputs. No model, no server."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from openai import AsyncOpenAI

from pad_core.evaluation.dataset import parse_cases
from pad_core.evaluation.quality import QualityGate
from pad_core.evaluation.report import Answer, sample_case_ids, samples_markdown
from server.tools.eval import (
    Decoding,
    Mode,
    choose_best,
    comparison_modes,
    gate_answers,
    grid_markdown,
    grid_modes,
    load_done,
    main,
    markdown_report,
    plot_summary,
    run_eval,
    summarize,
)

CASES = parse_cases(
    [
        json.dumps({"id": "b1", "prompt": "Tips for sleep?", "preference": "Use bullet points.",
                    "preference_type": "bullets", "checks": [{"type": "min_bullets", "value": 2}]}),
        json.dumps({"id": "q1", "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "A book?"}],
                    "preference": "End with a question.", "preference_type": "question",
                    "checks": [{"type": "ends_with_question"}]}),
    ]
)


def fake_endpoint(bodies: list[dict], fail_on: str | None = None):
    """Answers with bullets and a question when the preference reaches the
    model (PAD body field or a system message naming it), plainly otherwise."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "x"}]})
        body = json.loads(request.content)
        bodies.append(body)
        system = body["messages"][0]["content"] if body["messages"][0]["role"] == "system" else ""
        if fail_on and fail_on in json.dumps(body):
            return httpx.Response(500, json={"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})
        weight = (body.get("pad") or {}).get("weight", 1.0)
        if "preference" in body:
            text = "- one\n- two\n- three. Anything else?" + (" again and again" * 8 if weight >= 4 else "")
        elif "bullet" in system.lower() or "question" in system.lower():
            text = "- one point only. Fine."
        else:
            text = "Sleep well and read a good novel."
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        })

    return httpx.MockTransport(handler)


def client_for(transport) -> AsyncOpenAI:
    return AsyncOpenAI(base_url="http://fake/v1", api_key="k", http_client=httpx.AsyncClient(transport=transport), max_retries=0)


def test_request_per_mode():
    decoding = Decoding("m", max_tokens=32, temperature=0.0, seed=7)
    q1 = CASES[1]
    base = Mode("base").request(q1, decoding)
    assert base == {"model": "m", "messages": q1.messages, "max_tokens": 32, "temperature": 0.0, "top_p": 1.0, "seed": 7}
    prompt = Mode("prompt").request(q1, decoding)
    assert prompt["messages"][0] == {"role": "system", "content": "End with a question.\n\nBe kind."}
    assert prompt["messages"][1:] == q1.messages[1:] and "extra_body" not in prompt
    template = Mode("prompt-template").request(CASES[0], decoding)
    assert template["messages"][0]["role"] == "system" and "[Principles] Use bullet points." in template["messages"][0]["content"]
    pad = Mode("pad", 2.0, 5, None, False).request(q1, decoding)
    assert pad["messages"] == q1.messages  # the base context does not get the preference as text
    assert pad["extra_body"] == {"preference": "End with a question.", "pad": {"weight": 2.0, "top_k": 5, "base_sees_preference": False}}
    assert Mode("pad").request(q1, decoding)["extra_body"] == {"preference": "End with a question."}
    assert Mode("pad", 1.0, reward_model="concise").request(q1, decoding)["extra_body"]["pad"] == {"weight": 1.0, "reward_model": "concise"}
    floored = Mode("pad", 2.0, 80, min_p=0.05)
    assert floored.name == "pad w=2 k=80 p=0.05"
    assert floored.request(q1, decoding)["extra_body"]["pad"] == {"weight": 2.0, "top_k": 80, "min_p": 0.05}
    # Every mode: the same decoding settings.
    keys = ("model", "max_tokens", "temperature", "top_p", "seed")
    assert len({tuple(r[k] for k in keys) for r in (base, prompt, template, pad)}) == 1


def test_mode_names_and_sets():
    modes = comparison_modes(["base", "prompt", "pad"], [1, 2], ["self", "concise"])
    assert [m.name for m in modes] == ["base", "prompt", "pad w=1", "pad w=2", "pad[concise] w=1", "pad[concise] w=2"]
    from server.tools.eval import parse_args

    default = comparison_modes(["pad"], parse_args(["--weights", "default,2"]).weights, ["self"])
    assert [m.name for m in default] == ["pad", "pad w=2"] and "pad" not in default[0].request(CASES[0], Decoding("m")).get(
        "extra_body", {})
    grid = grid_modes([1, 2], [5, 10], [False, True])
    # self reward + base_sees_preference: reward 0 whatever w and k, one setting stands for all.
    assert len(grid) == 2 + 4 + 1 and len({m.name for m in grid}) == len(grid)
    assert "pad w=2 k=10 bsp=0" in {m.name for m in grid} and grid[-1].name == "pad w=1 k=5 bsp=1"
    assert len(grid_modes([1, 2], [5, 10], [False, True], "concise")) == 2 + 8
    floors = grid_modes([1, 2], [80], [False], min_ps=[0.0, 0.1])
    assert [m.name for m in floors][2:] == ["pad w=1 k=80 p=0 bsp=0", "pad w=2 k=80 p=0 bsp=0",
                                            "pad w=1 k=80 p=0.1 bsp=0", "pad w=2 k=80 p=0.1 bsp=0"]


def test_run_eval_against_a_fake_endpoint(tmp_path):
    bodies: list[dict] = []
    modes = comparison_modes(["base", "prompt", "pad"], [1.0, 4.0], ["self"])
    decoding = Decoding("fake-model", max_tokens=16)
    seen = []

    async def go():
        async with client_for(fake_endpoint(bodies, fail_on='"weight": 4.0')) as client:
            return await run_eval(client, CASES, modes, decoding, concurrency=3, progress=False, on_answer=seen.append)

    answers = asyncio.run(go())
    assert len(bodies) == len(answers) == len(seen) == len(CASES) * len(modes)
    assert [(a.mode, a.case_id) for a in answers] == [(m.name, c.id) for m in modes for c in CASES]
    by = {(a.mode, a.case_id): a for a in answers}
    assert not by[("base", "b1")].satisfied and not by[("prompt", "b1")].satisfied
    assert by[("pad w=1", "b1")].satisfied and by[("pad w=1", "q1")].satisfied
    assert by[("pad w=1", "b1")].checks == [True] and by[("pad w=1", "b1")].completion_tokens == 5
    failed = by[("pad w=4", "b1")]
    assert failed.error and not failed.satisfied and failed.text == ""

    assert gate_answers(answers, CASES, QualityGate()) is None  # no coherence scored: not judged
    assert all(a.gate is not None for a in answers if a.error is None) and failed.gate is None
    summary = summarize(answers, [m.name for m in modes])
    assert summary["types"] == ["bullets", "question"]
    assert summary["modes"]["pad w=1"]["satisfaction"]["overall"]["rate"] == 1.0
    assert summary["modes"]["pad w=1"]["gate"]["overall"]["rate"] == 1.0
    assert summary["modes"]["pad w=1"]["gated"]["overall"]["rate"] == 1.0
    assert summary["modes"]["prompt"]["gated"]["overall"]["rate"] == 0.0
    assert summary["modes"]["pad w=4"]["errors"] == 2
    assert summary["modes"]["pad w=1"]["vs_baseline"]["gated"]["overall"]["diff"] == 1.0
    assert "vs_baseline" not in summary["modes"]["prompt"]
    report = markdown_report(summary)
    assert "| **overall** | 2 | 0% [0-66] | 0% [0-66] | 100% [34-100] | 0% [0-66] |" in report
    assert "Difference to `prompt`" in report and "+100" in report
    plot_summary(summary, tmp_path / "chart.png", "test")
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def _gate(passed: bool) -> dict:
    return {"passed": passed, "failures": [] if passed else ["on_topic"], "coherence_logprob": -1.0}


def test_grid_rule_best_gated_satisfaction_within_five_points_of_prompts_gate():
    answers = []

    def add(mode, ok, good):
        for i in range(20):
            answers.append(Answer(f"c{i}", "t", mode, "some answer text", i < ok, gate=_gate(i < good)))

    add("base", 2, 20)
    add("prompt", 4, 16)  # gate 80%: eligible from 75% up; gated 4/20
    add("pad w=1", 6, 16)  # gated 6
    add("pad w=4", 18, 10)  # gated 10, the best, but gate 50%: not eligible
    add("pad w=2", 6, 15)  # gated 6 like w=1 with gate 75% (eligible); w=1 wins on the higher gate rate
    summary = summarize(answers, ["base", "prompt", "pad w=1", "pad w=4", "pad w=2"])
    choice = choose_best(summary)
    assert choice["gate_floor"] == pytest.approx(0.75)
    assert {r["mode"]: r["eligible"] for r in choice["rows"]} == {"pad w=1": True, "pad w=4": False, "pad w=2": True}
    assert choice["best"] == "pad w=1" and choice["best_at_least_baseline"]
    text = grid_markdown(choice)
    assert "Best eligible setting: **pad w=1**, at least as good as `prompt`" in text
    assert "| pad w=4 | 50% [" in text and "| no |" in text
    assert "As server defaults: `PAD_DEFAULT_WEIGHT=1`." in text


def test_grid_defaults_name_every_variable():
    answers = [Answer("c0", "t", m, "x", True, gate=_gate(True)) for m in ("prompt", "pad w=2 k=80 p=0.05 bsp=0")]
    choice = choose_best(summarize(answers, ["prompt", "pad w=2 k=80 p=0.05 bsp=0"]))
    assert "`PAD_DEFAULT_WEIGHT=2 PAD_DEFAULT_TOP_K=80 PAD_DEFAULT_MIN_P=0.05`" in grid_markdown(choice)


def test_samples_are_drawn_by_seed_not_by_hand():
    answers = [Answer(f"c{i}", "t", m, f"answer {i} {m}", i % 2 == 0, gate=_gate(i % 3 != 0))
               for m in ("prompt", "pad") for i in range(30)]
    ids = sample_case_ids(answers, 10, seed=0)
    assert len(ids) == 10 and ids == sample_case_ids(answers, 10, seed=0) != sample_case_ids(answers, 10, seed=1)
    text = samples_markdown(answers, ["prompt", "pad"], {f"c{i}": (f"q{i}", "p") for i in range(30)}, 10, 0)
    assert text.count("- `prompt`") == text.count("- `pad`") == 10
    assert "✅" in text and "❌ on_topic" in text


def test_cli_end_to_end_on_a_fake_endpoint(tmp_path, monkeypatch):
    """`pad eval --base-url ...` writes the JSON, the Markdown and the chart;
    --resume reuses the journal."""
    bodies: list[dict] = []
    transport = fake_endpoint(bodies)
    real = AsyncOpenAI.__init__

    def patched(self, *args, **kwargs):
        kwargs["http_client"] = httpx.AsyncClient(transport=transport)
        real(self, *args, **kwargs)

    monkeypatch.setattr(AsyncOpenAI, "__init__", patched)
    data = tmp_path / "cases.jsonl"
    data.write_text("\n".join(json.dumps({"id": c.id, "messages": c.messages, "preference": c.preference,
                                          "preference_type": c.preference_type, "checks": c.checks}) for c in CASES))
    out = tmp_path / "out"
    argv = [str(data), "--base-url", "http://fake/v1", "--weights", "1,2", "--out", str(out), "--no-progress", "--max-tokens", "9",
            "--no-coherence"]
    assert main(argv) == 0
    payload = json.loads((out / "answers.json").read_text())
    assert payload["settings"]["decoding"]["model"] == "fake-model"  # from GET /v1/models
    assert payload["settings"]["modes"] == ["base", "prompt", "pad w=1", "pad w=2"]
    assert len(payload["answers"]) == 8 and all(b["max_tokens"] == 9 for b in bodies)
    report = (out / "report.md").read_text()
    assert "| **overall** |" in report and "drawn with seed 0" in report
    assert all(a["gate"] is not None for a in payload["answers"])
    assert (out / "chart.png").stat().st_size > 1000
    assert len(load_done(out / "answers.jsonl", Decoding("fake-model", 9))) == 8
    bodies.clear()
    assert main(argv + ["--resume"]) == 0 and bodies == []  # nothing re-asked
    assert main(argv + ["--grid", "--grid-weights", "1", "--grid-top-k", "5,10", "--grid-base-sees-preference", "false"]) == 0
    grid = json.loads((out / "answers.json").read_text())["grid"]
    assert [r["mode"] for r in grid["rows"]] == ["pad w=1 k=5 bsp=0", "pad w=1 k=10 bsp=0"]
    assert "PAD settings grid" in (out / "report.md").read_text()
    # The comparison at the chosen setting reuses the grid's answers: nothing is asked again.
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    (chosen / "answers.jsonl").write_text((out / "answers.jsonl").read_text())
    bodies.clear()
    assert main([str(data), "--base-url", "http://fake/v1", "--weights", "1", "--top-k", "10", "--base-sees-preference",
                 "false", "--out", str(chosen), "--no-progress", "--max-tokens", "9", "--resume", "--no-coherence"]) == 0
    assert bodies == []
    assert json.loads((chosen / "answers.json").read_text())["settings"]["modes"] == ["base", "prompt", "pad w=1 k=10 bsp=0"]
    # --rescore judges the journal again without any endpoint.
    (chosen / "report.md").unlink()
    assert main([str(data), "--out", str(chosen), "--rescore", "--no-coherence"]) == 0 and bodies == []
    assert "Gated satisfaction" in (chosen / "report.md").read_text()


def test_cli_reports_dataset_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\nnot json\n')
    assert main([str(bad), "--base-url", "http://unused/v1"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1:" in err and "bad.jsonl:2: not valid JSON" in err
