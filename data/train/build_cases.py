"""Builds `synth_cases.jsonl`: the prompts `pad data synth` samples training
pairs from (issue 6's PersRM experiment).

Every question here is new: none appears in `data/eval/dev.jsonl`, so the
whole eval set stays held out. Each question is crossed with every TRAINED
preference type, with the type's checks copied from the eval set and a
phrasing of our own (not the eval set's). The three UNSEEN types get no
training cases at all: they measure generalisation to new preferences.

    python data/train/build_cases.py   # rewrites synth_cases.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL_SET = HERE.parent / "eval" / "dev.jsonl"

UNSEEN_TYPES = ("spanish", "avoid_word", "casual_tone")

QUESTIONS = [
    "How do I keep my kitchen clean?",
    "What is a good way to learn to draw?",
    "How do I prepare for a long hike?",
    "Why do we have seasons?",
    "How can I drink more water during the day?",
    "What should I pack for a beach holiday?",
    "How do I fix a squeaky door?",
    "What makes a good password?",
    "How do I care for a new pair of leather shoes?",
    "Why do onions make people cry?",
    "How can I save time in the morning?",
    "What is a good first instrument to learn?",
    "How do I organise my wardrobe?",
    "What should I know before adopting a rabbit?",
    "How do volcanoes form?",
    "How can I be a better listener?",
    "What is a simple dessert I can make?",
    "How do I start journaling?",
    "Why is the ocean salty?",
    "How do I choose a good watermelon?",
    "What are good exercises to do at home?",
    "How can I reduce my screen time?",
    "How do I remove a coffee stain from a shirt?",
    "What is the best way to memorise a speech?",
    "How do airplanes stay in the air?",
    "How can I make my bike ride more comfortable?",
    "What should I do when I feel bored?",
    "How do I keep cut flowers fresh?",
    "How can I get better at chess?",
    "What is a healthy snack for the afternoon?",
    "How do I pack a suitcase efficiently?",
    "Why do birds migrate?",
    "How can I make a small garden on a balcony?",
    "What is a good routine before bed?",
    "How do I write a thank-you note?",
    "How can I stop losing my keys?",
    "What is a good way to spend a rainy afternoon alone?",
    "How do I cook rice properly?",
    "Why do we yawn?",
    "How can I improve my handwriting?",
    "What should I do to prepare for an exam?",
    "How do I clean my bathroom quickly?",
    "How can I make friends at a new gym?",
    "What is a fun thing to do in a big city?",
    "How do I keep my phone battery healthy?",
    "Why does bread go stale?",
    "How can I feel less nervous before a presentation?",
    "What should I cook for a dinner party?",
]

# New phrasings (the eval set's own are not reused).
PHRASINGS = {
    "brevity": [
        "Short answers only, please: no more than a couple of sentences.",
        "Be concise. I don't want long explanations.",
        "Please answer in as few words as you can.",
    ],
    "bullets": [
        "Put your answer in bullet points.",
        "I read lists more easily than paragraphs: use bullets.",
        "Reply with a short bulleted list.",
    ],
    "numbered_steps": [
        "Break your answer into numbered steps.",
        "Use a numbered list (1., 2., 3.) for your answer.",
        "I like answers organised as step 1, step 2, step 3.",
    ],
    "humour": [
        "Keep it light and make me laugh with a joke.",
        "I enjoy a funny answer with a pun or two.",
        "Add some humour to your reply, please.",
    ],
    "question_ending": [
        "End with a question back to me, please.",
        "Close every reply by asking me something.",
        "Always finish with a follow-up question.",
    ],
    "french": [
        "Reply in French, please.",
        "I only read French: answer in French.",
        "Answer me in the French language.",
    ],
    "emoji": [
        "Use emoji in your reply, please!",
        "Sprinkle a few emoji into your answer.",
        "I like answers decorated with emoji.",
    ],
}


def checks_by_type() -> dict[str, list[dict]]:
    checks: dict[str, list[dict]] = {}
    for line in EVAL_SET.read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        checks.setdefault(case["preference_type"], case["checks"])
    return checks


def build() -> list[dict]:
    checks = checks_by_type()
    assert not set(PHRASINGS) & set(UNSEEN_TYPES)
    cases = []
    for q_index, question in enumerate(QUESTIONS):
        for preference_type, phrasings in PHRASINGS.items():
            cases.append(
                {
                    "id": f"train-{preference_type}-{q_index + 1:02d}",
                    "prompt": question,
                    "preference": phrasings[q_index % len(phrasings)],
                    "preference_type": preference_type,
                    "checks": checks[preference_type],
                }
            )
    return cases


def main() -> None:
    eval_prompts = {
        (json.loads(line).get("prompt") or json.loads(line)["messages"][-1]["content"]).lower()
        for line in EVAL_SET.read_text(encoding="utf-8").splitlines()
    }
    overlap = [q for q in QUESTIONS if q.lower() in eval_prompts]
    if overlap:
        raise SystemExit(f"questions also in the eval set: {overlap}")
    cases = build()
    with (HERE / "synth_cases.jsonl").open("w", encoding="utf-8") as out:
        for case in cases:
            out.write(json.dumps(case, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases, {len(QUESTIONS)} questions x {len(PHRASINGS)} trained types")


if __name__ == "__main__":
    main()
