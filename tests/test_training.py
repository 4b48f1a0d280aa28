"""PersRM training (`pad train`): the loss, a step that learns, adapters
saved, served by name with the same rewards, and refused when they do not fit."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from pad_core.errors import ModelLoadError
from pad_core.evaluation.quality import QualityGate
from pad_core.runner import NewRow
from pad_core.testing import tiny_model
from pad_core.training.loss import pad_dpo_loss, sequence_log_probs
from pad_core.training.pairs import PairFileError, PreferencePair, load_pairs
from pad_core.training.trainer import (
    PersRMTrainer,
    TrainSettings,
    encode_pair,
    split_pairs,
    train_adapter,
    wrap_with_lora,
)

PAIRS = [
    PreferencePair((("user", f"Question number {i}?"),), "short answers", "Yes.", "Well, it is a long story that goes on.")
    for i in range(8)
]


def test_loss_on_hand_made_log_probs():
    # chosen reward 0.1*(−1−(−3)) = 0.2, rejected 0.1*(−4−(−2)) = −0.2: margin 0.4
    result = pad_dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), beta=0.1
    )
    assert result.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.4))), rel=1e-6)
    assert result.margin.item() == pytest.approx(0.4)
    assert result.accuracy.item() == 1.0


def test_loss_is_log_two_when_policy_equals_reference_and_prefers_nothing():
    same = torch.tensor([-2.0, -5.0])
    result = pad_dpo_loss(same, same, same, same, beta=0.5)
    assert result.loss.item() == pytest.approx(math.log(2))
    assert result.accuracy.item() == 0.0


def test_sequence_log_probs_sums_each_rows_tokens():
    token_logits = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]]))
    labels = torch.tensor([0, 1, 0])
    row_of_token = torch.tensor([0, 0, 2])
    totals = sequence_log_probs(token_logits, labels, row_of_token, rows=3)
    assert totals.tolist() == pytest.approx([math.log(0.9) + math.log(0.8), 0.0, math.log(0.3)], rel=1e-5)


def test_batch_log_probs_equal_the_full_forward(tokenizer):
    # The head runs only at answer positions; the sums must equal those taken
    # from the model's own full logits, with right padding in the batch.
    from pad_core.training.trainer import EncodedSequence, batch_log_probs

    torch.manual_seed(0)
    model = tiny_model(tokenizer).eval()
    sequences = [EncodedSequence([5, 6, 7, 8, 9, 10], 3), EncodedSequence([11, 12, 13, 14], 2)]
    with torch.no_grad():
        fast = batch_log_probs(model, sequences, pad_id=0, device="cpu")
        expected = []
        for seq in sequences:
            ids = torch.tensor([seq.input_ids])
            log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            picked = log_probs.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
            expected.append(picked[seq.answer_start - 1 :].sum().item())
    assert fast.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_policy_sees_the_preference_and_the_reference_does_not(tokenizer):
    from pad_core.prompting import PromptBuilder

    prompts = PromptBuilder(tokenizer, TrainSettings().preference_template)
    encoded = encode_pair(prompts, PAIRS[0], tokenizer.eos_token_id, 512)
    policy = tokenizer.decode(encoded.policy_chosen.input_ids)
    reference = tokenizer.decode(encoded.reference_chosen.input_ids)
    assert "short answers" in policy and "short answers" not in reference
    assert encoded.policy_chosen.input_ids[encoded.policy_chosen.answer_start :] == (
        encoded.reference_chosen.input_ids[encoded.reference_chosen.answer_start :]
    )


def test_one_training_step_lowers_the_loss(tokenizer):
    torch.manual_seed(0)
    model = wrap_with_lora(tiny_model(tokenizer), TrainSettings())
    trainer = PersRMTrainer(model, tokenizer, TrainSettings(learning_rate=1e-2, batch_size=8), "/nonexistent", torch.device("cpu"))
    encoded = trainer.encode(PAIRS)
    reference = trainer.reference_log_probs(encoded)
    before = trainer.pair_loss(encoded, reference).loss
    before.backward()
    trainer.optimizer.step()
    with torch.no_grad():
        after = trainer.pair_loss(encoded, reference).loss
    # LoRA B starts at zero: before training the PersRM is the `self` reward
    # (the base model conditioned on the preference).
    with torch.no_grad(), model.disable_adapter():
        self_reward_loss = trainer.pair_loss(encoded, reference).loss
    assert before.item() == pytest.approx(self_reward_loss.item(), abs=1e-5)
    assert after.item() < before.item()


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("adapter")
    summary = train_adapter(
        tiny_model(tokenizer), tokenizer, PAIRS, TrainSettings(epochs=2, batch_size=4, learning_rate=5e-2, validation_fraction=0.25), out
    )
    return out, summary


def test_training_writes_an_adapter_with_its_settings_and_metrics(trained_adapter):
    out, summary = trained_adapter
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    written = json.loads((out / "pad_training.json").read_text())
    assert written["settings"]["beta"] == 0.1
    assert written["pairs"] == {"train": 6, "validation": 2}
    assert written["metrics"]["val_accuracy"] == pytest.approx(1.0)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_served_adapter_gives_the_rewards_it_was_trained_with(trained_adapter, tokenizer, make_engine):
    """The adapter loaded by the engine computes the same reward-row logits as
    the trained peft model did in memory."""
    out, _ = trained_adapter
    from peft import PeftModel

    reference_model = PeftModel.from_pretrained(tiny_model(tokenizer), out, adapter_name="short").eval()
    engine = make_engine(model=tiny_model(tokenizer), reward_adapters={"short": out})
    prompt = engine.prompts.encode_with_preference([{"role": "user", "content": "Question number 3?"}], "short answers")
    runner = engine.runners["base"]
    with torch.inference_mode():
        hidden = runner.prefill([NewRow(("x", 1), prompt, "short"), NewRow(("x", 0), prompt)])
        expected = reference_model(torch.tensor([prompt])).logits[0, -1]
        with reference_model.disable_adapter():
            expected_base = reference_model(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(runner.head.full(hidden[:1])[0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runner.head.full(hidden[1:])[0], expected_base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, expected_base)


def test_an_adapter_for_another_base_model_is_refused(trained_adapter, tokenizer, make_engine):
    out, _ = trained_adapter
    with pytest.raises(ModelLoadError, match="different base model"):
        make_engine(model=tiny_model(tokenizer, num_layers=3), reward_adapters={"short": out})


def test_a_bad_adapter_path_is_refused(tmp_path, make_engine, tokenizer):
    with pytest.raises(ModelLoadError, match="not a peft adapter folder"):
        make_engine(model=tiny_model(tokenizer), reward_adapters={"x": tmp_path / "missing"})


def test_resume_continues_from_the_newest_checkpoint(trained_adapter, tokenizer):
    out, _ = trained_adapter
    model = wrap_with_lora(tiny_model(tokenizer), TrainSettings())
    trainer = PersRMTrainer(model, tokenizer, TrainSettings(epochs=2), out, torch.device("cpu"))
    assert trainer.resume()
    assert (trainer.epoch, trainer.step) == (2, 4)


def test_pair_file_errors_name_their_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps(PAIRS[0].to_json()) + "\n"
        + "not json\n"
        + json.dumps({"prompt": "hi", "preference": "p", "chosen": "a", "rejected": "a"}) + "\n"
        + json.dumps({"preference": "p", "chosen": "a", "rejected": "b"}) + "\n"
    )
    with pytest.raises(PairFileError) as error:
        load_pairs(path)
    assert [p.split(":")[0] for p in error.value.problems] == ["line 2", "line 3", "line 4"]


def test_split_keeps_every_pair_once():
    train, validation = split_pairs(list(range(10)), 0.2, seed=1)
    assert sorted(train + validation) == list(range(10)) and len(validation) == 2


SOCK_TOPIC = ("sock", "laundry", "washing", "dryer", "drum")


def _sock_case(checks=({"type": "max_words", "value": 12},)):
    from pad_core.training.synth import SynthCase

    return SynthCase("c1", (("user", "Why do I lose socks in the laundry?"),), "Answer in at most twelve words.",
                     checks, "en", SOCK_TOPIC, "en", SOCK_TOPIC)


def test_synth_judges_chosen_fluent_misses_and_degenerate_answers():
    from pad_core.training.synth import Sample, judge

    case = _sock_case()
    judged = judge(case, [
        Sample("Socks slip into the washing machine drum or stick to towels.", True),  # follows, good: chosen
        Sample("Socks slip into the washing machine drum or stick to towels.", True),  # duplicate: once
        Sample("Answer in at most twelve words: socks vanish in laundry.", True),  # follows, echoes: dropped
        Sample("Socks often get lost in the laundry because they are small and light, so they slip into the "
               "gap between the drum and the door seal, or cling to larger items like sheets.", False),  # fluent miss
        Sample("Verifca que este pasaje es específique para tu especíbel laundry socks misterio grande.", True),
        Sample("", True),
    ], QualityGate())
    assert judged.chosen == ["Socks slip into the washing machine drum or stick to towels."]
    assert len(judged.fluent_misses) == 1 and judged.fluent_misses[0].startswith("Socks often get lost")
    assert len(judged.degenerate) == 1 and "Verifca" in judged.degenerate[0]


def test_synth_pairs_use_fluent_losers_and_a_share_of_degenerate_ones():
    from pad_core.training.synth import Judged, pick_pairs

    case = _sock_case()
    judged = Judged(chosen=[f"good {i}" for i in range(4)], fluent_misses=[f"miss {i}" for i in range(4)],
                    degenerate=[f"junk {i}" for i in range(4)])
    plain = pick_pairs(case, judged, per_case=4)
    assert len(plain) == 4 and all(p.rejected.startswith("miss") for p in plain)
    assert len({p.chosen for p in plain}) == len({p.rejected for p in plain}) == 4
    mixed = pick_pairs(case, judged, per_case=4, degenerate_share=0.5)
    assert sum(p.rejected.startswith("junk") for p in mixed) == 2
    # No loser: no pair.
    assert pick_pairs(case, Judged(chosen=["good"]), per_case=2) == []


GOOD_ANSWER = ("Socks slip into the gap between the drum and the door seal. Static also makes them cling to "
               "sheets, so check the duvet cover.")


@pytest.mark.parametrize("kind", ["repeat_line", "count", "numbered_repeat"])
def test_a_loop_variant_of_a_good_answer_is_a_loop_the_gate_sees(kind):
    from pad_core.evaluation.quality import is_loop
    from pad_core.training.synth import loop_variant

    assert not is_loop(GOOD_ANSWER)
    looped = loop_variant(GOOD_ANSWER, kind)
    assert looped is not None and is_loop(looped) and len(looped) >= len(GOOD_ANSWER)
    assert looped == loop_variant(GOOD_ANSWER, kind)  # pure
    assert GOOD_ANSWER.split()[0] in looped  # it starts as the answer did
    assert loop_variant("", kind) is None and loop_variant("Yes", kind) is None  # no sentence to start from


def test_loop_pairs_add_a_share_of_pairs_with_the_same_winner_and_a_looping_loser():
    from pad_core.evaluation.quality import is_loop
    from pad_core.training.pairs import PreferencePair
    from pad_core.training.synth import add_loop_pairs

    pairs = [PreferencePair((("user", f"q{i}"),), "Be brief.", GOOD_ANSWER, f"A fluent miss number {i}.")
             for i in range(10)]
    out = add_loop_pairs(pairs, 0.3, random.Random(0))
    assert out[:10] == pairs and len(out) == 13
    for pair in out[10:]:
        assert pair.chosen == GOOD_ANSWER and is_loop(pair.rejected) and pair.preference == "Be brief."
    assert add_loop_pairs(pairs, 0.0, random.Random(0)) == pairs


def test_synth_adds_loop_pairs_to_an_earlier_runs_pairs_without_a_model(tmp_path):
    from pad_core.training.pairs import PreferencePair, load_pairs, write_pairs
    from pad_core.training.synth import main

    given = tmp_path / "pairs.jsonl"
    write_pairs(given, [PreferencePair((("user", f"q{i}"),), "Be brief.", GOOD_ANSWER, "A miss.") for i in range(4)])
    out = tmp_path / "out.jsonl"
    assert main(["--pairs-in", str(given), "--loop-share", "0.5", "--out", str(out)]) == 0
    assert len(load_pairs(out)) == 6
    with pytest.raises(SystemExit):
        main(["--pairs-in", str(given), "--loop-share", "1.5", "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["--out", str(out)])  # no cases and no --pairs-in


def test_synth_end_to_end_on_the_tiny_model_every_pair_is_a_real_winner_and_loser(make_engine):
    from pad_core.evaluation.checks import satisfied
    from pad_core.training.synth import synthesize

    case = _sock_case()
    pairs, stats = synthesize(make_engine(), [case], samples=6, temperature=1.0, max_tokens=6, per_case=3,
                              plain_samples=2)
    assert set(stats) >= {"chosen", "fluent_misses", "degenerate", "cases_with_pairs"}
    gate = QualityGate()
    for pair in pairs:  # random weights rarely give one; whatever it gives must hold
        assert satisfied(pair.chosen, list(case.checks)) and not satisfied(pair.rejected, list(case.checks))
        assert gate.check(pair.chosen, language="en", topic=SOCK_TOPIC, preference=case.preference).passed
